"""What routing balance costs per training step at a million experts: one FHME layer (PEER
neurons, N = 1,048,576, width 256, 8 heads x top-16, 2,048 tokens, row-wise Adagrad), a whole
step each: forward, backward, optimizer step and the statistics fold. Settings alternate
A/B/C/A/B/C in one process; medians of the repeats. On a busy machine (another PyTorch process,
load average above 0.5: ``bench_hygiene``) it waits up to 3 minutes, then refuses (status 2)
unless ``--force``.

    python benchmarks/balance_cost.py [--repeats 7] [--experts 1048576] [--force]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from fractalmoe import FHME, Balancing, collect, fold_statistics
from fractalmoe.bench_hygiene import wait_until_idle
from fractalmoe.optim import ModelOptimizer

SETTINGS = {"off": Balancing(), "balance_loss=0.01": Balancing(loss=0.01),
            "balance_rate=0.01": Balancing(rate=0.01)}


def step_seconds(layer: FHME, opt: ModelOptimizer, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    opt.zero_grad()
    with collect(layer) as stats:
        y = layer(x)
        (y.square().mean() + stats.aux_loss()).backward()
    opt.step()
    fold_statistics(layer, stats)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=1_048_576)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--force", action="store_true", help="run even on a busy machine")
    args = p.parse_args()
    reason = None if args.force else wait_until_idle(max_wait_s=180)
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        raise SystemExit(2)
    torch.manual_seed(0)
    x = torch.randn(2048, 256)
    runs = {}
    for name, balancing in SETTINGS.items():
        layer = FHME(256, args.experts, depth=1, heads=8, topk=16, key_dim=128, block="neuron",
                     balancing=balancing).train()
        runs[name] = (layer, ModelOptimizer(layer, 1e-3, 0.05, 0.0))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.repeats + 1):
        for name, (layer, opt) in runs.items():
            seconds = step_seconds(layer, opt, x)
            if i:  # the first round warms up
                times[name].append(seconds)
    base = statistics.median(times["off"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(json.dumps({"setting": name, "experts": args.experts, "median_step_s": round(med, 4),
                          "vs_off": round(med / base, 3), "repeats": len(ts)}))


if __name__ == "__main__":
    main()
