"""Validation loss, bits per byte, expert usage and depth statistics of a model; bpb of any causal
LM (transformers models too: ``val_bpb``).

Losses are in nats per byte (one token = one byte); bpb = nats / ln 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .baselines import MoEFFN
from .data import ByteDataset
from .fhme import FHME
from .model import FHMELanguageModel
from .routing import ProductKeyRouter
from .stats import CHOICES, DEPTH_COUNTS, Statistics, collect


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
    # Tokens per depth of every FHME layer (adapters too): model.flops_per_token(measured_depth).
    measured_depth: dict[nn.Module, Tensor] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, object]:
        skip = ("usage", "depth_hist", "measured_depth")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    def usage_per_block(self) -> list[list[tuple[float, float]]]:
        """(share of experts used, KL to uniform) per layer and block position."""
        return [[(u.fraction_used, u.kl_uniform) for u in layer] for layer in self.usage]


def choice_sources(model: nn.Module) -> list[tuple[int, list[nn.Module]]]:
    """(layer index, modules recording expert choices, one per block position) of every decoder
    layer with a routed FFN (an adapter's too)."""
    out = []
    for i, block in enumerate(model.blocks):
        sources = [m for m in block.ffn.modules() if isinstance(m, (ProductKeyRouter, MoEFFN))]
        if sources:
            out.append((i, sources))
    return out


class ChoiceCounts:
    """Selections per expert of each source, accumulated on the device over collected batches
    (index_add into fixed (N,) counters: no sync until they are read).

    ``limit``: count only each source's first ``limit`` choices, so that usage compares across
    numbers of experts and lengths of validation splits (a fixed sample of routing choices)."""

    def __init__(self, sources: list[nn.Module], limit: int | None = None) -> None:
        self.counts: dict[nn.Module, Tensor | None] = dict.fromkeys(sources)
        self.limit = limit
        self.seen = dict.fromkeys(sources, 0)  # choices counted so far (from shapes: no sync)

    def add(self, stats: Statistics) -> None:
        for source in self.counts:
            for idx in stats.values(source, CHOICES):
                flat = idx.reshape(-1)
                if self.limit is not None:
                    flat = flat[:max(0, self.limit - self.seen[source])]
                    self.seen[source] += flat.numel()
                acc = self.counts[source]
                if acc is None:
                    acc = self.counts[source] = torch.zeros(source.num_experts, dtype=torch.long,
                                                            device=flat.device)
                acc.index_add_(0, flat, torch.ones_like(flat))

    def host(self) -> dict[nn.Module, Tensor]:
        """(N,) counts of every source on the CPU, in one copy (zeros for a source never called)."""
        device = next((c.device for c in self.counts.values() if c is not None), None)
        parts = [c if c is not None else torch.zeros(m.num_experts, dtype=torch.long, device=device)
                 for m, c in self.counts.items()]
        flat = torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.long)
        return dict(zip(self.counts, flat.split([p.numel() for p in parts])))


@torch.no_grad()
def evaluate(model: FHMELanguageModel, data: ByteDataset, batch_size: int,
             max_windows: int | None = None, device: str = "cpu",
             usage_choices: int | None = None) -> EvalResult:
    """Mean loss over validation windows, with usage and depth metrics of routed layers (FLOPs
    at the depth histograms measured here); usage over each block's first ``usage_choices``
    routing choices if given. Values are read back once, at the end."""
    was_training = model.training
    model.eval()
    routed = choice_sources(model)
    counts = ChoiceCounts([m for _, sources in routed for m in sources], usage_choices)
    layers = [m for m in model.modules() if isinstance(m, FHME)]
    depth_counts: dict[nn.Module, Tensor] = {}
    total: Tensor | float = 0.0  # summed on the device
    tokens = 0
    for x, y in data.val_batches(batch_size, model.cfg.seq_len, max_windows):
        x, y = x.to(device), y.to(device)
        with collect(model) as stats:
            _, loss = model(x, y)
        total = total + loss.detach() * y.numel()
        tokens += y.numel()
        counts.add(stats)
        for layer in layers:
            found = stats.total(layer, DEPTH_COUNTS)
            if found is not None:
                depth_counts[layer] = depth_counts.get(layer, 0) + found
    model.train(was_training)
    measured = {layer: c.cpu() for layer, c in depth_counts.items()}
    val_loss = float(total) / max(tokens, 1)
    chosen = counts.host()
    usage = [[UsageStats.from_counts(chosen[m]) for m in sources] for _, sources in routed]
    flat = [u for layer in usage for u in layer]
    result = EvalResult(val_loss, val_loss / math.log(2), tokens,
                        flops_per_token=model.flops_per_token(measured), usage=usage,
                        measured_depth=measured)
    if flat:
        result.expert_usage = sum(u.fraction_used for u in flat) / len(flat)
        result.usage_kl = sum(u.kl_uniform for u in flat) / len(flat)
    fhme = model.fhme_layers()
    if fhme:
        hists = [_shares(measured.get(layer), layer.depth) for layer in fhme]
        result.depth_hist = hists
        result.mean_depth = sum(sum(d * h for d, h in enumerate(hist, 1)) for hist in hists) / len(hists)
        result.blocks_per_token = sum(layer.blocks_per_token(hist) for layer, hist in zip(fhme, hists)) / len(hists)
    return result


def _shares(counts: Tensor | None, depth: int) -> list[float]:
    """Tokens per depth as shares (all zero if none were measured)."""
    if counts is None:
        return [0.0] * depth
    return (counts / counts.sum().clamp_min(1)).tolist()


def lm_logits(model: nn.Module, x: Tensor) -> Tensor:
    """(B, T, V) logits of a FractalMoE model or a transformers causal LM."""
    out = model(x)
    return getattr(out, "logits", out)


@torch.no_grad()
def val_bpb(model: nn.Module, data: ByteDataset, seq_len: int, batch_size: int,
            device: str = "cpu") -> float:
    """Bits per byte over every non-overlapping window of ``data.val``."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for x, y in data.val_batches(batch_size, seq_len):
        logits = lm_logits(model, x.to(device))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).reshape(-1), reduction="sum")
        total += loss.double()
        count += y.numel()
    model.train(was_training)
    return float(total) / max(count, 1) / math.log(2)
