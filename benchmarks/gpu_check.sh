#!/usr/bin/env bash
# Every CUDA path in one pass, at most 8 minutes on one GPU (more GPUs add a torchrun check); the
# steps that do not depend on each other run side by side.
#
#   benchmarks/gpu_check.sh            # PYTHON=... to pick the interpreter (needs CUDA PyTorch)
#
#  1 env        nvidia-smi -L, torch / CUDA versions
#  2 pytest     the CUDA-marked tests (pytest -m cuda; 4 workers where pytest-xdist is installed)
#  3 train      fractalmoe train --device cuda, 50 steps, evaluation every 25, adaptive depth off,
#               every training step under torch.cuda.set_sync_debug_mode("warn"): the log lists
#               each host-sync site once (FRACTALMOE_SYNC_DEBUG=warn)
#  4 sync       side by side: 5 more steps with FRACTALMOE_SYNC_DEBUG=error, passing only if a
#               step has no host sync beyond the trainer's one deliberate read-back (loss +
#               finiteness); the same for 5 steps with deferred table gradients, 5 with row SGD,
#               5 with the one-kernel lazy-Adam update (Triton), 5 with bfloat16 tables rounded
#               stochastically, 5 with three-part keys routed once, 5 under bfloat16 autocast,
#               5 of the MoE baseline and 5 with float16 tables
#  5 eval, generate on cuda from that run; eval on cpu of the same checkpoint (side by side)
#  6 profile    benchmarks/gpu_profile.py: device operations, device and host time per step, and the
#               ops that take the device's time, per impl
#  7 model      fractalmoe bench model --device cuda: the default model at 16,384 and 1,048,576
#               experts per layer, 16 x 128 bytes a step, in float32 (and at 1,048,576 under
#               bfloat16 autocast)
#  8 bench      fractalmoe bench layer --device cuda at 1,048,576 experts: our layer with lazy Adam
#               (the default rule) in one kernel, PEER-pytorch with SparseAdam where it is installed
#               (one JSON row per impl; the profile adds row-wise Adagrad)
#  9 torchrun   with >= 2 GPUs: 2-rank training (cuda:LOCAL_RANK, cpu:gloo,cuda:nccl), resume of
#               the 1-GPU run on 2 ranks (each reads its own rows), then eval of the 2-rank run
#
# Side by side, the GPU-bound training steps take 2 CPU threads each (OMP_NUM_THREADS=2).
# The whole pass keeps to GPU_CHECK_BUDGET seconds (default 480): each step's limit is cut to what
# is left, and a step with under 20 s left is skipped. Output: $OUT (default
# benchmarks/results/gpu_check) gets summary.txt (one PASS/FAIL/SKIPPED line per step),
# logs.tgz (every step's log, refreshed after each step, so a pass cut short keeps what ran) and
# profile.jsonl; the failed steps' last lines are printed at the end.
# On a machine without internet, wheels in .whl/ (pip download --no-deps -d .whl ...) are
# installed into /tmp/site first; PYTHON picks the interpreter (default python3, with CUDA PyTorch).
# Timings from this script are smoke numbers (a busy machine, --force), not results.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: installing .whl/ failed" >&2; exit 3; }
fi
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-benchmarks/results/gpu_check}
BUDGET=${GPU_CHECK_BUDGET:-480}
RUNS=${GPU_CHECK_RUNS:-runs/gpu_check}
LOGS=$RUNS/logs
rm -rf "$RUNS"
mkdir -p "$OUT" "$LOGS"
: > "$OUT/summary.txt"
T0=$(date +%s)

step() {  # step NAME TIMEOUT_S CMD...: run within the budget, log, record PASS/FAIL/SKIPPED
    local name=$1 limit=$2
    shift 2
    local t=$(date +%s)
    local left=$(( BUDGET - (t - T0) ))
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "$name: SKIPPED (budget of ${BUDGET}s spent)" | tee -a "$OUT/summary.txt"
        return
    fi
    echo "== $name: $*" | tee "$LOGS/$name.log"
    timeout --kill-after=10 "$limit" "$@" >> "$LOGS/$name.log" 2>&1
    local rc=$?
    local verdict=PASS
    [ $rc -eq 0 ] || verdict="FAIL (exit $rc$( { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && echo ", timed out after ${limit}s"))"
    echo "$name: $verdict in $(( $(date +%s) - t ))s" | tee -a "$OUT/summary.txt"
    tar czf "$OUT/.logs-$name.tgz" -C "$LOGS" . && mv -f "$OUT/.logs-$name.tgz" "$OUT/logs.tgz"
}

if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: $PY has no CUDA PyTorch or sees no GPU; set PYTHON=..." | tee "$OUT/summary.txt"
    exit 2
fi
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
F="$PY -m fractalmoe"
SMALL="--set adaptive_depth=false --set sample_bytes=64 --set eval_batches=4"

step env 60 bash -c "nvidia-smi -L; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'"

XDIST=""
if $PY -c "import xdist" 2>/dev/null; then XDIST="-n 4"; fi
step pytest 240 $PY -m pytest -m cuda -q -p no:cacheprovider $XDIST tests/

step train 180 env FRACTALMOE_SYNC_DEBUG=warn PYTHONWARNINGS=default \
    $F train --device cuda --out "$RUNS/one" --max-steps 50 --save-every 25 --quiet \
    --set eval_every=25 $SMALL
