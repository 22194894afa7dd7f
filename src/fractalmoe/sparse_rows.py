"""Sparse memory fine-tuning: which rows of a memory learn, and fresh memories whose rows can.

A token changes the model only through the rows it reads, so fine-tuning that lets only rows the
kept domains (the base's corpus, earlier fine-tuning corpora) seldom read learn keeps what the
base knew. Rows are ranked by tf-idf of expert choices with the kept domains' sampled windows as
documents (``rank_rows``), once (``sparse_row_masks``) or at every step from the step's batch
(``StepRowSelector``). ``add_row_adapters`` gives a model without expert tables (GPT-2, Llama, ...)
or a FractalMoE run fresh million-row memories with frozen, hashing routing to apply this to.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import (
    AdaptedAttention,
    AdaptedFFN,
    EmbeddingChange,
    GatedEmbedding,
    GatedLoRA,
    add_fhme_adapters,
    decoder_layers,
    gate_lora_layers,
    mask_rows,
    trainable_parameter_count,
)
from .checkpoint import freeze_in_run
from .data import ByteDataset
from .evaluate import lm_logits
from .fhme import FHME
from .routing import ProductKeyRouter
from .stats import CHOICES, collect

# where a domain gate may sit (``gate_sites``)
GatedSite = AdaptedFFN | AdaptedAttention | GatedLoRA | EmbeddingChange
SAMPLE_WINDOWS = 256  # training windows per domain whose expert choices rank the rows (at least)
_HUB_IDF = 1e-9  # orders rows every kept window reads (idf 0) by tf, after all others


def trainable_memories(model: nn.Module) -> list[tuple[int, FHME]]:
    """(layer index, FHME) of each FHME whose expert tables train: the new adapters, or the
    base's own layers under memory fine-tuning."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        for m in layer.modules():
            if isinstance(m, FHME) and any(t.requires_grad for t in m.fractal.bank.tables().values()):
                out.append((i, m))
    return out


def row_masked_memories(model: nn.Module) -> list[tuple[int, FHME]]:
    """``trainable_memories`` for a row mask per layer: each must read a bank of its own (on a
    bank shared by layers, every layer's mask would zero the rows the others chose)."""
    found = trainable_memories(model)
    if not found:
        raise ValueError("sparse rows need FHME layers to train")
    if len({id(m.fractal.bank) for _, m in found}) < len(found):
        raise ValueError("sparse rows: these layers share one expert bank (share_bank), and a row "
                         "mask per layer would cancel the others'")
    return found


