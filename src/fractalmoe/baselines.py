"""Baseline FFNs with FHME's interface: dense SwiGLU and top-k MoE; PEER, PKM and Memory+ are
FHME layers of one column (``routed_config``).

Legend: T tokens, D width, F hidden width, E MoE experts, K top-k, S = T * K routed slots.

Each module maps (..., D) -> (..., D) and reports ``flops_per_token()`` (forward, multiply-add = 2)
and ``active_params_per_token()``; the MoE hands its balance loss and choices to a collector
(``stats.collect``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .experts import ExpertBank
from .fhme import FHME
from .stats import BALANCE_LOSS, CHOICES, Recorder, Statistics, mean_of


class DenseFFN(nn.Module):
    """SwiGLU: W2 (silu(W1 x) * W3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def flops_per_token(self) -> float:
        return 2 * 3 * self.w1.in_features * self.w1.out_features

    def active_params_per_token(self) -> float:
        return 3 * self.w1.in_features * self.w1.out_features


def pack_blocks(expert_S: Tensor, load_E: Tensor, b: int) -> tuple[Tensor, Tensor, Tensor]:
    """Slots sorted by expert, each expert's run padded to whole blocks of b rows: (the sorting
    order, the packed row of each sorted slot, the expert of each block). The block count,
    (S + E (b - 1)) // b >= sum_e ceil(load_e / b), follows from the shapes alone; blocks past
    the last expert's run are padding (any expert, zero rows)."""
    order = torch.argsort(expert_S, stable=True)
    sorted_e = expert_S[order]
    padded = (load_E + b - 1) // b * b
    ends = torch.cumsum(padded, 0)
    rank = torch.arange(expert_S.numel(), device=expert_S.device) - (torch.cumsum(load_E, 0) - load_E)[sorted_e]
    row = (ends - padded)[sorted_e] + rank
    blocks = (expert_S.numel() + load_E.numel() * (b - 1)) // b
    starts = torch.arange(blocks, device=expert_S.device) * b
    block_e = torch.searchsorted(ends, starts, right=True).clamp_(max=load_E.numel() - 1)
    return order, row, block_e


class MoEFFN(nn.Module, Recorder):
    """Dropless top-k softmax MoE of SwiGLU experts with the Switch load-balancing loss.

    Routed slots are packed into blocks of one expert each (``pack_blocks``): three bmm's over
    the blocks with each block's expert weights gathered. The block count follows from the shapes
    whatever the loads: no host sync, and no dropped token (a capacity would make a token's
    output depend on the other tokens). Padding rows are zeros and are computed;
    ``flops_per_token`` counts the routed work. Under a collector it records its choices and, in
    training with grad on, the balance loss.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, topk: int,
                 balance: float) -> None:
        super().__init__()
        self.dim, self.hidden, self.num_experts, self.topk = dim, hidden, num_experts, topk
        self.balance = balance
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each expert's projections N(0, 1/fan_in)."""
        for w in (self.w1, self.w3, self.w2):
            w.copy_(torch.randn(w.shape, device=w.device) * w.shape[1] ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x_TD = x.reshape(-1, self.dim)
        num_t = x_TD.shape[0]
        probs_TE = F.softmax(self.router(x_TD).float(), dim=-1)
        gate_TK, expert_TK = probs_TE.topk(self.topk, dim=-1)
        if self.topk > 1:  # renormalised over the chosen; at top-1 (Switch) the raw probability,
            gate_TK = gate_TK / gate_TK.sum(-1, keepdim=True)  # else the gate is 1 and has no gradient
        gate_TK = gate_TK.to(x.dtype)
        load_E = probs_TE.new_zeros(self.num_experts).index_add_(
            0, expert_TK.reshape(-1), probs_TE.new_ones(expert_TK.numel()))
        if self.collecting:
            self.record(CHOICES, expert_TK)
            if self.training and torch.is_grad_enabled():
                # Switch balance loss: E * sum_e (fraction of slots to e) * (mean router prob of e).
                frac_E = load_E / (num_t * self.topk)
                self.record(BALANCE_LOSS, self.balance * self.num_experts * (frac_E * probs_TE.mean(0)).sum())
        expert_S = expert_TK.reshape(-1)
        b = self.block_rows(expert_S.numel())
        order, row, block_e = pack_blocks(expert_S, load_E.long(), b)
        token_S = order // self.topk
        packed = x_TD.new_zeros(block_e.numel() * b, self.dim).index_copy_(0, row, x_TD.index_select(0, token_S))
        packed = packed.view(-1, b, self.dim)
        w1, w3, w2 = (w.index_select(0, block_e) for w in (self.w1, self.w3, self.w2))
        h = F.silu(torch.bmm(packed, w1)) * torch.bmm(packed, w3)
        out = torch.bmm(h, w2).view(-1, self.dim)
        y_S = out.index_select(0, row) * gate_TK.reshape(-1)[order].unsqueeze(-1)
        y_TD = x_TD.new_zeros(num_t, self.dim).index_add_(0, token_S, y_S)
        return y_TD.view(*lead, self.dim)

    def block_rows(self, slots: int) -> int:
        """Rows per block: at most 128 (fewer blocks gather fewer expert weights), and few enough
        that the E runs' padding adds at most S rows."""
        return max(1, min(128, slots // self.num_experts))

    def flops_per_token(self) -> float:
        return 2 * self.dim * self.num_experts + self.topk * 2 * 3 * self.dim * self.hidden

    def active_params_per_token(self) -> float:
        return self.dim * self.num_experts + self.topk * 3 * self.dim * self.hidden

    def aux_loss_from(self, stats: Statistics) -> Tensor | None:
        return mean_of(stats.values(self, BALANCE_LOSS))


def routed_config(cfg: ModelConfig) -> ModelConfig:
    """The FHME settings a routed baseline stands for: PEER, PKM and Memory+ are one column of
    neuron, value and gated blocks (Memory+ with one bank for every layer)."""
    one = dict(fractal_depth=1, adaptive_depth=False, column_heads="")
    if cfg.ffn == "peer":
        return cfg.replace(block="neuron", **one)
    if cfg.ffn == "pkm":
        return cfg.replace(block="value", **one)
    if cfg.ffn == "memplus":
        return cfg.replace(block="gated", share_bank=True, **one)
    return cfg


def build_ffn(cfg: ModelConfig, bank: ExpertBank | None = None) -> nn.Module:
    """The FFN named by ``cfg.ffn``; routed ones read ``bank`` when the model shares one."""
    if cfg.ffn == "dense":
        return DenseFFN(cfg.dim, cfg.ffn_hidden)
    if cfg.ffn == "moe":
        return MoEFFN(cfg.dim, cfg.ffn_hidden, cfg.moe_experts, cfg.moe_topk, cfg.moe_balance)
    return FHME.from_config(routed_config(cfg), bank)
