#!/usr/bin/env bash
# Tokens/s and per-rank peak RSS of 1 and 2 processes at 262,144 experts per FHME layer.
# DEVICE=cuda runs each rank on cuda:LOCAL_RANK (needs 2 GPUs); the default is gloo on CPU.
# Per-rank anonymous memory of sharded training and resume at 4M experts: sharded_rss.sh.
set -u
cd "$(dirname "$0")/.."
F=.venv/bin/fractalmoe
R=benchmarks/results
DEVICE=${DEVICE:-cpu}
ARGS="--device $DEVICE --set num_experts=262144 --max-steps 30 --set eval_every=1000 --set sample_bytes=0 --quiet"
mkdir -p $R
rm -rf runs/dist1 runs/dist2
/usr/bin/time -v $F train --out runs/dist1 $ARGS > $R/dist_p1.log 2>&1
/usr/bin/time -v .venv/bin/torchrun --standalone --nproc_per_node=2 -m fractalmoe train --out runs/dist2 $ARGS \
    > $R/dist_p2.log 2>&1
