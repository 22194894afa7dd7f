"""Table gradients as a sparse ``.grad`` against deferred ones (formed in the optimizer step), per
training step of three models that read a table several times a step: one 65K-row bank shared
by every layer of a 4-layer FHME (12 reads), Memory+ (4 reads of its shared bank) and the
default FHME (3 reads of each layer's bank), on the default of when this was measured
(``MEASURED_DEFAULT``: top-24, no block convolutions). 16 x 128 bytes, lazy-Adam tables, one thread, as
``fractalmoe bench model`` times a step.

Each (layout, model, repeat) runs in a fresh process, alternated A/B/A/B; medians are reported,
and the run refuses to start while another PyTorch process runs or the load average is above 0.5.

    python benchmarks/table_grad_speed.py [--repeats 3] [--out benchmarks/results/table_grad_speed.jsonl]
"""

from __future__ import annotations

import argparse
import json
import statistics

LAYOUTS = ("sparse", "deferred")
# The default when this was measured (top-24, no block convolutions), and two models on top of it.
MEASURED_DEFAULT = ["topk=24", "block_conv=0"]
MODELS = {"fhme_shared65k": [*MEASURED_DEFAULT, "share_bank=true", "num_experts=65536", "key_dim=12", "topk=21"],
          "memplus": [*MEASURED_DEFAULT, "ffn=memplus"], "fhme": MEASURED_DEFAULT}


def measure(layout: str, model: str) -> dict[str, object]:
    """One process: the model's training step with the table-gradient layout forced."""
    import torch

    from fractalmoe import bench, config
    from fractalmoe.bench import ModelSpec, run_model

    torch.set_num_threads(1)
    run = config.default_run_config().with_overrides(MODELS[model])
    bench.defers_table_grads = lambda *_: layout == "deferred"
    row = run_model(ModelSpec(run.model.num_experts, batch_size=run.train.batch_size, steps=5,
                              overrides=MODELS[model]))
    return {"layout": layout, "model": model, "step_ms": row["step_ms"],
            "opt_ms": row["opt_ms"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/table_grad_speed.jsonl")
    p.add_argument("--force", action="store_true", help="run even on a busy machine")
    p.add_argument("--child", nargs=2, metavar=("LAYOUT", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    from fractalmoe.bench_hygiene import alternated_children, report

    children = [[layout, model] for model in MODELS for layout in LAYOUTS]
    rows = alternated_children(__file__, children, args.repeats, args.force)
    summary = {"summary": "median step_ms"}
    for model in MODELS:
        med = {lay: statistics.median(r["step_ms"] for r in rows if r["model"] == model and r["layout"] == lay)
               for lay in LAYOUTS}
        summary |= {f"{model}_{lay}": med[lay] for lay in LAYOUTS}
        summary[f"{model}_speedup"] = med["sparse"] / med["deferred"]
    report(args.out, rows, summary)


if __name__ == "__main__":
    main()
