#!/usr/bin/env bash
# Does adaptive training save time to a given quality? The full-depth C = 3 model of
# configs/adaptive.toml (1,200 steps) and the threshold rule at 45% of its 7 blocks (STEPS steps,
# default 1,500: its steps take about 0.53x as long, so ~0.7x the full run's wall-clock), on the
# standard-library corpus, one after the other, each alone on the machine (one thread, pinned;
# refuses to start while another PyTorch process runs or the load average stays above 0.5).
# Prints, as JSON, when the adaptive run's periodic validation bpb first reaches the full-depth
# run's final one, as a fraction of the full-depth run's training wall-clock, and both runs'
# forward FLOPs per token at the depths their routers chose (training: ~3x, forward + backward).
#   SEED=2 bash benchmarks/adaptive_time_to_quality.sh [OUT] [RESULTS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/adapt_time}
RESULTS=${2:-benchmarks/results/adaptive_time_to_quality}
SEED=${SEED:-2}
STEPS=${STEPS:-1500}
DATA=${DATA:-data/stdlib}
.venv/bin/python -c "
import sys
from fractalmoe.bench_hygiene import wait_until_idle
reason = wait_until_idle(180)  # a previous step leaves the load average high for a minute or two
sys.exit(reason and f'this measurement needs the machine to itself: {reason}')"
# Each run by adaptive_frontier.sh (its flags for fixed_c3 and threshold_t45), pinned to CPU 0.
train() {  # frontier run name, steps, results name
  local out="$OUT/s$SEED/steps$2" res="$RESULTS/seed$SEED/$3"
  CPU=0 SEED=$SEED BENCH=0 RUNS=$1 EXTRA="--data $DATA --max-steps $2" bash benchmarks/adaptive_frontier.sh "$out"
  mkdir -p "$res"
  cp "$out/$1/config.json" "$out/$1/metrics.jsonl" "$res/"
  grep -h "Elapsed" "$out/$1.log" > "$res/time.txt" || true
}
train fixed_c3 1200 "full_c3_s$SEED"
train threshold_t45 "$STEPS" "threshold_t45_steps${STEPS}_s$SEED"
python3 - "$RESULTS/seed$SEED/full_c3_s$SEED" "$RESULTS/seed$SEED/threshold_t45_steps${STEPS}_s$SEED" <<'EOF' \
  | tee "$RESULTS/seed$SEED/time_to_quality.json"
import json, sys
def evals(run):
    rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    return [r for r in rows if r.get("val_bpb") is not None]
full, adaptive = evals(sys.argv[1]), evals(sys.argv[2])
target, full_s = full[-1]["val_bpb"], full[-1]["elapsed_s"]
reached = next((r for r in adaptive if r["val_bpb"] <= target), None)
print(json.dumps({
    "full_final_bpb": target, "full_train_s": full_s, "full_flops_per_token": full[-1]["flops_per_token"],
    "adaptive_final_bpb": adaptive[-1]["val_bpb"], "adaptive_train_s": adaptive[-1]["elapsed_s"],
    "adaptive_flops_per_token": adaptive[-1]["flops_per_token"],
    "adaptive_blocks_per_token": adaptive[-1]["blocks_per_token"],
    "reached_at_step": reached and reached["step"], "reached_at_s": reached and reached["elapsed_s"],
    "reached_time_frac": reached and reached["elapsed_s"] / full_s}))
EOF
