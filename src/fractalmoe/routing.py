"""Product-key routing: a router (queries, sub-keys, exact top-k over N experts) and the routed
block that mixes the experts it picks.

Legend: H retrieval heads, K top-k, P key parts (key_parts, 2 by default), n_p sub-keys in part p
(n_keys = sqrt(N) for two parts), Q query width (key_dim).

A query q = norm(W_q x) per head (``query_norm``) is split into P parts, each scored against its
sub-key table; the exact top-K over all N = n_1 * ... * n_P keys follows from the parts' top-K
lists (``product_keys``).

Balancing (opt-in, see ``Balancing``): selection-only biases (gates still use q . c) per sub-key
and per expert move after each training step toward the ones chosen less than average; with
sub-key biases alone, selection is the exact top-K of s1 + b1 + s2 + b2, and expert biases then
re-rank the K*K candidates. A Switch-style loss instead teaches queries and keys to spread.

Forward changes no state: under a collector (``stats.collect``) a router records its choices,
sub-key loads and balance loss, a running norm its query moments; ``stats.fold_statistics``
folds them in after the optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .experts import ExpertBank
from .product_keys import (
    candidate_sums,
    combine_parts,
    combine_topk,
    key_table_sizes,
    pair_indices,
    split_index,
    sub_key_topk,
)
from .query_norm import RunningQueryWhitening, make_query_norm
from .stats import (
    BALANCE_LOSS,
    CHOICES,
    SUB_KEY_LOAD,
    FoldInputs,
    PastBatchStatistics,
    Statistics,
    mean_of,
)


@dataclass(frozen=True)
class Balancing:
    """Opt-in ways to spread a router's choices over all N experts (all off by default).

    unit_keys: score against unit-length sub-keys, so no key wins by its norm alone.
    rate: per-step move of the selection-only biases (sub-keys and experts) toward even loads:
        b -= rate * load / mean load for each chosen one (see ``ProductKeyRouter.fold``).
    loss: weight of the Switch-style loss N * sum_e f_e * P_e over each token's K*K candidates
        (f_e: share of this batch's choices, P_e: mean candidate softmax), which teaches the
        queries and keys themselves to spread.
    router_only: the loss trains the router's own weights (query projection, sub-keys) and sends
        no gradient into the hidden states, which the rest of the model shares; its candidate
        scores are recomputed from the detached input (one more query projection in training).
    target_kl: > 0 makes ``loss`` the starting value of a weight of the router's own, steered
        after every step toward the least that holds the KL divergence of its usage (its last
        ~1M choices) from uniform at ``target_kl`` nats (``ProductKeyRouter.steer_weight``): each
        router gets the pressure it needs, where one shared weight over-spreads some layers to
        spread the one that needs it most.
    steer_rate: the exponent r of the weight's step (KL / target_kl) ** r after every step.
    """

    unit_keys: bool = False
    rate: float = 0.0
    loss: float = 0.0
    router_only: bool = False
    target_kl: float = 0.0
    steer_rate: float = 0.005


# The steered balance weight (``Balancing.target_kl``): usage is an EMA of choice counts over about
# this many choices (the window ``fractalmoe eval --usage-choices`` reads); the weight moves by a
# factor (KL / target) ** steer_rate per step, within these bounds: as fast down as up for the same
# ratio (at rate 0.005, 1.007x a step at 2.4 nats against 0.6, 0.998x at 0.4). A step
# exp(rate * (KL - target)) rose ~10x faster than it fell and held the reads over-spread for most
# of a run; the ratio at rate 0.05 reached its bound while the routes formed and cost twice the bpb.
USAGE_WINDOW = 1_000_000
WEIGHT_RANGE = (1e-4, 0.03)


def _tally(flat: Tensor, size: int) -> Tensor:
    """How often each of ``size`` indices appears in flat, as float counts (size,): fixed size,
    no host read."""
    return torch.zeros(size, device=flat.device).index_add_(0, flat, torch.ones(flat.shape, device=flat.device))


def _counts(idx: Tensor, heads: int, size: int) -> Tensor:
    """How often each of ``size`` indices appears per head in idx (..., H, K): (H, size)."""
    return _tally((idx + _head_offsets(heads, size, idx.device)).flatten(), heads * size).view(heads, size)


def _head_offsets(heads: int, size: int, device: torch.device) -> Tensor:
    """h * size per head, (H, 1): makes the indices of all heads one range of H * size."""
    return torch.arange(heads, device=device).unsqueeze(-1) * size


def _share_at(chosen: Tensor, at: Tensor, size: int) -> Tensor:
    """Share of each head's choices chosen (..., H, K) that equal each entry of at (..., H, M).

    Counted in an (H, size) table when that table is at most a few times larger than ``at``
    (a memset and a gather are then far cheaper than binary searches); otherwise without one: the
    choices of all heads sorted once (offset by h * size), each entry counted by two binary
    searches. Either way the cost is O(T H (K + M)) up to a log factor and a constant, never a
    table that grows with N alone."""
    heads = chosen.shape[-2]
    offsets = _head_offsets(heads, size, chosen.device)
    flat = (chosen + offsets).flatten()
    keys = (at + offsets).contiguous()
    if heads * size <= 4 * keys.numel():
        count = _tally(flat, heads * size)[keys]
    else:
        ranked = flat.sort().values
        count = torch.searchsorted(ranked, keys, right=True) - torch.searchsorted(ranked, keys)
    return count.float() / (chosen.numel() // heads)


def _per_head_at(table_HN: Tensor, idx: Tensor) -> Tensor:
    """table[h, idx[..., h, j]] for idx (..., H, K)."""
    flat = idx.reshape(-1, *idx.shape[-2:])  # (T, H, K)
    return table_HN.unsqueeze(0).expand(flat.shape[0], -1, -1).gather(-1, flat).view_as(idx)


class ProductKeyRouter(nn.Module, PastBatchStatistics):
    """Multi-head product-key retrieval: x (..., D) -> scores, indices (..., H, K).

    Under a collector it records its choices (every call) and, in training, its sub-key loads
    (when balancing) and balance loss (when ``balancing.loss`` > 0 and grad is on)."""

    def __init__(self, dim: int, num_experts: int, heads: int, topk: int, key_dim: int,
                 query_norm: str = "layernorm", balancing: Balancing = Balancing(),
                 key_parts: int = 2) -> None:
        super().__init__()
        sizes = key_table_sizes(num_experts, key_parts)
        if key_dim % key_parts or (key_parts == 2 and topk > sizes[0]) or topk > num_experts:
            raise ValueError(f"key_dim={key_dim} must split into {key_parts} equal parts and "
                             f"topk={topk} <= {sizes[0] if key_parts == 2 else num_experts}")
        if key_parts != 2 and (balancing.rate > 0 or balancing.loss > 0):
            raise ValueError("balancing rates and losses work on two key parts (key_parts = 2)")
        if balancing.target_kl > 0 and balancing.loss <= 0:
            raise ValueError("a usage target (target_kl) steers the balance loss: it needs loss > 0 to start from")
        self.heads, self.topk, self.key_dim, self.sizes = heads, topk, key_dim, sizes
        self.n_keys = max(sizes)  # rows of each part's sub-key table (parts smaller than it use a prefix)
        self.num_experts = num_experts
        self.balancing = balancing
        self.query = nn.Linear(dim, heads * key_dim, bias=False)
        self.norm = make_query_norm(query_norm, heads, key_dim)
        self.sub_keys = nn.Parameter(torch.empty(heads, key_parts, self.n_keys, key_dim // key_parts))
        # Selection-only biases per sub-key and per expert (persistent only when balancing).
        balanced = balancing.rate > 0
        self.register_buffer("key_bias", torch.empty(heads, key_parts, self.n_keys), persistent=balanced)
        self.register_buffer("expert_bias", torch.empty(heads, num_experts if balanced else 0),
                             persistent=balanced)
        # The steered balance weight and the usage it steers by (persistent only with a target).
        steered = balancing.target_kl > 0
        self.register_buffer("balance_weight", torch.empty(()), persistent=steered)
        self.register_buffer("usage_ema", torch.empty(num_experts if steered else 0), persistent=steered)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Sub-keys N(0, 1/width), so that a unit query's scores have unit variance; no biases;
        the balance weight at its starting value, no usage seen."""
        keys = self.sub_keys
        keys.copy_(torch.randn(keys.shape, device=keys.device).div_(math.sqrt(keys.shape[-1])))
        self.key_bias.zero_()
        self.expert_bias.zero_()
        self.balance_weight.fill_(self.balancing.loss)
        self.usage_ema.zero_()

    def queries(self, x: Tensor) -> Tensor:
        """Normalised queries (..., H, Q)."""
        return self.norm(self.query(x).unflatten(-1, (self.heads, self.key_dim)))

    def query_parts(self, x: Tensor) -> tuple[Tensor, ...]:
        """The queries split into the key's P parts, (..., H, Q/P) each."""
        return self.queries(x).chunk(len(self.sizes), dim=-1)

    def keys(self) -> Tensor:
        """Sub-keys (H, P, n, Q/P) as scored: unit length when ``unit_keys``."""
        return F.normalize(self.sub_keys, dim=-1) if self.balancing.unit_keys else self.sub_keys

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        keys, biased = self.keys(), self.balancing.rate > 0
        lists = []  # each part's top-k (scores, sub-key indices)
        for p, (q, size) in enumerate(zip(self.query_parts(x), self.sizes)):
            bias = self.key_bias[:, p, :size] if biased else None
            lists.append(sub_key_topk(q, keys[:, p, :size], min(self.topk, size), bias))
        if biased:  # two parts
            (v1, i1), (v2, i2), n = *lists, self.sizes[1]
            grid = (_per_head_at(self.key_bias[:, 0], i1).unsqueeze(-1)
                    + _per_head_at(self.key_bias[:, 1], i2).unsqueeze(-2)).flatten(-2)
            grid = grid + _per_head_at(self.expert_bias, pair_indices(i1, i2, n))
            scores, idx = combine_topk(v1, i1, v2, i2, n, self.topk, grid)
        else:
            scores, idx = combine_parts(lists, self.sizes, self.topk)
        if self.collecting:
            self.record(CHOICES, idx)
            if self.training and biased:
                i1, i2 = lists[0][1], lists[1][1]
                self.record(SUB_KEY_LOAD, _counts(torch.cat([i1, i2 + self.n_keys], dim=-1),
                                                  self.heads, 2 * self.n_keys))
            # Not formed when a schedule has faded the loss out, nor for a call with no tokens
            # (a sharded bank's stage that no token of this rank reached): a mean of nothing.
            if (self.training and self.balancing.loss > 0 and torch.is_grad_enabled()
                    and self.balance_scale_on and idx.numel() > 0):
                (v1, i1), (v2, i2) = lists
                if self.balancing.router_only:
                    v1, v2 = self._scores_at(x.detach(), [i1, i2])
                self.record(BALANCE_LOSS, self._balance_loss(v1, i1, v2, i2, idx))
        return scores, idx

    def rescore(self, x: Tensor, idx: Tensor) -> Tensor:
        """Scores (..., H, K) of x's queries at experts idx (..., H, K) chosen earlier: q . (c1_i, c2_j)
        for idx = i * n + j, 2 K Q FLOPs per head instead of scoring all sub-keys and ranking.
        Records no choices: it makes none."""
        return torch.stack(self._scores_at(x, split_index(idx, self.sizes))).sum(0)

    def _scores_at(self, x: Tensor, part_idx: list[Tensor]) -> list[Tensor]:
        """Sub-key scores of x's queries at the sub-keys part_idx[p] (..., H, K) of each part."""
        keys, heads = self.keys(), torch.arange(self.heads, device=x.device).unsqueeze(-1)
        return [torch.einsum("...hq,...hkq->...hk", q, keys[:, p][heads, i])
                for p, (q, i) in enumerate(zip(self.query_parts(x), part_idx))]

    def _balance_loss(self, v1: Tensor, i1: Tensor, v2: Tensor, i2: Tensor, idx: Tensor) -> Tensor:
        """loss * N * sum_e f_e P_e = loss * N * mean_{t,h} sum_c softmax(cand)_c * f[pair_c],
        f = share of this call's choices idx, needed at the K*K candidates only."""
        probs = F.softmax((v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2).float(), dim=-1)
        f_at = _share_at(idx, pair_indices(i1, i2, self.sizes[1]), self.num_experts)
        weight = self.balance_weight if self.balancing.target_kl > 0 else self.balancing.loss
        return weight * self.num_experts * (probs * f_at).sum(-1).mean()

    def aux_loss_from(self, stats: Statistics) -> Tensor | None:
        """Mean balance loss over this router's calls, times the schedule's factor."""
        loss = mean_of(stats.values(self, BALANCE_LOSS))
        return loss * stats.balance_scale if loss is not None else None

    def fold_inputs(self, stats: Statistics) -> FoldInputs | None:
        """The step's sub-key loads and per-head choices (selection biases) and its choice counts
        per expert (the steered weight), whichever this router folds."""
        choices = stats.values(self, CHOICES, training=True)
        loads = stats.values(self, SUB_KEY_LOAD, training=True)
        inputs = FoldInputs([], [])
        if self.balancing.rate > 0 and loads:
            offsets = _head_offsets(self.heads, self.num_experts, loads[0].device)
            chosen = [(c.reshape(-1, self.heads, self.topk) + offsets).reshape(-1) for c in choices]
            inputs = FoldInputs([torch.stack(loads).sum(0)], [torch.cat(chosen)])
        if self.balancing.target_kl > 0 and choices:
            inputs.sums.append(_tally(torch.cat([c.reshape(-1) for c in choices]), self.num_experts))
        return inputs if inputs.sums else None

    def fold(self, inputs: FoldInputs) -> None:
        """The selection biases' move (``move_biases``) and the balance weight's (``steer_weight``)."""
        sums = list(inputs.sums)
        if self.balancing.rate > 0 and inputs.indices:
            self.move_biases(sums.pop(0), inputs.indices[0])
        if self.balancing.target_kl > 0 and sums:
            self.steer_weight(sums.pop(0))

    def steer_weight(self, counts: Tensor) -> None:
        """usage <- usage * (1 - c / W) + counts (c: the step's choices, W = ``USAGE_WINDOW``, so
        usage holds about the last W choices), then, once it holds W / 2 of them, weight *=
        (KL(usage || uniform) / target_kl) ** steer_rate, clamped to ``WEIGHT_RANGE``. On the
        device throughout: no host read."""
        ema = self.usage_ema
        ema.mul_((1 - counts.sum() / USAGE_WINDOW).clamp_min(0)).add_(counts)
        total = ema.sum()
        share = ema / total.clamp_min(1)
        kl = torch.special.xlogy(share, share * self.num_experts).sum()
        step = (kl.clamp_min(1e-6) / self.balancing.target_kl) ** self.balancing.steer_rate
        self.balance_weight.mul_(torch.where(total >= USAGE_WINDOW / 2, step, torch.ones_like(step)))
        self.balance_weight.clamp_(*WEIGHT_RANGE)

    def move_biases(self, load: Tensor, chosen: Tensor) -> None:
        """b -= rate * load / mean load for the chosen sub-keys and experts: those chosen more
        than average become harder to pick than the rest.

        A constant added to every bias of a head changes no top-k, so the expert biases are
        written at the chosen rows only (an index_add of the step's choices, O(tokens * K) and
        never O(H * N)); they drift by -rate per step on average, which float32 resolves to
        1e-3 up to |b| ~ 1e4. Sub-key biases are few and kept centred: b += rate * (1 - load /
        mean load)."""
        rate = self.balancing.rate
        load = load.view_as(self.key_bias)
        self.key_bias.add_(rate * (1 - load / load.mean(-1, keepdim=True).clamp_min(1e-12)))
        per_choice = -rate * self.heads * self.num_experts / max(chosen.numel(), 1)
        step = torch.full((), per_choice, dtype=self.expert_bias.dtype, device=chosen.device)
        self.expert_bias.view(-1).index_add_(0, chosen, step.expand(chosen.numel()))

    def flops_per_token(self, choose: bool = True) -> int:
        """Query projection (and whitening), then either each part's sub-key scoring and the
        candidate sums, or (choose=False, ``rescore``) the K chosen keys' dot products.

        Two parts count all K*K candidate sums (the biased and balance-loss paths sum all of them;
        the plain path only the ~K ln K that can win: under 2% of a default block either way), so
        that every comparison table keeps one count; more parts (no biased path) count the pairs
        that can win of each combination, the adds they make."""
        dim = self.query.in_features
        whiten = 2 * self.heads * self.key_dim**2 if isinstance(self.norm, RunningQueryWhitening) else 0
        query = 2 * dim * self.heads * self.key_dim + whiten
        if not choose:
            return query + 2 * self.heads * self.topk * self.key_dim
        scoring = 2 * self.heads * sum(self.sizes) * (self.key_dim // len(self.sizes))
        return query + scoring + self.heads * candidate_sums(self.sizes, self.topk)

    def params_per_token(self) -> int:
        return self.query.weight.numel() + self.heads * sum(self.sizes) * (self.key_dim // len(self.sizes))


def gate_scores(scores: Tensor, kind: str) -> Tensor:
    """Softmax over the K retrieved scores (competing) or an independent sigmoid."""
    return F.softmax(scores, dim=-1) if kind == "softmax" else torch.sigmoid(scores)


@torch.compiler.disable
def _read_experts(bank: nn.Module, x: Tensor, idx: Tensor, gates: Tensor) -> Tensor:
    """bank(x, idx, gates), run eagerly under torch.compile: the mixes are autograd functions
    with row-sparse gradients (and, sharded, collectives) that dynamo does not trace."""
    return bank(x, idx, gates)


class ProductKeyMemory(nn.Module):
    """One routed block: sum over heads and top-k of g_j e_j(x). x (..., D) -> (..., D).

    Without ``bank`` it builds and owns one of ``num_experts`` experts of ``kind``; the fractal's
    blocks share their layer's bank instead, which the owner passes to ``forward`` (so each table
    is one parameter in one place). The "gated" kind multiplies the value read by SiLU(W x)
    (Memory+), W being this block's own.
    """

    def __init__(self, dim: int, num_experts: int, heads: int = 8, topk: int = 16,
                 key_dim: int = 128, gate: str = "softmax", query_norm: str = "layernorm",
                 act: str = "gelu", kind: str = "neuron", own_bank: bool = True,
                 balancing: Balancing = Balancing(), key_parts: int = 2,
                 value_dropout: float = 0.0) -> None:
        super().__init__()
        if gate not in ("softmax", "sigmoid"):
            raise ValueError(f"gate={gate!r} must be 'softmax' or 'sigmoid'")
        if not 0.0 <= value_dropout < 1.0:
            raise ValueError(f"value_dropout={value_dropout} must be in [0, 1)")
        self.router = ProductKeyRouter(dim, num_experts, heads, topk, key_dim, query_norm, balancing,
                                       key_parts)
        self.gate, self.kind, self.dim, self.value_dropout = gate, kind, dim, value_dropout
        self.bank = ExpertBank(num_experts, dim, act, kind=kind) if own_bank else None
        self.silu_gate = nn.Linear(dim, dim, bias=False) if kind == "gated" else None

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scores and expert indices, both (..., heads, topk); the scores sorted in descending
        order unless selection biases chose them (then in the order of score plus bias)."""
        return self.router(x)

    def forward(self, x: Tensor, bank: nn.Module | None = None) -> Tensor:
        return self.routed(x, bank)[0]

    def routed(self, x: Tensor, bank: nn.Module | None = None, experts: Tensor | None = None,
               row_offset: int = 0) -> tuple[Tensor, Tensor]:
        """The block's output and the experts it chose (..., H, K): routed afresh, or the given
        ``experts`` (chosen earlier for the same token) re-weighted from x's own query. It reads
        the experts' rows shifted by ``row_offset`` (mod N)."""
        bank = bank if bank is not None else self.bank
        scores, idx = self.router(x) if experts is None else (self.router.rescore(x, experts), experts)
        gates = F.dropout(gate_scores(scores, self.gate), self.value_dropout, self.training)
        rows = (idx + row_offset) % self.router.num_experts if row_offset else idx
        y = _read_experts(bank, x, rows.flatten(-2), gates.flatten(-2))
        return (y * F.silu(self.silu_gate(x)) if self.silu_gate is not None else y), idx

    def _per_slot(self) -> tuple[int, int]:
        """Forward FLOPs and parameters of one routed slot."""
        if self.kind == "neuron":
            return 4 * self.dim, 2 * self.dim
        return 2 * self.dim, self.dim

    def flops_per_token(self, choose: bool = True) -> int:
        """Routing (choosing experts, or re-weighting given ones), the routed slots and (gated)
        the SiLU gate's projection and product."""
        slots = self.router.heads * self.router.topk
        gated = 2 * self.dim * self.dim + self.dim if self.silu_gate is not None else 0
        return self.router.flops_per_token(choose) + slots * self._per_slot()[0] + gated

    def row_params_per_token(self) -> int:
        """Expert-table entries one call reads: every slot's row (two for neurons)."""
        return self.router.heads * self.router.topk * self._per_slot()[1]

    def params_per_token(self) -> int:
        gated = self.dim * self.dim if self.silu_gate is not None else 0
        return self.router.params_per_token() + self.row_params_per_token() + gated
