"""Validation loss, bits per byte, expert usage and depth statistics of a model.

Losses are in nats per byte (one token = one byte); bpb = nats / ln 2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .data import ByteDataset
from .fhme import FHME
from .model import FHMELanguageModel


@dataclass
class UsageStats:
    """How evenly a routed layer's selections spread over its N experts."""

    fraction_used: float  # experts chosen at least once
    kl_uniform: float  # KL(usage || uniform) in nats
    dead: int  # experts never chosen

    @classmethod
    def from_counts(cls, counts: Tensor) -> UsageStats:
        n = counts.numel()
        total = counts.sum().clamp_min(1).double()
        p = counts.double() / total
        nz = p > 0
        kl = float((p[nz] * (p[nz] * n).log()).sum())
        used = int(nz.sum())
        return cls(used / n, kl, n - used)


@dataclass
class EvalResult:
    val_loss: float
    val_bpb: float
    tokens: int
    expert_usage: float | None = None  # mean fraction used over layers and block positions
    usage_kl: float | None = None
    mean_depth: float | None = None
    blocks_per_token: float | None = None
    flops_per_token: float | None = None
    usage: list[list[UsageStats]] = field(default_factory=list)  # [layer][block position]
    depth_hist: list[list[float]] = field(default_factory=list)  # [layer][depth]

    def summary(self) -> dict[str, object]:
        out = asdict(self)
        out.pop("usage")
        out.pop("depth_hist")
        return out


def _usage_sources(model: FHMELanguageModel) -> list:
    return [b.ffn for b in model.blocks if hasattr(b.ffn, "track_usage")]


def usage_counts_of(ffn) -> list[Tensor]:  # type: ignore[no-untyped-def]
    """(N,) selection counts per block position of a routed FFN while tracking is on."""
    if isinstance(ffn, FHME):
        return ffn.usage_counts()
    return [ffn.usage] if ffn.usage is not None else []


@torch.no_grad()
def evaluate(model: FHMELanguageModel, data: ByteDataset, batch_size: int,
             max_windows: int | None = None, device: str = "cpu") -> EvalResult:
    """Mean loss over validation windows, with usage and depth metrics of routed layers."""
    was_training = model.training
    model.eval()
    seq_len = model.cfg.seq_len
    routed = _usage_sources(model)
    for ffn in routed:
        ffn.track_usage(True)
    fhme = model.fhme_layers()
    depth_sum = [torch.zeros(layer.depth) for layer in fhme]
    total, tokens = 0.0, 0
    flops = 0.0
    for x, y in data.val_batches(batch_size, seq_len, max_windows):
        x, y = x.to(device), y.to(device)
        _, loss = model(x, y)
        n = y.numel()
        total += float(loss) * n
        tokens += n
        flops += model.flops_per_token() * n
        for acc, layer in zip(depth_sum, fhme):
            acc += layer.depth_hist.cpu() * n
    usage = [[UsageStats.from_counts(c.cpu()) for c in usage_counts_of(ffn)] for ffn in routed]
    for ffn in routed:
        ffn.track_usage(False)
    model.train(was_training)
    val_loss = total / max(tokens, 1)
    flat = [u for layer in usage for u in layer]
    result = EvalResult(val_loss, val_loss / math.log(2), tokens,
                        flops_per_token=flops / max(tokens, 1), usage=usage)
    if flat:
        result.expert_usage = sum(u.fraction_used for u in flat) / len(flat)
        result.usage_kl = sum(u.kl_uniform for u in flat) / len(flat)
    if fhme:
        hists = [(acc / max(tokens, 1)).tolist() for acc in depth_sum]
        result.depth_hist = hists
        result.mean_depth = sum(sum(d * h for d, h in enumerate(hist, 1)) for hist in hists) / len(hists)
        result.blocks_per_token = sum(sum((2**d - 1) * h for d, h in enumerate(hist, 1))
                                      for hist in hists) / len(hists)
    return result
