"""Where a trained FHME (C = 2) spends its reads: how many of the rows the deep path's second
block application reads were already read by its first, the join's mean deep-branch weight per
layer, validation bpb with every join pinned to one branch, and validation bpb with the deep path
made parallel: its second application reads the layer input x instead of f_1(x), so
f_1(f_1(x)) becomes f_1(x) + (f_1(x) - x), two reads side by side as a wider layer would make them.
What that costs is what the trained model gets from composing its reads in sequence.

    python benchmarks/fractal_paths.py RUN_DIR [--windows 64]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import Tensor

from fractalmoe.checkpoint import load_model_from_run, load_run_data
from fractalmoe.evaluate import evaluate
from fractalmoe.fractal import FractalExpert, HighwayJoin, joins_at_depth


def _reused_share(first: list[Tensor], second: list[Tensor]) -> float:
    """Mean over tokens of the share of second-call rows that the first call also read."""
    shares = [(b.unsqueeze(-1) == a.unsqueeze(-2)).any(-1).float().mean() for a, b in zip(first, second)]
    return float(torch.stack(shares).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--windows", type=int, default=64, help="validation windows of seq_len bytes")
    args = p.parse_args()
    model, cfg, _ = load_model_from_run(args.run, "cpu")
    data = load_run_data(args.run, cfg)
    fractals = [m for m in model.modules() if isinstance(m, FractalExpert)]
    if not fractals or fractals[0].depth != 2:
        raise SystemExit("error: needs an FHME model with fractal_depth = 2")

    def bpb() -> float:
        with torch.no_grad():
            return evaluate(model, data, cfg.train.batch_size, max_windows=args.windows).val_bpb

    # Rows chosen by each router call, and the joins' deep-branch weights, in call order.
    calls: dict[torch.nn.Module, list[Tensor]] = {}
    gates: dict[torch.nn.Module, list[Tensor]] = {}
    hooks = [b.memory.router.register_forward_hook(
        lambda m, i, out: calls.setdefault(m, []).append(out[1].flatten(-2))) for f in fractals for b in f.blocks]
    hooks += [j.register_forward_hook(
        lambda m, i, out: gates.setdefault(m, []).append(torch.sigmoid(m.gate(i[0])).mean()))
        for f in fractals for j in f.joins]
    trained = bpb()
    for h in hooks:
        h.remove()
    result: dict[str, object] = {"run": args.run, "tied": fractals[0].tied, "val_bpb": trained}
    reused = []
    for f in fractals:  # applications 0 and 1 are f_1(x) and the deep path's f_1(f_1(x))
        first, second = (calls[f.block_of(a).memory.router] for a in (0, 1))
        if first is second:  # one router called twice per batch
            first, second = first[0::2], first[1::2]
        reused.append(_reused_share(first, second))
    result["rows_reread_by_deep_path"] = reused
    result["deep_gate_mean"] = [float(torch.stack(gates[f.joins[0]]).mean()) for f in fractals]
    forward = HighwayJoin.forward
    try:
        HighwayJoin.forward = lambda self, x, deep, shallow, keep=None: shallow  # type: ignore[method-assign]
        result["val_bpb_shallow_only"] = bpb()
        HighwayJoin.forward = lambda self, x, deep, shallow, keep=None: deep  # type: ignore[method-assign]
        result["val_bpb_deep_only"] = bpb()
    finally:
        HighwayJoin.forward = forward  # type: ignore[method-assign]
    extend = FractalExpert._extend

    def parallel(self, c, x, prev, shallow, column, block, join, routes, seqs):  # type: ignore[no-untyped-def]
        side = self._f(c - 1, x, column, block, join, routes, seqs)  # the deep path's reads, on x
        gate = self.joins[self._join_at[join + joins_at_depth(c - 1)]]
        return gate(x, prev + (side - x), shallow, self._keep_masks(c, x, column))
    try:
        FractalExpert._extend = parallel  # type: ignore[method-assign]
        result["val_bpb_parallel_deep_path"] = bpb()
    finally:
        FractalExpert._extend = extend  # type: ignore[method-assign]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
