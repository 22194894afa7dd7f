"""Product-key routing: exact top-k over N = n_1 * ... * n_P experts at O(P N^(1/P) Q/P + (P-1) K**2).

Legend: H retrieval heads, K top-k, P key parts (key_parts, 2 by default), n_p sub-keys in part p
(n_keys = sqrt(N) for two parts), Q query width (key_dim).

A query q = norm(W_q x) per head is split in halves q1, q2, scored against two sub-key tables.
Any of the top-K full keys (i, j), score s1[i] + s2[j], has i in the top-K of s1 and j in the
top-K of s2, so the top-K of the K*K candidate sums is the exact top-K over all N keys. With P
parts the same argument applies part by part: the exact top-K of parts 1..p, combined with part
p + 1's top-K, holds the exact top-K of parts 1..p+1. Scoring costs 2 Q sum_p n_p FLOPs per head:
at N = 262,144 and Q = 16, 16,384 with two parts of 512 sub-keys, 3,072 with three of 64.

Balancing (opt-in, see ``Balancing``): selection-only biases (gates still use q . c) per sub-key
and per expert move after each training step toward the ones chosen less than average; with
sub-key biases alone, selection is the exact top-K of s1 + b1 + s2 + b2, and expert biases then
re-rank the K*K candidates. A Switch-style loss instead teaches queries and keys to spread.

Forward changes no state: under a collector (``stats.collect``) a router records its choices,
sub-key loads and balance loss, a running norm its query moments; ``stats.fold_statistics``
folds them in after the optimizer step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autocast import autocast_dtype, autocast_off
from .experts import ExpertBank, RowScatter
from .stats import (
    BALANCE_LOSS,
    CHOICES,
    QUERY_MOMENTS,
    SUB_KEY_LOAD,
    FoldInputs,
    PastBatchStatistics,
    Statistics,
    mean_of,
)


# Sub-key scores per block of tokens: 8 MB of float32 on a CPU, where a block stays in the caches;
# 256 MB on an accelerator, whose caches are no help, so that a step launches few kernels.
_SCORE_BLOCK = {"cpu": 1 << 21, "device": 1 << 26}
# The sub-key score gradient has k nonzeros in each row of n. Up to n = 8 k it is formed dense
# and multiplied out (n / k times the FLOPs of summing the k rows, but no sort of the indices:
# faster on a CPU for the default's 22 of 128); past that (a million experts: 16 of 1,024) only
# the selected keys' rows are summed.
_DENSE_SCORE_GRAD = 8
_FULL_SORT = 256  # rows up to this long are argsorted whole on the host (``topk_indices``)


def _select_on_host(scores: Tensor, k: int) -> bool:
    """numpy's selection for CPU float rows where k is over an eighth of the row (not traced)."""
    return (scores.device.type == "cpu" and 8 * k >= scores.shape[-1] and not torch.compiler.is_compiling()
            and scores.dtype in (torch.float32, torch.float64))


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries along the last dim, in descending order of score.

    On a CPU, when k is a large share of the row (the default's 22 of 128 sub-keys, 22 of the
    74 candidate pairs), numpy is 1.5-2.5x faster than ``torch.topk``, which sorts (value,
    index) pairs row by row: rows of up to ``_FULL_SORT`` scores are argsorted whole (one pass,
    no gathers: 1.6x the argpartition route at 128), longer ones argpartitioned and the k
    argsorted. The same indices but for the order of tied scores. Elsewhere (accelerators,
    torch.compile, small k) ``torch.topk``."""
    n = scores.shape[-1]
    if not _select_on_host(scores, k):
        return scores.detach().topk(k, dim=-1).indices
    a = scores.detach().contiguous().numpy()
    if n <= _FULL_SORT:
        return torch.from_numpy(np.ascontiguousarray(np.argsort(-a, axis=-1)[..., :k]))
    part = np.argpartition(a, n - k, axis=-1)[..., n - k:]
    order = np.argsort(-np.take_along_axis(a, part, -1), axis=-1)
    return torch.from_numpy(np.take_along_axis(part, order, -1))


def sorted_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest entries along the last dim, descending, as
    ``torch.topk``; values keep their autograd graph."""
    idx = topk_indices(scores, k)
    return scores.gather(-1, idx), idx


