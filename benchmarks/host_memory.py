"""Freed host memory returned to the OS (glibc's defaults) against kept for reuse
(``fractalmoe.host_memory.keep_freed_memory``, what the command line does), per training step of
the default model as ``fractalmoe bench model`` times it (16 x 128 bytes, one thread), with the
step's page faults and system time.

Each (mode, repeat) runs in a fresh process, alternated A/B/A/B; medians are reported, and the
run refuses to start while another PyTorch process runs or the load average is above 0.5.

    python benchmarks/host_memory.py [--repeats 3] [--out benchmarks/results/host_memory.jsonl]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics

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
    return {"mode": mode, "step_ms": row["fwd_ms"] + row["bwd_ms"] + row["opt_ms"],
            "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "system_ms_per_step": (after.ru_stime - before.ru_stime) * 1e3 / steps,
            "peak_rss_gb": after.ru_maxrss / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/host_memory.jsonl")
    p.add_argument("--force", action="store_true", help="run even on a busy machine")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    from fractalmoe.bench_layer import alternated_children, report

    rows = alternated_children(__file__, [[m] for m in MODES], args.repeats, args.force)
    keys = [k for k in rows[0] if k != "mode" and k != "repeat"]
    med = {m: {k: statistics.median(r[k] for r in rows if r["mode"] == m) for k in keys} for m in MODES}
    summary = {"summary": "median", **{f"{m}_{k}": v for m in MODES for k, v in med[m].items()},
               "speedup_step": med["returned"]["step_ms"] / med["kept"]["step_ms"]}
    report(args.out, rows, summary)


if __name__ == "__main__":
    main()
