"""Bank of N singleton experts e_i(x) = act(u_i . x) v_i and the fused gather-mix over them.

Legend: T tokens, M routed slots per token (heads * topk), D width, N experts, R unique rows.

The two tables ``down`` (u_i) and ``up`` (v_i) are plain (N, D) parameters. The mix is one autograd
function whose backward returns *coalesced sparse* row gradients: only the R rows a step touched
exist in the gradient, so backward and the row-sparse optimizer cost O(R * D), never O(N * D).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _act_and_grad(a: Tensor, act: str) -> tuple[Tensor, Tensor]:
    """Activation value and its derivative, written out so backward needs no second graph."""
    if act == "relu":
        return a.clamp_min(0.0), (a > 0).to(a.dtype)
    cdf = 0.5 * (1.0 + torch.erf(a * _SQRT_HALF))
    pdf = torch.exp(-0.5 * a * a) * _INV_SQRT_2PI
    return a * cdf, cdf + a * pdf


def _activate(a: Tensor, act: str) -> Tensor:
    return F.relu(a) if act == "relu" else F.gelu(a)


def coalesced_row_grad(idx_flat: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """Sum duplicate rows into one sparse (num_rows, D) gradient holding only touched rows."""
    uniq, inverse = torch.unique(idx_flat, sorted=True, return_inverse=True)
    values = rows.new_zeros(uniq.numel(), rows.shape[-1]).index_add_(0, inverse, rows)
    return torch.sparse_coo_tensor(uniq.unsqueeze(0), values, (num_rows, rows.shape[-1]),
                                   is_coalesced=True, check_invariants=False)


class _ExpertMix(torch.autograd.Function):
    """y_t = sum_m g_tm * act(u_{i_tm} . x_t) * v_{i_tm}, with sparse table gradients."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, idx_TM: Tensor, gate_TM: Tensor, down_ND: Tensor,
                up_ND: Tensor, act: str) -> Tensor:
        num_t, num_m = idx_TM.shape
        idx_flat = idx_TM.reshape(-1)
        u_TMD = down_ND.index_select(0, idx_flat).view(num_t, num_m, -1).to(x_TD.dtype)
        a_TM = torch.bmm(u_TMD, x_TD.unsqueeze(-1)).squeeze(-1)
        h_TM = _activate(a_TM, act) * gate_TM
        # embedding_bag sums weighted rows of `up` without materialising the (T, M, D) gather.
        y_TD = F.embedding_bag(idx_TM, up_ND, per_sample_weights=h_TM.to(up_ND.dtype),
                               mode="sum").to(x_TD.dtype)
        ctx.save_for_backward(x_TD, idx_TM, gate_TM, a_TM, down_ND, up_ND)
        ctx.act = act
        return y_TD

    @staticmethod
    def backward(ctx, gy_TD: Tensor):  # type: ignore[override]
        x_TD, idx_TM, gate_TM, a_TM, down_ND, up_ND = ctx.saved_tensors
        num_t, num_m = idx_TM.shape
        idx_flat = idx_TM.reshape(-1)
        act_TM, dact_TM = _act_and_grad(a_TM, ctx.act)
        v_TMD = up_ND.index_select(0, idx_flat).view(num_t, num_m, -1).to(gy_TD.dtype)
        gh_TM = torch.bmm(v_TMD, gy_TD.unsqueeze(-1)).squeeze(-1)  # dL/dh
        g_gate = gh_TM * act_TM
        ga_TM = gh_TM * gate_TM * dact_TM  # dL/da
        g_x = g_down = g_up = None
        if ctx.needs_input_grad[0]:
            u_TMD = down_ND.index_select(0, idx_flat).view(num_t, num_m, -1).to(gy_TD.dtype)
            g_x = torch.bmm(ga_TM.unsqueeze(1), u_TMD).squeeze(1)
        if ctx.needs_input_grad[3]:  # d/du_i = sum over slots routed to i of da * x
            rows = (ga_TM.unsqueeze(-1) * x_TD.unsqueeze(1)).reshape(-1, x_TD.shape[-1])
            g_down = coalesced_row_grad(idx_flat, rows.to(down_ND.dtype), down_ND.shape[0])
        if ctx.needs_input_grad[4]:  # d/dv_i = sum over slots routed to i of h * dy
            h_TM = act_TM * gate_TM
            rows = (h_TM.unsqueeze(-1) * gy_TD.unsqueeze(1)).reshape(-1, gy_TD.shape[-1])
            g_up = coalesced_row_grad(idx_flat, rows.to(up_ND.dtype), up_ND.shape[0])
        return g_x, None, g_gate, g_down, g_up, None


def expert_mix(x: Tensor, idx: Tensor, gates: Tensor, down: Tensor, up: Tensor,
               act: str = "gelu") -> Tensor:
    """Fused gather + weighted sum over routed experts. x: (..., D); idx, gates: (..., M)."""
    lead = x.shape[:-1]
    y = _ExpertMix.apply(x.reshape(-1, x.shape[-1]), idx.reshape(-1, idx.shape[-1]),
                         gates.reshape(-1, gates.shape[-1]), down, up, act)
    return y.view(*lead, x.shape[-1])


def expert_mix_reference(x: Tensor, idx: Tensor, gates: Tensor, down: Tensor, up: Tensor,
                         act: str = "gelu") -> Tensor:
    """Plain-autograd definition of ``expert_mix`` (dense gradients): the test reference."""
    a = torch.einsum("...md,...d->...m", down[idx], x)
    return torch.einsum("...m,...md->...d", _activate(a, act) * gates, up[idx])


def mark_expert_table(p: nn.Parameter) -> nn.Parameter:
    """Tag a parameter whose gradients are row-sparse, for the row-sparse optimizer."""
    p.expert_table = True  # type: ignore[attr-defined]
    return p


def is_expert_table(p: Tensor) -> bool:
    return bool(getattr(p, "expert_table", False))


class ExpertBank(nn.Module):
    """Two (N, D) tables of singleton experts shared by every routed block of one layer."""

    def __init__(self, num_experts: int, dim: int, act: str = "gelu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_experts, self.dim, self.act = num_experts, dim, act
        std = 1.0 / math.sqrt(dim)
        self.down = mark_expert_table(nn.Parameter(torch.empty(num_experts, dim, dtype=dtype)))
        self.up = mark_expert_table(nn.Parameter(torch.empty(num_experts, dim, dtype=dtype)))
        with torch.no_grad():  # u . x has unit variance for unit-RMS x; v starts small
            self.down.normal_(0.0, std)
            self.up.normal_(0.0, std)

    def forward(self, x: Tensor, idx: Tensor, gates: Tensor) -> Tensor:
        return expert_mix(x, idx, gates, self.down, self.up, self.act)

    def bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in (self.down, self.up))
