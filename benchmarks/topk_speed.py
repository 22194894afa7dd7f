"""Top-k selection on a CPU: ``torch.topk`` against the routing's numpy selection
(``fractalmoe.product_keys.topk_indices``) as an argpartition of the row then an argsort of the k
(``select``, the route for rows past ``_FULL_SORT``) and as one argsort of the whole row
(``sort``, the route up to it), per call at the default model's shapes and per training step of
the default model (16 x 128 bytes, one thread, freed memory kept as the command line does).

Each (selection, repeat) runs in a fresh process, alternated A/B/A/B; medians are reported, and
the run refuses to start while another PyTorch process runs or the load average is above 0.5.

    python benchmarks/topk_speed.py [--repeats 3] [--out benchmarks/results/topk_speed.jsonl]
"""

from __future__ import annotations

import statistics
import time

MODES = ("torch", "select", "sort")
# (rows, width, k) of the default model's calls: 2,048 tokens x 2 heads, 128 sub-keys per half or
# the 74 candidate pairs that can win, top-22; and the earlier default's top-40 of 128 and 158.
SHAPES = ((4096, 128, 22), (4096, 74, 22), (4096, 128, 40), (4096, 158, 40))


def _median_ms(fn, runs: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(mode: str) -> dict[str, object]:
    """One process: the selection's time per call at SHAPES, and the default model's training step
    as ``fractalmoe bench model`` times it (``bench.run_model``: 16 x 128 bytes, 5 steps)."""
    import torch

    from fractalmoe import product_keys
    from fractalmoe.bench import ModelSpec, run_model
    from fractalmoe.config import default_run_config
    from fractalmoe.host_memory import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()
    if mode == "torch":
        product_keys._select_on_host = lambda scores, k: False
    if mode == "select":
        product_keys._FULL_SORT = 0
    torch.manual_seed(0)
    out: dict[str, object] = {"mode": mode}
    for rows, width, k in SHAPES:
        scores = torch.randn(rows, width)
        out[f"call_{width}_{k}_ms"] = _median_ms(lambda: product_keys.sorted_topk(scores, k), 9)
    run = default_run_config()
    row = run_model(ModelSpec(run.model.num_experts, batch_size=run.train.batch_size, steps=5))
    out["step_ms"] = row["step_ms"]
    return out


if __name__ == "__main__":
    from fractalmoe.bench_hygiene import mode_benchmark

    mode_benchmark(__file__, __doc__, MODES, measure, "benchmarks/results/topk_speed.jsonl")
