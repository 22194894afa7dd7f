"""Scale-out on torch.distributed: data parallelism for dense parameters, expert tables sharded.

Legend: P ranks, T tokens per rank, M routed slots per token, D width.

Why rows (experts) and not columns. An expert is e_i(x) = act(u_i . x) v_i: the activation needs
the *whole* dot product u_i . x. With column shards every rank would hold a slice of u_i, so each
forward would all-reduce T*M partial dot products before the activation, and the row-wise
optimizer (one second moment per expert row) would need another all-reduce of per-row sums to
keep the single-process rule. With row shards a rank owns whole experts: dot, activation, mix,
gradient and optimizer state of its rows stay local and exactly match one process. Tokens travel
instead: x, indices and gates are all-gathered (autograd-aware collectives), each rank computes
the slots that hit its own rows, and the partial outputs return through reduce_scatter. Value
banks (e_i = v_i) shard the same way; they need no x.

No host sync: the number of slots a rank owns depends on the routing, so instead of selecting
them (``nonzero``) each rank mixes all P*T*M gathered slots, the ones it does not own with a zero
gate and pointed at a row of a slot it does own. Their zero gradients merge into that touched row,
so the row-sparse optimizers see exactly the owned rows (only a rank that owns no slot of a whole
step would count one row as touched with a zero gradient: lazy Adam decays its moments). The
price is P times the mix work of the owned slots alone.

Devices. On CUDA each rank runs on ``cuda:LOCAL_RANK`` and the process group is
"cpu:gloo,cuda:nccl": the expert collectives move CUDA tensors through NCCL, while the trainer's
small flags (finite step, stop signal) and object collectives stay CPU tensors through gloo.

Model code stays free of collectives: ``shard_experts`` swaps a ``ShardedExpertBank`` into an
already built model.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn

from .experts import ExpertBank, TableBank, expert_mix, fill_rows, value_mix
from .fhme import FHME


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0  # index of this rank's GPU on its node

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device_for(self, requested: str) -> str:
        """The device this rank runs on: with several ranks any CUDA request is cuda:LOCAL_RANK."""
        if self.active and requested.startswith("cuda"):
            return f"cuda:{self.local_rank}"
        return requested


def backend_for(device: str) -> str:
    """gloo on CPU; with CUDA one group that serves both: NCCL for CUDA tensors, gloo for CPU ones."""
    return "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"


def init_from_env(device: str = "cpu") -> DistContext:
    """Join the process group torchrun describes; P = 1 otherwise. With CUDA the rank's current
    device becomes cuda:LOCAL_RANK before the group exists (NCCL binds to it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


def broadcast_text(text: str) -> str:
    """Rank 0's text on every rank, as bytes in CPU tensors (no pickled objects between ranks)."""
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)
    size = torch.tensor([data.numel()])
    dist.broadcast(size, 0)
    data = data if dist.get_rank() == 0 else torch.zeros(int(size), dtype=torch.uint8)
    dist.broadcast(data, 0)
    return bytes(data.tolist()).decode()


def gather_row_ranges(table_rows: dict[str, tuple[int, int, int]]) -> list[list[list[int]]]:
    """[rank][table] = [lo, hi) of every rank, tables in ``table_rows``' order (the same on every
    rank), gathered as CPU tensors."""
    mine = torch.tensor([list(rows[:2]) for rows in table_rows.values()], dtype=torch.long).view(-1, 2)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [g.tolist() for g in gathered]


