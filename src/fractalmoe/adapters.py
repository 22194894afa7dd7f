"""FHME adapters: an FHME layer in parallel to chosen FFN/MLP blocks of a frozen model, and
optionally one more at each attention block's input.

Works on ``FHMELanguageModel`` and on Hugging Face causal LMs (GPT-2, Llama family, ...): the
decoder layers are found as the model's longest ``nn.ModuleList`` of identical blocks, and the
feed-forward block inside each layer by its structure (a child called mlp / ffn / feed_forward,
or whose class name says MLP / FeedForward), the attention block likewise (attn / self_attn /
attention, or a class name saying Attention), not by one model's attribute paths.

The adapter's output table (a neuron bank's ``up``, a value bank's ``values``) starts at zero,
so every routed block is the identity, the FHME output f_d(x) - x is exactly 0 and the adapted
model starts exactly as the base.

Also here, for fine-tuning (``finetune.py``): adapter sets stacked on an adapted model, an
optional output gate, expert-row masks, FHME adapters sized to a parameter budget, and the LoRA
baseline on every dense projection (``lora_targets``), which it is sized against.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from .fhme import FHME
from .routing import ProductKeyRouter
from .stats import freeze_statistics

_FFN_NAME = re.compile(r"^(mlp|ffn|feed_forward|feedforward)$", re.IGNORECASE)
_FFN_CLASS = re.compile(r"(MLP|FeedForward|FFN)", re.IGNORECASE)
_ATTENTION_NAME = re.compile(r"^(attn|self_attn|attention|self_attention)$", re.IGNORECASE)
DEFAULT_ADAPTER = dict(num_experts=1024, depth=2, heads=2, topk=8, key_dim=32)


class AdaptedFFN(nn.Module):
    """base(x) + FHME(x): the frozen FFN with a trainable FHME beside it. The adapter's aux
    losses and statistics reach a collector like any FHME layer's (``stats.collect``)."""

    def __init__(self, base: nn.Module, adapter: FHME, gate: nn.Linear | None = None) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.gate = gate  # optional output gate sigmoid(w . x + b) (``output_gate_linear``)
        self.domain_gate: nn.Module | None = None  # x -> (..., 1): ``sparse_rows.DomainGate``

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.domain_gate is not None and (args or kwargs):  # cached generation: x holds new positions alone
            raise ValueError("a domain gate reads the whole sequence so far: generate without a cache")
        out = self.base(x, *args, **kwargs)
        y = self.adapter(x)
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x)) * y
        if self.domain_gate is not None:
            y = self.domain_gate(x) * y
        return out + y.to(out.dtype)


class AdaptedAttention(nn.Module):
    """attention(x + FHME(x)): the frozen attention reads its input moved by a trainable FHME, so
    its queries, keys and values adapt (as LoRA on the q/k/v projections does), which an adapter
    beside the FFN cannot reach. The FHME is position-wise, so a KV cache stays valid."""

    def __init__(self, base: nn.Module, adapter: FHME) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.domain_gate: nn.Module | None = None  # x -> (..., 1): ``sparse_rows.DomainGate``

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            args = (self._moved(args[0]), *args[1:])
        else:  # transformers' Llama passes its input by name
            kwargs["hidden_states"] = self._moved(kwargs["hidden_states"])
        return self.base(*args, **kwargs)

    def _moved(self, x: Tensor) -> Tensor:
        y = self.adapter(x)
        if self.domain_gate is not None:
            y = self.domain_gate(x) * y
        return x + y.to(x.dtype)


class GatedLoRA(nn.Module):
    """A peft LoRA layer whose update reaches the output through a per-token domain gate:
    base(x) + gate(x) * B A x * scaling. LoRA behind a gate cannot be merged into its weight,
    so the wrapper keeps the two apart; with no gate set it computes what the LoRA layer does."""

    def __init__(self, lora: nn.Module) -> None:
        super().__init__()
        self.lora = lora
        self.domain_gate: nn.Module | None = None  # x -> (..., 1): ``sparse_rows.DomainGate``

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        lora = self.lora
        out = lora.base_layer(x, *args, **kwargs)
        delta = sum(lora.lora_B[n](lora.lora_A[n](lora.lora_dropout[n](x))) * lora.scaling[n]
                    for n in lora.active_adapters)
        if self.domain_gate is not None:
            delta = self.domain_gate(x) * delta
        return out + delta.to(out.dtype)

    @property
    def in_features(self) -> int:
        return next(iter(self.lora.lora_A.values())).in_features

    def trains(self) -> bool:
        """Whether its own LoRA weights learn (a later stage's LoRA may sit inside its base layer)."""
        return lora_trains(self.lora)


