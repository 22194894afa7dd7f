"""Banks of N experts stored as (N, D) tables, and the fused gather-mixes over them.

Legend: T tokens, M routed slots per token (heads * topk), D width, N experts, R unique rows.

Two kinds of bank (``BLOCK_KINDS`` adds the gated variant, whose gate lives in the routed block):

* ``neuron`` (PEER): e_i(x) = act(u_i . x) v_i, tables ``down`` (u_i) and ``up`` (v_i);
  a routed slot costs 4 D FLOPs and reads 2 D parameters.
* ``value`` (PKM): e_i = v_i, one table ``values``; the gate (from the key score) is the only
  activation, so a slot costs 2 D FLOPs and reads D parameters: twice the rows per FLOP.

Each mix is one autograd function whose backward returns row-sparse table gradients of a *fixed*
size, known without reading any index on the host (no sync): the slots sorted by row and summed per
row, padded to min(T * M, N) rows. A padding row repeats the last (largest) touched row with a zero
value, so summing duplicate rows (the optimizers do, without a sync) gives exactly the R touched
rows. Backward and the row-sparse optimizer cost O(min(T * M, N) * D), never O(N * D).

A table's gradient layout (``set_grad_layout``) is ``sparse`` (the above), ``dense`` (for a dense
optimizer) or ``deferred``: row i of the gradient is sum_{s -> i} w_s z_t(s) for per-slot weights w
and per-token vectors z, so backward keeps only w, z and the slots' rows (``DeferredRowGrad``, a few
MB) and the row optimizer forms the summed rows inside its step, chunk by chunk. No (R, D)
gradient then lives between backward and step; with the gathers done in blocks of tokens too, a
million-row layer's step needs a few MB beyond its tables and optimizer state, not hundreds.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BLOCK_KINDS, EXPERT_ACTS

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Rows per block of the gathers and per chunk of deferred row gradients. On a CPU, 2 MiB of
# float32 rows (cache-sized: 1.1x faster than 32 MiB at a million rows, where one (T*M, D)
# buffer is hundreds of MB); on an accelerator, whose caches are no help here, blocks large
# enough that a step launches few kernels.
CPU_CHUNK_BYTES = 2 << 20
_DEVICE_CHUNK_BYTES = 256 << 20
_MERGED_BYTES = 64 << 20  # deferred row gradients up to this size are summed in one buffer


def chunk_slots(dim: int, device: torch.device, cpu_bytes: int = CPU_CHUNK_BYTES) -> int:
    """Rows of width dim per chunk: ``cpu_bytes`` of float32 rows on a CPU."""
    chunk_bytes = cpu_bytes if device.type == "cpu" else _DEVICE_CHUNK_BYTES
    return max(64, chunk_bytes // (4 * dim))


def _act_and_grad(a: Tensor, act: str) -> tuple[Tensor, Tensor]:
    """Activation value and its derivative, written out so backward needs no second graph."""
    if act == "relu":
        return a.clamp_min(0.0), (a > 0).to(a.dtype)
    cdf = 0.5 * (1.0 + torch.erf(a * _SQRT_HALF))
    pdf = torch.exp(-0.5 * a * a) * _INV_SQRT_2PI
    return a * cdf, cdf + a * pdf


def _activate(a: Tensor, act: str) -> Tensor:
    return F.relu(a) if act == "relu" else F.gelu(a)


class _Workspace(threading.local):
    """The reused buffers of ``scratch``, one set per thread: threads serving one model
    concurrently must not write into each other's rows (on an accelerator autograd runs
    backward in its device thread, which then keeps a set of its own)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.dtype, torch.device, str], Tensor] = {}


_workspace = _Workspace()


