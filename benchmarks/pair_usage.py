"""Where a product-key router's unused experts come from: its sub-keys, or how it pairs them.

    python benchmarks/pair_usage.py RUN [RUN ...] [--choices 1000000] [--data PATH]

An expert is a pair (i, j) of sub-keys, one from each half of the query. Over each routed
block's first ``--choices`` routing choices on the run's validation split (as ``fractalmoe eval
--usage-choices`` counts them), this prints per block: the share of experts chosen and KL(usage
|| uniform); the same for each half's sub-keys (how often a sub-key is part of a chosen pair);
and the share of experts that would be chosen if the halves picked their sub-keys independently
with those same marginals (each pair (i, j) then expected p_i q_j M times in M choices, chosen
with probability 1 - exp(-p_i q_j M)). Sub-keys nearly all used but pairs far below the
independent share means the unused experts come from the halves' dependence, which no
measure on the sub-keys alone (biases, restarts) reaches. One JSON line per block.
"""

from __future__ import annotations

import argparse
import json

import torch

from fractalmoe.checkpoint import load_model_from_run, load_run_data
from fractalmoe.evaluate import ChoiceCounts, UsageStats, choice_sources
from fractalmoe.stats import collect


def pair_usage(counts: torch.Tensor, n_second: int) -> dict[str, float]:
    """Usage of experts and of each half's sub-keys from (N,) choice counts, N = n_first * n_second,
    and the experts an independent pairing with the same sub-key marginals would use."""
    grid = counts.double().view(-1, n_second)
    total = grid.sum()
    first, second = grid.sum(1), grid.sum(0)
    expected = torch.outer(first, second) / total.clamp_min(1)  # p_i q_j M
    rows, a, b = UsageStats.from_counts(counts), UsageStats.from_counts(first), UsageStats.from_counts(second)
    return {"used": rows.fraction_used, "kl": rows.kl_uniform,
            "first_used": a.fraction_used, "first_kl": a.kl_uniform,
            "second_used": b.fraction_used, "second_kl": b.kl_uniform,
            "used_if_independent": float((1 - torch.exp(-expected)).mean())}


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--choices", type=int, default=1_000_000, help="routing choices counted per block")
    p.add_argument("--data", default=None, help="corpus (default: the run's)")
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args()
    for run in a.runs:
        model, config, _ = load_model_from_run(run)
        model.eval()
        data = load_run_data(run, config, a.data)
        routers = [(i, r) for i, sources in choice_sources(model) for r in sources]
        if not routers or any(len(getattr(r, "sizes", ())) != 2 for _, r in routers):
            raise SystemExit(f"error: {run}: pairs need product-key routers of two key parts")
        counts = ChoiceCounts([r for _, r in routers], a.choices)
        for x, _ in data.val_batches(a.batch_size, config.model.seq_len):
            with collect(model) as stats:
                model(x)
            counts.add(stats)
            if min(counts.seen.values()) >= a.choices:
                break
        chosen = counts.host()
        position: dict[int, int] = {}
        for layer, router in routers:
            block = position[layer] = position.get(layer, -1) + 1
            row = {"run": run, "layer": layer, "block": block, "choices": int(chosen[router].sum()),
                   **pair_usage(chosen[router], router.sizes[1])}
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
