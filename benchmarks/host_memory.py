"""Freed host memory returned to the OS (glibc's defaults) against kept for reuse
(``fractalmoe.host_memory.keep_freed_memory``, what the command line does), per training step of
the default model as ``fractalmoe bench model`` times it (16 x 128 bytes, one thread), with the
step's page faults and system time (over the timed steps only) and the peak RSS.

Each (mode, repeat) runs in a fresh process, alternated A/B/A/B; medians are reported, and the
run refuses to start while another PyTorch process runs or the load average is above 0.5.

    python benchmarks/host_memory.py [--repeats 3] [--out benchmarks/results/host_memory.jsonl]
"""

from __future__ import annotations

MODES = ("returned", "kept")
STEPS = 5


def measure(mode: str) -> dict[str, object]:
    """One process: the default model's training step, page faults and system time per step over
    the steps ``run_model`` times (its two warm-up steps, model build and inference left out),
    and the process's peak RSS as ``run_model`` reports it (``peak_rss_gb``: this process's own
    peak, in GB, unlike ``ru_maxrss``)."""
    import torch

    from fractalmoe import bench
    from fractalmoe.config import default_run_config
    from fractalmoe.host_memory import keep_freed_memory

    torch.set_num_threads(1)
    if mode == "kept":
        keep_freed_memory()
    run = default_run_config()
    row = bench.run_model(bench.ModelSpec(run.model.num_experts, batch_size=run.train.batch_size,
                                          steps=STEPS, peak_gflops=1.0, copy_gbps=1.0))  # no floor here
    return {"mode": mode, **{k: row[k] for k in ("step_ms", "page_faults_per_step", "system_ms_per_step",
                                                 "peak_rss_gb")}}


if __name__ == "__main__":
    from fractalmoe.bench_hygiene import mode_benchmark

    mode_benchmark(__file__, __doc__, MODES, measure, "benchmarks/results/host_memory.jsonl")
