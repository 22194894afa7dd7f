#!/usr/bin/env bash
# One routed layer (width 256, 8 heads x top-16, 2048 tokens, fp32) at 16K / 262K / 1M experts,
# every implementation, 3 alternated fresh-process repeats each; medians, roofline fractions and
# the headline same-run ratios.
#
#   bash benchmarks/bench_layer.sh            # from the repository root, after
#                                             # .venv/bin/pip install -e '.[bench]'
#
# Writes benchmarks/results/layer.jsonl (one JSON line per implementation and N) and
# benchmarks/results/layer_summary.txt (measured peak and bandwidth, progress, headline ratios).
# Needs an otherwise idle machine: the benchmark waits up to 10 minutes for the load average to
# fall below 0.5 and for other PyTorch processes to finish, then refuses (exit 2). Peak memory is
# about 12 GB (dense AdamW at 1M experts).
set -euo pipefail
F=.venv/bin/fractalmoe
R=benchmarks/results
mkdir -p $R
$F bench layer --experts 16384,262144,1048576 \
    --impl fractalmoe,fractalmoe-lazy-adam,peer-pytorch-sparse,peer-pytorch,peer-dense,pkm-pytorch \
    --repeats 3 --wait-idle 600 --json > $R/layer.jsonl.tmp 2> >(tee $R/layer_summary.txt >&2)
mv $R/layer.jsonl.tmp $R/layer.jsonl
