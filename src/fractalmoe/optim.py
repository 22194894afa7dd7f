"""Optimisers: AdamW for dense parameters, a row-sparse rule for expert tables.

Legend: N table rows, D width, R rows touched this step.

Expert tables receive coalesced sparse gradients (R touched rows). Two row-sparse rules read and
write only those R rows and their state:

* ``rowwise_adagrad`` (default): one accumulator per row, s_i += mean_d(g_id**2),
  w_i -= lr * g_i / (sqrt(s_i) + eps). State: 4 bytes per row, which is what lets a
  million-expert layer fit in a few GB.
* ``lazy_adam``: torch.optim.SparseAdam semantics (Adam moments updated only on touched rows,
  bias correction by the global step). State: 2x the table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .experts import is_expert_table


def _rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """(unique row indices, summed row values) of a sparse or dense (N, D) gradient.

    A gradient from a single use of a table already holds sorted unique rows (autograd drops
    the coalesced flag when it stores it): detect that instead of paying for a sort + copy.
    """
    if not grad.is_sparse:
        return torch.arange(grad.shape[0], device=grad.device), grad
    if not grad.is_coalesced():
        idx = grad._indices()[0]
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):  # one host sync
            grad = grad.coalesce()
        else:
            return idx, grad._values()
    return grad.indices()[0], grad.values()


class RowwiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one second-moment accumulator per table row; touched rows only.

    The gradient's row values are consumed: they are scaled in place into the update, which
    saves a table-sized allocation per step (call zero_grad afterwards, as usual).
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 0.05, eps: float = 1e-8,
                 initial_accumulator: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, eps=eps, initial_accumulator=initial_accumulator))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["sum"] = torch.full((p.shape[0],), group["initial_accumulator"],
                                              dtype=torch.float32, device=p.device)
                rows, g = _rows(p.grad)
                g = g.float()
                mean_sq = torch.linalg.vector_norm(g, dim=1).square_().div_(g.shape[1])
                acc = state["sum"].index_add_(0, rows, mean_sq)
                scale = acc.index_select(0, rows).sqrt_().add_(group["eps"]).reciprocal_()
                update = g.mul_(scale.mul_(group["lr"]).unsqueeze(1))
                p.index_add_(0, rows, update.to(p.dtype), alpha=-1.0)


class LazyAdam(torch.optim.Optimizer):
    """Adam whose moments and weights change only on touched rows (SparseAdam semantics)."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                step = float(state["step"])
                rows, g = _rows(p.grad)
                g = g.float()
                m = state["exp_avg"].index_select(0, rows).lerp_(g, 1.0 - beta1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                step_size = group["lr"] * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
                update = m / v.sqrt_().add_(group["eps"])
                p.index_add_(0, rows, (update * step_size).to(p.dtype), alpha=-1.0)


def split_parameters(model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(expert tables, dense weights that decay, dense params that do not: norms, biases)."""
    tables, decay, no_decay = [], [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if is_expert_table(p):
            tables.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    return tables, decay, no_decay


class ModelOptimizer:
    """AdamW over dense parameters plus a row-sparse optimiser over expert tables."""

    def __init__(self, model: nn.Module, lr: float, expert_lr: float, weight_decay: float,
                 expert_optim: str = "rowwise_adagrad") -> None:
        tables, decay, no_decay = split_parameters(model)
        groups = [dict(params=decay, weight_decay=weight_decay),
                  dict(params=no_decay, weight_decay=0.0)]
        self.dense = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr,
                                       betas=(0.9, 0.95), foreach=True)
        self.sparse: torch.optim.Optimizer | None = None
        if tables:
            if expert_optim == "lazy_adam":
                self.sparse = LazyAdam(tables, lr=expert_lr)
            elif expert_optim == "rowwise_adagrad":
                self.sparse = RowwiseAdagrad(tables, lr=expert_lr)
            else:
                raise ValueError(f"expert_optim={expert_optim!r}: use rowwise_adagrad or lazy_adam")
        self.base_lrs = (lr, expert_lr)
        self.dense_params = decay + no_decay
        self.tables = tables

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.dense] + ([self.sparse] if self.sparse is not None else [])

    def set_lr_scale(self, scale: float) -> None:
        for opt, base in zip(self.optimizers, self.base_lrs):
            for group in opt.param_groups:
                group["lr"] = base * scale

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def grads_finite(self) -> bool:
        """True if every gradient (dense and touched expert rows) is finite. One host sync."""
        flags = []
        for p in self.dense_params + self.tables:
            if p.grad is not None:
                g = p.grad._values() if p.grad.is_sparse else p.grad
                flags.append(torch.isfinite(g).all())
        return bool(torch.stack(flags).all()) if flags else True

    def clip_dense(self, max_norm: float) -> Tensor:
        """Clip the global gradient norm of dense parameters; expert rows are per-row scaled
        by their own optimiser."""
        params = [p for p in self.dense_params if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))

    def state_dict(self) -> dict[str, object]:
        return {"dense": self.dense.state_dict(),
                "sparse": self.sparse.state_dict() if self.sparse is not None else None}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.dense.load_state_dict(state["dense"])  # type: ignore[arg-type]
        if self.sparse is not None and state.get("sparse") is not None:
            self.sparse.load_state_dict(state["sparse"])  # type: ignore[arg-type]
