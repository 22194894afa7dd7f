"""What routed layers measure, handed to an explicit collector, and the one fold after a step.

A forward never changes module state: that is what lets ``torch.compile``, activation
checkpointing, DDP and a user's own loop drive the layers. What a layer measures (balance losses,
ponder cost, chosen experts, query moments, depth counts, join gates) goes to the collector that
the *caller* installs for the duration of a block; without one, forward records nothing and is a
pure function. Statistics of finished batches (running query norms, routing biases, the depth
cost controller) are folded into the modules by one call after the optimizer step::

    with collect(model) as stats:          # routed layers hand their measurements to `stats`
        logits, loss = model(x, y)
        (loss + stats.aux_loss()).backward()
    opt.step()
    fold_statistics(model, stats)          # skip it for a step you skip (non-finite loss)

Records made while autograd runs a backward (the recompute of activation checkpointing) are
ignored: the forward that ran first already made them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

# What layers record (kind -> value of one call):
CHOICES = "choices"  # expert indices chosen (LongTensor, any shape, values in [0, N))
SUB_KEY_LOAD = "sub_key_load"  # (H, 2 n) choices per sub-key, training with balancing only
BALANCE_LOSS = "balance_loss"  # differentiable scalar: routing balance loss
PONDER = "ponder"  # differentiable scalar: depth router's compute cost
DEPTH_COUNTS = "depth_counts"  # (C,) tokens that stopped at each depth
DEPTH_COST = "depth_cost"  # (2,) [sum of blocks used, tokens]: the depth cost controller's input
HALTS = "halts"  # (2, C-1) [tokens that went on to stage c, tokens that reached c - 1]: thresholds' input
QUERY_MOMENTS = "query_moments"  # (count, sum, second-moment sum) of queries about the running mean
JOIN_GATE = "join_gate"  # (2,) [sum of gate values, tokens] of a highway join


class Statistics:
    """The records of one collection block: (module, kind, value, module.training) in call order,
    also indexed by module and kind."""

    def __init__(self, root: nn.Module, balance_scale: float = 1.0) -> None:
        self.root = root
        self.balance_scale = balance_scale  # the training schedule's factor on routing balance losses
        self.records: list[tuple[nn.Module, str, Any, bool]] = []
        self._index: dict[tuple[int, str], list[tuple[Any, bool]]] = {}
        self.folded = False

    @classmethod
    def joined(cls, parts: Sequence[Statistics]) -> Statistics:
        """One step's records from the collectors of its micro-batches (gradient accumulation),
        in call order: what one collector around the whole batch would hold."""
        whole = cls(parts[0].root, parts[0].balance_scale)
        for part in parts:
            for module, kind, value, training in part.records:
                whole._append(module, kind, value, training)
        return whole

    def add(self, module: nn.Module, kind: str, value: Any) -> None:
        if torch._C._current_graph_task_id() != -1:
            return  # a forward re-run inside backward (activation checkpointing): counted already
        self._append(module, kind, value, module.training)

    def _append(self, module: nn.Module, kind: str, value: Any, training: bool) -> None:
        self.records.append((module, kind, value, training))
        self._index.setdefault((id(module), kind), []).append((value, training))

    def values(self, module: nn.Module, kind: str, training: bool | None = None) -> list[Any]:
        """What ``module`` recorded as ``kind``, in call order (only in that mode if ``training``
        is given)."""
        found = self._index.get((id(module), kind), [])
        return [v for v, t in found if training is None or t == training]

    def total(self, module: nn.Module, kind: str, training: bool | None = None) -> Tensor | None:
        """Sum of a tensor kind over the calls (None without records)."""
        found = self.values(module, kind, training)
        return torch.stack(found).sum(0) if found else None

    def aux_loss(self) -> Tensor:
        """Sum of the differentiable parts (balance losses, ponder costs) to add to the loss.

        Each layer weighs as one: the outermost recorder of a subtree speaks for it (an FHME
        layer averages its blocks' balance losses, each over that block's calls)."""
        parts = list(self._aux_parts(self.root, set()))
        if parts:
            return torch.stack([p.float() for p in parts]).sum()
        first = next(iter(self.root.parameters()), None)
        return torch.zeros((), device=first.device if first is not None else None)

    def _aux_parts(self, module: nn.Module, seen: set[int]) -> Iterator[Tensor]:
        if id(module) in seen:
            return
        seen.add(id(module))
        if isinstance(module, Recorder):
            if module.statistics_frozen:
                return
            loss = module.aux_loss_from(self)
            if loss is not None:
                yield loss
            return
        for child in module.children():
            yield from self._aux_parts(child, seen)


def mean_of(values: list[Tensor]) -> Tensor | None:
    """Mean of recorded scalars (None if there are none): a module called several times in one
    pass weighs as much as one called once."""
    return torch.stack(values).mean() if values else None


class Recorder:
    """Mixin of modules that hand measurements to a collector. ``collect`` sets the collector
    for the duration of a block; forward only reads it.

    A recorder with ``statistics_frozen`` (a fine-tuned model's frozen base: ``freeze_statistics``)
    still records what it measures, but its subtree adds no auxiliary loss and folds nothing, so
    the base's routing biases, running norms and depth controllers stay as it was trained."""

    _collector: Statistics | None = None
    statistics_frozen: bool = False

    @property
    def collecting(self) -> bool:
        return self._collector is not None

    @property
    def balance_scale_on(self) -> bool:
        """Whether the collector's schedule still weighs balance losses (a bool, not the factor:
        one compiled graph before the fade ends and one after)."""
        return self._collector is not None and self._collector.balance_scale > 0

    @torch.compiler.disable  # runs eagerly under torch.compile: no guard on the records so far
    def record(self, kind: str, value: Any) -> None:
        if self._collector is not None:
            self._collector.add(self, kind, value)  # type: ignore[arg-type]

    def aux_loss_from(self, stats: Statistics) -> Tensor | None:
        """This module's (and its subtree's) share of ``stats.aux_loss()``."""
        return None


@dataclass
class FoldInputs:
    """What one module folds: ``sums`` are added over data-parallel ranks, ``indices`` are
    concatenated over ranks (the same shape on every rank)."""

    sums: list[Tensor]
    indices: list[Tensor] = field(default_factory=list)


class PastBatchStatistics(Recorder):
    """A module whose state learns from finished training batches (records made in train mode).

    ``fold_inputs`` pools this process's records of one step; ``fold`` applies the pooled (and,
    when distributed, reduced) inputs. No output of a batch depends on that batch's other tokens:
    the state changes only after the step, so the update is causal.
    """

    def fold_inputs(self, stats: Statistics) -> FoldInputs | None:
        raise NotImplementedError

    def fold(self, inputs: FoldInputs) -> None:
        raise NotImplementedError


@contextlib.contextmanager
def collect(model: nn.Module, balance_scale: float = 1.0) -> Iterator[Statistics]:
    """Install one collector on every recorder in ``model`` (found now, so modules added after
    construction take part) and remove it when the block ends. ``balance_scale`` multiplies the
    routers' balance losses (``train``'s schedule for them)."""
    stats = Statistics(model, balance_scale)
    recorders = [m for m in model.modules() if isinstance(m, Recorder)]
    previous = [vars(m).get("_collector") for m in recorders]
    for m in recorders:
        m._collector = stats
    try:
        yield stats
    finally:
        for m, prev in zip(recorders, previous):
            if prev is None:
                vars(m).pop("_collector", None)
            else:
                m._collector = prev


def freeze_statistics(model: nn.Module, frozen: bool = True) -> None:
    """Mark every recorder in ``model`` (found now: modules added later keep learning) as frozen,
    or, with ``frozen=False``, as learning again. Fine-tuning calls it on the base before adding
    adapters: a base whose weights are frozen should not drift through its past-batch statistics
    or be pushed around by its own balance losses while it reads a new domain."""
    for m in model.modules():
        if isinstance(m, Recorder):
            m.statistics_frozen = frozen


def _distributed(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _reduce_over_ranks(inputs: list[FoldInputs], group: Any) -> None:
    """All-reduce every sum and all-gather every index tensor, in one collective each (fixed
    shapes, no host sync). Every rank must have made the same calls on same-shaped batches."""
    sums = [t for inp in inputs for t in inp.sums]
    if sums:
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in sums])
        dist.all_reduce(flat, group=group)
        parts = iter(flat.split([t.numel() for t in sums]))
        for inp in inputs:
            inp.sums = [next(parts).view_as(t).to(t.dtype) for t in inp.sums]
    indices = [t for inp in inputs for t in inp.indices]
    if indices:
        flat = torch.cat([t.reshape(-1).long() for t in indices])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, flat, group=group)
        parts = iter(torch.stack(gathered).split([t.numel() for t in indices], dim=1))
        for inp in inputs:
            inp.indices = [next(parts).reshape(-1) for _ in inp.indices]


@torch.no_grad()
def fold_statistics(model: nn.Module, stats: Statistics | Sequence[Statistics], group: Any = None) -> None:
    """Fold one step's training records into every module of ``model`` that learns from past
    batches (running query norms, routing biases, the depth cost controller), discovered now.

    Call it once after the optimizer step, and not at all for a skipped step; with gradient
    accumulation, pass the collectors of all the step's micro-batches: they fold as one batch.
    With torch.distributed initialised, sums and counts are all-reduced and chosen indices
    all-gathered over ``group`` first, so P ranks fold exactly what one process would fold for
    their joint batch.
    """
    parts = [stats] if isinstance(stats, Statistics) else list(stats)
    if any(part.folded for part in parts):
        raise RuntimeError("these statistics were folded already")
    for part in parts:
        part.folded = True
    stats = parts[0] if len(parts) == 1 else Statistics.joined(parts)
    pending = [(m, inp) for m in model.modules() if isinstance(m, PastBatchStatistics)
               and not m.statistics_frozen and (inp := m.fold_inputs(stats)) is not None]
    if _distributed(group):
        _reduce_over_ranks([inp for _, inp in pending], group)
    for module, inp in pending:
        module.fold(inp)