class EmbeddingChange(nn.Module):
    """One side of the tied byte embeddings (the input table or the output head), frozen, plus
    the change dE both sides share, read through the side's own domain gate if it has one."""

    def __init__(self, base: nn.Module, delta: nn.Parameter) -> None:
        super().__init__()
        self.base = base
        self.delta = delta  # one parameter on both sides, as the base's head and embeddings are
        self.domain_gate: nn.Module | None = None  # x -> (..., 1): ``sparse_rows.DomainGate``

    @property
    def weight(self) -> Tensor:
        """The base's: code that reads the embeddings' weight keeps reading the frozen table."""
        return self.base.weight

    def _gated(self, read: Tensor, d: Tensor) -> Tensor:
        return d if self.domain_gate is None else self.domain_gate(read) * d


class GatedEmbedding(EmbeddingChange):
    """The frozen byte embeddings plus a trainable change that starts at zero:
    E[x] + gate(E[x]) * dE[x]. A new domain often writes bytes the base seldom saw (``_``, ``=``,
    digits in source code), whose rows a change to the embeddings moves at little cost to the base;
    with the head tied to the embeddings, ``GatedHead`` reads the same change on the output side.
    The gate reads the base's embeddings of the text so far."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base, nn.Parameter(torch.zeros_like(base.weight)))

    def forward(self, ids: Tensor) -> Tensor:
        e = self.base(ids)
        return e + self._gated(e, nn.functional.embedding(ids, self.delta)).to(e.dtype)

    def flops_per_token(self) -> int:
        """A gathered row and an add; the gate's routing, if any."""
        return self.weight.shape[1] + _gate_cost(self.domain_gate, "flops_per_token")

    def active_params_per_token(self) -> int:
        return self.weight.shape[1] + _gate_cost(self.domain_gate, "active_params_per_token")


class GatedHead(EmbeddingChange):
    """The frozen output head plus the tied change of a ``GatedEmbedding``:
    h E^T + gate(h) * h dE^T, the gate reading the head's input."""

    def forward(self, h: Tensor) -> Tensor:
        out = self.base(h)
        return out + self._gated(h, nn.functional.linear(h, self.delta.to(h.dtype))).to(out.dtype)

    def flops_per_token(self) -> int:
        """The change's own matmul (2 D V) and the add; the gate's routing, if any."""
        v, d = self.delta.shape
        return 2 * v * d + v + _gate_cost(self.domain_gate, "flops_per_token")

    def active_params_per_token(self) -> int:
        return self.delta.numel() + _gate_cost(self.domain_gate, "active_params_per_token")


def _gate_cost(gate: nn.Module | None, which: str) -> int:
    """``which`` (flops_per_token or active_params_per_token) of a site's domain gate, 0 without one."""
    return 0 if gate is None else getattr(gate, which)()


def output_head(model: nn.Module) -> nn.Module:
    """The output head of a FractalMoE model or a transformers one."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model.head


def tied_embeddings(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(input embeddings, output head), which must share their weight."""
    embed, head = input_embeddings(model), output_head(model)
    if head is None or head.weight is not embed.weight:
        raise ValueError("a change to the embeddings needs an output head tied to them; this model's is "
                         "a weight of its own")
    return embed, head


