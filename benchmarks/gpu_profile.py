"""Where a GPU training step of one routed layer spends its time: ``torch.profiler`` over a few
steps of ``bench layer``'s shapes (a million experts, width 256, 8 heads x top-16, 2,048 tokens),
per implementation. Prints, per impl, the device operations (kernels, copies) per step, the device time per step
and the host time per step (a step whose host time exceeds its device time is launch-bound), and
the ops that take the most device time.

    python benchmarks/gpu_profile.py [--impl fractalmoe,fractalmoe-lazy-adam,...] [--experts N]

Needs a CUDA device. Writes one JSON line per impl to ``--out`` (default
benchmarks/results/gpu_check/profile.jsonl) and the tables to stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from fractalmoe.bench_layer import LayerSpec, build_impl
from fractalmoe.roofline import synchronize

DEFAULT_IMPLS = "fractalmoe,fractalmoe-lazy-adam,fractalmoe-lazy-adam-fused,peer-pytorch-sparse"


def profile_impl(spec: LayerSpec, steps: int, top: int) -> tuple[dict, str]:
    """(summary row, table of the top ops by device time) over ``steps`` profiled steps."""
    torch.manual_seed(0)
    built = build_impl(spec)
    x = torch.randn(1, spec.tokens, spec.dim, device=spec.device)

    def step() -> None:
        built.layer(x).float().square().mean().backward()
        built.step()
        built.zero_grad()

    for _ in range(3):  # warm-up: optimizer state, compiled kernels, allocator
        step()
    synchronize(spec.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        host_s = time.perf_counter() - t0
        synchronize(spec.device)
        wall_s = time.perf_counter() - t0
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    device_us = sum(e.time_range.elapsed_us() for e in kernels)  # busy time, kernels and copies
    row = {"impl": spec.impl, "N": spec.num_experts, "steps": steps,
           "device_ops_per_step": len(kernels) / steps,
           "device_ms_per_step": device_us / 1e3 / steps,
           "host_ms_per_step": host_s * 1e3 / steps,
           "wall_ms_per_step": wall_s * 1e3 / steps}
    table = events.table(sort_by="self_device_time_total", row_limit=top)
    return row, table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", default=DEFAULT_IMPLS)
    p.add_argument("--experts", type=int, default=1_048_576)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default="benchmarks/results/gpu_check/profile.jsonl")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: gpu_profile.py needs a CUDA device")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for impl in args.impl.split(","):
            row, table = profile_impl(LayerSpec(impl, args.experts, device="cuda"), args.steps, args.top)
            f.write(json.dumps(row) + "\n")
            print(json.dumps(row))
            print(table, flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