def scratch(shape: tuple[int, int], dtype: torch.dtype, device: torch.device, slot: str = "") -> Tensor:
    """A reused buffer, valid in this thread until its next call for the same dtype, device and
    slot: a fresh (T*M, D) allocation per call costs more in page faults than the work that
    fills it (on CPU a buffer this large is mapped anew, page by page, on every allocation).
    Callers (the gathers here, the optimisers' row merge and row state) consume it before the
    next call. Allocated outside inference mode, as it outlives the call: an inference tensor
    could not be written by a later training step."""
    key, need = (dtype, device, slot), shape[0] * shape[1]
    buf = _workspace.buffers.get(key)
    if buf is None or buf.numel() < need:
        with torch.inference_mode(False):
            buf = _workspace.buffers[key] = torch.empty(need, dtype=dtype, device=device)
    return buf[:need].view(shape)


def scratch_cast(t: Tensor, dtype: torch.dtype, slot: str) -> Tensor:
    """t itself when it has dtype, else t converted into the reused buffer of slot (see
    ``scratch``): a cast of table rows is as large as the rows and would fault in afresh."""
    if t.dtype == dtype:
        return t
    return scratch((t.shape[0], t.shape[1]), dtype, t.device, slot).copy_(t)


def _gather_rows(table: Tensor, idx_flat: Tensor, dtype: torch.dtype) -> Tensor:
    """table[idx] into the scratch buffer, in dtype."""
    rows = scratch((idx_flat.numel(), table.shape[1]), table.dtype, table.device)
    torch.index_select(table, 0, idx_flat, out=rows)
    return scratch_cast(rows, dtype, "cast")


