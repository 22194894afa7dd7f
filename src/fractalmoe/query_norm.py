"""Query norms of a product-key router: per token (LayerNorm, RMSNorm) or with statistics of past
training batches (a running per-coordinate norm, or whitening), never of the current batch, whose
statistics would leak future tokens into training.

Forward changes no state: under a collector a running norm records its query moments, and
``stats.fold_statistics`` folds them in after the optimizer step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import QUERY_NORMS
from .stats import QUERY_MOMENTS, FoldInputs, PastBatchStatistics, Statistics

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
    Its fold decomposes the covariance (eigh), which on CUDA waits for the device: once per
    whitened router per step.
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
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"query_norm={kind!r} must be one of {QUERY_NORMS}")