def add_embedding_delta(model: nn.Module) -> nn.Parameter:
    """A trainable change to the tied byte embeddings, read by the input (``GatedEmbedding``) and
    the output head (``GatedHead``); returns it. Stacks over an earlier set's change, which stays
    frozen and active."""
    embed, head = tied_embeddings(model)
    gated = GatedEmbedding(embed)
    gated_head = GatedHead(head, gated.delta)
    if hasattr(model, "set_input_embeddings"):
        model.set_input_embeddings(gated)
        model.set_output_embeddings(gated_head)
    else:
        model.embed, model.head = gated, gated_head
    return gated.delta


def gated_lora_ids(model: nn.Module) -> set[int]:
    """The ids of the peft LoRA layers that sit inside a ``GatedLoRA``: never merged nor re-wrapped."""
    return {id(m.lora) for m in model.modules() if isinstance(m, GatedLoRA)}


def lora_trains(lora: nn.Module) -> bool:
    """Whether a peft LoRA layer's own A and B learn, not counting LoRA nested in its base layer."""
    return any(p.requires_grad for part in (lora.lora_A, lora.lora_B) for p in part.parameters())


def gate_lora_layers(model: nn.Module) -> list[GatedLoRA]:
    """Every trainable peft LoRA layer of ``model`` put inside a ``GatedLoRA`` (no gate yet), in
    module order; returns the wrappers. A domain gate reads whole sequences, so LoRA on a
    projection that sees flattened tokens (an FHME layer's router queries) is refused."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # without peft there is no LoRA layer to gate
        return []
    inside_fhme = {id(m) for f in model.modules() if isinstance(f, FHME) for m in f.modules()}
    gated = gated_lora_ids(model)
    wrapped = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer) and id(mod) not in gated and lora_trains(mod):
            if id(mod) in inside_fhme:
                raise ValueError(f"LoRA on {name} reads flattened tokens, and a domain gate reads whole "
                                 f"sequences: put LoRA on the attention projections only")
            parent, _, attr = name.rpartition(".")
            wrapper = GatedLoRA(mod)
            setattr(model.get_submodule(parent) if parent else model, attr, wrapper)
            wrapped.append(wrapper)
    return wrapped


GATE_BIAS = -4.0  # sigmoid(-4) = 0.018: a gated adapter starts nearly shut


def output_gate_linear(dim: int) -> nn.Linear:
    """A per-token scalar gate on an adapter's output, w = 0 and b = -4 at init: the adapter
    must earn its way into the residual stream, which keeps the base's behaviour longer."""
    gate = nn.Linear(dim, 1)
    nn.init.zeros_(gate.weight)
    nn.init.constant_(gate.bias, GATE_BIAS)
    return gate


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of identical blocks holding the most parameters: the decoder stack."""
    best, best_size = None, -1
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    if best is None:
        raise ValueError("found no stack of identical decoder layers in this model")
    return best


def chosen_layers(decoder: nn.ModuleList, layers: list[int] | None) -> list[int]:
    """The decoder layer indices asked for (None: every layer), checked against the model: an
    index past its last layer is a one-line error before anything is built or written."""
    if layers is None:
        return list(range(len(decoder)))
    bad = [i for i in layers if not 0 <= i < len(decoder)]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {len(decoder)} layers (0..{len(decoder) - 1})")
    return layers


def find_ffn(layer: nn.Module, stack: bool = False) -> str:
    """Attribute name of the feed-forward block inside one decoder layer (with ``stack``, an
    already adapted one: the new adapter set wraps the old)."""
    for name, child in layer.named_children():
        if isinstance(child, AdaptedFFN):
            if stack:
                return name
            raise ValueError("this model already has FHME adapters")
        if _FFN_NAME.match(name) or _FFN_CLASS.search(type(child).__name__):
            return name
    raise ValueError(f"no feed-forward block (mlp / ffn / feed_forward) in {type(layer).__name__}")


def find_attention(layer: nn.Module) -> str:
    """Attribute name of the self-attention block inside one decoder layer (adapted or not)."""
    for name, child in layer.named_children():
        if isinstance(child, AdaptedAttention) or _ATTENTION_NAME.match(name) \
                or "Attention" in type(child).__name__:
            return name
    raise ValueError(f"no attention block (attn / self_attn / attention) in {type(layer).__name__}")


def hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    for key in ("dim", "hidden_size", "n_embd", "d_model"):
        if cfg is not None and isinstance(getattr(cfg, key, None), int):
            return int(getattr(cfg, key))
    raise ValueError("cannot tell the model's hidden size (no dim / hidden_size / n_embd)")


def freeze_base(model: nn.Module) -> None:
    """Freeze every weight of ``model`` and its past-batch statistics and balance losses
    (``freeze_statistics``): what every fine-tuning method but full fine-tuning starts from."""
    model.requires_grad_(False)
    freeze_statistics(model)


def zero_adapter(dim: int, **fhme_config: Any) -> FHME:
    """An FHME (DEFAULT_ADAPTER overridden by ``fhme_config``) whose output table (neuron: up;
    value and gated: values) is zero, so that it adds exactly nothing until it learns."""
    adapter = FHME(dim, **{**DEFAULT_ADAPTER, **fhme_config})
    with torch.no_grad():
        getattr(adapter.fractal.bank, adapter.fractal.bank.table_names[-1]).zero_()
    return adapter


def add_fhme_adapters(model: nn.Module, layers: list[int] | None = None, stack: bool = False,
                      output_gate: bool = False, reroute: bool = False,
                      attention: dict[str, Any] | None = None, attention_lora: int | None = None,
                      embeddings: bool = False, **fhme_config: Any) -> list[FHME]:
    """Freeze the model (``freeze_base``) and add a zero-initialised FHME beside the FFN of each
    chosen layer; returns them, then the attention-side ones.

    ``stack``: a layer that already holds adapters gets one more set around them (sequential
    adaptation: the earlier sets stay in place, frozen and active). ``output_gate``: each
    adapter's output is scaled by a learned per-token gate that starts nearly shut. ``reroute``:
    the base's own routers' query projections stay trainable (``base_router_queries``).
    ``attention``: also an FHME at each chosen layer's attention input (``AdaptedAttention``), of
    this config over ``fhme_config`` (e.g. its own num_experts and topk). ``attention_lora``:
    also LoRA of this rank (at most width / 2) on the chosen layers' attention projections: one
    dense low-rank update for every token, which the few rows a routed adapter reads per token do
    not give attention as well per parameter (docs/results.md). ``embeddings``: also a change to
    the tied byte embeddings (``add_embedding_delta``)."""
    decoder = decoder_layers(model)
    chosen = chosen_layers(decoder, layers)
    if embeddings:
        tied_embeddings(model)  # refused before anything changes
    freeze_base(model)
    dim = hidden_size(model)
    adapters, at_attention = [], []
    for i in chosen:
        device = next(decoder[i].parameters()).device
        name = find_ffn(decoder[i], stack)
        adapter = zero_adapter(dim, **fhme_config).to(device)
        gate = output_gate_linear(dim).to(device) if output_gate else None
        setattr(decoder[i], name, AdaptedFFN(getattr(decoder[i], name), adapter, gate))
        adapters.append(adapter)
        if attention is not None:
            name = find_attention(decoder[i])
            adapter = zero_adapter(dim, **{**fhme_config, **attention}).to(device)
            setattr(decoder[i], name, AdaptedAttention(getattr(decoder[i], name), adapter))
            at_attention.append(adapter)
    for weight in base_router_queries(model, layers) if reroute else []:
        weight.requires_grad_(True)
    if attention_lora is not None:
        add_attention_lora(model, attention_lora, layers)
    if embeddings:
        add_embedding_delta(model)
    return adapters + at_attention


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- sizing FHME adapters to a budget -------------------------------------------------------
def fhme_adapter_parameter_count(dim: int, output_gate: bool = False, **fhme_config: Any) -> int:
    """Trainable parameters of one FHME adapter (its tables built on the meta device, the global
    random state left as it was)."""
    from .experts import meta_expert_tables

    with torch.random.fork_rng(devices=[]), meta_expert_tables():
        adapter = FHME(dim, **{**DEFAULT_ADAPTER, **fhme_config})
    return sum(p.numel() for p in adapter.parameters()) + (dim + 1 if output_gate else 0)


def experts_for_budget(model: nn.Module, budget: int, layers: list[int] | None = None,
                       output_gate: bool = False, **fhme_config: Any) -> tuple[int, int]:
    """(num_experts, trainable parameters) of the largest adapter set, one per chosen layer,
    whose perfect-square num_experts keeps the trainable count at or below ``budget``."""
    cfg = {**DEFAULT_ADAPTER, **fhme_config}
    cfg.pop("num_experts")
    dim, count_layers = hidden_size(model), len(chosen_layers(decoder_layers(model), layers))

    def count(n_keys: int) -> int:
        return count_layers * fhme_adapter_parameter_count(dim, output_gate, num_experts=n_keys**2, **cfg)

    lo = int(cfg["topk"])  # product keys need n_keys >= topk
    if count(lo) > budget:
        raise ValueError(f"the smallest FHME adapters ({lo**2} experts, topk={lo}) have {count(lo):,} "
                         f"trainable parameters, more than the budget of {budget:,}")
    hi = lo + 1
    while count(hi) <= budget:  # doubling, then bisection: count grows with n_keys
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= budget else (lo, mid)
    return lo**2, count(lo)


# --- expert-row masks (sparse memory fine-tuning) -------------------------------------------
def mask_rows(adapter: FHME, keep: Tensor) -> None:
    """Let only the expert rows where ``keep`` (N,) is true learn: a hook drops every other row
    from each bank table's row-sparse gradient (the row-sparse rules then leave those rows, and
    their state, bit-identical, even where ``keep`` changes between steps and lazy Adam holds
    momentum for them) or zeroes it in a dense one (dense AdamW still moves a row by its momentum)."""
    keep = keep.bool()
    hooks = vars(adapter).setdefault("row_mask_hooks", [])
    for table in adapter.fractal.bank.tables().values():
        hooks.append(table.register_hook(lambda grad, keep=keep: _keep_rows(grad, keep)))


def unmask_rows(model: nn.Module) -> None:
    """Remove every row mask (full fine-tuning of an adapted model trains every row)."""
    for m in model.modules():
        for hook in vars(m).pop("row_mask_hooks", []):
            hook.remove()


def _keep_rows(grad: Tensor, keep: Tensor) -> Tensor:
    keep = keep.to(grad.device)
    if grad.is_sparse:  # a listed row counts as touched, even with a zero gradient: drop it
        idx = grad._indices()
        kept = keep.index_select(0, idx[0]).nonzero().squeeze(1)  # a host sync, in fine-tuning only
        return torch.sparse_coo_tensor(idx.index_select(1, kept), grad._values().index_select(0, kept),
                                       grad.shape, is_coalesced=grad.is_coalesced(), check_invariants=False)
    return grad.masked_fill(~keep.unsqueeze(1), 0)


def load_row_masks(adapters: list[FHME], layers: list[int] | None, path: str) -> None:
    """Apply the masks of a ``row_mask`` file (safetensors, one (N,) mask per layer index)."""
    from safetensors.torch import load_file

    masks = load_file(path)
    for i, adapter in zip(layers if layers is not None else range(len(adapters)), adapters):
        mask_rows(adapter, masks[str(i)])


def base_memories(model: nn.Module, layers: list[int] | None = None) -> list[tuple[int, FHME]]:
    """(layer index, FHME) of the base model's own FHME FFNs in the chosen decoder layers (inside
    any adapters added since)."""
    decoder = decoder_layers(model)
    chosen = chosen_layers(decoder, layers)
    found = []
    for i in chosen:
        ffn = getattr(decoder[i], find_ffn(decoder[i], stack=True))
        while isinstance(ffn, AdaptedFFN):
            ffn = ffn.base
        if isinstance(ffn, FHME):
            found.append((i, ffn))
    return found


def required_memories(model: nn.Module, layers: list[int] | None = None) -> list[tuple[int, FHME]]:
    """``base_memories``, which memory fine-tuning cannot do without."""
    memories = base_memories(model, layers)
    if not memories:
        raise ValueError("--adapter memory needs a base whose FFNs are FHME layers")
    return memories


def open_memories(model: nn.Module, layers: list[int] | None = None) -> list[tuple[int, FHME]]:
    """Freeze the model except the expert tables of its own FHME FFNs (memory fine-tuning: the
    rows to train are then chosen with ``mask_rows``)."""
    memories = required_memories(model, layers)
    freeze_base(model)  # the routing the rows are read by stays the base's
    for _, fhme in memories:
        for table in fhme.fractal.bank.tables().values():
            table.requires_grad_(True)
    return memories


def base_router_queries(model: nn.Module, layers: list[int] | None = None) -> list[nn.Parameter]:
    """The query projections of the routers of the base's own FHME FFNs: what ``--reroute``
    trains beside FHME adapters. The base memory's rows stay as they are; which of them a token
    reads may change, and with new rows beside them that learns a new domain further than adapter
    rows of the same count (docs/results.md, fine-tuning)."""
    memories = base_memories(model, layers)
    if not memories:
        raise ValueError("--reroute needs a base whose FFNs are FHME layers")
    return [m.query.weight for _, fhme in memories for m in fhme.modules() if isinstance(m, ProductKeyRouter)]


def input_embeddings(model: nn.Module) -> nn.Module:
    """The byte embeddings of a FractalMoE model (its output head shares them) or a transformers one."""
    return model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.embed


def embedding_parameter_count(model: nn.Module) -> int:
    return input_embeddings(model).weight.numel()


# --- LoRA -----------------------------------------------------------------------------------
LORA_TARGETS = ("all", "attention", "ffn")
_NOT_PROJECTIONS = re.compile(r"^(gate|router|depth_router)$")  # routing / gating logits


def _is_dense(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def lora_targets(model: nn.Module, layers: list[int] | None = None,
                 which: str = "all") -> list[tuple[str, nn.Module]]:
    """(name from the model's root, module) of each LoRA target in the chosen decoder layers.

    ``all``, every dense projection: each nn.Linear / transformers Conv1D in the layers
    (attention q/k/v/o or a fused qkv, the MLP's linears, an FHME layer's routers' query
    projections and the gated block's SiLU gate) except routing and gating heads (modules called
    gate, router or depth_router: a handful of logits, e.g. highway joins and depth routers) and
    the inside of earlier adapter sets, their domain gates and LoRA layers (a projection whose
    LoRA sits behind a gate, ``GatedLoRA``, takes no more). ``attention``: the Linear / Conv1D
    modules of the attention block only (the original baseline, kept for its runs). ``ffn``: those
    of ``all`` inside the FFN / MLP block (which half of the layer LoRA's gain comes from)."""
    if which not in LORA_TARGETS:
        raise ValueError(f"LoRA targets {which!r} must be one of {LORA_TARGETS}")
    decoder = decoder_layers(model)
    chosen = chosen_layers(decoder, layers)
    prefix = _path_of(model, decoder)
    earlier = {id(m) for a in model.modules() if isinstance(a, (AdaptedFFN, AdaptedAttention))
               for part in (a.adapter, getattr(a, "gate", None)) if part is not None for m in part.modules()}
    earlier |= {id(m) for a in model.modules() if getattr(a, "domain_gate", None) is not None
                for m in a.domain_gate.modules()}  # an earlier set's gates: frozen routing, never a target
    earlier |= {id(m) for a in model.modules() if isinstance(a, GatedLoRA) for m in a.modules()}  # unmergeable
    out = []
    for i in chosen:
        ffn = find_ffn(decoder[i], stack=True) if which == "ffn" else None
        for name, mod in decoder[i].named_modules():
            if not _is_dense(mod) or id(mod) in earlier or "lora_" in name:
                continue
            block = name.split(".")[0]
            if which == "attention":
                keep = re.search("attn|attention", block, re.IGNORECASE) is not None
            else:
                keep = not _NOT_PROJECTIONS.match(name.rsplit(".", 1)[-1]) and ffn in (None, block)
            if keep:
                out.append((f"{prefix}.{i}.{name}", mod))
    return out


def _target_rank(m: nn.Module, rank: int) -> int:
    return min(rank, *_shape(m))


def lora_parameter_count(targets: list[tuple[str, nn.Module]], rank: int) -> int:
    """Trainable parameters of LoRA at ``rank`` (capped at each target's full rank)."""
    return sum(_target_rank(m, rank) * _in_out(m) for _, m in targets)


def max_lora_rank(model: nn.Module) -> int:
    """Width / 2: beyond it a low-rank update is no longer the low-rank baseline."""
    return max(1, hidden_size(model) // 2)


def lora_rank_cap(model: nn.Module, targets: list[tuple[str, nn.Module]], which: str) -> int:
    """The largest LoRA rank: ``max_lora_rank`` (on every dense projection or the FFN's), the
    narrowest target's full rank on attention only (the original baseline's cap, kept for its runs)."""
    return min(min(_shape(m)) for _, m in targets) if which == "attention" else max_lora_rank(model)


def check_lora_rank(rank: int, cap: int, which: str) -> None:
    """A one-line error for a rank outside 1..cap that says where the cap comes from."""
    if not 1 <= rank <= cap:
        why = "the narrowest attention projection's full rank" if which == "attention" else "width / 2"
        raise ValueError(f"LoRA rank {rank} must be in 1..{cap} ({cap} = {why})")


def lora_rank_for_budget(targets: list[tuple[str, nn.Module]], budget: int, cap: int) -> int:
    """The rank in 1..cap whose trainable count comes closest to ``budget``."""
    return min(range(1, cap + 1), key=lambda r: (abs(lora_parameter_count(targets, r) - budget), r))


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA layer into its base weight and put the base layer back: an earlier
    adaptation stays active (and frozen) under a new one. LoRA behind a domain gate
    (``GatedLoRA``) cannot be folded and stays as it is. Returns how many were merged."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # without peft there is no LoRA layer to merge
        return 0
    gated = gated_lora_ids(model)
    merged = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer) and id(mod) not in gated:
            mod.merge()
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, mod.get_base_layer())
            merged += 1
    if merged and hasattr(model, "peft_config"):
        del model.peft_config  # the next injection starts a fresh configuration
    return merged


def add_lora_adapters(model: nn.Module, budget: int | None = None, layers: list[int] | None = None,
                      rank: int | None = None, targets: str = "attention") -> int:
    """Freeze the model and put LoRA (peft) on ``lora_targets(model, layers, targets)`` at
    ``rank``, or at the rank whose trainable count comes closest to ``budget``. LoRA layers
    already in the model (an earlier adaptation) are merged into their weights first. Returns
    the rank (alpha = rank; a target narrower than it gets its full rank)."""
    merge_lora(model)
    found = lora_targets(model, layers, targets)
    if not found:
        what = "attention" if targets == "attention" else "dense"
        raise ValueError(f"found no {what} projections (Linear / Conv1D) for LoRA")
    cap = lora_rank_cap(model, found, targets)
    if targets == "attention":  # the original sizing, so that its runs load unchanged
        per_rank = sum(_in_out(m) for _, m in found)
        default = None if budget is None else max(1, min(round(budget / per_rank), cap))
    else:
        default = None if budget is None else lora_rank_for_budget(found, budget, cap)
    rank = rank if rank is not None else default
    if rank is None:
        raise ValueError("LoRA needs a rank or a trainable-parameter budget")
    check_lora_rank(rank, cap, targets)
    freeze_base(model)
    inject_lora(model, found, rank)
    return rank


def add_attention_lora(model: nn.Module, rank: int, layers: list[int] | None = None) -> None:
    """LoRA at ``rank`` on the chosen layers' attention projections, beside what already learns
    (an earlier set's LoRA is merged into its weights first, and stays frozen; one behind domain
    gates cannot be, and its projections take no more)."""
    merge_lora(model)
    check_lora_rank(rank, max_lora_rank(model), "all")
    inject_lora(model, attention_lora_targets(model, layers), rank)


def attention_lora_targets(model: nn.Module, layers: list[int] | None = None) -> list[tuple[str, nn.Module]]:
    """``lora_targets(model, layers, "attention")``, or a one-line reason why there are none."""
    found = lora_targets(model, layers, "attention")
    if not found and any(isinstance(m, GatedLoRA) for m in model.modules()):
        raise ValueError("the base's LoRA on attention sits behind domain gates and cannot be merged: "
                         "a later stage cannot add LoRA there (leave out --attention-lora)")
    if not found:
        raise ValueError("found no attention projections (Linear / Conv1D) for LoRA")
    return found


def inject_lora(model: nn.Module, found: list[tuple[str, nn.Module]], rank: int) -> None:
    """LoRA (peft, alpha = rank) on the ``found`` targets; a target narrower than ``rank`` gets
    its full rank. The new LoRA weights learn; every other weight keeps its flag (peft would
    freeze them all, adapters added before included)."""
    from peft import LoraConfig, inject_adapter_in_model

    learning = [p for p in model.parameters() if p.requires_grad]
    narrow = {n: _target_rank(m, rank) for n, m in found if _target_rank(m, rank) != rank}
    conv1d = all(type(m).__name__ == "Conv1D" for _, m in found)  # GPT-2 stores (in, out) weights
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=[n for n, _ in found],
                                       rank_pattern=narrow, alpha_pattern=narrow, fan_in_fan_out=conv1d),
                            model)
    for p in learning:
        p.requires_grad_(True)


