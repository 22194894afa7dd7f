"""FHME: the Fractal Hyper-Mixture of Experts layer, a drop-in replacement for an FFN.

Legend: T tokens (flattened), D width, C fractal depth.

Three mixing levels: (1) top-k experts per head inside each routed block, (2) highway joins
between fractal paths, (3) a per-token depth choice d(x) in 1..C. The layer returns f_d(x) - x,
which the transformer block adds to its residual stream.

Adaptive depth is trained with a hard straight-through choice and an ACT-style ponder cost:
y = sum_{c <= d} w_c f_c(x), w = onehot(d) + p - stop_grad(p), d = argmax p, p = softmax(router(x)),
plus depth_penalty * sum_c p_c * (2**c - 1). The choice reads only the token's own state (causal).
In training and at inference alike, tokens that chose depth d are compacted out before stage
d + 1 (sorted deepest first, so each stage runs on a prefix), and the work of deeper stages is
never done for them.

Forward changes no state. Under a collector (``stats.collect``) the layer records its depth
counts and, in training, its ponder cost and the blocks used; with ``depth_target`` the fold
after each optimizer step steers depth_penalty (negative: a bonus) toward the value that spends
that share of the blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .experts import TABLE_DTYPES, ExpertBank
from .fractal import FractalExpert, blocks_at_depth, joins_at_depth
from .routing import Balancing
from .stats import (
    DEPTH_COST,
    DEPTH_COUNTS,
    JOIN_GATE,
    PONDER,
    FoldInputs,
    PastBatchStatistics,
    Statistics,
    mean_of,
)

DepthHist = Tensor | Sequence[float] | None  # tokens (or their share) per depth 1..C


def balancing_of(cfg: ModelConfig) -> Balancing:
    return Balancing(cfg.unit_keys, cfg.balance_rate, cfg.balance_loss)


class FHME(nn.Module, PastBatchStatistics):
    """Fractal expert + optional per-token depth router. x (..., D) -> (..., D)."""

    def __init__(self, dim: int, num_experts: int, depth: int = 2, heads: int = 8, topk: int = 16,
                 key_dim: int = 128, gate: str = "softmax", query_norm: str = "layernorm",
                 act: str = "gelu", join_bias: float = -2.0, drop_path_local: float = 0.0,
                 drop_path_global: float = 0.0, adaptive_depth: bool = False,
                 depth_penalty: float = 0.0, depth_explore: float = 0.0,
                 depth_target: float = 0.0, expert_dtype: str = "float32",
                 balancing: Balancing = Balancing(), block: str = "neuron",
                 bank: ExpertBank | None = None, tied: bool = True) -> None:
        super().__init__()
        self.dim, self.depth, self.adaptive = dim, depth, adaptive_depth
        self.depth_explore, self.depth_target = depth_explore, depth_target
        initial_penalty = depth_penalty if depth_penalty > 0 or depth_target == 0 else 1e-3
        self.fractal = FractalExpert(dim, num_experts, depth, heads, topk, key_dim, gate,
                                     query_norm, act, join_bias, drop_path_local,
                                     drop_path_global, TABLE_DTYPES[expert_dtype], balancing, block, bank,
                                     tied)
        self.depth_router: nn.Linear | None = None
        if adaptive_depth and depth > 1:
            self.depth_router = nn.Linear(dim, depth)
            nn.init.zeros_(self.depth_router.weight)
            with torch.no_grad():  # start at full depth; the ponder cost pulls tokens shallower
                self.depth_router.bias.copy_(torch.linspace(0.0, 1.0, depth))
        # The ponder cost per block; with a target the fold steers it multiplicatively toward the
        # penalty that uses depth_target of the blocks (state from past steps only: causal).
        self.register_buffer("depth_penalty", torch.tensor(initial_penalty),
                             persistent=self.depth_router is not None)
        self.forced_depth: int | None = None  # evaluate every token at this depth
        self.compact = True  # compact stopped tokens, training and inference (False: masked reference)

    @classmethod
    def from_config(cls, cfg: ModelConfig, bank: ExpertBank | None = None) -> FHME:
        return cls(cfg.dim, cfg.num_experts, cfg.fractal_depth, cfg.expert_heads, cfg.topk,
                   cfg.key_dim, cfg.gate, cfg.query_norm, cfg.expert_act, cfg.join_bias,
                   cfg.drop_path_local, cfg.drop_path_global, cfg.adaptive_depth,
                   cfg.depth_penalty, cfg.depth_explore, cfg.depth_target, cfg.expert_dtype,
                   balancing_of(cfg), cfg.block, bank, cfg.tie_blocks)

    def choose_depth(self, x_TD: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-token depth in 1..C (hard) and router probabilities (None without a router)."""
        if self.forced_depth is not None or self.depth_router is None:
            d = self.forced_depth or self.depth
            return torch.full(x_TD.shape[:1], d, dtype=torch.long, device=x_TD.device), None
        probs = F.softmax(self.depth_router(x_TD).float(), dim=-1)
        return probs.argmax(dim=-1) + 1, probs

    def _depths(self, like: Tensor) -> Tensor:
        """1..C on like's device."""
        return torch.arange(1, self.depth + 1, device=like.device)

    def _costs(self, like: Tensor) -> Tensor:
        """Blocks 2**c - 1 evaluated at each depth c, (C,), made on like's device (no host copy)."""
        return self._depths(like).to(like.dtype).exp2() - 1

    def forward(self, x: Tensor) -> Tensor:
        lead, dim = x.shape[:-1], x.shape[-1]
        x_TD = x.reshape(-1, dim)
        depth_T, probs = self.choose_depth(x_TD)
        if probs is not None and self.training:
            y_TD, depth_T = self._straight_through(x_TD, depth_T, probs)
        elif probs is None:
            fixed = self.forced_depth or self.depth
            y_TD = self.fractal(x_TD, max_depth=fixed)  # type: ignore[assignment]
        elif self.compact:
            y_TD = self.forward_compacted(x_TD, depth_T)
        else:
            y_TD = self.forward_masked(x_TD, depth_T)
        if self.collecting:
            self.record(DEPTH_COUNTS, (depth_T.unsqueeze(-1) == self._depths(depth_T)).sum(0).float())
        return (y_TD - x_TD).view(*lead, dim)

    def _straight_through(self, x_TD: Tensor, depth_T: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        """Training at a hard per-token depth that skips the work of deeper stages; returns the
        output and the depths used.

        A token that stops at d computes f_1 .. f_d on its way (the anytime outputs), never
        f_{d+1} .. f_C. The router learns through those: y = sum_{c <= d} w_c f_c with
        w = onehot(d) + p - stop_grad(p) (value: f_d), where each uncomputed deeper option c > d is
        credited with f_d, as if going deeper changed nothing: its gradient is d's, so no depth is
        pushed away just because it was not tried. A random depth_explore fraction of tokens takes
        a uniformly random depth (random, not a function of other tokens: causal), so deeper
        outputs keep being trained and tried."""
        soft = probs - probs.detach()
        if self.depth_explore > 0:
            routed = torch.rand(depth_T.shape, device=x_TD.device) >= self.depth_explore
            depth_T = torch.where(routed, depth_T, torch.randint_like(depth_T, 1, self.depth + 1))
            soft = soft * routed.unsqueeze(-1)
        depths = self._depths(depth_T)
        hard = (depth_T.unsqueeze(-1) == depths).to(probs.dtype)
        computed = (depths <= depth_T.unsqueeze(-1)).to(probs.dtype)
        deeper = (soft * (1 - computed)).sum(-1, keepdim=True)
        weights = (hard * (1 + deeper) + soft * computed).to(x_TD.dtype)  # (T, C), zero past d
        if self.collecting:
            costs = self._costs(probs)
            self.record(PONDER, self.depth_penalty * (probs * costs).sum(-1).mean())
            if self.depth_target > 0:
                used = costs[depth_T - 1]
                self.record(DEPTH_COST, torch.stack([used.sum(), used.new_full((), used.shape[0])]))
        if not self.compact:  # reference: every depth for every token, then the same weights
            outs = self.fractal(x_TD, return_all_depths=True)
            return torch.einsum("tc,ctd->td", weights, torch.stack(outs)), depth_T  # type: ignore[arg-type]
        return self._compacted(x_TD, depth_T, weights), depth_T

    def aux_loss_from(self, stats: Statistics) -> Tensor | None:
        """Ponder cost plus routing balance, one weight per layer: the mean over its blocks of
        each block's mean over its calls."""
        balance = [loss for b in self.fractal.blocks
                   if (loss := b.memory.router.aux_loss_from(stats)) is not None]
        parts = [p for p in (mean_of(stats.values(self, PONDER)), mean_of(balance)) if p is not None]
        return torch.stack(parts).sum() if parts else None

    def fold_inputs(self, stats: Statistics) -> FoldInputs | None:
        used = stats.total(self, DEPTH_COST, training=True)
        return FoldInputs([used]) if used is not None else None

    def fold(self, inputs: FoldInputs) -> None:
        """penalty += 1e-3 * (share of blocks used - target) / target. Additive, so it can turn
        negative, a bonus per block: without one, a router that drifts shallow (deeper outputs,
        trained by fewer tokens, look worse) has nothing pulling it back to the target."""
        used, tokens = inputs.sums[0].unbind()
        share = used / (tokens.clamp_min(1) * blocks_at_depth(self.depth))
        self.depth_penalty.add_(1e-3 * (share - self.depth_target) / self.depth_target)

    def forward_masked(self, x_TD: Tensor, depth_T: Tensor) -> Tensor:
        """Reference for compaction: every depth for every token, then select f_d(x)."""
        outs = torch.stack(self.fractal(x_TD, return_all_depths=True))  # type: ignore[arg-type]
        return outs.gather(0, (depth_T - 1).view(1, -1, 1).expand(1, -1, x_TD.shape[-1]))[0]

    def forward_compacted(self, x_TD: Tensor, depth_T: Tensor) -> Tensor:
        """f_{d(t)}(x_t) where stage c runs only on the tokens with d >= c."""
        weights = (depth_T.unsqueeze(-1) == self._depths(depth_T)).to(x_TD.dtype)
        return self._compacted(x_TD, depth_T, weights)

    def _compacted(self, x_TD: Tensor, depth_T: Tensor, weights_TC: Tensor) -> Tensor:
        """sum_c weights[t, c] f_c(x_t) over c <= d(t). Tokens are sorted deepest first, so stage
        c runs on a prefix of them (a view, no gather): one sort, one gather, one scatter back and
        one host sync (the prefix lengths) per layer."""
        order = torch.argsort(depth_T, descending=True, stable=True)
        reach = (depth_T.unsqueeze(-1) >= self._depths(depth_T)).sum(0).tolist()  # host sync
        x_sorted, w_sorted = x_TD.index_select(0, order), weights_TC.index_select(0, order)
        prev = self.fractal.stage(1, x_sorted, None)
        out = prev * w_sorted[:, :1]
        for c in range(2, self.depth + 1):
            n = reach[c - 1]  # tokens with d >= c: the first n
            if n == 0:
                break
            prev = self.fractal.stage(c, x_sorted[:n], prev[:n])
            out[:n] += prev * w_sorted[:n, c - 1:c]
        return torch.zeros_like(out).index_copy(0, order, out)

    # --- accounting -------------------------------------------------------------------------
    def _block_flops(self) -> int:
        return self.fractal.blocks[0].memory.flops_per_token()

    def flops_at_depth(self, depth: int) -> int:
        """Forward FLOPs per token that stops at ``depth`` (multiply-add = 2)."""
        router = 2 * self.dim * self.depth if self.depth_router is not None else 0
        return (blocks_at_depth(depth) * self._block_flops()
                + joins_at_depth(depth) * 2 * self.dim + router)

    def params_at_depth(self, depth: int) -> int:
        """Parameters a token at ``depth`` reads: its routers, its expert rows, its join gates."""
        mem = self.fractal.blocks[0].memory
        routers = mem.router.params_per_token()
        rows = mem.params_per_token() - routers  # expert rows (and gate) read per block call
        router = self.depth_router.weight.numel() if self.depth_router is not None else 0
        return (self.fractal.routers_at_depth(depth) * routers + blocks_at_depth(depth) * rows
                + self.fractal.join_gates_at_depth(depth) * (self.dim + 1) + router)

    def _expected(self, per_depth: Callable[[int], float], depth_hist: DepthHist) -> float:
        """Mean of per_depth(d) under a measured depth histogram (counts or fractions per depth);
        without one (or an empty one), at the depth the layer runs without a router."""
        hist = depth_hist.tolist() if isinstance(depth_hist, Tensor) else list(depth_hist or [])
        if sum(hist) == 0:
            return float(per_depth(self.forced_depth or self.depth))
        return sum(h * per_depth(d) for d, h in enumerate(hist, start=1)) / sum(hist)

    def flops_per_token(self, depth_hist: DepthHist = None) -> float:
        """Forward FLOPs per token at the measured depth histogram (e.g. ``evaluate``'s)."""
        return self._expected(self.flops_at_depth, depth_hist)

    def active_params_per_token(self, depth_hist: DepthHist = None) -> float:
        return self._expected(self.params_at_depth, depth_hist)

    def blocks_per_token(self, depth_hist: DepthHist = None) -> float:
        return self._expected(blocks_at_depth, depth_hist)

    def mixing_metrics(self, stats: Statistics) -> dict[str, object]:
        """The join and depth levels of mixing as collected in ``stats`` (expert usage, the
        first level, is ``evaluate``'s)."""
        counts = stats.total(self, DEPTH_COUNTS)
        hist = (counts / counts.sum()).tolist() if counts is not None else []
        gates = [stats.total(j, JOIN_GATE) for j in self.fractal.joins]
        return {
            "join_gate_means": [float(g[0] / g[1]) if g is not None else None for g in gates],
            "depth_hist": hist,
            "mean_depth": sum(d * h for d, h in enumerate(hist, start=1)),
            "blocks_per_token": self.blocks_per_token(hist),
        }
