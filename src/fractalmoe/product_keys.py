"""Exact product-key top-k: over N = n_1 * ... * n_P keys at O(P N^(1/P) Q/P + (P-1) K**2).

Legend: T tokens, H retrieval heads, K top-k, P key parts (2 by default), n_p sub-keys in part p
(n_keys = sqrt(N) for two parts), Q query width.

A query split in halves q1, q2 is scored against two sub-key tables. Any of the top-K full keys
(i, j), score s1[i] + s2[j], has i in the top-K of s1 and j in the top-K of s2, so the top-K of
the K*K candidate sums is the exact top-K over all N keys. With P parts the same argument applies
part by part: the exact top-K of parts 1..p, combined with part p + 1's top-K, holds the exact
top-K of parts 1..p+1. Scoring costs 2 Q sum_p n_p FLOPs per head: at N = 262,144 and Q = 16,
16,384 with two parts of 512 sub-keys, 3,072 with three of 64.

Pure tensor functions; the sub-key scoring's backward touches only the selected keys where the
tables are large.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .autocast import autocast_dtype, autocast_off
from .experts import RowScatter

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
    the count known on the host: no host data is copied and nothing waits for the device.
    Built outside inference mode: the cache outlives the call, and inference tensors could not
    serve a later training step."""
    total = sum(min(k2, k // (i + 1)) for i in range(k1))
    with torch.inference_mode(False):
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