def sample_batches(batch_size: int) -> int:
    """Batches of a domain's sample: ``SAMPLE_WINDOWS`` windows, rounded up to whole batches."""
    return -(-SAMPLE_WINDOWS // batch_size)


def sample_windows(data: ByteDataset, seq_len: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """The input batches of a domain's sample: its first ``sample_batches`` training batches."""
    for step in range(sample_batches(batch_size)):
        yield data.train_batch(step, batch_size, seq_len, seed)[0]


@torch.no_grad()
def sample_passes(model: nn.Module, pre_hooks: list[tuple[nn.Module, Callable[..., None]]],
                  domains: list[ByteDataset], seq_len: int, batch_size: int, seed: int, device: str = "cpu") -> None:
    """The model in eval mode over each domain's sampled windows (``sample_windows``), with each
    (module, hook) of ``pre_hooks`` seeing that module's inputs (hook(module, args, kwargs)); hooks
    removed, mode restored."""
    hooks = [m.register_forward_pre_hook(h, with_kwargs=True) for m, h in pre_hooks]
    was_training = model.training
    model.eval()
    try:
        for data in domains:
            for x in sample_windows(data, seq_len, batch_size, seed):
                lm_logits(model, x.to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


@torch.no_grad()
def choice_counts(model: nn.Module, adapters: list[FHME], data: ByteDataset, seq_len: int,
                  batch_size: int, seed: int, device: str = "cpu") -> list[tuple[Tensor, Tensor]]:
    """Per FHME layer, over the first ``SAMPLE_WINDOWS`` training windows of ``data``: how often
    each expert row was chosen (by any of its routed blocks), and in how many windows it was
    chosen at least once."""
    routers = [[block.memory.router for block in a.fractal.blocks] for a in adapters]
    sizes = [a.fractal.bank.num_experts for a in adapters]
    counts = [torch.zeros(n, dtype=torch.long, device=device) for n in sizes]
    windows = [torch.zeros(n, dtype=torch.long, device=device) for n in sizes]
    was_training = model.training
    model.eval()
    for x in sample_windows(data, seq_len, batch_size, seed):
        with collect(model) as stats:
            lm_logits(model, x.to(device))
        for acc, seen, n, rs in zip(counts, windows, sizes, routers):
            present = torch.zeros(x.shape[0], n, dtype=torch.bool, device=device)
            for router in rs:
                for idx in stats.values(router, CHOICES):
                    per_window = idx.reshape(x.shape[0], -1)
                    acc += torch.bincount(per_window.reshape(-1), minlength=n)
                    present.scatter_(1, per_window, True)
            seen += present.sum(0)
    model.train(was_training)
    return [(c.cpu(), w.cpu()) for c, w in zip(counts, windows)]


def rank_rows(new: Tensor, kept_windows: Tensor, windows: int, top: int,
              max_kept_windows: int | None = None) -> Tensor:
    """(N,) bool: the ``top`` rows by tf-idf with the kept domains' windows as documents: tf =
    the row's share of the new domain's choices, idf = log((1 + windows) / (1 + kept windows
    that chose the row)). A row every kept window reads has idf 0, however often the new domain
    reads it (counting kept *choices* instead would barely penalise such hub rows): such rows
    come after every other, by tf (``_HUB_IDF``); rows the new domain never chose are never
    picked, nor, with ``max_kept_windows``, rows that more kept windows chose (0: only rows no
    kept window read, which base tokens seldom reach)."""
    if max_kept_windows is not None:
        new = new * (kept_windows <= max_kept_windows)
    tf = new.double() / new.sum().clamp_min(1)
    idf = torch.log((1.0 + windows) / (1.0 + kept_windows.double())).clamp_min(0) + _HUB_IDF
    score = tf * idf
    best = score.topk(min(top, score.numel())).indices
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    mask[best] = score[best] > 0
    return mask


def _kept_choices(model: nn.Module, adapters: list[FHME], kept: list[ByteDataset], seq_len: int,
                  batch_size: int, seed: int, device: str) -> tuple[list[Tensor], list[Tensor], int]:
    """Per layer, how often the kept domains' sampled windows chose each row and in how many of
    them it was chosen, and how many windows were sampled: the documents of the tf-idf."""
    kept_counts = [torch.zeros(a.fractal.bank.num_experts, dtype=torch.long) for a in adapters]
    kept_windows = [torch.zeros_like(c) for c in kept_counts]
    for data in kept:
        for c, w, (n, seen) in zip(kept_counts, kept_windows,
                                   choice_counts(model, adapters, data, seq_len, batch_size, seed, device)):
            c += n
            w += seen
    return kept_counts, kept_windows, len(kept) * sample_batches(batch_size) * batch_size


def sparse_row_masks(model: nn.Module, new_data: ByteDataset, kept: list[ByteDataset], top: int,
                     seq_len: int, batch_size: int, seed: int, device: str = "cpu") -> dict[str, Tensor]:
    """Row masks of the model's trainable FHME tables (``rank_rows``), keyed by layer index, each
    applied (``mask_rows``); new adapters' routers are frozen with them."""
    found = row_masked_memories(model)
    adapters = [a for _, a in found]
    new = [c for c, _ in choice_counts(model, adapters, new_data, seq_len, batch_size, seed, device)]
    _, kept_windows, windows = _kept_choices(model, adapters, kept, seq_len, batch_size, seed, device)
    masks = {}
    for (i, adapter), n, w in zip(found, new, kept_windows):
        masks[str(i)] = rank_rows(n, w, windows, top)
        mask_rows(adapter, masks[str(i)])
        freeze_routing(adapter)  # keep the routing the rows were chosen under
    return masks


def freeze_routing(memory: FHME) -> None:
    """Freeze what routes tokens to a memory's rows (each block's norm and router), where it
    trains: the rows a token reads then stay the ones they were chosen under."""
    for block in memory.fractal.blocks:
        for module in (block.norm, block.memory.router):
            if any(p.requires_grad for p in module.parameters()):
                freeze_in_run(module)


class StepRowSelector:
    """Sparse memory fine-tuning's choice made at every step: of one FHME layer's table rows, only
    ``top`` learn, chosen anew from this step's batch, and ``mask_rows`` applies the choice to
    every table of the bank. ``trained`` gathers every row chosen.

    Two rules choose them, in the first table-gradient hook of the backward after a training
    forward (which forward hooks on the layer's routers mark). By default, the rows the batch reads
    most above the kept domains (``rank_rows`` with the batch's choices, counted by those hooks, as tf).

    With ``kept_share`` (each row's share of the kept domains' reads, over its mean: ``f``), the
    rows that buy the most new-domain loss per unit of kept-domain loss. The kept domains' loss is
    at a minimum, so moving row r by d_r raises it by about 1/2 sum_r f_r |d_r|^2 (Gauss-Newton:
    a row's curvature grows with how often the kept domains read it), while the new domain's loss
    falls by -sum_r g_r . d_r. For a given fall, the cheapest step is d_r = -lr g_r / (f_r + delta)
    over the rows with the largest |g_r|^2 / (f_r + delta); the gradient hook chooses those rows
    from the step's table gradient g and scales their rows by 1 / (f_r + delta) (a preconditioner
    that only ``row_sgd`` keeps: lazy Adam divides it out again). ``delta`` stands for the reads a
    sample of the kept domains does not see."""

    def __init__(self, memory: FHME, kept_windows: Tensor, windows: int, top: int,
                 kept_share: Tensor | None = None, delta: float = 0.1,
                 max_kept_windows: int | None = None) -> None:
        tables = list(memory.fractal.bank.tables().values())
        n, device = memory.fractal.bank.num_experts, tables[0].device
        self.kept_windows, self.windows, self.top = kept_windows.to(device), windows, top
        self.max_kept_windows = max_kept_windows
        if kept_share is not None and max_kept_windows is not None:
            raise ValueError("choosing rows by gain per cost already weighs the kept domains' reads: "
                             "give it no max_kept_windows")
        self.inverse_cost = None if kept_share is None else (kept_share.to(device).float() + delta).reciprocal()
        self.counts = torch.zeros(n, dtype=torch.long, device=device)
        self.keep = torch.zeros(n, dtype=torch.bool, device=device)
        self.trained = torch.zeros_like(self.keep)
        self.pending = False
        if self.inverse_cost is not None and len(tables) > 1:
            raise ValueError("choosing rows by gain per cost needs one table per bank (block = value)")
        for block in memory.fractal.blocks:
            block.memory.router.register_forward_hook(self._count)
        for table in tables:  # before mask_rows' hooks: a parameter's hooks run in order
            table.register_hook(self._select)
        mask_rows(memory, self.keep)

    def _count(self, router: nn.Module, inputs: tuple[Tensor, ...], output: tuple[Tensor, Tensor]) -> None:
        if router.training and torch.is_grad_enabled():
            if self.inverse_cost is None:  # the tf-idf rule's tf (index_add_: no host sync, unlike bincount)
                idx = output[1].reshape(-1)
                self.counts.index_add_(0, idx, torch.ones_like(idx))
            self.pending = True

    def _select(self, grad: Tensor) -> Tensor:
        if self.pending:
            self.pending = False
            if self.inverse_cost is None:
                self.keep.copy_(rank_rows(self.counts, self.kept_windows, self.windows, self.top,
                                          self.max_kept_windows))
                self.counts.zero_()
            else:
                grad = self._keep_by_gain(grad)
            self.trained |= self.keep
        return grad

    def _keep_by_gain(self, grad: Tensor) -> Tensor:
        """Keep the top rows by |g_r|^2 / (f_r + delta); the gradient with each row over f_r + delta."""
        grad = grad.coalesce() if grad.is_sparse else grad
        values = grad.values() if grad.is_sparse else grad
        rows = grad.indices()[0] if grad.is_sparse else None
        gain = values.float().square().sum(1)
        if rows is not None:
            gain = torch.zeros_like(self.inverse_cost).index_add_(0, rows, gain)
        score = gain * self.inverse_cost
        best = score.topk(min(self.top, score.numel())).indices
        self.keep.zero_()
        self.keep[best] = score[best] > 0
        if rows is None:
            return values * self.inverse_cost.unsqueeze(1).to(values.dtype)
        scaled = values * self.inverse_cost.index_select(0, rows).unsqueeze(1).to(values.dtype)
        # The indices are the coalesced gradient's own: valid by construction, so not checked again.
        return torch.sparse_coo_tensor(grad.indices(), scaled, grad.shape, is_coalesced=True,
                                       check_invariants=False)


def step_row_selectors(model: nn.Module, kept: list[ByteDataset], top: int, seq_len: int,
                       batch_size: int, seed: int, device: str = "cpu",
                       by_gain: bool = False, max_kept_windows: int | None = None) -> dict[str, StepRowSelector]:
    """A ``StepRowSelector`` on each trainable FHME layer, keyed by layer index; ``by_gain``: rows
    by new-domain gain per kept-domain cost, from the kept domains' read shares;
    ``max_kept_windows``: see ``rank_rows``."""
    found = row_masked_memories(model)
    choices = _kept_choices(model, [a for _, a in found], kept, seq_len, batch_size, seed, device)
    return _selectors(found, choices, top, by_gain, max_kept_windows)


def _selectors(found: list[tuple[int, FHME]], choices: tuple[list[Tensor], list[Tensor], int], top: int,
               by_gain: bool, max_kept_windows: int | None) -> dict[str, StepRowSelector]:
    """``step_row_selectors`` from the kept domains' choices (``_kept_choices``) of ``found``."""
    counts, kept_windows, windows = choices
    shares = [c.double() / c.double().mean().clamp_min(1e-12) if by_gain else None for c in counts]
    return {str(i): StepRowSelector(a, w, windows, top, share, max_kept_windows=max_kept_windows)
            for (i, a), w, share in zip(found, kept_windows, shares)}


def add_row_adapters(model: nn.Module, kept: list[ByteDataset], rows: int | None, seq_len: int,
                     batch_size: int, seed: int, device: str = "cpu", max_kept_windows: int | None = 0,
                     layers: list[int] | None = None, num_experts: int = 1_048_576,
                     fit_to: ByteDataset | None = None, gate_on: ByteDataset | None = None,
                     train_queries: bool = False, budget: int | None = None,
                     **fhme_config: Any) -> dict[str, StepRowSelector]:
    """Sparse memory fine-tuning in fresh memories, for a model without expert tables (GPT-2,
    Llama, ...) or beside a FractalMoE model's own FHME layers: beside each chosen FFN a
    zero-initialised value memory (``add_fhme_adapters`` with ``block="value"``) whose routing
    keeps its random initialisation, so that it hashes each token's hidden state to rows,
    and of whose rows only ``rows`` per layer learn at each step (``StepRowSelector``), by default
    only rows no sampled window of the ``kept`` domains read: base tokens then read rows that are
    still zero and go on as before. The more rows a layer, the more of them the kept domains leave
    unread.

    ``fit_to``: the new domain, whose queries and the kept domains' place the sub-keys first
    (``fit_sub_keys``). ``gate_on``: the new domain, from whose reads and the kept domains' each
    memory gets a ``DomainGate`` (then base text reads the memories through a shut gate, and any
    row may be let learn: ``max_kept_windows=None``). ``train_queries``: the memories' query
    projections learn too (the gate keeps its own frozen copy of the routing). ``budget``, in
    place of ``rows``: as many rows a step as fit the trainable parameters beside the tables into
    it. Returns the selectors, keyed by layer index."""
    if (rows is None) == (budget is None):
        raise ValueError("give rows a step or a parameter budget, one of the two")
    memories = add_hashed_memories(model, layers, num_experts, **fhme_config)
    if fit_to is not None:
        fit_sub_keys(model, memories, [fit_to, *kept], seq_len, batch_size, seed, device=device)
    found = row_masked_memories(model)  # the new memories, in layer order: the base is frozen
    memories = [a for _, a in found]
    choices = _kept_choices(model, memories, kept, seq_len, batch_size, seed, device)  # rows and gates share them
    if gate_on is not None:
        add_domain_gates(model, memories, gate_on, choices[0], seq_len, batch_size, seed, device)
    if train_queries:
        for memory in memories:
            for block in memory.fractal.blocks:
                block.memory.router.query.requires_grad_(True)
    if budget is not None:
        rows = (budget - non_table_trainable(model)) // sum(row_width(m) for m in memories)
        if rows < 1:
            raise ValueError(f"a budget of {budget} parameters leaves no row to learn")
    return _selectors(found, choices, rows, False, max_kept_windows)


def row_width(memory: FHME) -> int:
    """Parameters in one row of a memory's bank (every table's row)."""
    return sum(t[0].numel() for t in memory.fractal.bank.tables().values())


def non_table_trainable(model: nn.Module) -> int:
    """Trainable parameters outside the trainable memories' tables (their rows are counted by
    the rows a step lets learn)."""
    tables = sum(t.numel() for _, m in trainable_memories(model) for t in m.fractal.bank.tables().values())
    return trainable_parameter_count(model) - tables


def spherical_kmeans(points: Tensor, k: int, iters: int, generator: torch.Generator) -> Tensor:
    """(k, d) unit centroids of ``points`` (n, d) by cosine: start from k random points, then
    ``iters`` rounds of assigning each point to its best centroid and renormalising the means (a
    centroid nobody chose keeps its place)."""
    if len(points) < k:
        raise ValueError(f"{k} centroids need at least as many points, got {len(points)}")
    units = F.normalize(points.float(), dim=-1)
    centroids = units[torch.randperm(len(units), generator=generator)[:k]].clone()
    for _ in range(iters):
        best = (units @ centroids.T).argmax(-1)
        sums = torch.zeros_like(centroids).index_add_(0, best, units)
        chosen = sums.norm(dim=-1) > 0
        centroids[chosen] = F.normalize(sums[chosen], dim=-1)
    return centroids


@torch.no_grad()
def fit_sub_keys(model: nn.Module, memories: list[FHME], domains: list[ByteDataset], seq_len: int,
                 batch_size: int, seed: int, iters: int = 10, device: str = "cpu") -> None:
    """Place each router's sub-keys on its queries, read from an equal sample of every domain
    (``SAMPLE_WINDOWS`` training windows each): per head and key part, the unit centroids of a
    spherical k-means with one centroid per sub-key. Random sub-keys take no account of where
    the queries lie; fitted ones give each domain's own regions of query space their own
    sub-keys, so that more of the rows a domain reads are ones the other domains do not.
    Run on memories that add nothing yet (zero values): the queries are then the base model's."""
    routers = [block.memory.router for m in memories for block in m.fractal.blocks]
    seen: dict[nn.Module, list[Tensor]] = {r: [] for r in routers}

    def keep_input(router: nn.Module, args: tuple[Tensor, ...], _: dict[str, Any]) -> None:
        seen[router].append(args[0].detach().reshape(-1, args[0].shape[-1]))

    sample_passes(model, [(r, keep_input) for r in routers], domains, seq_len, batch_size, seed, device)
    generator = torch.Generator().manual_seed(seed)
    for router in routers:
        parts = router.query_parts(torch.cat(seen[router]))  # P of (T, H, Q/P)
        for p, (q, size) in enumerate(zip(parts, router.sizes)):
            for h in range(router.heads):
                keys = spherical_kmeans(q[:, h].cpu(), size, iters, generator)
                router.sub_keys[h, p, :size] = keys.to(router.sub_keys)


def add_hashed_memories(model: nn.Module, layers: list[int] | None = None, num_experts: int = 1_048_576,
                        **fhme_config: Any) -> list[FHME]:
    """The memories of ``add_row_adapters``, before any row is chosen: zero-initialised value
    memories beside the chosen FFNs, their routing frozen at its random initialisation."""
    memories = add_fhme_adapters(model, layers, **{**fhme_config, "num_experts": num_experts, "block": "value"})
    for memory in memories:
        freeze_routing(memory)
    return memories


class DomainGate(nn.Module):
    """Opens a row adapter on the new domain's text and keeps it shut on the kept domains', with
    no domain label: a naive-Bayes reading of a frozen hashing router. Row r carries
    llr_r = log p_new(r) - log p_kept(r), from how often samples of the two read it (add-1/2
    smoothing); a token's evidence e_t is the mean llr over the rows it reads, and the gate at
    position t is sigmoid(prior + sum_{s <= t} e_s), the posterior that the text so far is the new
    domain's from prior odds e^prior, each token one observation. The prior trades the two
    costs of a wrong gate: shut on the new domain's text, it forgoes the adapter's gain; open on
    the kept domains', it lets the adapter change them. Kept text piles up evidence against the
    new domain within a few positions, new text for it more slowly, so a prior above even odds
    (``set_gate_prior``) buys the new domain more than it costs the kept ones. Causal: position t
    reads only positions <= t of its own sequence. The norm and router are frozen copies (a row
    memory's first block's, so that its own routing may go on to learn, or ``hashing_gate``'s);
    nothing here trains. It needs every position so far in each call: a FractalMoE model's ``generate``
    re-reads the context when it holds a gate (a cached step is refused), and a Hugging Face
    model must generate with ``use_cache=False``."""

    def __init__(self, norm: nn.Module, router: nn.Module, llr: Tensor, prior: float = 0.0) -> None:
        super().__init__()
        self.norm, self.router = copy.deepcopy(norm), copy.deepcopy(router)
        self.requires_grad_(False)  # trains never; a run keeps its gates in a file of their own
        self.register_buffer("llr", llr.float())
        self.prior = float(prior)  # log-odds; a run records it in its adapter spec, not its weights

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 3:
            raise ValueError("a domain gate needs whole sequences: x of shape (B, T, D)")
        return torch.sigmoid(self.prior + self.evidence(x).cumsum(-1)).unsqueeze(-1).to(x.dtype)

    def evidence(self, x: Tensor) -> Tensor:
        """(..., T): e_t, the mean log ratio over the rows each position of x (..., T, D) reads."""
        return self.llr[self.reads(x)].flatten(1).mean(1).view(x.shape[:-1])

    def reads(self, x: Tensor) -> Tensor:
        """(tokens, heads, topk): the rows each position of x (..., D) reads."""
        return self.router(self.norm(x.reshape(-1, x.shape[-1])))[1]

    def extra_repr(self) -> str:
        return f"prior={self.prior:g}"

    def flops_per_token(self) -> int:
        """The routing's (the mean and running sum of llr: a few adds beside it)."""
        return self.router.flops_per_token()

    def active_params_per_token(self) -> int:
        """The routing's parameters and the llr of every row read."""
        return self.router.params_per_token() + self.router.heads * self.router.topk


def adapter_owners(model: nn.Module) -> dict[int, AdaptedFFN]:
    """The adapted FFN that holds each adapter, keyed by the adapter's id."""
    return {id(m.adapter): m for m in model.modules() if isinstance(m, AdaptedFFN)}


def row_llr(new: Tensor, kept: Tensor) -> Tensor:
    """Per row, log p_new(r) - log p_kept(r) from read counts (N,), add-1/2 smoothed."""
    def log_p(c: Tensor) -> Tensor:
        c = c.double() + 0.5
        return c.log() - c.sum().log()
    return (log_p(new) - log_p(kept)).float()


def add_domain_gates(model: nn.Module, memories: list[FHME], new: ByteDataset, kept_counts: list[Tensor],
                     seq_len: int, batch_size: int, seed: int, device: str = "cpu") -> None:
    """A ``DomainGate`` on each of ``memories`` (row adapters: frozen routing), from the reads of
    ``SAMPLE_WINDOWS`` training windows of the new domain and the kept domains' read counts
    (``_kept_choices``)."""
    new_counts = [c for c, _ in choice_counts(model, memories, new, seq_len, batch_size, seed, device)]
    owners = adapter_owners(model)
    for memory, n, k in zip(memories, new_counts, kept_counts):
        block = memory.fractal.blocks[0]
        owners[id(memory)].domain_gate = DomainGate(block.norm, block.memory.router, row_llr(n, k)).to(device)


GATE_ROUTING = dict(num_experts=1_048_576, heads=2, topk=8, key_dim=32)  # the row adapters' memories'


def hashing_gate(dim: int, prior: float = 0.0) -> DomainGate:
    """A ``DomainGate`` with routing of its own, random and frozen (``GATE_ROUTING``: as many rows
    as the row adapters' memories, so as fine a reading of the hidden state), llr still zero."""
    r = GATE_ROUTING
    return DomainGate(nn.RMSNorm(dim), ProductKeyRouter(dim, r["num_experts"], r["heads"], r["topk"], r["key_dim"]),
                      torch.zeros(r["num_experts"]), prior)


def gate_sites(model: nn.Module) -> list[tuple[GatedSite, int]]:
    """(module, width of what its gate reads) of every place a trainable update enters the model,
    in module order: FHME adapters beside an FFN or at an attention input, LoRA layers (put in a
    ``GatedLoRA`` first, ``gate_lora_layers``) and a change to the tied embeddings, on the input
    and on the output side. Each takes a ``domain_gate`` on its own input (the embeddings' gate:
    on the base's embeddings of the text)."""
    gate_lora_layers(model)
    return [(m, _gate_width(m)) for m in model.modules() if isinstance(m, GatedSite) and _site_trains(m)]


def _gate_width(site: GatedSite) -> int:
    if isinstance(site, GatedLoRA):
        return site.in_features
    if isinstance(site, EmbeddingChange):
        return site.delta.shape[1]
    return site.adapter.dim


def _site_trains(site: GatedSite) -> bool:
    """Whether the update at a site learns (a gated LoRA's own weights, not LoRA nested below it)."""
    if isinstance(site, GatedLoRA):
        return site.trains()
    if isinstance(site, EmbeddingChange):
        return site.delta.requires_grad
    return any(p.requires_grad for p in site.adapter.parameters())


def gate_input(site: GatedSite, args: tuple[Tensor, ...], kwargs: dict[str, Any]) -> Tensor:
    """What a site's gate reads, from the site's call: its input (transformers' Llama passes it by
    name), or for the input embeddings the base's embeddings of the byte ids it was given."""
    x = args[0] if args else kwargs["hidden_states"]
    return site.base(x) if isinstance(site, GatedEmbedding) else x


def hashing_gates(model: nn.Module, prior: float = 0.0) -> list[tuple[GatedSite, DomainGate]]:
    """A fresh ``hashing_gate`` for each of ``gate_sites(model)`` (not attached)."""
    device = next(model.parameters()).device
    return [(site, hashing_gate(dim, prior).to(device)) for site, dim in gate_sites(model)]


def set_gate_prior(model: nn.Module, prior: float) -> None:
    """Every ``DomainGate`` of ``model`` at prior log-odds ``prior``: the gate is a posterior, so
    its prior can move after training, trading the kept domains' rise for the new domain's gain
    with no step taken."""
    for m in model.modules():
        if isinstance(m, DomainGate):
            m.prior = float(prior)


def new_gates(model: nn.Module) -> list[tuple[GatedSite, DomainGate]]:
    """(site, gate) of each domain gate on an update that trains: the newest adapter set's."""
    return [(m, m.domain_gate) for m in model.modules() if isinstance(m, GatedSite)
            and isinstance(m.domain_gate, DomainGate) and _site_trains(m)]


@torch.no_grad()
def gate_read_counts(model: nn.Module, gated: list[tuple[GatedSite, DomainGate]], data: ByteDataset,
                     seq_len: int, batch_size: int, seed: int, device: str = "cpu") -> list[Tensor]:
    """Per (site, gate): how often the gate's routing read each row, given the site's input over
    ``data``'s sampled windows (``sample_windows``)."""
    counts = [torch.zeros(g.llr.numel(), dtype=torch.long, device=device) for _, g in gated]

    def counter(gate: DomainGate, acc: Tensor) -> Any:
        def hook(site: GatedSite, args: tuple[Tensor, ...], kwargs: dict[str, Any]) -> None:
            idx = gate.reads(gate_input(site, args, kwargs)).reshape(-1)
            acc.index_add_(0, idx, torch.ones_like(idx))
        return hook

    sample_passes(model, [(site, counter(g, acc)) for (site, g), acc in zip(gated, counts)], [data], seq_len,
                  batch_size, seed, device)
    return [c.cpu() for c in counts]


def save_domain_gates(model: nn.Module, path: str | Path) -> None:
    """The state of every gate ``new_gates`` finds (the newest adapter set's), by module name, to a
    safetensors file that ``load_domain_gates`` reads back into a model of the same adapters."""
    from safetensors.torch import save_file

    gates = {id(g) for _, g in new_gates(model)}
    tensors = {f"{name}.{k}": v.contiguous() for name, m in model.named_modules() if id(m) in gates
               for k, v in m.state_dict().items()}
    save_file(tensors, str(path))


def load_domain_gates(model: nn.Module, path: str | Path) -> None:
    """Fill the model's gates from a ``save_domain_gates`` file (every tensor must find its gate)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    unexpected = model.load_state_dict(tensors, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} tensors match no domain gate here, e.g. {unexpected[0]}")


def attach_saved_gates(model: nn.Module, spec: dict[str, Any]) -> None:
    """The gates ``finetune`` fitted on a trained adapter set (its spec's domain_gate file, at its
    gate_prior) put back on the sites they were fitted on."""
    for site, gate in hashing_gates(model, float(spec.get("gate_prior", 0.0))):
        site.domain_gate = gate
    load_domain_gates(model, spec["domain_gate"])


def fit_domain_gates(model: nn.Module, gated: list[tuple[GatedSite, DomainGate]], new: ByteDataset,
                     kept: list[ByteDataset], seq_len: int, batch_size: int, seed: int,
                     device: str = "cpu") -> None:
    """Each gate's llr from its reads of its site's inputs over sampled windows of ``new`` and of
    ``kept``, then the gate put in place. Fit before the updates train (adapters and LoRA add
    nothing yet, so the inputs are the base model's) or after, on the trained model's."""
    new_counts = gate_read_counts(model, gated, new, seq_len, batch_size, seed, device)
    kept_counts = [torch.zeros_like(c) for c in new_counts]
    for data in kept:
        for acc, c in zip(kept_counts, gate_read_counts(model, gated, data, seq_len, batch_size, seed, device)):
            acc += c
    for (site, gate), n, k in zip(gated, new_counts, kept_counts):
        gate.llr.copy_(row_llr(n, k))
        site.domain_gate = gate


def gate_adapters(model: nn.Module, new: ByteDataset, kept: list[ByteDataset], seq_len: int, batch_size: int,
                  seed: int, device: str = "cpu", prior: float = 0.0) -> int:
    """Every update that trains (``gate_sites``: FHME adapters, LoRA) behind a ``DomainGate`` for
    ``new`` against ``kept``, each with routing of its own (``hashing_gate``): an adapter's own
    routing has a few hundred rows, too coarse a reading to tell the domains apart, and it learns.
    Returns how many gates were placed."""
    gated = hashing_gates(model, prior)
    if not gated:
        raise ValueError("a domain gate needs FHME adapters or LoRA that train")
    fit_domain_gates(model, gated, new, kept, seq_len, batch_size, seed, device)
    return len(gated)
