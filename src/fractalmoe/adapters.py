"""FHME adapters: an FHME layer in parallel to chosen FFN/MLP blocks of a frozen model.

Works on ``FHMELanguageModel`` and on Hugging Face causal LMs (GPT-2, Llama family, ...): the
decoder layers are found as the model's longest ``nn.ModuleList`` of identical blocks, and the
feed-forward block inside each layer by its structure (a child called mlp / ffn / feed_forward,
or whose class name says MLP / FeedForward), not by one model's attribute paths.

The adapter's expert ``up`` table starts at zero, so every routed block is the identity, the
FHME output f_d(x) - x is exactly 0 and the adapted model starts exactly as the base.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from .fhme import FHME

_FFN_NAME = re.compile(r"^(mlp|ffn|feed_forward|feedforward)$", re.IGNORECASE)
_FFN_CLASS = re.compile(r"(MLP|FeedForward|FFN)", re.IGNORECASE)
DEFAULT_ADAPTER = dict(num_experts=1024, depth=2, heads=2, topk=8, key_dim=32)


class AdaptedFFN(nn.Module):
    """base(x) + FHME(x): the frozen FFN with a trainable FHME beside it. The adapter's aux
    losses and statistics reach a collector like any FHME layer's (``stats.collect``)."""

    def __init__(self, base: nn.Module, adapter: FHME) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = self.base(x, *args, **kwargs)
        return out + self.adapter(x).to(out.dtype)


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


def find_ffn(layer: nn.Module) -> str:
    """Attribute name of the feed-forward block inside one decoder layer."""
    for name, child in layer.named_children():
        if isinstance(child, AdaptedFFN):
            raise ValueError("this model already has FHME adapters")
        if _FFN_NAME.match(name) or _FFN_CLASS.search(type(child).__name__):
            return name
    raise ValueError(f"no feed-forward block (mlp / ffn / feed_forward) in {type(layer).__name__}")


def hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    for key in ("dim", "hidden_size", "n_embd", "d_model"):
        if cfg is not None and isinstance(getattr(cfg, key, None), int):
            return int(getattr(cfg, key))
    raise ValueError("cannot tell the model's hidden size (no dim / hidden_size / n_embd)")


def add_fhme_adapters(model: nn.Module, layers: list[int] | None = None, **fhme_config: Any) -> list[FHME]:
    """Freeze the model and add a zero-initialised FHME beside the FFN of each chosen layer."""
    stack = decoder_layers(model)
    chosen = list(range(len(stack))) if layers is None else layers
    bad = [i for i in chosen if not 0 <= i < len(stack)]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {len(stack)} layers")
    for p in model.parameters():
        p.requires_grad_(False)
    dim = hidden_size(model)
    adapters = []
    for i in chosen:
        name = find_ffn(stack[i])
        adapter = FHME(dim, **{**DEFAULT_ADAPTER, **fhme_config})
        with torch.no_grad():
            adapter.fractal.bank.up.zero_()
        device = next(stack[i].parameters()).device
        setattr(stack[i], name, AdaptedFFN(getattr(stack[i], name), adapter.to(device)))
        adapters.append(adapter)
    return adapters


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def add_lora_adapters(model: nn.Module, budget: int, layers: list[int] | None = None) -> int:
    """LoRA (peft) on the attention projections of the chosen layers, rank chosen so the
    trainable parameters come closest to ``budget``. Returns the rank."""
    from peft import LoraConfig, inject_adapter_in_model

    stack = decoder_layers(model)
    chosen = list(range(len(stack))) if layers is None else layers
    targets = []
    prefix = _path_of(model, stack)
    for i in chosen:
        for name, mod in stack[i].named_modules():
            if (re.search("attn|attention", name.split(".")[0], re.IGNORECASE)
                    and type(mod).__name__ in ("Linear", "Conv1D")):
                targets.append((mod, f"{prefix}.{i}.{name}"))
    if not targets:
        raise ValueError("found no attention projections (Linear / Conv1D) for LoRA")
    per_rank = sum(_in_out(m) for m, _ in targets)
    rank = max(1, min(round(budget / per_rank), min(min(_shape(m)) for m, _ in targets)))
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=[n for _, n in targets]),
                            model)
    return rank


def _path_of(model: nn.Module, target: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is target)


def _shape(m: nn.Module) -> tuple[int, int]:
    w = m.weight
    return (w.shape[1], w.shape[0]) if type(m).__name__ == "Linear" else (w.shape[0], w.shape[1])


def _in_out(m: nn.Module) -> int:
    return sum(_shape(m))


ADAPTER_KINDS = ("fhme", "lora", "full")


def build_adapted_model(base_run: str, spec: dict[str, Any], device: str = "cpu") -> nn.Module:
    """The base run's model with the adapters described by ``spec`` (kind, layers, fhme, rank)."""
    from .checkpoint import load_model_from_run

    model, _, _ = load_model_from_run(base_run, device)
    if spec["kind"] == "fhme":
        add_fhme_adapters(model, spec.get("layers"), **spec.get("fhme", {}))
    elif spec["kind"] == "lora":
        add_lora_adapters(model, spec["budget"], spec.get("layers"))
    return model.to(device)
