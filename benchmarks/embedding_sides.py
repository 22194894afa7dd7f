"""Where a memory fine-tuning run with ``--with-embeddings`` gains and forgets: its expert tables,
its input embeddings, or its output head (the same tied matrix, read twice).

    python benchmarks/embedding_sides.py RUN [RUN ...] [--eval-bytes N]

For each memory fine-tuning run whose base is a trained model (not another adapter run: its
changes would be reverted too), the new domain's and the base domain's validation bpb with each part of the
change kept and the rest reverted to the base, one JSON line per (run, variant):

    base       nothing kept (the base model)
    tables     the trained expert rows; embeddings and head as in the base
    input      tables + trained input embeddings; the head reads the base's embeddings
    head       tables + trained head; the input reads the base's embeddings
    all        the run as trained (tables + embeddings read by both)
    embeddings the trained embeddings (both sides); expert tables as in the base

The head and the input share one matrix in the model, so "input" and "head" untie it for the
evaluation only. Read: a change that lowers the new domain's bpb and leaves the base's is a change
on a side the base domain seldom exercises.
"""
from __future__ import annotations

import argparse
import copy
import json

from torch import nn

from fractalmoe.checkpoint import load_model_from_run, load_run_config, run_extra
from fractalmoe.evaluate import val_bpb
from fractalmoe.finetune import kept_domains, lineage, load_domain


def _with_sides(adapted: nn.Module, base_model: nn.Module, tables: bool, inp: bool, head: bool) -> nn.Module:
    """``adapted`` with each side either as trained or as in ``base_model`` (in place; returns it)."""
    trained, base_embed = adapted.embed.weight.detach().clone(), base_model.embed.weight.detach()
    if not tables:  # loading re-ties the head: untie after
        adapted.load_state_dict({k: v for k, v in base_model.state_dict().items()
                                 if k not in ("embed.weight", "head.weight")}, strict=False)
    adapted.embed.weight = nn.Parameter(trained if inp else base_embed.clone(), requires_grad=False)
    adapted.head.weight = nn.Parameter(trained if head else base_embed.clone(), requires_grad=False)
    return adapted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--eval-bytes", type=int, default=262144)
    args = ap.parse_args()
    for run in args.runs:
        chain = lineage(run)
        cfg = load_run_config(run)
        seq, batch = cfg.model.seq_len, cfg.train.batch_size
        new = load_domain(run_extra(run)["data"], cfg.train.val_fraction, seq, args.eval_bytes)
        kept = kept_domains(chain[:1], args.eval_bytes)[0].data
        base_model, adapted = load_model_from_run(chain[0])[0], load_model_from_run(run)[0]
        variants = {"base": None, "tables": (True, False, False), "input": (True, True, False),
                    "head": (True, False, True), "all": (True, True, True),
                    "embeddings": (False, True, True)}
        for name, sides in variants.items():
            model = base_model if sides is None else _with_sides(copy.deepcopy(adapted), base_model, *sides)
            print(json.dumps({"run": str(run), "variant": name,
                              "val_bpb": round(val_bpb(model, new, seq, batch), 4),
                              "base_val_bpb": round(val_bpb(model, kept, seq, batch), 4)}), flush=True)


if __name__ == "__main__":
    main()
