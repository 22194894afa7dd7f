"""Product-key routing: exact top-k over N = n_keys**2 experts at O(sqrt(N) * d_k + k**2).

Legend: H retrieval heads, K top-k, n sub-keys per half (n_keys), Q query width (key_dim).

A query q = norm(W_q x) per head is split in halves q1, q2, scored against two sub-key tables.
Any of the top-K full keys (i, j), score s1[i] + s2[j], has i in the top-K of s1 and j in the
top-K of s2, so the top-K of the K*K candidate sums is the exact top-K over all N keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .experts import ExpertBank, RowScatter


class _SubKeyTopK(torch.autograd.Function):
    """Top-k of the sub-key scores q . c_i per head, whose backward touches only the k selected
    keys of each query: O(T * H * k * Q) instead of the dense O(T * H * n * Q) score gradient."""

    @staticmethod
    def forward(ctx, q_THQ: Tensor, keys_HNQ: Tensor, k: int) -> tuple[Tensor, Tensor]:
        scores = torch.einsum("thq,hnq->thn", q_THQ, keys_HNQ)
        vals, idx = scores.topk(k, dim=-1)
        ctx.save_for_backward(q_THQ, keys_HNQ, idx)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, g_vals: Tensor, _g_idx: Tensor):  # type: ignore[override]
        q_THQ, keys_HNQ, idx = ctx.saved_tensors
        num_t, heads, k = idx.shape
        n, width = keys_HNQ.shape[1], keys_HNQ.shape[2]
        rows = (idx + torch.arange(heads, device=idx.device).view(1, heads, 1) * n).view(-1, k)
        table = keys_HNQ.reshape(heads * n, width)
        g_flat = g_vals.reshape(-1, k)
        g_q = F.embedding_bag(rows, table, per_sample_weights=g_flat, mode="sum")
        g_keys = RowScatter(rows, heads * n)(g_flat, q_THQ.reshape(-1, width), keys_HNQ.dtype,
                                              sparse=False)
        return g_q.view_as(q_THQ), g_keys.view_as(keys_HNQ), None


def sub_key_topk(q: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k scores and indices of q (..., H, Q) against keys (H, n, Q): (..., H, k) each."""
    lead = q.shape[:-2]
    vals, idx = _SubKeyTopK.apply(q.reshape(-1, *q.shape[-2:]), keys, k)
    return vals.view(*lead, *vals.shape[1:]), idx.view(*lead, *idx.shape[1:])