class _SubKeyTopK(torch.autograd.Function):
    """Top-k of the sub-key scores q . c_i per head, whose backward touches only the k selected
    keys of each query where n is large: O(T * H * k * Q) instead of the dense O(T * H * n * Q)
    score gradient (``_DENSE_SCORE_GRAD``)."""

    @staticmethod
    def forward(ctx, q_THQ: Tensor, keys_HNQ: Tensor, k: int,
                bias_HN: Tensor | None) -> tuple[Tensor, Tensor]:
        ctx.dtypes = q_THQ.dtype, keys_HNQ.dtype
        dtype = autocast_dtype(q_THQ)  # under autocast, scored as its matrix product would be
        if dtype is not None:
            q_THQ, keys_HNQ = q_THQ.to(dtype), keys_HNQ.to(dtype)
        with autocast_off(q_THQ):
            vals, idx = _SubKeyTopK._scores(q_THQ, keys_HNQ, k, bias_HN)
        ctx.save_for_backward(q_THQ, keys_HNQ, idx)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def _scores(q_THQ: Tensor, keys_HNQ: Tensor, k: int, bias_HN: Tensor | None) -> tuple[Tensor, Tensor]:
        # Scored in blocks of tokens (``_SCORE_BLOCK``): on a CPU a block's (T_b, H, n) scores stay
        # a few MB where all of them are tens of MB at a million experts (n = 1024, 8 heads,
        # 2,048 tokens: 67 MB); on an accelerator one block holds them all.
        heads, n = keys_HNQ.shape[:2]
        block = max(1, _SCORE_BLOCK["cpu" if q_THQ.device.type == "cpu" else "device"] // (heads * n))
        parts = []
        for q in q_THQ.split(block):
            scores = torch.einsum("thq,hnq->thn", q, keys_HNQ)
            if bias_HN is None:
                parts.append(sorted_topk(scores, k))
            else:
                idx = topk_indices(scores + bias_HN, k)
                parts.append((scores.gather(-1, idx), idx))
        if len(parts) == 1:
            return parts[0]
        return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])

    @staticmethod
    def backward(ctx, g_vals: Tensor, _g_idx: Tensor):  # type: ignore[override]
        q_THQ, keys_HNQ, idx = ctx.saved_tensors
        with autocast_off(q_THQ):
            g_q, g_keys = _SubKeyTopK._grads(q_THQ, keys_HNQ, idx, g_vals.to(q_THQ.dtype))
        return g_q.to(ctx.dtypes[0]), g_keys.to(ctx.dtypes[1]), None, None

    @staticmethod
    def _grads(q_THQ: Tensor, keys_HNQ: Tensor, idx: Tensor, g_vals: Tensor) -> tuple[Tensor, Tensor]:
        num_t, heads, k = idx.shape
        n, width = keys_HNQ.shape[1], keys_HNQ.shape[2]
        if n <= _DENSE_SCORE_GRAD * k:  # few sub-keys: two small matrix products, no sort
            g_scores = g_vals.new_zeros(num_t, heads, n).scatter_(-1, idx, g_vals)
            return (torch.einsum("thn,hnq->thq", g_scores, keys_HNQ),
                    torch.einsum("thn,thq->hnq", g_scores, q_THQ))
        rows = (idx + torch.arange(heads, device=idx.device).view(1, heads, 1) * n).view(-1, k)
        table = keys_HNQ.reshape(heads * n, width)
        g_flat = g_vals.reshape(-1, k)
        g_q = F.embedding_bag(rows, table, per_sample_weights=g_flat, mode="sum")
        g_keys = RowScatter(rows, heads * n)(g_flat, q_THQ.reshape(-1, width), keys_HNQ.dtype,
                                              sparse=False)
        return g_q.view_as(q_THQ), g_keys.view_as(keys_HNQ)


