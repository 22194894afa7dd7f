#!/usr/bin/env bash
# Every committed result under benchmarks/results, with the command that produced it.
# Run from the repository root after `make install`; on 2 CPU cores the whole script takes ~1.5 h.
set -euo pipefail
F=.venv/bin/fractalmoe
R=benchmarks/results
mkdir -p $R

# Issue: million-expert scaling (one layer, dim 256, 8 heads x top-16, 2048 tokens, fp32)
$F bench layer --experts 16384,262144,1048576 --impl fractalmoe,peer-dense,peer-pytorch,pkm-pytorch --json > $R/layer.jsonl
$F bench layer --experts 4194304 --impl fractalmoe --json > $R/layer_4m.jsonl
$F bench model --experts 16384,262144,1048576 --json > $R/model.jsonl
$F train --config configs/million.toml --out runs/million --quiet
cp runs/million/metrics.jsonl $R/million_metrics.jsonl

# Issue: adaptive depth (C = 3): the adaptive model, the same config at full depth, bench adaptive
$F train --config configs/adaptive.toml --out runs/adaptive --quiet
$F train --config configs/adaptive.toml --set adaptive_depth=false --set depth_explore=0 --out runs/adaptive_full --quiet
$F bench adaptive --ckpt runs/adaptive --json > $R/adaptive.jsonl
$F eval --ckpt runs/adaptive_full --json > $R/adaptive_full_eval.json
$F plot runs/adaptive --out $R/adaptive_plots --depth-map --text "$(head -c 300 src/fractalmoe/tinyshakespeare.txt)"

# Issue: comparisons at equal active FLOPs (2 seeds) and the scaling study
$F compare --models fhme,dense,moe,pkm,peer --max-steps 300 --seeds 1,2 --out runs/compare --json > $R/compare.jsonl
cp runs/compare/table.md runs/compare/*.png $R/ 2>/dev/null || true
$F compare --models peer --sweep num_experts=1024,4096,16384,65536,262144 --max-steps 300 --out runs/scaling_experts --json > $R/scaling_experts.jsonl
$F compare --models fhme --sweep fractal_depth=1,2,3,4 --max-steps 300 --out runs/scaling_depth --json > $R/scaling_depth.jsonl
