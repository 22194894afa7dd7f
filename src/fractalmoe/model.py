"""Causal language model whose FFNs are FHME layers (or a baseline), with KV-cache generation.

Legend: B batch, T time, D width, H attention heads, Hd head width, V vocabulary.

Forward is a pure function of the parameters and buffers (no host sync without adaptive depth):
aux losses and statistics go to a collector (``stats.collect``) and are folded by
``stats.fold_statistics`` after the optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .adapters import AdaptedAttention, AdaptedFFN, EmbeddingChange, GatedHead, GatedLoRA
from .baselines import build_ffn, routed_config
from .config import ROUTED_FFNS, ModelConfig
from .conv import CausalConv
from .experts import TABLE_DTYPES, ExpertBank
from .fhme import FHME, DepthHist
from .fractal import blocks_at_depth
from .reset import reset_tree


def rope_tables(end: int, head_dim: int, base: float = 10000.0, start: int = 0,
                device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin of rotary position angles of positions start..end-1: (end - start, head_dim / 2),
    made on ``device`` (cheap enough per call; nothing cached on the module)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(start, end, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs of x (B, H, T, Hd) by their position's angle."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


@dataclass
class KVCache:
    """Preallocated keys and values of one attention layer: (B, H, seq_len, Hd); with an FFN
    convolution of width W, its inputs too: (B, W - 1 + seq_len, D), zeros before position 0;
    with block convolutions, those of each routed block application (in evaluation order)."""

    k: Tensor
    v: Tensor
    ffn_in: Tensor | None = None
    block_in: list[Tensor] | None = None


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                pos: int = 0) -> Tensor:
        bsz, t, dim = x.shape
        q, k, v = self.qkv(x).view(bsz, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # cos, sin: positions pos..pos+t-1
        mask = None
        if cache is not None:
            cache.k[:, :, pos:pos + t], cache.v[:, :, pos:pos + t] = k, v
            k, v = cache.k[:, :, :pos + t], cache.v[:, :, :pos + t]
            if t > 1 and pos > 0:  # query i sits at absolute position pos + i
                mask = torch.ones(t, pos + t, dtype=torch.bool, device=x.device).tril(pos)
        causal = mask is None and t > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(bsz, t, dim))


class FHMETransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)) with an FHME (or baseline) FFN."""

    def __init__(self, cfg: ModelConfig, bank: ExpertBank | None = None) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim)
        self.ffn_conv = CausalConv(cfg.dim, cfg.ffn_conv) if cfg.ffn_conv else None
        self.ffn = build_ffn(cfg, bank)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                pos: int = 0) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, pos))
        h = self.ffn_norm(x)
        if self.ffn_conv is not None:
            h = self.ffn_conv(h, None if cache is None else cache.ffn_in, pos)
        if cache is not None and cache.block_in is not None:
            return x + self.drop(self.ffn(h, cache.block_in, pos))
        return x + self.drop(self.ffn(h))

    def ffn_cost(self, which: str, depth_hists: Mapping[nn.Module, DepthHist] | None = None) -> float:
        """``which`` (flops_per_token or active_params_per_token) of the FFN and its input convolution."""
        conv = 0 if self.ffn_conv is None else getattr(self.ffn_conv, which)()
        return conv + ffn_cost(self.ffn, which, depth_hists)

    def attention_adapter_cost(self, which: str) -> float:
        """``which`` of the FHME adapters at the attention's input (``AdaptedAttention``), if any, and
        of the domain gates on the attention side (on those adapters or on LoRA's projections)."""
        cost = sum(getattr(m.domain_gate, which)() for m in self.attn.modules()
                   if isinstance(m, (AdaptedAttention, GatedLoRA)) and m.domain_gate is not None)
        attn = self.attn
        while isinstance(attn, AdaptedAttention):
            cost, attn = cost + getattr(attn.adapter, which)(None), attn.base
        return cost