grep "called a synchronizing" "$LOGS/train.log" | sort | uniq -c | sort -rn > "$LOGS/sync_sites.txt" || true
echo "host-sync warnings in training steps: $(wc -l < "$LOGS/sync_sites.txt") distinct lines (sync_sites.txt in logs.tgz)" \
    | tee -a "$OUT/summary.txt"

step sync_error 120 env FRACTALMOE_SYNC_DEBUG=error OMP_NUM_THREADS=2 \
    $F train --device cuda --resume "$RUNS/one" --max-steps 55 --quiet --set eval_every=1000 $SMALL &
step sync_error_deferred 120 env FRACTALMOE_SYNC_DEBUG=error OMP_NUM_THREADS=2 \
    $F train --device cuda --out "$RUNS/deferred" --max-steps 5 --quiet --set eval_every=1000 \
    --set expert_optim=rowwise_adagrad --set expert_lr=0.05 --set deferred_table_grads=true $SMALL &
step sync_error_row_sgd 120 env FRACTALMOE_SYNC_DEBUG=error OMP_NUM_THREADS=2 \
    $F train --device cuda --out "$RUNS/row_sgd" --max-steps 5 --quiet --set eval_every=1000 \
    --set expert_optim=row_sgd --set expert_lr=100 $SMALL &
step sync_error_fused 180 env FRACTALMOE_SYNC_DEBUG=error OMP_NUM_THREADS=2 \
    $F train --device cuda --out "$RUNS/fused" --max-steps 5 --quiet --set eval_every=1000 \
    --set fused_row_update=true --set deferred_table_grads=true $SMALL &
step sync_error_bf16_sr 120 env FRACTALMOE_SYNC_DEBUG=error OMP_NUM_THREADS=2 \
    $F train --device cuda --out "$RUNS/bf16_sr" --max-steps 5 --quiet --set eval_every=1000 \
    --set expert_dtype=bfloat16 --set stochastic_rounding=true $SMALL &
step sync_error_three_part 120 env FRACTALMOE_SYNC_DEBUG=error OMP_NUM_THREADS=2 \
    $F train --device cuda --out "$RUNS/three_part" --max-steps 5 --quiet --set eval_every=1000 \
    --set key_parts=3 --set key_dim=24 --set route_once=true $SMALL &
step sync_error_autocast 120 env FRACTALMOE_SYNC_DEBUG=error OMP_NUM_THREADS=2 \
    $F train --device cuda --out "$RUNS/autocast" --max-steps 5 --quiet --set eval_every=1000 \
    --set autocast=bfloat16 $SMALL &
step sync_error_moe 120 env FRACTALMOE_SYNC_DEBUG=error OMP_NUM_THREADS=1 \
    $F train --device cuda --out "$RUNS/moe" --max-steps 5 --quiet --set eval_every=1000 \
    --set ffn=moe $SMALL &
step sync_error_fp16 120 env FRACTALMOE_SYNC_DEBUG=error OMP_NUM_THREADS=1 \
    $F train --device cuda --out "$RUNS/fp16" --max-steps 5 --quiet --set eval_every=1000 \
    --set expert_dtype=float16 $SMALL &
wait

step eval_cuda 60 $F eval --ckpt "$RUNS/one" --device cuda --json &
step eval_cpu 120 $F eval --ckpt "$RUNS/one" --device cpu --json &
step generate 60 $F generate --ckpt "$RUNS/one" --device cuda --max-new-tokens 200 --prompt "ROMEO:" &
wait

IMPLS=fractalmoe-lazy-adam-fused  # the default rule, one-kernel
if $PY -c "import PEER_pytorch" 2>/dev/null; then IMPLS=$IMPLS,peer-pytorch-sparse; fi
step profile 120 $PY benchmarks/gpu_profile.py --impl fractalmoe,$IMPLS --out "$OUT/profile.jsonl"
step bench_model 120 $F bench model --device cuda --experts 16384,1048576 --batch-size 16 --force --json
step bench_model_bf16 60 $F bench model --device cuda --experts 1048576 --batch-size 16 --force --json \
    --set autocast=bfloat16
step bench_layer 240 $F bench layer --device cuda --experts 1048576 --impl $IMPLS --steps 5 --repeats 3 --force --json

if [ "$NGPU" -ge 2 ]; then
    TR="$PY -m torch.distributed.run --standalone --nproc_per_node=2 -m fractalmoe"
    step torchrun_train 180 $TR train --device cuda --out "$RUNS/two" --max-steps 20 --quiet \
        --set eval_every=10 --set batch_size=16 $SMALL
    cp -r "$RUNS/one" "$RUNS/one_on_two"
    step torchrun_resume_p1_ckpt 180 $TR train --device cuda --resume "$RUNS/one_on_two" \
        --max-steps 60 --quiet --set eval_every=1000 $SMALL
    step eval_two_rank_ckpt 60 $F eval --ckpt "$RUNS/two" --device cuda --json
else
    echo "torchrun: SKIPPED ($NGPU GPU)" | tee -a "$OUT/summary.txt"
fi

for log in "$LOGS"/*.log; do  # what went wrong, where the returned output shows it
    name=$(basename "$log" .log)
    if grep -q "^$name: FAIL" "$OUT/summary.txt"; then echo "--- $name (last lines)"; tail -n 25 "$log"; fi
done
FAILED=$(grep -c ": FAIL" "$OUT/summary.txt")
echo "total: $(( $(date +%s) - T0 ))s, $([ "$FAILED" -eq 0 ] && echo 'all passed' || echo "$FAILED FAILED")" \
    | tee -a "$OUT/summary.txt"
[ "$FAILED" -eq 0 ]
