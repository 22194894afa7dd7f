"""Freed host memory returned to the OS (glibc's defaults) against kept for reuse
(``fractalmoe.host_memory.keep_freed_memory``, what the command line does), per training step of
the default model as ``fractalmoe bench model`` times it (16 x 128 bytes, one thread), with the
step's page faults and system time.

Each (mode, repeat) runs in a fresh process, alternated A/B/A/B; medians are reported, and the
run refuses to start while another PyTorch process runs or the load average is above 0.5.

    python benchmarks/host_memory.py [--repeats 3] [--out benchmarks/results/host_memory.jsonl]
"""

from __future__ import annotations

import resource

MODES = ("returned", "kept")
STEPS = 5


def measure(mode: str) -> dict[str, object]:
    """One process: the default model's training step, page faults and system time per step
    (``run_model`` runs STEPS + 2 steps and an inference pass: the counts are over all of it)."""
    import torch

    from fractalmoe.bench import ModelSpec, run_model
    from fractalmoe.config import default_run_config
    from fractalmoe.host_memory import keep_freed_memory

    torch.set_num_threads(1)
    if mode == "kept":
        keep_freed_memory()
    run = default_run_config()
    before = resource.getrusage(resource.RUSAGE_SELF)
    row = run_model(ModelSpec(run.model.num_experts, batch_size=run.train.batch_size, steps=STEPS))
    after = resource.getrusage(resource.RUSAGE_SELF)
    steps = STEPS + 2
    return {"mode": mode, "step_ms": row["step_ms"],
            "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "system_ms_per_step": (after.ru_stime - before.ru_stime) * 1e3 / steps,
            "peak_rss_gb": after.ru_maxrss / 2**20}


if __name__ == "__main__":
    from fractalmoe.bench_hygiene import mode_benchmark

    mode_benchmark(__file__, __doc__, MODES, measure, "benchmarks/results/host_memory.jsonl")
