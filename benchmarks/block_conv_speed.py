"""The cost of block convolutions on a CPU: a training step of the default FHME (top-22, a causal
depthwise convolution on each of its 3 routed blocks' inputs per layer) against the default before
them (top-24, none), at the same FFN FLOPs within 0.5%. 16 x 128 bytes, lazy-Adam tables, one
thread, as ``fractalmoe bench model`` times a step.

Each (model, repeat) runs in a fresh process, alternated A/B/A/B; medians are reported, and the
run refuses to start while another PyTorch process runs or the load average is above 0.5.

    python benchmarks/block_conv_speed.py [--repeats 3] [--out benchmarks/results/block_conv_speed.jsonl]
"""

from __future__ import annotations

import argparse
import json
import statistics

MODELS = {"block_conv": [], "without": ["block_conv=0", "topk=24"]}


def measure(model: str) -> dict[str, object]:
    """One process: the model's training step."""
    import torch

    from fractalmoe import config
    from fractalmoe.bench import ModelSpec, run_model

    torch.set_num_threads(1)
    run = config.default_run_config().with_overrides(MODELS[model])
    row = run_model(ModelSpec(run.model.num_experts, batch_size=run.train.batch_size, steps=5,
                              overrides=MODELS[model]))
    return {"model": model, "step_ms": row["step_ms"], "fwd_ms": row["fwd_ms"],
            "bwd_ms": row["bwd_ms"], "opt_ms": row["opt_ms"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/block_conv_speed.jsonl")
    p.add_argument("--force", action="store_true", help="run even on a busy machine")
    p.add_argument("--child", metavar="MODEL", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    from fractalmoe.bench_hygiene import alternated_children, report

    rows = alternated_children(__file__, [[model] for model in MODELS], args.repeats, args.force)
    summary: dict[str, object] = {"summary": "median ms per training step"}
    for model in MODELS:
        for part in ("step_ms", "fwd_ms", "bwd_ms", "opt_ms"):
            summary[f"{model}_{part}"] = statistics.median(r[part] for r in rows if r["model"] == model)
    summary["slowdown"] = summary["block_conv_step_ms"] / summary["without_step_ms"]  # type: ignore[operator]
    report(args.out, rows, summary)


if __name__ == "__main__":
    main()