def _path_of(model: nn.Module, target: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is target)


def _shape(m: nn.Module) -> tuple[int, int]:
    w = m.weight
    return (w.shape[1], w.shape[0]) if type(m).__name__ != "Conv1D" else (w.shape[0], w.shape[1])


def _in_out(m: nn.Module) -> int:
    return sum(_shape(m))


# What `fractalmoe finetune --adapter` trains: new FHME layers, the base's own expert rows, LoRA, or
# every weight.
ADAPTER_KINDS = ("fhme", "memory", "lora", "full")


def build_adapted_model(base_run: str, spec: dict[str, Any], device: str = "cpu") -> nn.Module:
    """The base run's model with the adapters described by ``spec``. The base may itself be an
    adapter run (sequential adaptation): its adapters stay active and frozen under the new ones.

    spec: kind (fhme | memory | lora | full), layers; fhme: the adapters' FHME config, output_gate,
    attention (the attention-side adapters' config over it, if any), attention_lora (the rank
    of LoRA on the attention projections, if any), reroute (``base_router_queries`` learn too), a
    row_mask file, embeddings (a change to the tied embeddings, ``add_embedding_delta``); memory:
    the base's own expert tables, a row_mask file of the rows that learn, embeddings (learn as they are);
    lora: rank (or budget) and targets (default ``attention``, as older runs had); full: every
    weight trainable, earlier adapters included. A domain_gate file (with its gate_prior) is not
    read here: the gates go on after the run's weights are loaded (``sparse_rows.attach_saved_gates``),
    since gating LoRA moves its weights into a wrapper."""
    from .checkpoint import load_model_from_run

    model, _, _ = load_model_from_run(base_run, device)
    if spec["kind"] == "fhme":
        adapters = add_fhme_adapters(model, spec.get("layers"), stack=True, output_gate=bool(spec.get("output_gate")),
                                     reroute=bool(spec.get("reroute")), attention=spec.get("attention"),
                                     attention_lora=spec.get("attention_lora"), embeddings=bool(spec.get("embeddings")),
                                     **spec.get("fhme", {}))
        if spec.get("row_mask"):
            load_row_masks(adapters, spec.get("layers"), spec["row_mask"])
    elif spec["kind"] == "memory":
        memories = open_memories(model, spec.get("layers"))
        if spec.get("embeddings"):
            input_embeddings(model).weight.requires_grad_(True)
        if spec.get("row_mask"):
            load_row_masks([m for _, m in memories], [i for i, _ in memories], spec["row_mask"])
    elif spec["kind"] == "lora":
        add_lora_adapters(model, spec.get("budget"), spec.get("layers"), spec.get("rank"),
                          spec.get("targets", "attention"))
    elif spec["kind"] == "full":
        unmask_rows(model)
        freeze_statistics(model, frozen=False)
        for p in model.parameters():
            p.requires_grad_(True)
    return model.to(device)
