"""How well domain gates of a given routing size tell a new domain's text from the base's.

    python benchmarks/gate_separation.py --base runs/ft_base_s2 --data PATH \\
        [--routing '[{"num_experts": 1048576, "heads": 2, "topk": 8}, ...]'] [--by-position]

For each routing, FHME adapters at LoRA rank 64's count go beside the base's FFNs, each behind a
``DomainGate`` fitted by ``gate_adapters`` (seed 1, as ``finetune_gpt2.py finetune --seed 1``),
and the gates are read over 128 evenly spaced validation windows of each domain: their mean and
the share of positions below 1/2. Prints one JSON line per routing. The adapters add nothing yet,
so this measures the gate alone: what an adapter behind it could at most reach on each domain.
``--by-position`` adds, per layer, the share below 1/2 at a few positions of the window
(``POSITIONS``): how fast each domain's text piles up its evidence.
"""

from __future__ import annotations

import argparse
import json

import torch

from fractalmoe import sparse_rows
from fractalmoe.adapters import AdaptedFFN
from fractalmoe.checkpoint import load_model_from_run
from fractalmoe.evaluate import lm_logits
from fractalmoe.finetune import adapt_in_memory, kept_domains, lineage, load_domain

SEQ_LEN, BATCH, WINDOWS = 128, 16, 128
POSITIONS = (0, 1, 2, 4, 8, 16, 32, 64, 127)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--eval-bytes", type=int, default=262144)
    p.add_argument("--routing", default=json.dumps([sparse_rows.GATE_ROUTING]))
    p.add_argument("--by-position", action="store_true", help="also each layer's share below 1/2 by position")
    args = p.parse_args()
    default = dict(sparse_rows.GATE_ROUTING)
    for routing in json.loads(args.routing):
        sparse_rows.GATE_ROUTING.update({**default, **routing})
        torch.manual_seed(1)
        model, config, _ = load_model_from_run(args.base)
        new = load_domain(args.data, config.train.val_fraction, SEQ_LEN, args.eval_bytes)
        kept = [d.data for d in kept_domains(lineage(args.base), args.eval_bytes)]
        adapt_in_memory(model, "fhme", 64)
        sparse_rows.gate_adapters(model, new, kept, SEQ_LEN, BATCH, 1)
        gates = [m.domain_gate for m in model.modules() if isinstance(m, AdaptedFFN)]
        row = {"base": args.base, "data": args.data, "routing": sparse_rows.GATE_ROUTING.copy()}
        for name, data in (("new", new), ("base", kept[0])):
            seen: list[torch.Tensor] = []
            hooks = [g.register_forward_hook(lambda m, i, o: seen.append(o.squeeze(-1))) for g in gates]
            with torch.no_grad():
                for x, _ in data.val_batches(BATCH, SEQ_LEN, WINDOWS):
                    lm_logits(model.eval(), x)
            for h in hooks:
                h.remove()
            g = torch.stack([torch.cat(seen[i::len(gates)]) for i in range(len(gates))])  # (layers, windows, T)
            row[f"{name}_gate_mean"] = float(g.mean())
            row[f"{name}_share_below_half"] = float((g < 0.5).float().mean())
            if args.by_position:
                row[f"{name}_below_half_by_position"] = [[round(float((layer[:, t] < 0.5).float().mean()), 3)
                                                          for t in POSITIONS] for layer in g]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
