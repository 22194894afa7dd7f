#!/usr/bin/env bash
# Per-rank peak anonymous RSS of sharded training and resume, P=1 vs P=2 (gloo on CPU), at
# 4,194,304 experts per layer, width 128, 2 layers, fp32, row-wise Adagrad. Refuses to start on a
# busy machine (another PyTorch process, load average > 0.5); extra arguments go to the script
# (e.g. --force, --threads 4, --experts 65536 --steps 2 for a smoke test).
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p benchmarks/results
$PY benchmarks/sharded_rss.py --out benchmarks/results/sharded_rss.jsonl "$@"