def _dots(table: Tensor, idx_TM: Tensor, x_TD: Tensor) -> Tensor:
    """a[t, m] = table[idx[t, m]] . x[t]: the sampled dot products of the routed experts, in
    blocks of tokens, so the gathered rows take a few MB, never a (T*M, D) buffer. A product and
    a sum over the cached block: 5x faster on CPU than a batched matrix-vector product. In the
    wider of the two dtypes: a bfloat16 input (autocast) meets float32 rows unrounded."""
    num_t, num_m = idx_TM.shape
    x_TD = x_TD.to(torch.promote_types(table.dtype, x_TD.dtype))
    out = x_TD.new_empty(num_t, num_m)
    block = max(1, chunk_slots(table.shape[1], table.device) // max(1, num_m))
    for lo in range(0, num_t, block):
        hi = min(num_t, lo + block)
        rows = _gather_rows(table, idx_TM[lo:hi].reshape(-1), x_TD.dtype)
        rows = rows.view(hi - lo, num_m, table.shape[1]).mul_(x_TD[lo:hi].unsqueeze(1))
        torch.sum(rows, -1, out=out[lo:hi])
    return out


def sort_rows(idx: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """(sorted row indices, the permutation that sorts them) of flat idx < num_rows; equal rows
    keep their order (stable). Rows that fit int32 are sorted as int32 keys: the same order,
    2-3x faster than int64 keys on a CPU (a quarter-million slots: 1.0 against 2.8 ms)."""
    if num_rows <= torch.iinfo(torch.int32).max:
        keys, order = torch.sort(idx.to(torch.int32), stable=True)
        return keys.to(idx.dtype), order
    return torch.sort(idx, stable=True)


def sorted_runs(sorted_idx: Tensor, num_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Runs of equal values in sorted row indices < num_rows, found without a host sync: (the run
    of each entry, the row and the start of each of min(len, num_rows) runs). Runs past the last
    real one repeat its row and start at len(sorted_idx) (an empty bag)."""
    n = sorted_idx.numel()
    new_run = torch.ones_like(sorted_idx, dtype=torch.bool)
    new_run[1:] = sorted_idx[1:] != sorted_idx[:-1]
    run = new_run.cumsum(0) - 1
    starts = torch.full((min(n, num_rows),), n, dtype=run.dtype, device=run.device)
    starts.scatter_reduce_(0, run, torch.arange(n, device=run.device), "amin")
    return run, sorted_idx.index_select(0, starts.clamp(max=n - 1)), starts


class RowScatter:
    """Sums per-slot row gradients w[s] * z[token(s)] per row without materialising an (S, D)
    intermediate or a host sync: slots are sorted by row once, then each gradient is one
    embedding_bag over the tokens (a bag per output row, the slot weights as per-sample weights).

    Sparse: one bag per run of equal rows, padded to min(S, N) bags (see the module docstring).
    Dense: one bag per table row (empty for untouched rows)."""

    def __init__(self, idx: Tensor, num_rows: int, tokens: Tensor | None = None) -> None:
        """idx (T, M) with slot s reading token s // M, or flat idx (S,) with each slot's token."""
        self.sorted_idx, self.order = sort_rows(idx.reshape(-1), num_rows)
        self.tokens = self.order // idx.shape[-1] if tokens is None else tokens.index_select(0, self.order)
        self.num_rows = num_rows
        self._bags: dict[bool, tuple[Tensor, Tensor]] = {}
        self._runs: tuple[Tensor, Tensor, Tensor] | None = None

    def runs(self) -> tuple[Tensor, Tensor, Tensor]:
        """``sorted_runs`` of the sorted slots: (run of each slot, row and start of each run)."""
        if self._runs is None:
            self._runs = sorted_runs(self.sorted_idx, self.num_rows)
        return self._runs

    def sorted(self, w: Tensor) -> Tensor:
        """Per-slot values w in the sorted slots' order."""
        return w.reshape(-1).index_select(0, self.order)

    def bags(self, sparse: bool) -> tuple[Tensor, Tensor]:
        """(row of each bag, offsets of the bags into the sorted slots)."""
        if sparse not in self._bags:
            if sparse:
                self._bags[sparse] = self.runs()[1:]
            else:
                rows = torch.arange(self.num_rows, device=self.sorted_idx.device)
                self._bags[sparse] = rows, torch.searchsorted(self.sorted_idx, rows)
        return self._bags[sparse]

    def sums(self, w: Tensor, z_TD: Tensor, sparse: bool = True) -> Tensor:
        """(bags, D): each bag's sum of w[s] * z[token(s)] over its slots, in the wider of w's and
        z's dtypes (under autocast a block's input may be bfloat16 and its gates float32)."""
        dtype = torch.promote_types(w.dtype, z_TD.dtype)
        return F.embedding_bag(self.tokens, z_TD.to(dtype), self.bags(sparse)[1], mode="sum",
                               per_sample_weights=self.sorted(w).to(dtype))

    def __call__(self, w_TM: Tensor, z_TD: Tensor, dtype: torch.dtype, sparse: bool = True) -> Tensor:
        """(num_rows, D) gradient, row i = sum over slots routed to i; sparse (uncoalesced) or dense."""
        values = self.sums(w_TM, z_TD, sparse).to(dtype)
        if not sparse:
            return values
        return torch.sparse_coo_tensor(self.bags(sparse)[0].unsqueeze(0), values,
                                       (self.num_rows, z_TD.shape[-1]), is_coalesced=False,
                                       check_invariants=False)


GRAD_LAYOUTS = ("sparse", "dense", "deferred")


class DeferredRowGrad:
    """An (N, D) table gradient kept as what forms it: row i = sum over the slots s routed to i of
    w_s z_t(s), over the slots of every mix that read the table since the gradient was cleared.
    Holds S indices and weights and the (T, D) vectors per mix; ``chunks`` forms the summed rows."""

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []

    def add(self, idx_TM: Tensor, w_TM: Tensor, z_TD: Tensor) -> None:
        self.parts.append((idx_TM, w_TM.detach().float(), z_TD.detach().float()))

    def finite(self) -> Tensor:
        """Are all weights and vectors finite? Then so is every row, short of a float32 overflow
        in the sums, which the loss would show first."""
        return torch.stack([torch.isfinite(w).all() & torch.isfinite(z).all()
                            for _, w, z in self.parts]).all()

    def _slots(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(row, weight, token) of every slot of every part, and the parts' vectors stacked."""
        idx, w, tokens, z, offset = self.slot_rows(), [], [], [], 0
        for idx_TM, w_TM, z_TD in self.parts:
            slots = torch.arange(idx_TM.numel(), device=idx_TM.device)
            w.append(w_TM.reshape(-1))
            tokens.append(slots // idx_TM.shape[1] + offset)
            z.append(z_TD)
            offset += z_TD.shape[0]
        cat = (lambda ts: ts[0]) if len(self.parts) == 1 else torch.cat
        return cat(idx), cat(w), cat(tokens), cat(z)

    def slot_rows(self) -> list[Tensor]:
        """The row of every slot, one flat tensor per part (rows repeat)."""
        return [idx_TM.reshape(-1) for idx_TM, _, _ in self.parts]

    def touched_rows(self) -> int:
        """Distinct rows (a host read: for benchmarks and tests, not the training step)."""
        return int(self._slots()[0].unique().numel())

    def chunks(self, cpu_bytes: int = CPU_CHUNK_BYTES) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(rows, float32 row gradients, which rows are real) in chunks of the slots sorted by row:
        every touched row is real in exactly one chunk, with its whole gradient; entries that are
        not real have a zero gradient. Sizes follow from S and N alone: no host read.

        While the min(S, N) summed rows fit in ``_MERGED_BYTES`` they come as one chunk (the
        update then touches each row once, however many slots read it). Past that (a million
        rows) chunks of slots are summed into ``cpu_bytes`` each (on a CPU): a run of equal rows
        cut by a chunk's end is carried (zeroed, not real, there) and finished in the next
        chunk. Sums are embedding bags over the slots, one bag per run."""
        idx, w, tokens, z = self._slots()
        n, dim = idx.numel(), z.shape[1]
        scatter = RowScatter(idx, self.num_rows, tokens)
        run, rows, starts = scatter.runs()
        if starts.numel() * dim * 4 <= _MERGED_BYTES:  # one bag per run
            yield rows, scatter.sums(w, z), starts < n
            return
        sorted_idx, tokens, w = scatter.sorted_idx, scatter.tokens, scatter.sorted(w)
        chunk = chunk_slots(dim, z.device, cpu_bytes)
        carry = z.new_zeros(1, dim)  # the partial sum of a run that goes on into the next chunk
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            local = run[lo:hi] - run[lo]  # run of each slot, counted from the chunk's first
            j = torch.arange(hi - lo, device=z.device)
            bags = torch.full_like(j, hi - lo).scatter_reduce_(0, local, j, "amin")  # empty past last
            g = F.embedding_bag(tokens[lo:hi], z, bags, mode="sum", per_sample_weights=w[lo:hi])
            g[:1].add_(carry)  # zero unless the first run began in an earlier chunk
            last = local[-1:]
            goes_on = (sorted_idx[hi:hi + 1] == sorted_idx[hi - 1:hi] if hi < n
                       else torch.zeros_like(last, dtype=torch.bool))
            carry = g.index_select(0, last).mul_(goes_on.unsqueeze(1))
            real = (j < last) | ((j == last) & ~goes_on)
            chunk_rows = sorted_idx[hi - 1:hi].expand(hi - lo).scatter(0, local, sorted_idx[lo:hi])
            yield chunk_rows, g.mul_(real.unsqueeze(1)), real


class TableGrads:
    """The gradients of the tables one mix read, in the mix's layout: a row-sparse or dense
    tensor from the slots sorted once (``RowScatter``), or nothing returned and the ingredients
    added to the table's ``DeferredRowGrad``. ``scale`` multiplies the gradients (the per-slot
    weights) in every layout: a sharded bank's 1 / ranks."""

    def __init__(self, idx_TM: Tensor, layout: str, scale: float = 1.0) -> None:
        self.idx_TM, self.layout, self.scale = idx_TM, layout, scale
        self._scatter: RowScatter | None = None

    def __call__(self, table: Tensor, w_TM: Tensor, z_TD: Tensor) -> Tensor | None:
        if self.scale != 1.0:
            w_TM = w_TM * self.scale
        if self.layout == "deferred":
            grad = deferred_grad(table)
            if grad is None:
                grad = DeferredRowGrad(table.shape[0])
                table.deferred_grad = grad  # type: ignore[attr-defined]
            grad.add(self.idx_TM, w_TM, z_TD)
            return None
        if self._scatter is None:
            self._scatter = RowScatter(self.idx_TM, table.shape[0])
        return self._scatter(w_TM, z_TD, table.dtype, self.layout == "sparse")


class _ExpertMix(torch.autograd.Function):
    """y_t = sum_m g_tm * act(u_{i_tm} . x_t) * v_{i_tm}, with sparse table gradients."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, idx_TM: Tensor, gate_TM: Tensor, down_ND: Tensor,
                up_ND: Tensor, act: str, layout: str, grad_scale: float) -> Tensor:
        a_TM = _dots(down_ND, idx_TM, x_TD)
        h_TM = _activate(a_TM, act) * gate_TM
        # embedding_bag sums weighted rows of `up` without materialising the (T, M, D) gather.
        y_TD = F.embedding_bag(idx_TM, up_ND, per_sample_weights=h_TM.to(up_ND.dtype),
                               mode="sum").to(x_TD.dtype)
        ctx.save_for_backward(x_TD, idx_TM, gate_TM, a_TM, down_ND, up_ND)
        ctx.act, ctx.layout, ctx.grad_scale = act, layout, grad_scale
        ctx.tables = (down_ND, up_ND)  # the parameters themselves: a deferred gradient lands on them
        return y_TD

    @staticmethod
    def backward(ctx, gy_TD: Tensor):  # type: ignore[override]
        x_TD, idx_TM, gate_TM, a_TM, down_ND, up_ND = ctx.saved_tensors
        act_TM, dact_TM = _act_and_grad(a_TM, ctx.act)
        gh_TM = _dots(up_ND, idx_TM, gy_TD)  # dL/dh = v . dy
        g_gate = gh_TM * act_TM
        ga_TM = gh_TM * gate_TM * dact_TM  # dL/da
        g_x = g_down = g_up = None
        if ctx.needs_input_grad[0]:  # dL/dx_t = sum_m da_tm u_{i_tm}
            g_x = F.embedding_bag(idx_TM, down_ND, per_sample_weights=ga_TM.to(down_ND.dtype),
                                  mode="sum").to(x_TD.dtype)
        grads = TableGrads(idx_TM, ctx.layout, ctx.grad_scale)
        if ctx.needs_input_grad[3]:  # dL/du_i = sum over slots routed to i of da * x
            g_down = grads(ctx.tables[0], ga_TM, x_TD)
        if ctx.needs_input_grad[4]:  # dL/dv_i = sum over slots routed to i of h * dy
            g_up = grads(ctx.tables[1], act_TM * gate_TM, gy_TD)
        return g_x, None, g_gate, g_down, g_up, None, None, None


class _ValueMix(torch.autograd.Function):
    """y_t = sum_m g_tm * v_{i_tm}, with a sparse value gradient."""

    @staticmethod
    def forward(ctx, idx_TM: Tensor, gate_TM: Tensor, values_ND: Tensor, layout: str,
                grad_scale: float) -> Tensor:
        y_TD = F.embedding_bag(idx_TM, values_ND, per_sample_weights=gate_TM.to(values_ND.dtype),
                               mode="sum").to(gate_TM.dtype)
        ctx.save_for_backward(idx_TM, gate_TM, values_ND)
        ctx.layout, ctx.table, ctx.grad_scale = layout, values_ND, grad_scale
        return y_TD

    @staticmethod
    def backward(ctx, gy_TD: Tensor):  # type: ignore[override]
        idx_TM, gate_TM, values_ND = ctx.saved_tensors
        g_gate = _dots(values_ND, idx_TM, gy_TD) if ctx.needs_input_grad[1] else None  # v . dy
        g_values = None
        if ctx.needs_input_grad[2]:  # dL/dv_i = sum over slots routed to i of g * dy
            g_values = TableGrads(idx_TM, ctx.layout, ctx.grad_scale)(ctx.table, gate_TM, gy_TD)
        return None, g_gate, g_values, None, None


def value_mix(idx: Tensor, gates: Tensor, values: Tensor, layout: str | None = None,
              grad_scale: float = 1.0) -> Tensor:
    """Gated sum of routed value rows (PKM). idx, gates: (..., M) -> (..., D).

    The value gradient takes ``layout`` (default: the table's own, ``grad_layout``) and is
    multiplied by ``grad_scale``."""
    lead = idx.shape[:-1]
    y = _ValueMix.apply(idx.reshape(-1, idx.shape[-1]), gates.reshape(-1, gates.shape[-1]),
                        values, layout or grad_layout(values), grad_scale)
    return y.view(*lead, values.shape[1])


def expert_mix(x: Tensor, idx: Tensor, gates: Tensor, down: Tensor, up: Tensor,
               act: str = "gelu", layout: str | None = None, grad_scale: float = 1.0) -> Tensor:
    """Fused gather + weighted sum over routed experts. x: (..., D); idx, gates: (..., M).

    Table gradients take ``layout`` (see the module docstring; default: the tables' own,
    ``grad_layout``) and are multiplied by ``grad_scale``.
    """
    lead = x.shape[:-1]
    y = _ExpertMix.apply(x.reshape(-1, x.shape[-1]), idx.reshape(-1, idx.shape[-1]),
                         gates.reshape(-1, gates.shape[-1]), down, up, act, layout or grad_layout(down),
                         grad_scale)
    return y.view(*lead, x.shape[-1])


def expert_mix_reference(x: Tensor, idx: Tensor, gates: Tensor, down: Tensor, up: Tensor,
                         act: str = "gelu") -> Tensor:
    """Plain-autograd definition of ``expert_mix`` (dense gradients): the test reference."""
    a = torch.einsum("...md,...d->...m", down[idx], x)
    return torch.einsum("...m,...md->...d", _activate(a, act) * gates, up[idx])


def set_grad_layout(p: Tensor, layout: str) -> None:
    """Choose the layout of a table's gradients (``GRAD_LAYOUTS``): row-sparse (the default, for
    the row-sparse optimisers), dense (for a dense optimiser) or deferred (formed by the row
    optimiser's step). A parameter attribute, so every mix over the table agrees with its
    optimiser and no forward keeps any state of its own."""
    if layout not in GRAD_LAYOUTS:
        raise ValueError(f"gradient layout {layout!r} must be one of {GRAD_LAYOUTS}")
    p.grad_layout = layout  # type: ignore[attr-defined]


def grad_layout(p: Tensor) -> str:
    return str(getattr(p, "grad_layout", "sparse"))


def deferred_grad(p: Tensor) -> DeferredRowGrad | None:
    """The deferred gradient backward left on a table since the last ``clear_deferred_grad``."""
    return getattr(p, "deferred_grad", None)


def clear_deferred_grad(p: Tensor) -> None:
    p.deferred_grad = None  # type: ignore[attr-defined]


TABLE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ROW_CHUNK = 65536
_meta_tables = [False]


@contextlib.contextmanager
def meta_expert_tables(enabled: bool = True) -> Iterator[None]:
    """Build expert banks without allocating their tables (meta tensors): a sharded run then
    creates only its own rows from each bank's seed, never the whole table."""
    old, _meta_tables[0] = _meta_tables[0], enabled
    try:
        yield
    finally:
        _meta_tables[0] = old


def table_device() -> str | None:
    """Where new expert tables go: "meta" inside ``meta_expert_tables()``, else the default."""
    return "meta" if _meta_tables[0] else None


def init_rows(seed: int, lo: int, hi: int, num_rows: int, dim: int, dtype: torch.dtype) -> Tensor:
    """Rows [lo, hi) of a N(0, 1/D) (num_rows, D) table drawn in 64K-row chunks, chunk c from its
    own generator (seed, c): any row range is reproducible alone, identical to the whole table."""
    out = torch.empty(hi - lo, dim, dtype=dtype, device="cpu")
    for start in range(lo - lo % _ROW_CHUNK, hi, _ROW_CHUNK):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + start // _ROW_CHUNK)
        rows = min(_ROW_CHUNK, num_rows - start)
        chunk = torch.randn(rows, dim, generator=gen, device="cpu").div_(math.sqrt(dim))
        a, b = max(start, lo), min(start + _ROW_CHUNK, hi)
        out[a - lo:b - lo] = chunk[a - start:b - start]
    return out


@torch.no_grad()
def fill_rows(table: Tensor, seed: int, lo: int, num_rows: int) -> None:
    """table[i] = row lo + i of the (num_rows, D) table ``init_rows`` draws from seed, drawn on the
    CPU 64K rows at a time and copied where the table lives (never a whole table on the host)."""
    for a in range(0, table.shape[0], _ROW_CHUNK):
        b = min(a + _ROW_CHUNK, table.shape[0])
        table[a:b] = init_rows(seed, lo + a, lo + b, num_rows, table.shape[1], table.dtype)


class TableBank(nn.Module):
    """A module holding expert tables (row-sparse gradients, row-sparse optimizer) as the
    parameters named in ``table_names``."""

    table_names: tuple[str, ...]
    # Every rank must call the bank, whatever its token count (a row-sharded bank's collectives):
    # a caller with no tokens for it still calls it, with none.
    collective: bool = False

    def tables(self) -> dict[str, nn.Parameter]:
        """Name -> table, in a fixed order."""
        return {name: getattr(self, name) for name in self.table_names}


def expert_tables(model: nn.Module) -> list[nn.Parameter]:
    """Every expert table of a model, each once, found through the banks that hold them rather
    than through a mark on the tensor: a parameter replaced by ``to_empty``,
    ``load_state_dict(..., assign=True)`` or a move to another kind of device is still found."""
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, TableBank):
            for table in module.tables().values():
                found.setdefault(id(table), table)
    return list(found.values())


class ExpertBank(TableBank):
    """The (N, D) tables of one layer's experts, shared by every routed block that reads them.

    ``kind`` "neuron" keeps ``down`` and ``up``; "value" and "gated" keep ``values`` (the gated
    kind's SiLU gate is a dense projection of the routed block, not of the bank).
    """

    def __init__(self, num_experts: int, dim: int, act: str = "gelu",
                 dtype: torch.dtype = torch.float32, kind: str = "neuron") -> None:
        super().__init__()
        if kind not in BLOCK_KINDS:
            raise ValueError(f"block kind {kind!r} must be one of {BLOCK_KINDS}")
        if act not in EXPERT_ACTS:
            raise ValueError(f"act={act!r} must be one of {EXPERT_ACTS}")
        self.num_experts, self.dim, self.act, self.kind = num_experts, dim, act, kind
        self.table_names = ("down", "up") if kind == "neuron" else ("values",)
        # Where every other parameter goes (a ``with torch.device(...)`` block's), or meta
        # inside ``meta_expert_tables()``.
        device = table_device() or torch.get_default_device()
        for name in self.table_names:
            setattr(self, name, nn.Parameter(torch.empty(num_experts, dim, dtype=dtype, device=device)))
        self.reset_parameters()

    @staticmethod
    def table_seed(seed: int, name: str) -> int:
        """The seed table ``name`` of a bank seeded with ``seed`` is drawn from (one stream each)."""
        return 2 * seed + (0 if name == "down" else 1)

    def reset_parameters(self) -> None:
        """A new seed (one draw of the global RNG) and N(0, 1/D) rows drawn from it, so that
        u . x has unit variance for unit-RMS x (``fill_rows``: the same rows whatever the
        device); a meta table keeps only the seed (``rows`` draws any range from it)."""
        self.seed = int(torch.randint(0, 2**31 - 1, (1,), device="cpu"))
        for name, table in self.tables().items():
            if not table.is_meta:
                fill_rows(table, self.table_seed(self.seed, name), 0, self.num_experts)

    def rows(self, name: str, lo: int, hi: int) -> Tensor:
        """A copy of rows [lo, hi) of table ``name``, built from the seed if the tables were never
        allocated."""
        table = getattr(self, name)
        if table.is_meta:
            return init_rows(self.table_seed(self.seed, name), lo, hi, self.num_experts, self.dim,
                             table.dtype)
        return table.data[lo:hi].clone()

    def forward(self, x: Tensor, idx: Tensor, gates: Tensor) -> Tensor:
        if self.kind == "neuron":
            return expert_mix(x, idx, gates, self.down, self.up, self.act)
        return value_mix(idx, gates.to(x.dtype), self.values)