def combine_topk(v1: Tensor, i1: Tensor, v2: Tensor, i2: Tensor, n: int, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of the k*k sums of two per-half top-k lists; indices i * n + j."""
    cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)  # (..., K*K)
    scores, flat = cand.topk(k, dim=-1)
    idx = i1.gather(-1, flat // k) * n + i2.gather(-1, flat % k)
    return scores, idx


def product_key_topk(s1: Tensor, s2: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of s1[..., i] + s2[..., j] over all (i, j); returns (scores, i * n + j)."""
    n = s2.shape[-1]
    v1, i1 = s1.topk(k, dim=-1)  # (..., K), sorted
    v2, i2 = s2.topk(k, dim=-1)
    return combine_topk(v1, i1, v2, i2, n, k)


class RunningQueryNorm(nn.Module):
    """Standardise each query coordinate (per head) with an EMA of *previous* training batches'
    mean and variance, then a learned affine map.

    This is what BatchNorm does for PEER's expert usage, without its leak: a batch's statistics
    are only accumulated while it runs and folded into the EMA by ``commit()`` at the start of
    the next model forward, so no output of a batch ever depends on that batch's other tokens
    (a block called twice in one fractal pass sees the same statistics both times).
    Evaluation uses the frozen EMA.
    """

    def __init__(self, heads: int, width: int, momentum: float = 0.02, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(heads, width))
        self.register_buffer("var", torch.ones(heads, width))
        self.weight = nn.Parameter(torch.ones(heads, width))
        self.bias = nn.Parameter(torch.zeros(heads, width))
        self._pending: list[Tensor] = []  # per-call (mean, var) of batches not yet committed

    def commit(self) -> None:
        """Fold the statistics of the finished forward pass into the EMA."""
        with torch.no_grad():
            for mean, var in self._pending:
                self.mean.lerp_(mean, self.momentum)
                self.var.lerp_(var, self.momentum)
        self._pending = []

    def forward(self, q: Tensor) -> Tensor:  # q: (..., H, Q)
        out = (q - self.mean) * torch.rsqrt(self.var + self.eps) * self.weight + self.bias
        if self.training:
            flat = q.detach().reshape(-1, *q.shape[-2:])
            self._pending.append((flat.mean(0), flat.var(0, unbiased=False)))
        return out


def make_query_norm(kind: str, heads: int, width: int) -> nn.Module:
    """Queries are normalised per token, or with statistics of past batches (never the current
    batch: its statistics would leak future tokens into training)."""
    if kind == "layernorm":
        return nn.LayerNorm(width)
    if kind == "rmsnorm":
        return nn.RMSNorm(width)
    if kind == "running":
        return RunningQueryNorm(heads, width)
    return nn.Identity()


class ProductKeyRouter(nn.Module):
    """Multi-head product-key retrieval: x (..., D) -> scores, indices (..., H, K)."""

    def __init__(self, dim: int, num_experts: int, heads: int, topk: int, key_dim: int,
                 query_norm: str = "layernorm") -> None:
        super().__init__()
        n_keys = math.isqrt(num_experts)
        if n_keys * n_keys != num_experts:
            raise ValueError(f"num_experts={num_experts} must be a perfect square (n_keys**2)")
        if key_dim % 2 or topk > n_keys:
            raise ValueError(f"key_dim={key_dim} must be even and topk={topk} <= {n_keys}")
        self.heads, self.topk, self.key_dim, self.n_keys = heads, topk, key_dim, n_keys
        self.query = nn.Linear(dim, heads * key_dim, bias=False)
        self.norm = make_query_norm(query_norm, heads, key_dim)
        half = key_dim // 2
        self.sub_keys = nn.Parameter(torch.randn(heads, 2, n_keys, half) / math.sqrt(half))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        q = self.norm(self.query(x).unflatten(-1, (self.heads, self.key_dim)))  # (..., H, Q)
        q1, q2 = q.chunk(2, dim=-1)
        v1, i1 = sub_key_topk(q1, self.sub_keys[:, 0], self.topk)
        v2, i2 = sub_key_topk(q2, self.sub_keys[:, 1], self.topk)
        return combine_topk(v1, i1, v2, i2, self.n_keys, self.topk)

    def flops_per_token(self) -> int:
        """Query projection, sub-key scoring of both halves and the K*K candidate sums."""
        dim = self.query.in_features
        return (2 * dim * self.heads * self.key_dim
                + 2 * self.heads * self.n_keys * self.key_dim
                + self.heads * self.topk * self.topk)

    def params_per_token(self) -> int:
        return self.query.weight.numel() + self.sub_keys.numel()


def gate_scores(scores: Tensor, kind: str) -> Tensor:
    """Softmax over the K retrieved scores (competing) or an independent sigmoid."""
    return F.softmax(scores, dim=-1) if kind == "softmax" else torch.sigmoid(scores)


class ProductKeyMemory(nn.Module):
    """One routed block: sum over heads and top-k of g_j e_j(x). x (..., D) -> (..., D).

    Pass ``bank`` to share one expert bank between several routers (the fractal's blocks).
    """

    def __init__(self, dim: int, num_experts: int, heads: int = 8, topk: int = 16,
                 key_dim: int = 128, gate: str = "softmax", query_norm: str = "layernorm",
                 act: str = "gelu", bank: ExpertBank | None = None) -> None:
        super().__init__()
        if gate not in ("softmax", "sigmoid"):
            raise ValueError(f"gate={gate!r} must be 'softmax' or 'sigmoid'")
        self.router = ProductKeyRouter(dim, num_experts, heads, topk, key_dim, query_norm)
        self.gate = gate
        self.bank = bank if bank is not None else ExpertBank(num_experts, dim, act)
        self.usage: Tensor | None = None  # (N,) selection counts while tracking is on

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scores (sorted, descending) and expert indices, both (..., heads, topk)."""
        return self.router(x)

    def forward(self, x: Tensor) -> Tensor:
        scores, idx = self.router(x)
        if self.usage is not None:
            self.usage += torch.bincount(idx.reshape(-1), minlength=self.usage.numel())
        gates = gate_scores(scores, self.gate)
        return self.bank(x, idx.flatten(-2), gates.flatten(-2))

    def track_usage(self, on: bool) -> None:
        self.usage = torch.zeros(self.bank.num_experts, dtype=torch.long) if on else None

    def flops_per_token(self) -> int:
        """Routing plus, per retrieved expert, one dot product and one scaled row add."""
        slots = self.router.heads * self.router.topk
        return self.router.flops_per_token() + slots * 4 * self.bank.dim

    def params_per_token(self) -> int:
        return self.router.params_per_token() + self.router.heads * self.router.topk * 2 * self.bank.dim