def sub_key_topk(q: Tensor, keys: Tensor, k: int,
                 bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-k (of score + bias) scores and indices of q (..., H, Q) against keys (H, n, Q):
    (..., H, k) each; the scores returned carry no bias."""
    lead = q.shape[:-2]
    vals, idx = _SubKeyTopK.apply(q.reshape(-1, *q.shape[-2:]), keys, k, bias)
    return vals.view(*lead, *vals.shape[1:]), idx.view(*lead, *idx.shape[1:])


def pair_indices(i1: Tensor, i2: Tensor, n: int) -> Tensor:
    """Expert index i * n + j of every candidate pair: (..., K*K)."""
    return (i1.unsqueeze(-1) * n + i2.unsqueeze(-2)).flatten(-2)


@functools.cache
def _pairs_that_can_win(k1: int, k2: int, k: int,
                        device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(i, j, i * k2 + j) of the pairs i < k1, j < k2 with (i + 1)(j + 1) <= k: about k ln k.

    With both lists sorted in descending order, pair (i, j) is beaten or tied by every (i', j')
    with i' <= i and j' <= j, (i + 1)(j + 1) - 1 others: past k of them it cannot be in the top k.
    Row i holds j < min(k2, k // (i + 1)). The pairs are built on the device from ``arange`` with
    the count known on the host: no host data is copied and nothing waits for the device."""
    total = sum(min(k2, k // (i + 1)) for i in range(k1))
    rows = torch.arange(k1, device=device)
    per_row = (k // (rows + 1)).clamp_(max=k2)
    i = torch.repeat_interleave(rows, per_row, output_size=total)
    starts = torch.repeat_interleave(per_row.cumsum(0) - per_row, per_row, output_size=total)
    j = torch.arange(total, device=device) - starts
    return i, j, i * k2 + j


def candidate_sums(sizes: tuple[int, ...], topk: int) -> int:
    """Adds per head that fold the parts' top-k lists into the exact top-k, as counted: all K*K
    sums for two parts (the biased and balance-loss paths sum all of them), the pairs that can
    win of each combination for more parts (``_pairs_that_can_win``)."""
    if len(sizes) == 2:
        return topk * topk
    sums, kept = 0, min(topk, sizes[0])
    for size in sizes[1:]:
        listed = min(topk, size)
        sums += len(_pairs_that_can_win(kept, listed, topk, torch.device("cpu"))[0])
        kept = min(topk, kept * listed)
    return sums


def combine_topk(v1: Tensor, i1: Tensor, v2: Tensor, i2: Tensor, n: int, k: int,
                 grid_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exact top-k of the k1*k2 sums of two top-k lists (..., k1), (..., k2), each sorted in
    descending order; indices i * n + j (n: the size of the table i2 indexes).

    Without ``grid_bias`` only the ~k ln k pairs that can win are summed (``_pairs_that_can_win``).
    ``grid_bias`` (..., k1*k2) is added to all candidates for choosing only (it breaks the
    order); the scores returned are always v1 + v2 of the chosen pairs."""
    k2 = v2.shape[-1]
    if grid_bias is None:
        # Traced by torch.compile (its cache is host state that a graph must not bake in).
        pairs = _pairs_that_can_win.__wrapped__ if torch.compiler.is_compiling() else _pairs_that_can_win
        rows, cols, flat_of = pairs(v1.shape[-1], k2, k, v1.device)
        scores, pos = sorted_topk(v1.index_select(-1, rows) + v2.index_select(-1, cols), k)
        flat = flat_of[pos]
    else:
        cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)  # (..., k1*k2)
        flat = topk_indices(cand.detach() + grid_bias, k)
        scores = cand.gather(-1, flat)
    idx = i1.gather(-1, flat // k2) * n + i2.gather(-1, flat % k2)
    return scores, idx


def key_table_sizes(num_experts: int, parts: int) -> tuple[int, ...]:
    """Sub-key table sizes (n_1, ..., n_P), product N, as equal as N's divisors allow: a
    perfect square for two parts; for more, e.g. a power of two (16,384 = 32 * 16 * 32)."""
    if parts == 2:
        root = math.isqrt(num_experts)
        if root * root != num_experts:
            raise ValueError(f"num_experts={num_experts} must be a perfect square (n_keys**2), "
                             f"e.g. {root * root} or {(root + 1) ** 2}")
        return root, root
    if parts < 2:
        raise ValueError(f"key_parts={parts} must be >= 2")
    sizes, rest = [], num_experts
    for left in range(parts, 1, -1):
        target = math.log(rest) / left
        divisors = [d for d in range(2, math.isqrt(rest) + 1) if rest % d == 0]
        divisors += [rest // d for d in divisors] + [rest]
        size = min(divisors, key=lambda d: (abs(math.log(d) - target), d))
        sizes.append(size)
        rest //= size
    sizes.append(rest)
    if min(sizes) < 2 or max(sizes) > 4 * min(sizes):
        raise ValueError(f"num_experts={num_experts} does not split into {parts} sub-key tables of "
                         f"near-equal size (got {sizes}): use a power of two or n**{parts}")
    return tuple(sizes)


def split_index(idx: Tensor, sizes: tuple[int, ...]) -> list[Tensor]:
    """The sub-key of each part of expert idx = ((i_1 n_2 + i_2) n_3 + i_3) ...: [i_1, ..., i_P]."""
    parts = []
    for size in reversed(sizes[1:]):
        parts.append(idx % size)
        idx = idx // size
    return [idx, *reversed(parts)]


def product_key_topk(*part_scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of s1[..., i] + s2[..., j] + ... over all (i, j, ...); returns (scores,
    mixed-radix indices (i * n_2 + j) * n_3 + ...)."""
    lists = [sorted_topk(s, min(k, s.shape[-1])) for s in part_scores]  # (..., <=K), sorted
    return combine_parts(lists, tuple(s.shape[-1] for s in part_scores), k)


def combine_parts(lists: list[tuple[Tensor, Tensor]], sizes: tuple[int, ...],
                  k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k over the sums of P per-part top-k lists (scores, indices), sorted descending,
    folded in part by part."""
    scores, idx = lists[0]
    for (v, i), size in zip(lists[1:], sizes[1:]):
        scores, idx = combine_topk(scores, idx, v, i, size, min(k, scores.shape[-1] * v.shape[-1]))
    return scores, idx


class RunningQueryNorm(nn.Module, PastBatchStatistics):
    """Standardise each query coordinate (per head) with statistics of *previous* training
    batches, then a learned affine map.

    This is what BatchNorm does for PEER's expert usage, without its leak: under a collector a
    training forward records its query moments (sums and counts about the running mean), and
    ``fold`` merges one step's moments into the running estimate after the optimiser step, so no
    output of a batch ever depends on that batch's other tokens (a block called twice in one
    fractal pass sees the same statistics both times; the step's calls are pooled).
    The estimate is a cumulative mean for the first 1/momentum steps, an EMA after (so the first
    steps are not normalised by the initial guess). Evaluation uses the same frozen estimate.
    """

    def __init__(self, heads: int, width: int, momentum: float = 0.02, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(heads, width))
        self.register_buffer("var", torch.ones(heads, width))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))
        self.weight = nn.Parameter(torch.ones(heads, width))
        self.bias = nn.Parameter(torch.zeros(heads, width))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """No batches seen: zero mean, unit second moment, identity affine map."""
        self.mean.zero_()
        self.batches.zero_()
        self._reset_second()
        self.weight.fill_(1.0)
        if self.bias is not None:
            self.bias.zero_()

    def _reset_second(self) -> None:
        self.var.fill_(1.0)

    def _second_sum(self, centered: Tensor) -> Tensor:
        """Sum over tokens of the second moment this norm keeps, of (T, H, Q) queries."""
        return centered.square().sum(0)

    def _outer(self, shift: Tensor) -> Tensor:
        """The same second moment of one (H, Q) vector."""
        return shift.square()

    def _second(self) -> Tensor:
        return self.var

    def _refresh(self) -> None:
        """Recompute derived transforms after the statistics changed."""

    def _standardise(self, centered: Tensor) -> Tensor:
        return centered * torch.rsqrt(self.var + self.eps)

    def fold_inputs(self, stats: Statistics) -> FoldInputs | None:
        calls = stats.values(self, QUERY_MOMENTS, training=True)
        if not calls:
            return None
        return FoldInputs([torch.stack(parts).sum(0) for parts in zip(*calls)])

    def fold(self, inputs: FoldInputs) -> None:
        """Merge the step's pooled moments: mean and second moment about the batch mean, at
        rate max(momentum, 1 / (steps folded + 1))."""
        count, total, second = inputs.sums
        count = count.clamp_min(1)
        shift = total / count  # batch mean - running mean
        rate = (1.0 / (self.batches + 1)).clamp_min(self.momentum).to(self.mean.dtype)
        self._second().lerp_(second / count - self._outer(shift), rate)
        self.mean.add_(shift * rate)
        self.batches += 1
        self._refresh()

    def forward(self, q: Tensor) -> Tensor:  # q: (..., H, Q)
        out = self._standardise(q - self.mean) * self.weight
        if self.bias is not None:
            out = out + self.bias
        if self.training and self.collecting:
            centered = q.detach().reshape(-1, *q.shape[-2:]).to(self.mean.dtype) - self.mean
            self.record(QUERY_MOMENTS, (centered.new_full((), centered.shape[0]), centered.sum(0),
                                        self._second_sum(centered)))
        return out


class RunningQueryWhitening(RunningQueryNorm):
    """Like RunningQueryNorm, but decorrelates the query coordinates of each head with the
    inverse square root of their running covariance (ZCA).

    Product keys choose evenly only if the two query halves are spread in every direction and
    independent of each other; per-coordinate scaling fixes neither a low-rank query nor
    correlated halves. Whitened queries have identity covariance, so both hold to second order.
    There is no learned bias: a shared offset would pull every query toward the same keys.
    Its fold decomposes the covariance (eigh), which on CUDA waits for the device once per step.
    """

    def __init__(self, heads: int, width: int, momentum: float = 0.02, eps: float = 1e-5) -> None:
        super().__init__(heads, width, momentum, eps)
        del self.var, self.bias
        self.bias = None
        eye = torch.eye(width).expand(heads, width, width).clone()
        self.register_buffer("cov", eye)
        self.register_buffer("whitener", eye.clone())

    def _reset_second(self) -> None:
        eye = torch.eye(self.cov.shape[-1], device=self.cov.device)
        self.cov.copy_(eye)
        self.whitener.copy_(eye)

    def _second_sum(self, centered: Tensor) -> Tensor:
        return torch.einsum("thi,thj->hij", centered, centered)

    def _outer(self, shift: Tensor) -> Tensor:
        return torch.einsum("hi,hj->hij", shift, shift)

    def _second(self) -> Tensor:
        return self.cov

    def _refresh(self) -> None:
        evals, evecs = torch.linalg.eigh(self.cov.double())
        inv_sqrt = evals.clamp_min(0).add(self.eps).rsqrt()
        self.whitener.copy_((evecs * inv_sqrt.unsqueeze(-2)) @ evecs.transpose(-1, -2))

    def _standardise(self, centered: Tensor) -> Tensor:
        return torch.einsum("...hj,hij->...hi", centered, self.whitener)


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
    """

    unit_keys: bool = False
    rate: float = 0.0
    loss: float = 0.0
    router_only: bool = False


def _counts(idx: Tensor, heads: int, size: int) -> Tensor:
    """How often each of ``size`` indices appears per head in idx (..., H, K): (H, size)."""
    per_head = idx.reshape(-1, heads, idx.shape[-1]).transpose(0, 1).reshape(heads, -1)
    out = torch.zeros(heads, size, device=idx.device)
    return out.scatter_add_(1, per_head, torch.ones_like(per_head, dtype=out.dtype))


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
        table = torch.zeros(heads * size, device=chosen.device).index_add_(
            0, flat, torch.ones(flat.shape, device=chosen.device))
        count = table[keys]
    else:
        ranked = flat.sort().values
        count = torch.searchsorted(ranked, keys, right=True) - torch.searchsorted(ranked, keys)
    return count.float() / (chosen.numel() // heads)


def _per_head_at(table_HN: Tensor, idx: Tensor) -> Tensor:
    """table[h, idx[..., h, j]] for idx (..., H, K)."""
    flat = idx.reshape(-1, *idx.shape[-2:])  # (T, H, K)
    return table_HN.unsqueeze(0).expand(flat.shape[0], -1, -1).gather(-1, flat).view_as(idx)


def make_query_norm(kind: str, heads: int, width: int) -> nn.Module:
    """Queries are normalised per token, or with statistics of past batches (never the current
    batch: its statistics would leak future tokens into training)."""
    if kind == "layernorm":
        return nn.LayerNorm(width)
    if kind == "rmsnorm":
        return nn.RMSNorm(width)
    if kind == "running":
        return RunningQueryNorm(heads, width)
    if kind == "whiten":
        return RunningQueryWhitening(heads, width)
    return nn.Identity()


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
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Sub-keys N(0, 1/width), so that a unit query's scores have unit variance; no biases."""
        keys = self.sub_keys
        keys.copy_(torch.randn(keys.shape, device=keys.device).div_(math.sqrt(keys.shape[-1])))
        self.key_bias.zero_()
        self.expert_bias.zero_()

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
            if (self.training and self.balancing.loss > 0 and torch.is_grad_enabled()
                    and self.balance_scale_on):  # a schedule that has faded the loss out: not formed
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
        return self.balancing.loss * self.num_experts * (probs * f_at).sum(-1).mean()

    def aux_loss_from(self, stats: Statistics) -> Tensor | None:
        """Mean balance loss over this router's calls, times the schedule's factor."""
        loss = mean_of(stats.values(self, BALANCE_LOSS))
        return loss * stats.balance_scale if loss is not None else None

    def fold_inputs(self, stats: Statistics) -> FoldInputs | None:
        loads = stats.values(self, SUB_KEY_LOAD, training=True)
        if self.balancing.rate <= 0 or not loads:
            return None
        offsets = _head_offsets(self.heads, self.num_experts, loads[0].device)
        chosen = [(c.reshape(-1, self.heads, self.topk) + offsets).reshape(-1)
                  for c in stats.values(self, CHOICES, training=True)]
        return FoldInputs([torch.stack(loads).sum(0)], [torch.cat(chosen)])

    def fold(self, inputs: FoldInputs) -> None:
        """b -= rate * load / mean load for the chosen sub-keys and experts: those chosen more
        than average become harder to pick than the rest.

        A constant added to every bias of a head changes no top-k, so the expert biases are
        written at the chosen rows only (an index_add of the step's choices, O(tokens * K) and
        never O(H * N)); they drift by -rate per step on average, which float32 resolves to
        1e-3 up to |b| ~ 1e4. Sub-key biases are few and kept centred: b += rate * (1 - load /
        mean load)."""
        rate = self.balancing.rate
        load = inputs.sums[0].view_as(self.key_bias)
        self.key_bias.add_(rate * (1 - load / load.mean(-1, keepdim=True).clamp_min(1e-12)))
        chosen = inputs.indices[0]
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
        """Scores (sorted, descending) and expert indices, both (..., heads, topk)."""
        return self.router(x)

    def forward(self, x: Tensor, bank: nn.Module | None = None) -> Tensor:
        return self.routed(x, bank)[0]

    def routed(self, x: Tensor, bank: nn.Module | None = None,
               experts: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The block's output and the experts it read (..., H, K): routed afresh, or the given
        ``experts`` (chosen earlier for the same token) re-weighted from x's own query."""
        bank = bank if bank is not None else self.bank
        scores, idx = self.router(x) if experts is None else (self.router.rescore(x, experts), experts)
        gates = F.dropout(gate_scores(scores, self.gate), self.value_dropout, self.training)
        y = _read_experts(bank, x, idx.flatten(-2), gates.flatten(-2))
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

    def params_per_token(self) -> int:
        gated = self.dim * self.dim if self.silu_gate is not None else 0
        return (self.router.params_per_token() + self.router.heads * self.router.topk * self._per_slot()[1]
                + gated)
