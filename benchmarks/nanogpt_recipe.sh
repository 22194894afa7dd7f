#!/usr/bin/env bash
# The default `fractalmoe train` against the strongest small dense recipe people run on a CPU,
# nanoGPT's Shakespeare recipe (4 layers x 128, 4 heads, context 64, batch 12, AdamW lr 1e-3,
# warmup 100, cosine to 1e-4, weight decay 0.1, beta2 0.99, clip 1.0, no dropout), rebuilt with
# this project's dense model (its GELU MLP of 4 x 128 becomes a SwiGLU of equal parameters,
# hidden 341; no convolution on the FFN's input, as nanoGPT has none). The recipe gets the
# default run's whole wall-clock: a 100-step probe times its steps, its cosine schedule is
# stretched to 1.1x the steps that fit and --time-budget ends it at the default's wall-clock,
# near the end of its cosine (a machine's speed drifts by a few percent between the probe and
# the run: the seeds' races before this margin left the recipe 5-6% of its time). As nanoGPT's
# Shakespeare config does (it saves only improving checkpoints: the small corpus is overfitted),
# the recipe keeps the checkpoint of its lowest periodic validation loss (`keep_best`, every 250
# steps) and is scored with it. One after the other on an idle machine; both scored by
# `fractalmoe eval` on the whole validation split.
#   bash benchmarks/nanogpt_recipe.sh [OUT]
#   CPU=0 bash benchmarks/nanogpt_recipe.sh [OUT]   # both runs pinned to core 0, one OpenMP thread
#   SEED=2 bash benchmarks/nanogpt_recipe.sh [OUT]  # both runs at another seed (initialisation, data order)
#   WALL=1332 bash benchmarks/nanogpt_recipe.sh OUT  # the recipe alone, OUT/default trained earlier in WALL s
#   STEPS=1200 bash benchmarks/nanogpt_recipe.sh [OUT]  # the default run at another length (1,200: the earlier default)
#   LAST=1 bash benchmarks/nanogpt_recipe.sh [OUT]  # the recipe scored at its last step (the races before keep_best)
set -euo pipefail
cd "$(dirname "$0")/.."
F=.venv/bin/fractalmoe
if [ -n "${CPU:-}" ]; then
  export OMP_NUM_THREADS=1
  F="taskset -c $CPU $F"
fi
OUT=${1:-runs/nanogpt_vs_default}
mkdir -p "$OUT"
SEEDED=()
if [ -n "${SEED:-}" ]; then SEEDED=(--seed "$SEED"); fi
LENGTH=()
if [ -n "${STEPS:-}" ]; then LENGTH=(--max-steps "$STEPS"); fi
RECIPE=("${SEEDED[@]}" --set ffn=dense --set ffn_hidden=341 --set ffn_conv=0 --set seq_len=64 --set batch_size=12 --set lr=1e-3
        --set warmup_steps=100 --set min_lr_frac=0.1 --set weight_decay=0.1 --set beta2=0.99
        --set grad_clip=1.0 --set dropout=0.0 --set eval_every=250 --set eval_batches=16 --quiet)
BEST=(--set keep_best=true)  # the recipe's own checkpoint choice, as nanoGPT's always_save_checkpoint = False
SCORED=(--best)
if [ -n "${LAST:-}" ]; then BEST=(); SCORED=(); fi

if [ -n "${WALL:-}" ]; then
  wall=$WALL
else
  t0=$(date +%s.%N)
  $F train --out "$OUT/default" --quiet "${SEEDED[@]}" "${LENGTH[@]}"
  wall=$(python3 -c "import time; print(time.time() - $t0)")
fi

$F train --out "$OUT/probe" "${RECIPE[@]}" --max-steps 100 --set sample_bytes=0
step_s=$(python3 -c "
import json; rows = [json.loads(l) for l in open('$OUT/probe/metrics.jsonl')]
print(max(r['elapsed_s'] for r in rows if r.get('elapsed_s')) / 100)")
steps=$(python3 -c "print(int(1.1 * $wall / $step_s))")
echo "default: ${wall}s; recipe: ${step_s}s/step -> schedule of $steps steps, stopped at the same wall-clock"

$F train --out "$OUT/nanogpt" "${RECIPE[@]}" "${BEST[@]}" --max-steps "$steps" --time-budget "$(python3 -c "print($wall / 60)")"
$F eval --ckpt "$OUT/default" --json > "$OUT/default.eval.json"
$F eval --ckpt "$OUT/nanogpt" "${SCORED[@]}" --json > "$OUT/nanogpt.eval.json"
for run in default nanogpt; do echo "$run: $(cat "$OUT/$run.eval.json")"; done