def shard_range(num_rows: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous rows [lo, hi) of rank's shard; the first num_rows % world ranks get one more."""
    base, extra = divmod(num_rows, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class ShardedExpertBank(TableBank):
    """Rows [lo, hi) of an expert bank on this rank; same interface as ``ExpertBank``. A forward
    is a collective: every rank calls it. ``uneven``: ranks may bring different numbers of
    tokens (adaptive depth's compacted stages); each pads to the most any rank brings, learned
    with one all-reduce and a host read (the compaction's stage sizes are host reads already)."""

    collective = True

    def __init__(self, bank: ExpertBank, ctx: DistContext) -> None:
        super().__init__()
        self.num_experts, self.dim, self.act = bank.num_experts, bank.dim, bank.act
        self.kind = bank.kind
        self.table_names = tuple(bank.table_names)
        self.world = ctx.world
        self.lo, self.hi = shard_range(bank.num_experts, ctx.rank, ctx.world)
        self.seed = bank.seed
        for name in self.table_names:  # only this rank's rows are ever built (from the bank's seed)
            setattr(self, name, nn.Parameter(bank.rows(name, self.lo, self.hi)))
        # Each rank's loss is a mean over its own tokens and DDP averages dense gradients over
        # ranks; the collectives sum row gradients over ranks, so rows take the same 1 / P
        # (applied where the mixes form them, so deferred gradients get it too).
        self.row_grad_scale = 1.0 / self.world
        self.uneven = False

    def reset_parameters(self) -> None:
        """This rank's rows drawn again from the bank's seed (every rank the same seed, so the
        shards stay one table): what ``init_weights`` gives a sharded model after ``to_empty``."""
        for name, table in self.tables().items():
            if not table.is_meta:
                fill_rows(table, ExpertBank.table_seed(self.seed, name), self.lo, self.num_experts)

    def forward(self, x: Tensor, idx: Tensor, gates: Tensor) -> Tensor:
        dim, num_m = x.shape[-1], idx.shape[-1]
        x_TD, idx_TM, gate_TM = x.reshape(-1, dim), idx.reshape(-1, num_m), gates.reshape(-1, num_m)
        num_t = x_TD.shape[0]
        if self.uneven:  # padding tokens read row lo with gate 0: no output, no gradient
            most = torch.tensor([num_t], device=x.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            pad = max(int(most), 1) - num_t  # host read
            x_TD, gate_TM = F.pad(x_TD, (0, 0, 0, pad)), F.pad(gate_TM, (0, 0, 0, pad))
            idx_TM = F.pad(idx_TM, (0, 0, 0, pad), value=self.lo)
        neuron = self.kind == "neuron"
        gate_all = torch.cat(dist_nn.all_gather(gate_TM.contiguous()))  # (P*T, M)
        idx_parts = [torch.empty_like(idx_TM) for _ in range(self.world)]
        dist.all_gather(idx_parts, idx_TM.contiguous())  # indices carry no gradient
        local = torch.cat(idx_parts) - self.lo  # (P*T, M)
        owned = (local >= 0) & (local < self.hi - self.lo)
        first = owned.view(-1).to(torch.uint8).argmax().view(1)  # first owned slot, if any
        anchor = local.view(-1).index_select(0, first).clamp(0, self.hi - self.lo - 1)
        local = torch.where(owned, local, anchor)  # other ranks' slots: a row this rank touches
        gate_all = torch.where(owned, gate_all, 0.0)
        if neuron:  # e_i(x) = act(u_i . x) v_i needs every rank's tokens
            x_all = torch.cat(dist_nn.all_gather(x_TD.contiguous()))  # (P*T, D)
            y_all = expert_mix(x_all, local, gate_all, self.down, self.up, self.act,
                               grad_scale=self.row_grad_scale)
        else:  # e_i = v_i
            y_all = value_mix(local, gate_all.to(x.dtype), self.values, grad_scale=self.row_grad_scale)
        out = dist_nn.reduce_scatter(torch.empty_like(x_TD), list(y_all.to(x.dtype).chunk(self.world)))
        return out[:num_t].view(x.shape)


def shard_experts(model: nn.Module, ctx: DistContext) -> None:
    """Replace every expert bank of the model by this rank's row shard, under every name and
    reference that points at it (a bank shared by several layers stays shared).

    Every rank calls each bank in lockstep (the collectives); the banks of adaptive-depth layers,
    whose compacted stages hold different numbers of tokens on different ranks, pad to the most.
    """
    banks = [m for m in model.modules() if isinstance(m, ExpertBank)]
    sharded = {id(bank): ShardedExpertBank(bank, ctx) for bank in banks}
    adaptive = [id(m.fractal.bank) for m in model.modules() if isinstance(m, FHME) and m.depth_router is not None]
    for bank_id in adaptive:
        sharded[bank_id].uneven = True
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if id(child) in sharded:
                module._modules[name] = sharded[id(child)]
        for name, value in list(vars(module).items()):  # references kept outside _modules
            if isinstance(value, ExpertBank) and id(value) in sharded:
                object.__setattr__(module, name, sharded[id(value)])


def wrap_data_parallel(model: nn.Module, device: str = "cpu") -> nn.Module:
    """DDP over the dense parameters; the sharded tables stay each rank's own.

    Buffers are not broadcast from rank 0 at each forward: they hold statistics that the model
    folds in after each step, all-reduced over ranks there.
    """
    shard_ids = {id(p) for m in model.modules() if isinstance(m, ShardedExpertBank)
                 for p in m.tables().values()}
    ignore = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in shard_ids]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    kwargs: dict[str, object] = {"broadcast_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters:
        kwargs = {"forward_sync_buffers": False}  # the newer name; buffers still agree at init
    if device.startswith("cuda"):
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        kwargs.update(device_ids=[index], output_device=index)
    return nn.parallel.DistributedDataParallel(model, **kwargs)


def table_shards(model: nn.Module) -> dict[str, ShardedExpertBank]:
    """State-dict name prefix -> sharded bank, for every sharded table in the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ShardedExpertBank)}


def table_rows(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """State-dict name of every sharded table -> (lo, hi, num_rows) held by this rank."""
    return {f"{name}.{t}": (bank.lo, bank.hi, bank.num_experts)
            for name, bank in table_shards(model).items() for t in bank.table_names}
