#!/usr/bin/env bash
# Tokens/s and per-rank peak RSS for 1 and 2 processes at 262,144 experts per FHME layer.
set -u
F=.venv/bin/fractalmoe
R=benchmarks/results
ARGS="--set num_experts=262144 --max-steps 30 --set eval_every=1000 --set sample_bytes=0 --quiet"
rm -rf runs/dist1 runs/dist2
/usr/bin/time -v $F train --out runs/dist1 $ARGS > $R/dist_p1.log 2>&1
.venv/bin/torchrun --standalone --nproc_per_node=2 -m fractalmoe train --out runs/dist2 $ARGS > $R/dist_p2.log 2>&1
