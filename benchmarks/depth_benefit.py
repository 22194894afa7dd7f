"""Is what depth buys a token a property of the token, which a causal router could learn, or noise?

For each of two seeds, FHME models trained at fixed depth C = 1, 2, 3 (1, 3, 7 blocks per token)
are scored token by token on the same validation windows. The benefit of depth for a token is
l_1 - l_3 (nats). If it is a property of the token, the two seeds agree on which tokens gain
(their per-token benefits correlate); a router can at best learn what they agree on.

Allocation estimate at a budget of B blocks per token: each token takes the depth that minimises
predicted loss + lambda * blocks (lambda set so the mean is B) and pays this seed's loss at that
depth. Predicted by the other seed's per-token losses ("cross_seed": what the tokens themselves
say) or by this seed's own ("own": an upper bound that also exploits this seed's noise). This is
an ideal adaptive model whose depth-d output is as good as a model trained for depth d; each
token's loss comes from a model in which every token had that depth, so what a token's depth does
to the others' contexts is left out: an estimate, not a model. Against it: the fixed-depth
frontier of this seed's three models at the blocks the allocation used, linear in blocks between
them.

    python benchmarks/depth_benefit.py --a RUN_C1 RUN_C2 RUN_C3 --b RUN_C1 RUN_C2 RUN_C3 [--windows N]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fractalmoe.checkpoint import load_model_from_run, load_run_data
from fractalmoe.data import ByteDataset
from fractalmoe.fractal import blocks_at_depth
from fractalmoe.model import FHMELanguageModel

TARGETS = (0.25, 0.45, 0.65)  # shares of the 2**C - 1 blocks, as the adaptive study's targets


@torch.no_grad()
def token_losses(model: FHMELanguageModel, data: ByteDataset, batch: int, windows: int | None) -> Tensor:
    """Cross-entropy (nats) of every validation token, in window order."""
    model.eval()
    out = []
    for x, y in data.val_batches(batch, model.cfg.seq_len, windows):
        logits = model(x)
        out.append(F.cross_entropy(logits.flatten(0, 1).float(), y.reshape(-1).long(), reduction="none"))
    return torch.cat(out)


def losses_of_runs(runs: list[str], windows: int | None) -> np.ndarray:
    """(runs, tokens) per-token losses of each run's model."""
    out = []
    for run in runs:
        model, cfg, _ = load_model_from_run(run, "cpu")
        data = load_run_data(run, cfg)
        out.append(token_losses(model, data, cfg.train.batch_size, windows))
    return torch.stack(out).numpy()


def allocate(predicted: np.ndarray, blocks: np.ndarray, budget: float) -> np.ndarray:
    """Depth index per token minimising predicted loss + lambda * blocks, lambda bisected so the
    mean blocks are at most ``budget``."""
    lo, hi = 0.0, float(predicted.max() - predicted.min()) + 1.0
    for _ in range(60):
        lam = (lo + hi) / 2
        pick = np.argmin(predicted + lam * blocks[:, None], axis=0)
        lo, hi = (lo, lam) if blocks[pick].mean() <= budget else (lam, hi)
    return np.argmin(predicted + hi * blocks[:, None], axis=0)


def frontier_at(points: list[tuple[float, float]], x: float) -> float:
    """Lower envelope of (blocks, nats) points, linear between them."""
    pts = sorted(points)
    best = min((nats for b, nats in pts if b <= x + 1e-9), default=float("inf"))
    for (b0, l0), (b1, l1) in zip(pts, pts[1:]):
        if b0 <= x <= b1:
            best = min(best, l0 + (l1 - l0) * (x - b0) / (b1 - b0))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", nargs="+", required=True, help="one seed's runs at fixed C = 1, 2, ...")
    p.add_argument("--b", nargs="+", required=True, help="the other seed's, in the same order")
    p.add_argument("--windows", type=int, default=None, help="validation windows (default: the whole split)")
    args = p.parse_args()
    losses = [losses_of_runs(runs, args.windows) for runs in (args.a, args.b)]
    blocks = np.array([blocks_at_depth(d) for d in range(1, len(args.a) + 1)], dtype=float)
    a, b = (per_run[0] - per_run[-1] for per_run in losses)
    rank_a, rank_b = (np.argsort(np.argsort(v)) for v in (a, b))
    result: dict[str, object] = {
        "runs": [args.a, args.b], "tokens": int(a.size), "blocks": blocks.tolist(),
        "nats_at_depth": [per_run.mean(axis=1).tolist() for per_run in losses],
        "benefit_pearson": float(np.corrcoef(a, b)[0, 1]),
        "benefit_spearman": float(np.corrcoef(rank_a, rank_b)[0, 1]), "targets": []}
    for share in TARGETS:
        budget = share * blocks[-1]
        row: dict[str, object] = {"share": share, "blocks": budget}
        for i, own in enumerate(losses):
            points = list(zip(blocks.tolist(), own.mean(axis=1).tolist()))
            row[f"seed_{i}"] = {}
            for name, predicted in (("cross_seed", losses[1 - i]), ("own", own)):
                pick = allocate(predicted, blocks, budget)
                used = float(blocks[pick].mean())  # below the budget where no lambda >= 0 spends it all
                row[f"seed_{i}"][name] = {"nats": float(own[pick, np.arange(own.shape[1])].mean()),
                                          "blocks": used, "frontier_there": frontier_at(points, used)}
        result["targets"].append(row)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
