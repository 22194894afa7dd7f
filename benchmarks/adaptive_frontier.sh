#!/usr/bin/env bash
# Adaptive depth against fixed depth: bpb vs routed blocks per token.
#
#   bash benchmarks/adaptive_frontier.sh [OUT_DIR]
#   SEED=2 RUNS="fixed_c1 fixed_c2 fixed_c3 threshold_t25 threshold_t45 threshold_t65" \
#     RESULTS=benchmarks/results/adaptive_frontier/seed2 bash benchmarks/adaptive_frontier.sh runs/adapt_s2
#   EXTRA="--set n_layers=1 ..." bash benchmarks/adaptive_frontier.sh runs/adapt_l1   # other settings, every run
#   CPU=1 BENCH=0 RUNS="..." bash benchmarks/adaptive_frontier.sh ...   # train only (a second core's share)
#   EVAL_BYTES=262144 PASSES=1 ... # bench on a fixed validation prefix, one timed pass per mode
#   DEPTH_TEXT="$(head -c 800 data/stdlib/val.txt)" ...  # the depth map's held-out text
#
# configs/adaptive.toml (2 layers, C = 3, threshold rule) trained at three compute targets (25%,
# 45%, 65% of the 7 blocks), models of the same config trained at fixed C = 1, 2, 3 (1, 3, 7
# blocks), and the pilots of the rule's settings at 45% (random-depth exploration 0.25 and 0.05,
# untied routers with and without it); then
# `fractalmoe bench adaptive` over all of them: every depth of every model, the fixed-depth
# frontier (lower envelope, linear between its points) and each adaptive model's margin below it.
# Each run is one single-threaded process pinned to CPU $CPU; finished runs are skipped.
set -euo pipefail
OUT=${1:-runs/adapt}
RESULTS=${RESULTS:-benchmarks/results/adaptive_frontier}
F=${F:-.venv/bin/fractalmoe}
CPU=${CPU:-0}
SEED_SET=${SEED:+--set seed=$SEED}  # default: the config's seed
read -r -a EXTRA <<< "${EXTRA:-}"
mkdir -p "$OUT" "$RESULTS"
train() {
  local name=$1; shift
  [ -e "$OUT/$name" ] && return
  [ -n "${RUNS:-}" ] && [[ " $RUNS " != *" $name "* ]] && return
  OMP_NUM_THREADS=1 /usr/bin/time -v taskset -c "$CPU" $F train --config configs/adaptive.toml $SEED_SET "${EXTRA[@]}" "$@" \
    --out "$OUT/$name" --quiet > "$OUT/$name.log" 2>&1
}
FIXED="--set adaptive_depth=false --set depth_explore=0 --set depth_target=0"
train fixed_c1 $FIXED --set fractal_depth=1
train fixed_c2 $FIXED --set fractal_depth=2
train fixed_c3 $FIXED
for t in 25 45 65; do train "threshold_t$t" --set depth_target=0.$t; done
train threshold_t45_explore0.25 --set depth_explore=0.25
train threshold_t45_explore0.05 --set depth_explore=0.05
train threshold_t45_untied --set tie_blocks=false
train threshold_t45_untied_explore0.05 --set tie_blocks=false --set depth_explore=0.05
[ "${BENCH:-1}" = 0 ] && exit 0
if [ -n "${RUNS:-}" ]; then read -r -a RUNS <<< "$RUNS"; else
RUNS=(fixed_c1 fixed_c2 fixed_c3 threshold_t25 threshold_t45 threshold_t65 threshold_t45_explore0.25
      threshold_t45_explore0.05 threshold_t45_untied threshold_t45_untied_explore0.05); fi
OMP_NUM_THREADS=1 taskset -c "$CPU" $F bench adaptive $(printf -- "--ckpt $OUT/%s " "${RUNS[@]}") \
  ${EVAL_BYTES:+--eval-bytes $EVAL_BYTES} --passes "${PASSES:-3}" --plot "$RESULTS/frontier.png" --json \
  > "$RESULTS/bench.jsonl"
for r in "${RUNS[@]}"; do
  mkdir -p "$RESULTS/$r"; cp "$OUT/$r/config.json" "$OUT/$r/metrics.jsonl" "$RESULTS/$r/"
  grep -h "Elapsed" "$OUT/$r.log" > "$RESULTS/$r/time.txt" || true
done
[ -d "$OUT/threshold_t45" ] && $F plot "$OUT/threshold_t45" --out "$RESULTS/threshold_t45_plots" --depth-map \
  --text "${DEPTH_TEXT:-$(tail -c 1000 src/fractalmoe/tinyshakespeare.txt | head -c 800)}"
