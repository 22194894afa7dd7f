"""FHME: the Fractal Hyper-Mixture of Experts layer, a drop-in replacement for an FFN.

Legend: T tokens (flattened), D width, C fractal depth.

Three mixing levels: (1) top-k experts per head inside each routed block, (2) highway joins
between fractal paths, (3) a per-token depth choice d(x) in 1..C. The layer returns f_d(x) - x,
which the transformer block adds to its residual stream.

Adaptive depth is trained with a hard straight-through choice and an ACT-style ponder cost:
y = sum_c w_c f_c(x), w = onehot(argmax p) + p - stop_grad(p), p = softmax(router(x)), plus
depth_penalty * sum_c p_c * (2**c - 1). The choice reads only the token's own state (causal).
At inference, tokens that chose depth d are compacted out before stage d + 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .experts import TABLE_DTYPES, ExpertBank
from .fractal import FractalExpert, blocks_at_depth, joins_at_depth
from .routing import Balancing

def balancing_of(cfg: ModelConfig) -> Balancing:
    return Balancing(cfg.unit_keys, cfg.balance_rate, cfg.balance_loss)


class FHME(nn.Module):
    """Fractal expert + optional per-token depth router. x (..., D) -> (..., D)."""

    def __init__(self, dim: int, num_experts: int, depth: int = 2, heads: int = 8, topk: int = 16,
                 key_dim: int = 128, gate: str = "softmax", query_norm: str = "layernorm",
                 act: str = "gelu", join_bias: float = -2.0, drop_path_local: float = 0.0,
                 drop_path_global: float = 0.0, adaptive_depth: bool = False,
                 depth_penalty: float = 0.0, depth_explore: float = 0.0,
                 depth_target: float = 0.0, expert_dtype: str = "float32",
                 balancing: Balancing = Balancing(), block: str = "neuron",
                 bank: ExpertBank | None = None) -> None:
        super().__init__()
        self.dim, self.depth, self.adaptive = dim, depth, adaptive_depth
        self.depth_explore, self.depth_target = depth_explore, depth_target
        initial_penalty = depth_penalty if depth_penalty > 0 or depth_target == 0 else 1e-3
        self.fractal = FractalExpert(dim, num_experts, depth, heads, topk, key_dim, gate,
                                     query_norm, act, join_bias, drop_path_local,
                                     drop_path_global, TABLE_DTYPES[expert_dtype], balancing, block, bank)
        self.depth_router: nn.Linear | None = None
        if adaptive_depth and depth > 1:
            self.depth_router = nn.Linear(dim, depth)
            nn.init.zeros_(self.depth_router.weight)
            with torch.no_grad():  # start at full depth; the ponder cost pulls tokens shallower
                self.depth_router.bias.copy_(torch.linspace(0.0, 1.0, depth))
        # The ponder cost per block; with a target it is steered multiplicatively toward the
        # penalty that uses depth_target of the blocks (state from past steps only: causal).
        self.register_buffer("depth_penalty", torch.tensor(initial_penalty),
                             persistent=self.depth_router is not None)
        self.forced_depth: int | None = None  # evaluate every token at this depth
        self.compact = True  # inference: compact stopped tokens (False: masked reference path)
        self.aux_loss: Tensor = torch.zeros(())
        self.depth_hist: Tensor = torch.zeros(depth)  # fraction of tokens per depth, last call

    @classmethod
    def from_config(cls, cfg: ModelConfig, bank: ExpertBank | None = None) -> FHME:
        return cls(cfg.dim, cfg.num_experts, cfg.fractal_depth, cfg.expert_heads, cfg.topk,
                   cfg.key_dim, cfg.gate, cfg.query_norm, cfg.expert_act, cfg.join_bias,
                   cfg.drop_path_local, cfg.drop_path_global, cfg.adaptive_depth,
                   cfg.depth_penalty, cfg.depth_explore, cfg.depth_target, cfg.expert_dtype,
                   balancing_of(cfg), cfg.block, bank)

    def choose_depth(self, x_TD: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-token depth in 1..C (hard) and router probabilities (None without a router)."""
        if self.forced_depth is not None or self.depth_router is None:
            d = self.forced_depth or self.depth
            return torch.full(x_TD.shape[:1], d, dtype=torch.long, device=x_TD.device), None
        probs = F.softmax(self.depth_router(x_TD).float(), dim=-1)
        return probs.argmax(dim=-1) + 1, probs

    def forward(self, x: Tensor) -> Tensor:
        lead, dim = x.shape[:-1], x.shape[-1]
        x_TD = x.reshape(-1, dim)
        depth_T, probs = self.choose_depth(x_TD)
        self.aux_loss = x.new_zeros(())
        if probs is not None and self.training:
            y_TD = self._straight_through(x_TD, depth_T, probs)
        elif probs is None:
            fixed = self.forced_depth or self.depth
            y_TD = self.fractal(x_TD, max_depth=fixed)  # type: ignore[assignment]
        elif self.compact:
            y_TD = self.forward_compacted(x_TD, depth_T)
        else:
            y_TD = self.forward_masked(x_TD, depth_T)
        self.depth_hist = torch.bincount(depth_T - 1, minlength=self.depth).float() / depth_T.numel()
        balance = [a for b in self.fractal.blocks if (a := b.memory.router.pop_aux_loss()) is not None]
        if balance:  # routing balance: one loss weight per layer, however many blocks it has
            self.aux_loss = self.aux_loss + torch.stack(balance).mean()
        return (y_TD - x_TD).view(*lead, dim)

    def _straight_through(self, x_TD: Tensor, depth_T: Tensor, probs: Tensor) -> Tensor:
        """Hard depth in the forward pass, router gradient through the soft probabilities.

        A random depth_explore fraction of tokens takes a uniformly random depth instead, so every
        anytime output keeps being trained on every kind of token (the choice is random, not a
        function of other tokens, so it stays causal)."""
        outs = self.fractal(x_TD, return_all_depths=True)
        routed = torch.ones_like(depth_T, dtype=torch.bool)
        if self.depth_explore > 0:
            routed = torch.rand(depth_T.shape, device=x_TD.device) >= self.depth_explore
            random_depth = torch.randint_like(depth_T, 1, self.depth + 1)
            depth_T.copy_(torch.where(routed, depth_T, random_depth))
        hard = F.one_hot(depth_T - 1, self.depth).to(probs.dtype)
        soft = (probs - probs.detach()) * routed.unsqueeze(-1)
        weights = (hard + soft).to(x_TD.dtype)  # (T, C)
        costs = torch.tensor([blocks_at_depth(c) for c in range(1, self.depth + 1)],
                             dtype=probs.dtype, device=probs.device)
        penalty = self.depth_penalty.clone()  # the controller below updates the buffer in place
        self.aux_loss = penalty * (probs * costs).sum(-1).mean()
        if self.depth_target > 0:
            with torch.no_grad():
                used = costs[depth_T - 1].mean() / costs[-1]
                self.depth_penalty.mul_(torch.exp(0.2 * (used - self.depth_target) / self.depth_target))
        return torch.einsum("tc,ctd->td", weights, torch.stack(outs))  # type: ignore[arg-type]

    def forward_masked(self, x_TD: Tensor, depth_T: Tensor) -> Tensor:
        """Reference for compaction: every depth for every token, then select f_d(x)."""
        outs = torch.stack(self.fractal(x_TD, return_all_depths=True))  # type: ignore[arg-type]
        return outs.gather(0, (depth_T - 1).view(1, -1, 1).expand(1, -1, x_TD.shape[-1]))[0]

    def forward_compacted(self, x_TD: Tensor, depth_T: Tensor) -> Tensor:
        """f_{d(t)}(x_t) where stage c runs only on the tokens with d >= c."""
        prev = self.fractal.stage(1, x_TD, None)
        out = prev.clone()
        active = torch.arange(x_TD.shape[0], device=x_TD.device)
        for c in range(2, self.depth + 1):
            keep = (depth_T.index_select(0, active) >= c).nonzero().squeeze(1)  # host sync: size
            if keep.numel() == 0:
                break
            active, prev = active.index_select(0, keep), prev.index_select(0, keep)
            prev = self.fractal.stage(c, x_TD.index_select(0, active), prev)
            out.index_copy_(0, active, prev)
        return out

    def track_usage(self, on: bool) -> None:
        """Count expert selections per block position (metrics over a validation pass)."""
        for block in self.fractal.blocks:
            block.memory.track_usage(on)

    def usage_counts(self) -> list[Tensor]:
        """(N,) selection counts of each block position while tracking is on."""
        return [b.memory.usage for b in self.fractal.blocks if b.memory.usage is not None]

    # --- accounting -------------------------------------------------------------------------
    def _block_flops(self) -> int:
        return self.fractal.blocks[0].memory.flops_per_token()

    def flops_at_depth(self, depth: int) -> int:
        """Forward FLOPs per token that stops at ``depth`` (multiply-add = 2)."""
        router = 2 * self.dim * self.depth if self.depth_router is not None else 0
        return (blocks_at_depth(depth) * self._block_flops()
                + joins_at_depth(depth) * 2 * self.dim + router)

    def params_at_depth(self, depth: int) -> int:
        """Parameters a token at ``depth`` reads: routers of blocks 1..d, its expert rows, joins."""
        mem = self.fractal.blocks[0].memory
        routers = mem.router.params_per_token()
        rows = mem.params_per_token() - routers  # expert rows (and gate) read per block call
        router = self.depth_router.weight.numel() if self.depth_router is not None else 0
        return depth * routers + blocks_at_depth(depth) * rows + (depth - 1) * (self.dim + 1) + router

    def _expected(self, per_depth) -> float:  # type: ignore[no-untyped-def]
        hist = self.depth_hist.tolist()
        if sum(hist) == 0:
            hist = [0.0] * (self.depth - 1) + [1.0]
        return sum(h * per_depth(d) for d, h in enumerate(hist, start=1))

    def flops_per_token(self) -> float:
        """At the depth distribution realised by the last call (full depth before any call)."""
        return self._expected(self.flops_at_depth)

    def active_params_per_token(self) -> float:
        return self._expected(self.params_at_depth)

    def blocks_per_token(self) -> float:
        return self._expected(blocks_at_depth)

    def stats(self) -> dict[str, object]:
        """Metrics of the three mixing levels from the last call."""
        hist = self.depth_hist.tolist()
        return {
            "join_gate_means": [float(j.last_gate_mean) if j.last_gate_mean is not None else None
                                for j in self.fractal.joins],
            "depth_hist": hist,
            "mean_depth": sum(d * h for d, h in enumerate(hist, start=1)),
            "blocks_per_token": self.blocks_per_token(),
        }
