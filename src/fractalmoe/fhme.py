"""FHME: the Fractal Hyper-Mixture of Experts layer, a drop-in replacement for an FFN.

Legend: T tokens (flattened), D width, C fractal depth.

Three mixing levels: (1) top-k experts per head inside each routed block, (2) highway joins
between fractal paths, (3) a per-token depth choice d(x) in 1..C. The layer returns f_d(x) - x
(times SiLU(W x) with ``output_gate``), which the transformer block adds to its residual stream.

Two rules choose the depth d(x); both read only the token's own state (causal):

* ponder: a hard straight-through choice with an ACT-style ponder cost,
  y = sum_{c <= d} w_c f_c(x), w = onehot(d) + p - stop_grad(p), d = argmax p, p = softmax(router(x)),
  plus depth_penalty * sum_c p_c * (2**c - 1).
* threshold: a halting gate per stage, as Mixture-of-Depths scales a block by its router weight,
  y = f_1 + sum_{c=2..d} g_c (f_c - f_{c-1}), g_c = sigmoid(s_c(x)), and a token goes on to stage
  c while s_c(x) > tau_c. Each tau_c tracks, from past batches only, the score above which a share
  q of the tokens that reached stage c - 1 go on (expert-threshold routing), with q set so that
  the blocks used are depth_target of 2**C - 1. The router learns from the stages it ran: a gate
  opens where its stage lowered the loss. No penalty to tune, no gradient for stages not run.

In training and at inference alike, tokens that chose depth d are compacted out before stage
d + 1 (sorted deepest first, so each stage runs on a prefix), and the work of deeper stages is
never done for them.

Forward changes no state. Under a collector (``stats.collect``) the layer records its depth
counts and, in training, its ponder cost and the blocks used (ponder) or how many tokens went on
at each stage (threshold); the fold after each optimizer step steers depth_penalty (negative: a
bonus) or the thresholds toward the compute target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DEPTH_RULES, ModelConfig
from .experts import TABLE_DTYPES, ExpertBank
from .fractal import FractalExpert, blocks_at_depth, joins_at_depth
from .reset import reset_tree
from .routing import Balancing
from .stats import (
    DEPTH_COST,
    DEPTH_COUNTS,
    HALTS,
    JOIN_GATE,
    PONDER,
    FoldInputs,
    PastBatchStatistics,
    Statistics,
    mean_of,
)

DepthHist = Tensor | Sequence[float] | None  # tokens (or their share) per depth 1..C


def balancing_of(cfg: ModelConfig) -> Balancing:
    return Balancing(cfg.unit_keys, cfg.balance_rate, cfg.balance_loss, cfg.balance_router_only,
                     cfg.balance_target_kl, cfg.balance_steer_rate)


def continue_share(depth: int, target: float) -> float:
    """Share q of the tokens at each stage that go on to the next, so that the expected blocks
    sum_{c=1..C} q**(c-1) 2**(c-1) are target * (2**C - 1) (bisection: increasing in q)."""
    want = target * blocks_at_depth(depth)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        q = (lo + hi) / 2
        lo, hi = (q, hi) if sum((2 * q) ** c for c in range(depth)) < want else (lo, q)
    return (lo + hi) / 2


THRESHOLD_STEP = 0.05  # per-step move of a threshold, logits per unit of (share going on - q)


class FHME(nn.Module, PastBatchStatistics):
    """Fractal expert + optional per-token depth router. x (..., D) -> (..., D)."""

    def __init__(self, dim: int, num_experts: int, depth: int = 2, heads: int | tuple[int, ...] = 8,
                 topk: int = 16,
                 key_dim: int = 128, gate: str = "softmax", query_norm: str = "layernorm",
                 act: str = "gelu", join_bias: float = -2.0, drop_path_local: float = 0.0,
                 drop_path_global: float = 0.0, adaptive_depth: bool = False,
                 depth_penalty: float = 0.0, depth_explore: float = 0.0,
                 depth_target: float = 0.0, expert_dtype: str = "float32",
                 balancing: Balancing = Balancing(), block: str = "neuron",
                 bank: ExpertBank | None = None, tied: bool = True,
                 depth_rule: str = "ponder", route_once: bool = False,
                 output_gate: bool = False, block_conv: int = 0, key_parts: int = 2,
                 value_dropout: float = 0.0, deep_query: str = "input", repeat_rows: str = "same") -> None:
        super().__init__()
        if depth_rule not in DEPTH_RULES:
            raise ValueError(f"depth_rule={depth_rule!r} must be one of {DEPTH_RULES}")
        self.dim, self.depth, self.adaptive = dim, depth, adaptive_depth
        self.depth_explore, self.depth_target, self.rule = depth_explore, depth_target, depth_rule
        initial_penalty = depth_penalty if depth_penalty > 0 or depth_target == 0 else 1e-3
        self.fractal = FractalExpert(
            dim, num_experts, depth, heads, topk, key_dim, gate=gate, query_norm=query_norm, act=act,
            join_bias=join_bias, drop_path_local=drop_path_local, drop_path_global=drop_path_global,
            expert_dtype=TABLE_DTYPES[expert_dtype], balancing=balancing, kind=block, bank=bank, tied=tied,
            route_once=route_once, block_conv=block_conv, key_parts=key_parts, value_dropout=value_dropout,
            deep_query=deep_query, repeat_rows=repeat_rows)
        self.depth_router: nn.Linear | None = None
        if adaptive_depth and depth > 1:
            self.depth_router = nn.Linear(dim, depth - 1 if depth_rule == "threshold" else depth)
        # ponder: the cost per block; with a target the fold steers it toward the penalty that
        # uses depth_target of the blocks. threshold: tau_c of stages 2..C, steered so that a
        # share q goes on at each. Both are state from past steps only: causal.
        self.initial_penalty = initial_penalty
        self.register_buffer("depth_penalty", torch.empty(()),
                             persistent=self.depth_router is not None and not self.halting)
        self.register_buffer("depth_thresholds", torch.empty(max(depth - 1, 0)),
                             persistent=self.depth_router is not None and self.halting)
        self.reset_parameters()
        if self.halting and not 1 / blocks_at_depth(depth) <= depth_target <= 1:
            raise ValueError(f"depth_target={depth_target}: the threshold rule needs a share of the "
                             f"{blocks_at_depth(depth)} blocks in [1/{blocks_at_depth(depth)}, 1]")
        self.continue_share = continue_share(depth, depth_target) if self.halting else 1.0
        # y * SiLU(W x): the multiplicative read-out of Memory+, paid once per layer
        self.output_gate = nn.Linear(dim, dim, bias=False) if output_gate else None
        self.forced_depth: int | None = None  # evaluate every token at this depth
        self.compact = True  # compact stopped tokens, training and inference (False: masked reference)

    @classmethod
    def from_config(cls, cfg: ModelConfig, bank: ExpertBank | None = None) -> FHME:
        return cls(cfg.dim, cfg.num_experts, cfg.fractal_depth, cfg.heads_per_column, cfg.topk, cfg.key_dim,
                   gate=cfg.gate, query_norm=cfg.query_norm, act=cfg.expert_act, join_bias=cfg.join_bias,
                   drop_path_local=cfg.drop_path_local, drop_path_global=cfg.drop_path_global,
                   adaptive_depth=cfg.adaptive_depth, depth_penalty=cfg.depth_penalty,
                   depth_explore=cfg.depth_explore, depth_target=cfg.depth_target,
                   expert_dtype=cfg.expert_dtype, balancing=balancing_of(cfg), block=cfg.block, bank=bank,
                   tied=cfg.tie_blocks, depth_rule=cfg.depth_rule, route_once=cfg.route_once,
                   output_gate=cfg.output_gate, block_conv=cfg.block_conv, key_parts=cfg.key_parts,
                   value_dropout=cfg.value_dropout, deep_query=cfg.deep_query, repeat_rows=cfg.repeat_rows)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The depth controllers' start: the depth router blind to its input (zero weights; the
        halting gates keep nn.Linear's biases, the ponder router starts at full depth, which the
        ponder cost pulls shallower), no thresholds yet. Runs after the router's own reset."""
        self.depth_penalty.fill_(self.initial_penalty)
        self.depth_thresholds.zero_()
        if self.depth_router is not None:
            nn.init.zeros_(self.depth_router.weight)
            if not self.halting:
                self.depth_router.bias.copy_(torch.linspace(0.0, 1.0, self.depth, device=self.depth_router.bias.device))

    def init_weights(self) -> None:
        """Initialise the whole layer in place, where its tensors live (``reset.reset_tree``):
        for a layer built on the meta device and materialised with ``to_empty``."""
        reset_tree(self)

    @property
    def halting(self) -> bool:
        """Threshold rule with a router: halting gates and thresholds per stage."""
        return self.adaptive and self.depth > 1 and self.rule == "threshold"

    def choose_depth(self, x_TD: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-token depth in 1..C (hard) and the router's output: probabilities (ponder), stage
        scores s_2..s_C (threshold; also at a forced depth, as the gates need them), or None."""
        forced = self.forced_depth or self.depth
        full = torch.full(x_TD.shape[:1], forced, dtype=torch.long, device=x_TD.device)
        if self.depth_router is None or (self.forced_depth is not None and not self.halting):
            return full, None
        logits = self.depth_router(x_TD).float()
        if self.halting:  # on while every stage so far scored above its threshold
            if self.forced_depth is not None:
                return full, logits
            go_on = (logits > self.depth_thresholds).long()
            return 1 + go_on.cumprod(-1).sum(-1), logits
        probs = F.softmax(logits, dim=-1)
        return probs.argmax(dim=-1) + 1, probs

    def _depths(self, like: Tensor) -> Tensor:
        """1..C on like's device."""
        return torch.arange(1, self.depth + 1, device=like.device)

    def _costs(self, like: Tensor) -> Tensor:
        """Blocks 2**c - 1 evaluated at each depth c, (C,), made on like's device (no host copy)."""
        return self._depths(like).to(like.dtype).exp2() - 1

    def forward(self, x: Tensor, seen: list[Tensor] | None = None, pos: int = 0) -> Tensor:
        """x (..., D); with block convolutions (B, T, D) at positions pos.., ``seen`` their cached
        inputs in generation (``model.KVCache.block_in``)."""
        lead, dim = x.shape[:-1], x.shape[-1]
        x_TD = x.reshape(-1, dim)
        depth_T, routed = self.choose_depth(x_TD)
        if routed is None:  # no router (or a forced depth of the ponder rule): f_d for every token
            y_TD = self.fractal(x, max_depth=self.forced_depth or self.depth, seen=seen, pos=pos).reshape(-1, dim)
        else:
            depth_T, kept = self._explore(depth_T)
            weights = (self._halting_weights(depth_T, kept, routed) if self.halting
                       else self._straight_through(depth_T, kept, routed))
            y_TD = self._combine(x_TD, depth_T, weights.to(x_TD.dtype))
        if self.collecting:
            self.record(DEPTH_COUNTS, (depth_T.unsqueeze(-1) == self._depths(depth_T)).sum(0).float())
        y_TD = y_TD - x_TD
        if self.output_gate is not None:
            y_TD = y_TD * F.silu(self.output_gate(x_TD))
        return y_TD.view(*lead, dim)

    def _explore(self, depth_T: Tensor) -> tuple[Tensor, Tensor]:
        """In training, a random depth_explore fraction of tokens takes a uniformly random depth
        (random, not a function of other tokens: causal), so every output keeps being trained and
        tried. Returns the depths and a (T, 1) float mask of the tokens left at the router's."""
        routed = torch.ones_like(depth_T, dtype=torch.bool)
        if self.training and self.depth_explore > 0:
            routed = torch.rand(depth_T.shape, device=depth_T.device) >= self.depth_explore
            depth_T = torch.where(routed, depth_T, torch.randint_like(depth_T, 1, self.depth + 1))
        return depth_T, routed.unsqueeze(-1).float()

    def _straight_through(self, depth_T: Tensor, kept_T1: Tensor, probs: Tensor) -> Tensor:
        """Weights (T, C) of f_1..f_C for the ponder rule: onehot(d) at inference; in training
        w = onehot(d) + p - stop_grad(p), where each uncomputed deeper option c > d is credited
        with f_d, as if going deeper changed nothing: its gradient is d's, so no depth is pushed
        away just because it was not tried. Tokens whose depth was explored give the router no
        gradient."""
        depths = self._depths(depth_T)
        hard = (depth_T.unsqueeze(-1) == depths).to(probs.dtype)
        if not self.training:
            return hard
        soft = (probs - probs.detach()) * kept_T1
        computed = (depths <= depth_T.unsqueeze(-1)).to(probs.dtype)
        deeper = (soft * (1 - computed)).sum(-1, keepdim=True)
        if self.collecting:
            costs = self._costs(probs)
            self.record(PONDER, self.depth_penalty * (probs * costs).sum(-1).mean())
            if self.depth_target > 0:
                used = costs[depth_T - 1]
                self.record(DEPTH_COST, torch.stack([used.sum(), used.new_full((), used.shape[0])]))
        return hard * (1 + deeper) + soft * computed  # zero past d

    def _halting_weights(self, depth_T: Tensor, kept_T1: Tensor, scores: Tensor) -> Tensor:
        """Weights (T, C) of f_1..f_C for the threshold rule: y = sum_c a_c (f_c - f_{c-1}) with
        a_1 = 1, a_c = sigmoid(s_c) for the stages run (c <= d), else 0; so w_c = a_c - a_{c+1}.
        Explored tokens train the gates of the stages they ran but do not steer the thresholds."""
        ran = (self._depths(depth_T)[1:] <= depth_T.unsqueeze(-1)).to(scores.dtype)  # (T, C-1)
        if self.training and self.collecting:  # of the routed tokens at stage c - 1, how many went on
            reached = (self._depths(depth_T)[:-1] <= depth_T.unsqueeze(-1)).to(scores.dtype)
            self.record(HALTS, torch.stack([(ran * kept_T1).sum(0), (reached * kept_T1).sum(0)]))
        a = torch.sigmoid(scores) * ran
        ones = torch.ones_like(a[:, :1])
        return torch.cat([ones, a], -1) - torch.cat([a, torch.zeros_like(ones)], -1)

    def _combine(self, x_TD: Tensor, depth_T: Tensor, weights_TC: Tensor) -> Tensor:
        """sum_c weights[t, c] f_c(x_t): compacted (stages only for the tokens that reach them),
        or the masked reference (every depth for every token)."""
        if self.compact:
            return self._compacted(x_TD, depth_T, weights_TC)
        outs = self.fractal(x_TD, return_all_depths=True)
        return torch.einsum("tc,ctd->td", weights_TC, torch.stack(outs))  # type: ignore[arg-type]

    def aux_loss_from(self, stats: Statistics) -> Tensor | None:
        """Ponder cost plus routing balance, one weight per layer: the mean over its blocks of
        each block's mean over its calls."""
        balance = [loss for b in self.fractal.blocks
                   if (loss := b.memory.router.aux_loss_from(stats)) is not None]
        parts = [p for p in (mean_of(stats.values(self, PONDER)), mean_of(balance)) if p is not None]
        return torch.stack(parts).sum() if parts else None

    def fold_inputs(self, stats: Statistics) -> FoldInputs | None:
        kind = HALTS if self.halting else DEPTH_COST
        sums = stats.total(self, kind, training=True)
        return FoldInputs([sums]) if sums is not None else None

    def fold(self, inputs: FoldInputs) -> None:
        """threshold: tau_c += step * (share of stage c - 1's tokens that went on - q).
        ponder: penalty += 1e-3 * (share of blocks used - target) / target. Additive, so it can
        turn negative, a bonus per block: without one, a router that drifts shallow (deeper
        outputs, trained by fewer tokens, look worse) has nothing pulling it back to the target."""
        if self.halting:
            went_on, reached = inputs.sums[0].unbind()
            share = went_on / reached.clamp_min(1)
            self.depth_thresholds.add_(THRESHOLD_STEP * (share - self.continue_share) * (reached > 0))
            return
        used, tokens = inputs.sums[0].unbind()
        share = used / (tokens.clamp_min(1) * blocks_at_depth(self.depth))
        self.depth_penalty.add_(1e-3 * (share - self.depth_target) / self.depth_target)

    def _compacted(self, x_TD: Tensor, depth_T: Tensor, weights_TC: Tensor) -> Tensor:
        """sum_c weights[t, c] f_c(x_t) over c <= d(t). Tokens are sorted deepest first, so stage
        c runs on a prefix of them (a view, no gather): one sort, one gather, one scatter back and
        one host sync (the prefix lengths) per layer."""
        order = torch.argsort(depth_T, descending=True, stable=True)
        reach = (depth_T.unsqueeze(-1) >= self._depths(depth_T)).sum(0).tolist()  # host sync
        x_sorted, w_sorted = x_TD.index_select(0, order), weights_TC.index_select(0, order)
        column = self.fractal.sample_columns(x_TD.shape[0], x_TD.device)  # global drop-path
        column = column.index_select(0, order) if column is not None else None
        routes: list[Tensor] | None = [] if self.fractal.route_once else None
        prev = self.fractal.stage(1, x_sorted, None, routes=routes)
        out = prev * w_sorted[:, :1]
        for c in range(2, self.depth + 1):
            n = reach[c - 1]  # tokens with d >= c: the first n
            if n == 0 and not self.fractal.bank.collective:
                break
            routes = [r[:n] for r in routes] if routes is not None else None
            prev = self.fractal.stage(c, x_sorted[:n], prev[:n], column[:n] if column is not None else None,
                                      routes=routes)
            out[:n] += prev * w_sorted[:n, c - 1:c]
        return torch.zeros_like(out).index_copy(0, order, out)

    # --- accounting -------------------------------------------------------------------------
    def _choosing(self, application: int) -> bool:
        """Whether a block application scores sub-keys: all do, except under ``route_once`` the
        ones after each column's first (stage c's B_c(x), application 2**c - 2)."""
        return not self.fractal.route_once or application + 2 in (2**c for c in range(1, self.depth + 1))

    def flops_at_depth(self, depth: int) -> int:
        """Forward FLOPs per token that stops at ``depth`` (multiply-add = 2): its 2**d - 1 block
        applications (routing, rows, convolution), its joins, the depth router and output gate."""
        blocks = 0
        for a in range(blocks_at_depth(depth)):
            block = self.fractal.block_of(a)
            blocks += block.memory.flops_per_token(choose=self._choosing(a))
            blocks += block.conv.flops_per_token() if block.conv is not None else 0
        if self.fractal.retrieved_queries:  # x - origin at the applications off the layer input
            blocks += (blocks_at_depth(depth) - depth) * self.dim
        dense = 2 * self.depth_router.weight.numel() if self.depth_router is not None else 0
        dense += 2 * self.dim * self.dim + self.dim if self.output_gate is not None else 0  # W x, product
        return blocks + joins_at_depth(depth) * 2 * self.dim + dense

    def params_at_depth(self, depth: int) -> int:
        """Parameters a token at ``depth`` reads: its routers (with their convolutions), its
        expert rows, its join gates."""
        applications = range(blocks_at_depth(depth))
        used = {id(b): b for b in map(self.fractal.block_of, applications)}  # tied: a block runs again
        total = 0
        for block in used.values():
            total += block.memory.router.params_per_token()
            total += block.conv.active_params_per_token() if block.conv is not None else 0
        for a in applications:  # expert rows (and gate) read per block call
            memory = self.fractal.block_of(a).memory
            total += memory.params_per_token() - memory.router.params_per_token()
        dense = self.depth_router.weight.numel() if self.depth_router is not None else 0
        dense += self.output_gate.weight.numel() if self.output_gate is not None else 0
        return total + self.fractal.join_gates_at_depth(depth) * (self.dim + 1) + dense

    def row_bytes_at_depth(self, depth: int) -> int:
        """Bytes of expert-table rows a token at ``depth`` reads: each block call's slots' rows."""
        elem = next(iter(self.fractal.bank.tables().values())).element_size()
        return elem * sum(self.fractal.block_of(a).memory.row_params_per_token()
                          for a in range(blocks_at_depth(depth)))

    def row_bytes_per_token(self, depth_hist: DepthHist = None) -> float:
        return self._expected(self.row_bytes_at_depth, depth_hist)

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