class FHMELanguageModel(nn.Module):
    """Byte-level causal LM: embeddings, FHME blocks, tied output head.

    ``checkpoint_blocks`` (False): in a training forward that builds a graph, each block keeps
    only its input and runs again in backward (non-reentrant activation checkpointing), so
    activations take one block's memory instead of all of them, for a second forward's time.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        routed = routed_config(cfg)
        # One expert bank read by every layer (Memory+), stored here once.
        self.shared_bank = (ExpertBank(cfg.num_experts, cfg.dim, cfg.expert_act, TABLE_DTYPES[cfg.expert_dtype],
                                       routed.block) if routed.share_bank and cfg.ffn in ROUTED_FFNS else None)
        self.blocks = nn.ModuleList(FHMETransformerBlock(cfg.layer_config(i), self.shared_bank)
                                    for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.register_load_state_dict_post_hook(FHMELanguageModel._retie_after_load)
        self._init_weights()
        self.checkpoint_blocks = False

    def tie_weights(self) -> None:
        """The output head reads the input embeddings: one parameter. Anything that replaces
        parameters (``to_empty``, a move between kinds of device, ``load_state_dict(...,
        assign=True)``) would leave two that train apart; ``_apply`` and loading re-tie them, and
        each change to the embeddings an adapter set put on both sides (``GatedEmbedding``)."""
        embed, head = self.embed, self.head
        while isinstance(head, GatedHead):
            head.delta = embed.delta
            embed, head = embed.base, head.base
        head.weight = embed.weight

    def _apply(self, fn: Any, recurse: bool = True) -> FHMELanguageModel:
        super()._apply(fn, recurse)
        self.tie_weights()
        return self

    @staticmethod
    def _retie_after_load(module: nn.Module, incompatible_keys: Any) -> None:
        module.tie_weights()  # type: ignore[operator]

    def init_weights(self) -> None:
        """Initialise every parameter and buffer in place, where it lives: for a model built on
        the meta device and materialised with ``to_empty`` (torchtitan's flow). Each module's
        ``reset_parameters`` (``reset.reset_tree``), then the model's own start for its
        embeddings and attention. Draws come from the device's global RNG; expert tables from a
        new seed per bank, 64K rows at a time."""
        reset_tree(self)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.embed.weight, std=0.02)
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=0.02)
            nn.init.normal_(block.attn.proj.weight, std=resid_std)

    def _check_shape(self, idx: Tensor) -> None:
        """dtype and shape of token ids (no host sync)."""
        if not isinstance(idx, Tensor) or idx.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"token ids must be an integer tensor (torch.long), got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)}")
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"token ids must have shape (batch, time) with time >= 1, got {tuple(idx.shape)}")
        if idx.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds seq_len={self.cfg.seq_len}; "
                             f"crop the input or raise seq_len")

    def check_input(self, idx: Tensor) -> None:
        """Validate token ids, values included: one host sync, so for entry points (CLI,
        ``generate``), not for every forward (which checks values asynchronously)."""
        self._check_shape(idx)
        lo, hi = (int(v) for v in torch.stack([idx.min(), idx.max()]).tolist())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}), got [{lo}, {hi}]")

    def _logits(self, idx: Tensor, caches: list[KVCache] | None = None, pos: int = 0) -> Tensor:
        x = self.embed(idx.long())
        cos, sin = rope_tables(pos + idx.shape[1], self.cfg.head_dim, start=pos, device=x.device)
        recompute = self.checkpoint_blocks and caches is None and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:  # the recompute records nothing (``stats``): the first pass did
                x = checkpoint(block, x, cos, sin, None, pos, use_reentrant=False)
            else:
                x = block(x, cos, sin, None if caches is None else caches[i], pos)
        return self.head(self.norm(x))

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (B, T, V); with targets, (logits, mean cross-entropy in nats per token)."""
        self._check_shape(idx)
        torch._assert_async(((idx >= 0) & (idx < self.cfg.vocab_size)).all(),
                            f"token ids must be in [0, {self.cfg.vocab_size})")
        logits = self._logits(idx)
        if targets is None:
            return logits
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1).long())
        return logits, loss

    def fhme_layers(self) -> list[FHME]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, FHME)]

    def set_depth(self, depth: int | None) -> None:
        """Force every FHME layer to one depth (anytime evaluation); None restores routing."""
        for layer in self.fhme_layers():
            if depth is not None and not 1 <= depth <= layer.depth:
                raise ValueError(f"depth={depth} must be in 1..{layer.depth}")
            layer.forced_depth = depth

    def new_caches(self, batch: int) -> list[KVCache]:
        p = next(self.parameters())
        shape = (batch, self.cfg.n_heads, self.cfg.seq_len, self.cfg.head_dim)
        conv = (batch, self.cfg.ffn_conv - 1 + self.cfg.seq_len, self.cfg.dim)
        block_conv = (batch, self.cfg.block_conv - 1 + self.cfg.seq_len, self.cfg.dim)
        caches = []
        for i in range(len(self.blocks)):
            cfg = self.cfg.layer_config(i)
            applications = (blocks_at_depth(routed_config(cfg).fractal_depth)
                            if cfg.block_conv and cfg.ffn in ROUTED_FFNS else 0)
            caches.append(KVCache(p.new_zeros(shape), p.new_zeros(shape),
                                  p.new_zeros(conv) if cfg.ffn_conv else None,
                                  [p.new_zeros(block_conv) for _ in range(applications)] if applications else None))
        return caches

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Sample continuations with a KV cache; temperature 0 is greedy. idx: (B, T) -> (B, T + n).

        When the cache fills up, it is rebuilt from the last seq_len // 2 tokens (at least one).
        A model with domain gates re-reads the last seq_len tokens at every step instead.
        """
        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError("need max_new_tokens >= 0, temperature >= 0 and top_k >= 1")
        self.check_input(idx[:, -self.cfg.seq_len:])
        # A domain gate (fine-tuning) reads every position so far in each call: no cache then.
        whole = any(getattr(m, "domain_gate", None) is not None for m in self.modules())
        caches = None if whole else self.new_caches(idx.shape[0])
        ctx = idx[:, -self.cfg.seq_len:]
        logits = self._logits(ctx, caches, 0)[:, -1]
        pos = ctx.shape[1]
        out = [idx]
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, generator)
            out.append(nxt)
            if i == max_new_tokens - 1:
                break
            if whole:
                logits = self._logits(torch.cat(out, dim=1)[:, -self.cfg.seq_len:])[:, -1]
            elif pos >= self.cfg.seq_len:
                seq = torch.cat(out, dim=1)
                keep = seq[:, seq.shape[1] - max(1, self.cfg.seq_len // 2):]
                logits = self._logits(keep, caches, 0)[:, -1]
                pos = keep.shape[1]
            else:
                logits = self._logits(nxt, caches, pos)[:, -1]
                pos += 1
        return torch.cat(out, dim=1)

    # --- accounting: FHME layers at a measured depth histogram each (full depth without one) ---
    def ffn_flops_per_token(self, depth_hists: Mapping[nn.Module, DepthHist] | None = None) -> float:
        return sum(b.ffn_cost("flops_per_token", depth_hists) for b in self.blocks)

    def flops_per_token(self, depth_hists: Mapping[nn.Module, DepthHist] | None = None) -> float:
        """Forward FLOPs per token: projections, attention over half the context on average (and
        any adapters at its input), FFNs (FHME layers at their measured depth, e.g.
        ``evaluate``'s), the output head and any change to the embeddings."""
        cfg = self.cfg
        attn = cfg.n_layers * (2 * 4 * cfg.dim * cfg.dim + 2 * 2 * cfg.dim * cfg.seq_len / 2)
        attn += sum(b.attention_adapter_cost("flops_per_token") for b in self.blocks)
        head = 2 * cfg.dim * cfg.vocab_size + self.embedding_change_cost("flops_per_token")
        return attn + self.ffn_flops_per_token(depth_hists) + head

    def active_params_per_token(self, depth_hists: Mapping[nn.Module, DepthHist] | None = None) -> float:
        cfg = self.cfg
        dense = cfg.n_layers * 4 * cfg.dim * cfg.dim + cfg.vocab_size * cfg.dim
        dense += self.embedding_change_cost("active_params_per_token")
        return dense + sum(b.ffn_cost("active_params_per_token", depth_hists)
                           + b.attention_adapter_cost("active_params_per_token") for b in self.blocks)

    def embedding_change_cost(self, which: str) -> float:
        """``which`` of the changes to the tied embeddings an adapter set adds (``GatedEmbedding``,
        ``GatedHead``: their own work and their domain gates'), if any."""
        return sum(getattr(m, which)() for m in self.modules() if isinstance(m, EmbeddingChange))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def ffn_cost(ffn: nn.Module, which: str, depth_hists: Mapping[nn.Module, DepthHist] | None) -> float:
    """``which`` (flops_per_token or active_params_per_token) of an FFN: an FHME layer at its
    histogram in depth_hists, an adapted FFN as base plus adapter (plus its domain gate's routing)."""
    if isinstance(ffn, FHME):
        return getattr(ffn, which)(None if depth_hists is None else depth_hists.get(ffn))
    if isinstance(ffn, AdaptedFFN):
        gate = 0 if ffn.domain_gate is None else getattr(ffn.domain_gate, which)()
        return ffn_cost(ffn.base, which, depth_hists) + ffn_cost(ffn.adapter, which, depth_hists) + gate
    return getattr(ffn, which)()


def sample_next(logits: Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None = None) -> Tensor:
    """One token per row from (B, V) logits: greedy at temperature 0, else top-k sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    # The best logit at 0 before dividing: a tiny temperature gives -inf elsewhere, never +inf.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:  # exactly k candidates, ties broken by topk
        kept = torch.topk(logits, min(top_k, logits.shape[-1]))
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, kept.indices, kept.values)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
