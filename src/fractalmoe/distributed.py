"""Scale-out on torch.distributed: data parallelism for dense parameters, expert tables sharded.

Legend: P ranks, T tokens per rank, M routed slots per token, D width, S slots owned by a rank.

Why rows (experts) and not columns. An expert is e_i(x) = act(u_i . x) v_i: the activation needs
the *whole* dot product u_i . x. With column shards every rank would hold a slice of u_i, so each
forward would all-reduce T*M partial dot products before the activation, and the row-wise
optimizer (one second moment per expert row) would need another all-reduce of per-row sums to
keep the single-process rule. With row shards a rank owns whole experts: dot, activation, mix,
gradient and optimizer state of its rows stay local and exactly match one process. Tokens travel
instead: x, indices and gates are all-gathered (autograd-aware collectives), each rank computes
the slots that hit its own rows, and the partial outputs return through reduce_scatter.

Model code stays free of collectives: ``shard_experts`` swaps a ``ShardedExpertBank`` into an
already built model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn

from .experts import ExpertBank, expert_mix, mark_expert_table
from .fhme import FHME


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_from_env(device: str = "cpu") -> DistContext:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); P = 1 otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size())


def shard_range(num_rows: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous rows [lo, hi) of rank's shard; the first num_rows % world ranks get one more."""
    base, extra = divmod(num_rows, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class ShardedExpertBank(nn.Module):
    """Rows [lo, hi) of an expert bank on this rank; same interface as ``ExpertBank``."""

    def __init__(self, bank: ExpertBank, ctx: DistContext) -> None:
        super().__init__()
        self.num_experts, self.dim, self.act = bank.num_experts, bank.dim, bank.act
        self.world = ctx.world
        self.lo, self.hi = shard_range(bank.num_experts, ctx.rank, ctx.world)
        self.down = mark_expert_table(nn.Parameter(bank.rows(0, self.lo, self.hi)))
        self.up = mark_expert_table(nn.Parameter(bank.rows(1, self.lo, self.hi)))
        # Each rank's loss is a mean over its own tokens and DDP averages dense gradients over
        # ranks; the collectives sum row gradients over ranks, so rows take the same 1 / P.
        for p in (self.down, self.up):
            p.register_hook(lambda g: g / self.world)

    def forward(self, x: Tensor, idx: Tensor, gates: Tensor) -> Tensor:
        dim, num_m = x.shape[-1], idx.shape[-1]
        x_TD, idx_TM, gate_TM = x.reshape(-1, dim), idx.reshape(-1, num_m), gates.reshape(-1, num_m)
        x_all = torch.cat(dist_nn.all_gather(x_TD))  # (P*T, D)
        gate_all = torch.cat(dist_nn.all_gather(gate_TM))
        idx_parts = [torch.empty_like(idx_TM) for _ in range(self.world)]
        dist.all_gather(idx_parts, idx_TM.contiguous())  # indices carry no gradient
        idx_all = torch.cat(idx_parts).reshape(-1)
        owned = ((idx_all >= self.lo) & (idx_all < self.hi)).nonzero().squeeze(1)  # host sync: S
        token = owned // num_m
        y_S = expert_mix(x_all.index_select(0, token), (idx_all[owned] - self.lo).unsqueeze(1),
                         gate_all.reshape(-1)[owned].unsqueeze(1), self.down, self.up, self.act)
        y_all = x_all.new_zeros(x_all.shape).index_add(0, token, y_S)
        out = dist_nn.reduce_scatter(torch.empty_like(x_TD), list(y_all.chunk(self.world)))
        return out.view(x.shape)

    def bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in (self.down, self.up))


def shard_experts(model: nn.Module, ctx: DistContext) -> None:
    """Replace every FHME layer's expert bank by this rank's row shard."""
    for module in model.modules():
        if isinstance(module, FHME):
            sharded = ShardedExpertBank(module.fractal.bank, ctx)
            module.fractal.bank = sharded  # type: ignore[assignment]
            for block in module.fractal.blocks:
                block.memory.bank = sharded  # type: ignore[assignment]


def wrap_data_parallel(model: nn.Module) -> nn.Module:
    """DDP over the dense parameters; the sharded tables (under every alias) stay each rank's own."""
    shard_ids = {id(p) for m in model.modules() if isinstance(m, ShardedExpertBank)
                 for p in (m.down, m.up)}
    ignore = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in shard_ids]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return nn.parallel.DistributedDataParallel(model)


def shard_tensors(tensors: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Full checkpoint tensors with every sharded table cut to this rank's rows."""
    out = dict(tensors)
    for name, bank in table_shards(model).items():
        for t in ("down", "up"):
            out[f"{name}.{t}"] = tensors[f"{name}.{t}"][bank.lo:bank.hi]
    return out


def table_shards(model: nn.Module) -> dict[str, ShardedExpertBank]:
    """State-dict name prefix -> sharded bank, for every sharded table in the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ShardedExpertBank)}
