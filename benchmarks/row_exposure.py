"""How much of the base's own reading did memory fine-tuning touch?

Memory fine-tuning (``--adapter memory``) changes only some rows of the base's expert tables, so a
base-domain token changes only where it reads one of them. For each run this counts, on the
base's validation windows and on the new domain's, per layer:

* the changed rows (any entry of any table of the layer's bank differs from the base's),
* the share of the domain's row choices that land on a changed row (its *exposure*),
* the share of its tokens that read at least one changed row.

    python benchmarks/row_exposure.py RUN [RUN ...] > exposure.jsonl

One JSON line per run; the base is the one the run was fine-tuned from.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from torch import Tensor

from fractalmoe.adapters import base_memories
from fractalmoe.checkpoint import load_model_from_run, run_extra
from fractalmoe.evaluate import lm_logits
from fractalmoe.finetune import load_domain
from fractalmoe.stats import CHOICES, collect

BATCH = 16


def changed_rows(base: torch.nn.Module, tuned: torch.nn.Module) -> list[Tensor]:
    """Per FHME layer, (N,) bool: rows where any table of the tuned bank differs from the base's."""
    out = []
    for (_, b), (_, t) in zip(base_memories(base), base_memories(tuned)):
        pairs = zip(b.fractal.bank.tables().values(), t.fractal.bank.tables().values())
        out.append(torch.stack([(x != y).flatten(1).any(1) for x, y in pairs]).any(0))
    return out


@torch.no_grad()
def exposure(model: torch.nn.Module, changed: list[Tensor], windows: list[Tensor]) -> list[dict[str, float]]:
    """Per layer: share of the model's row choices, and of its tokens, that touch a changed row."""
    memories = [m for _, m in base_memories(model)]
    hits = [torch.zeros(()) for _ in memories]
    tokens_hit = [torch.zeros(()) for _ in memories]
    choices = [0 for _ in memories]
    tokens = 0
    for x in windows:
        with collect(model) as stats:
            lm_logits(model, x)
        tokens += x.numel()
        for i, m in enumerate(memories):
            idx = torch.cat([c.reshape(x.numel(), -1) for blk in m.fractal.blocks
                             for c in stats.values(blk.memory.router, CHOICES)], 1)
            touched = changed[i][idx]
            hits[i] += touched.sum()
            tokens_hit[i] += touched.any(1).sum()
            choices[i] += idx.numel()
    return [{"choices_on_changed": round((h / c).item(), 4), "tokens_touched": round((t / tokens).item(), 4)}
            for h, t, c in zip(hits, tokens_hit, choices)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="memory fine-tuning run directories")
    p.add_argument("--batches", type=int, default=8, help="validation batches of 16 windows per domain")
    args = p.parse_args()
    for run in args.runs:
        extra = run_extra(run)
        tuned, config, _ = load_model_from_run(run)
        base, _, _ = load_model_from_run(extra["base"])
        tuned.eval()
        base.eval()
        seq_len, val_fraction = config.model.seq_len, config.train.val_fraction
        changed = changed_rows(base, tuned)
        domains = {"base": load_domain(run_extra(extra["base"]).get("data"), val_fraction, seq_len),
                   "new": load_domain(extra["data"], val_fraction, seq_len)}
        out = {"run": run, "changed_rows": [int(c.sum()) for c in changed],
               "rows": [int(c.numel()) for c in changed]}
        for name, data in domains.items():
            windows = [x for x, _ in itertools.islice(data.val_batches(BATCH, seq_len), args.batches)]
            out[name] = exposure(base, changed, windows)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
