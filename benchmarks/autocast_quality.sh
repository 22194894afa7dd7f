#!/usr/bin/env bash
# Does bfloat16 autocast (`train.autocast = "bfloat16"`) train the default model as well as
# float32? The default recipe at the comparison length (1,200 steps of 16 x 128 bytes, bundled
# corpus), float32 and bfloat16 autocast side by side (one core and one thread each: quality is
# what is compared, not speed, which a CPU without bfloat16 units would not show anyway), then
# both scored by `fractalmoe eval` on the whole validation split.
#   SEED=2 bash benchmarks/autocast_quality.sh [OUT] [RESULTS]   (then SEED=3)
set -euo pipefail
cd "$(dirname "$0")/.."
F=.venv/bin/fractalmoe
OUT=${1:-runs/autocast}
RESULTS=${2:-benchmarks/results/autocast}
SEED=${SEED:-2}
mkdir -p "$OUT" "$RESULTS"
export OMP_NUM_THREADS=1
taskset -c 0 $F train --seed "$SEED" --max-steps 1200 --quiet --out "$OUT/float32_s$SEED" &
taskset -c 1 $F train --seed "$SEED" --max-steps 1200 --quiet --set autocast=bfloat16 --out "$OUT/bfloat16_s$SEED" &
wait
for run in float32 bfloat16; do
  $F eval --ckpt "$OUT/${run}_s$SEED" --json \
    | python3 -c "import json, sys; r = json.load(sys.stdin); r.update(run='$run', seed=$SEED); print(json.dumps(r))" \
    >> "$RESULTS/eval.jsonl"
  cp "$OUT/${run}_s$SEED/metrics.jsonl" "$RESULTS/${run}_s${SEED}_metrics.jsonl"
done
