"""Optimisers: AdamW for dense parameters, a row-sparse rule for expert tables.

Legend: N table rows, D width, R rows touched this step, S gradient entries (rows may repeat).

Expert tables receive row-sparse gradients of a fixed size whose entries may repeat a row (the
mixes' padding, or a table used twice in one step). Each row-sparse rule first sums the entries of
each row without a host sync (``merge_rows``: one sort of the S indices, segment sums into a
min(S, N)-row buffer whose rows past the R touched ones are marked as padding), then reads and
writes only those rows and their state:

* ``rowwise_adagrad`` (default): one accumulator per row, s_i += mean_d(g_id**2),
  w_i -= lr * g_i / (sqrt(s_i) + eps). State: 4 bytes per row, which is what lets a
  million-expert layer fit in a few GB. Its updates are additive, so a zero padding row is harmless.
* ``lazy_adam``: torch.optim.SparseAdam semantics (Adam moments updated only on the R touched rows,
  padding masked; bias correction by the global step, kept on the table's device); a touched
  row of each moment is read once. State: 2x the table.
* ``row_sgd``: plain SGD on touched rows, w_i -= lr * g_i, no state. A row moves in proportion
  to its gradient, where the Adam rules and Adagrad normalise it away: sparse memory fine-tuning
  (Lin et al., 2025) found SGD forgets less than AdamW, whose per-coordinate normalisation gives
  a row the new domain barely reads a full-sized step (here it traces the same trade-off as lazy
  Adam: docs/results.md, "Fine-tuning and forgetting"). Padding rows are zero: harmless.
* ``dense_adamw``: torch.optim.AdamW over whole tables, which then get dense gradients
  (``set_grad_layout``): the dense design, O(N * D) per step, for comparisons.

With ``deferred`` table gradients (``experts.DeferredRowGrad``) the row rules form the summed rows
inside their step instead of merging a sparse ``.grad``: the same rows, the same update, without a
row-sized gradient held from backward to step.

``fused`` (lazy Adam): each chunk's gather, row math and write-back run as one compiled kernel
(``torch.compile``: C++ on CPU, Triton on CUDA) that reads each touched row of the table and its
moments once and writes it once, the least the rule can move, where the eager update reads and
writes them in separate passes (index_select, ten elementwise passes, index_add_ of deltas).
Plain writes race where a row appears twice in a chunk, so the padding entries are moved to
distinct rows the step does not touch (``distinct_padding``), which the kernel writes back
unchanged.

``stochastic_rounding`` (bfloat16 tables): an updated row is rounded to bfloat16 up or down at
random, in proportion to its distance from the two neighbours, so the stored row equals the exact
one in expectation; rounded to nearest, a step below half a bfloat16 unit (2^-9 to 2^-8 of the
value) is lost every time, and late, small steps stall.

Nothing here reads a tensor on the host, so backward plus optimizer step cost no host sync; the
trainer reads ``ModelOptimizer.finite_flag()`` together with the loss, once per step.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from .config import EXPERT_OPTIMS
from .experts import (
    CPU_CHUNK_BYTES,
    chunk_slots,
    clear_deferred_grad,
    deferred_grad,
    expert_tables,
    scratch,
    scratch_cast,
    set_grad_layout,
    sort_rows,
    sorted_runs,
)
from .fractal import FractalExpert


def merge_rows(grad: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """(rows, float32 row gradients, which rows are real; None: all) of an (N, D) gradient.

    Sparse: the entries of each row summed, in ascending row order, into min(S, N) rows of the
    scratch buffer (valid until the next ``scratch`` call); the rows past the R touched ones repeat
    the last touched row with a zero gradient and are not real. No host sync: sizes depend only on
    S and N. Dense: every row, all real.
    """
    if not grad.is_sparse:
        return torch.arange(grad.shape[0], device=grad.device), grad.float(), None
    idx, values = grad._indices()[0], grad._values()
    sorted_idx, order = sort_rows(idx, grad.shape[0])
    run, rows, starts = sorted_runs(sorted_idx, grad.shape[0])
    run_of_entry = torch.empty_like(run).scatter_(0, order, run)
    summed = scratch((starts.numel(), values.shape[1]), torch.float32, values.device).zero_()
    return rows, summed.index_add_(0, run_of_entry, values.float()), starts < idx.numel()


# Row-wise Adagrad and row SGD make one pass over a chunk's gradient rows, with no moment rows
# beside them: chunks of 4 MiB instead of the gathers' 2 MiB halve their loop's dispatch. At a
# million rows the row-wise Adagrad update took a median 116 against 129 ms (alternated fresh
# processes, benchmarks/results/adagrad_chunks_speed.jsonl; in one process 97 against 113 ms,
# 140 at 16 MiB); lazy Adam, which gathers two moment rows per gradient row, was slower with
# them (410-514 against 349-439 ms).
ONE_PASS_CHUNK_BYTES = 4 << 20


def row_gradients(p: Tensor, cpu_bytes: int = CPU_CHUNK_BYTES) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """A table's summed row gradient (see ``merge_rows``) in chunks: from its deferred gradient
    (``DeferredRowGrad.chunks``), or its ``.grad`` merged once and cut into cache-sized chunks
    (an update's several elementwise passes then run over cached rows); none when backward left
    neither. Each touched row is in one chunk only, or repeated as padding (zero, not real) in
    later ones."""
    deferred = deferred_grad(p)
    if deferred is not None:
        yield from deferred.chunks(cpu_bytes)
    elif p.grad is not None:
        rows, g, real = merge_rows(p.grad)
        size = chunk_slots(g.shape[1], g.device, cpu_bytes)
        reals = real.split(size) if real is not None else itertools.repeat(None)
        yield from zip(rows.split(size), g.split(size), reals)


def stochastic_round(x: Tensor) -> Tensor:
    """float32 rows x (..., D) rounded to bfloat16 values at random (returned as float32): up with
    probability equal to x's distance from the value below, in units of their gap, so E[result]
    = x. Adds 16 random bits under the bfloat16 mantissa and drops them: on the magnitude, so
    negative values round alike. A bfloat16 value comes back unchanged.

    The bits of entry (i, j) are r_i + c_j mod 2^16, from one random number per row and one per
    column: each entry's are uniform and any two entries' independent, so every entry rounds
    without bias and the rounding errors of a sum stay uncorrelated, at R + D draws instead of
    R * D (the CPU's generator takes ~4 ns a number: 58 million numbers were 200 ms of a
    million-row table's step)."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    r = torch.randint(0, 1 << 16, (n + rows.shape[1],), dtype=torch.int32, device=x.device)
    noise = r[:n, None].add(r[None, n:]).bitwise_and_((1 << 16) - 1)
    return noise.add_(rows.view(torch.int32)).bitwise_and_(-(1 << 16)).view(torch.float32).view_as(x)


def add_rows_(table: Tensor, rows: Tensor, delta: Tensor, stochastic: bool = False) -> None:
    """table[rows] += delta (float32), rows possibly repeated where their delta is zero (padding).

    The rules fold the step's sign and learning rate into ``delta`` and add it with alpha 1:
    PyTorch's CPU ``index_add_`` with any other alpha adds one row at a time (230,000 rows of 1 KB
    into a million-row table: 75 against 28 ms on two threads); at a million experts that made
    row-wise Adagrad's step 1.30x and lazy Adam's 1.11x slower (``benchmarks/revision_speed.py``).

    ``stochastic`` (bfloat16 tables): the delta becomes the step from the row to its new value
    rounded stochastically (``stochastic_round``); a padding entry's stays zero. The add is then
    exact wherever that step fits bfloat16's 8 significant bits, i.e. unless a value moves by more
    than about its own size in one step, where it is rounded to nearest."""
    if stochastic and table.dtype == torch.bfloat16:
        old = table.index_select(0, rows).float()
        delta = stochastic_round(old.add(delta)).sub_(old)
    table.index_add_(0, rows, scratch_cast(delta, table.dtype, "update"))


def slot_rows(p: Tensor) -> list[Tensor]:
    """The row of every gradient entry of a table this step (rows repeat); none for a dense grad."""
    deferred = deferred_grad(p)
    if deferred is not None:
        return deferred.slot_rows()
    if p.grad is not None and p.grad.is_sparse:
        return [p.grad._indices()[0]]
    return []


def free_rows(used: list[Tensor], num_rows: int, count: int) -> Tensor:
    """``count`` distinct rows, ascending, that no index in ``used`` names, among the first
    min(num_rows, count + the total entries of ``used``) rows; found without a host sync (static sizes). Where fewer
    are free there, the entries past the free ones are row 0: callers use only as many as
    ``distinct_padding`` guarantees."""
    total = sum(u.numel() for u in used)
    m = min(num_rows, count + total)
    device = used[0].device
    taken = torch.zeros(m + 1, dtype=torch.bool, device=device)  # rows >= m land in slot m
    for u in used:
        taken.index_fill_(0, u.clamp(max=m), True)
    free = ~taken[:m]
    rank = free.cumsum(0) - 1
    dest = torch.where(free & (rank < count), rank, count)
    out = torch.zeros(count + 1, dtype=torch.long, device=device)
    return out.scatter_(0, dest, torch.arange(m, device=device))[:count]


def distinct_padding(p: Tensor) -> tuple[Iterator[tuple[Tensor, Tensor, Tensor | None]], bool]:
    """(``row_gradients(p)``, True) with the entries that are not real (zero gradient) moved to
    distinct rows the step does not touch, so that no row appears twice in a chunk; or the chunks
    unchanged and False where that is not certain from the shapes alone (the eager update, which
    adds deltas, then applies).

    One chunk of min(S, N) rows has min(S, N) - R <= N - R padding entries, as many as there are
    untouched rows; chunks of c rows need N >= c + S. A padding row written back unchanged by one
    chunk and updated by another is safe: chunks run one after the other."""
    chunks = row_gradients(p)
    first = next(chunks, None)
    if first is None:
        return iter(()), True
    chunks = itertools.chain([first], chunks)
    rows, _, real = first
    if real is None:  # every row of a dense gradient, once
        return chunks, True
    used = slot_rows(p)
    s, n, count = sum(u.numel() for u in used), p.shape[0], rows.numel()
    if count != min(s, n) and count + s > n:
        return chunks, False
    free = free_rows(used, n, count)

    def moved(chunk: tuple[Tensor, Tensor, Tensor | None]) -> tuple[Tensor, Tensor, Tensor | None]:
        rows, g, real = chunk
        assert real is not None
        pad = (~real).cumsum(0).sub_(1).clamp_(min=0)  # the k-th padding entry takes free row k
        return torch.where(real, rows, free.index_select(0, pad)), g, real

    return map(moved, chunks), True


def _local(grad: Tensor) -> Tensor:
    """What this process holds of a gradient: a sparse one's rows, a DTensor's local shard."""
    if grad.is_sparse:
        return grad._values()
    return grad.to_local() if hasattr(grad, "to_local") else grad


def has_row_gradient(p: Tensor) -> bool:
    return p.grad is not None or deferred_grad(p) is not None


class RowOptimizer(torch.optim.Optimizer):
    """A rule that reads and writes only the rows a step touched; ``zero_grad`` also drops the
    tables' deferred gradients. ``stochastic_rounding``: bfloat16 rows rounded at random
    (``add_rows_``)."""

    def __init__(self, params: Iterable[Tensor], defaults: dict[str, object],
                 stochastic_rounding: bool = False) -> None:
        super().__init__(params, defaults)
        self.stochastic_rounding = stochastic_rounding

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        """As torch's, but the row state stays float32 (torch casts floating state to its
        parameter's dtype, which would round the moments of a bfloat16 table to bfloat16), and
        the step count moves beside its table (torch keeps it on the CPU): the first step after a
        resume then copies nothing to the device, which would wait for it."""
        super().load_state_dict(state_dict)
        groups = state_dict["param_groups"]  # type: ignore[index]
        ids = [i for group in groups for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params):
            for key, value in state_dict["state"].get(i, {}).items():  # type: ignore[index, union-attr]
                if torch.is_tensor(value) and value.dtype == torch.float32:
                    self.state[p][key] = value.to(p.device, copy=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                clear_deferred_grad(p)


class RowwiseAdagrad(RowOptimizer):
    """Adagrad with one second-moment accumulator per table row; touched rows only.

    A dense float32 gradient is consumed: it is scaled in place into the update (call zero_grad
    afterwards, as usual).
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 0.05, eps: float = 1e-8,
                 initial_accumulator: float = 0.0, stochastic_rounding: bool = False) -> None:
        super().__init__(params, dict(lr=lr, eps=eps, initial_accumulator=initial_accumulator),
                         stochastic_rounding)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        for group in self.param_groups:
            for p in group["params"]:
                if not has_row_gradient(p):
                    continue
                state = self.state[p]
                if not state:
                    state["sum"] = torch.full((p.shape[0],), group["initial_accumulator"],
                                              dtype=torch.float32, device=p.device)
                for rows, g, _ in row_gradients(p, ONE_PASS_CHUNK_BYTES):  # padding rows: zero, add nothing
                    mean_sq = torch.linalg.vector_norm(g, dim=1).square_().div_(g.shape[1])
                    acc = state["sum"].index_add_(0, rows, mean_sq)
                    scale = acc.index_select(0, rows).sqrt_().add_(group["eps"]).reciprocal_()
                    update = g.mul_(scale.mul_(-group["lr"]).unsqueeze(1))  # signed: see add_rows_
                    add_rows_(p, rows, update, self.stochastic_rounding)


class RowSGD(RowOptimizer):
    """SGD on touched rows only: w_i -= lr * g_i (no momentum, no state)."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1.0, stochastic_rounding: bool = False) -> None:
        super().__init__(params, dict(lr=lr), stochastic_rounding)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        for group in self.param_groups:
            for p in group["params"]:
                for rows, g, _ in row_gradients(p, ONE_PASS_CHUNK_BYTES):  # padding rows: zero, add nothing
                    add_rows_(p, rows, g.mul_(-group["lr"]), self.stochastic_rounding)


def keep_factor(real: Tensor | None, device: torch.device) -> Tensor:
    """1 for a real row, 0 for padding, as a (rows, 1) float factor; a scalar 1 when all are real."""
    return real.unsqueeze(1).float() if real is not None else torch.ones((), device=device)


def adam_row_math(g: Tensor, m: Tensor, v: Tensor, dv: Tensor, update: Tensor, keep: Tensor,
                  beta1: float, beta2: float, eps: float, step_size: Tensor) -> None:
    """Lazy Adam's elementwise work on gathered rows, in place: dv and g become the deltas of
    exp_avg_sq and exp_avg, m and v the new moments, ``update`` the step to add to the rows
    (``step_size`` is negative: -lr times the bias correction; keep: the 0/1 per row
    that leaves padding rows unchanged)."""
    torch.addcmul(v, g, g, value=-1.0, out=dv).mul_(keep * (beta2 - 1.0))  # v += (1 - b2) (g^2 - v)
    v.add_(dv)
    g.sub_(m).mul_(keep * (1.0 - beta1))  # m += (1 - b1) (g - m)
    m.add_(g)
    torch.div(m, torch.sqrt(v, out=update).add_(eps), out=update).mul_(keep * step_size)


def adam_rows(p: Tensor, m: Tensor, v: Tensor, rows: Tensor, g: Tensor, keep: Tensor,
              beta1: float, beta2: float, eps: float, step_size: Tensor) -> None:
    """Lazy Adam on distinct rows in one pass (``fused``): read p, m, v at rows, write them back
    updated; a row with keep 0 (padding) is written back unchanged."""
    m_old, v_old = m[rows], v[rows]
    v_new = v_old + (g * g - v_old) * (keep * (1.0 - beta2))
    m_new = m_old + (g - m_old) * (keep * (1.0 - beta1))
    p_new = p[rows].float() + m_new / (v_new.sqrt() + eps) * (keep * step_size)
    m.index_put_((rows,), m_new)
    v.index_put_((rows,), v_new)
    p.index_put_((rows,), p_new.to(p.dtype))


@functools.cache
def fused_kernel(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` compiled once per process (inductor: C++ on CPU, Triton on CUDA); shapes are
    dynamic, so chunks of any row count share one kernel."""
    return torch.compile(fn, dynamic=True)


class LazyAdam(RowOptimizer):
    """Adam whose moments and weights change only on touched rows (SparseAdam semantics).

    Moments move by masked deltas added per row, so a padding row never decays a moment; the step
    count and bias correction stay tensors on the table's device (no host read). ``fused``: one
    compiled kernel per chunk (``adam_rows``) reads and writes each row and its moments once."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, fused: bool = False,
                 stochastic_rounding: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps), stochastic_rounding)
        self.fused = fused

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if not has_row_gradient(p):
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                step = state["step"].add_(1)
                # 1 - beta**t as -expm1(t log beta): exact in float32 even for beta near 1
                bias1 = torch.expm1(step * math.log(beta1)).neg_()
                bias2 = torch.expm1(step * math.log(beta2)).neg_()
                # negative: the row math's update is added to the rows (see add_rows_)
                step_size = bias2.sqrt_().mul_(-group["lr"]).div_(bias1)
                chunks, distinct = distinct_padding(p) if self.fused else (row_gradients(p), False)
                for rows, g, real in chunks:
                    if distinct:
                        fused_kernel(adam_rows)(p.detach(), state["exp_avg"], state["exp_avg_sq"], rows, g,
                                                keep_factor(real, p.device), beta1, beta2, group["eps"],
                                                step_size)
                    else:
                        self._update_rows(p, state, rows, g, real, beta1, beta2, group["eps"], step_size)

    def _update_rows(self, p: Tensor, state: dict[str, Tensor], rows: Tensor, g: Tensor,
                     real: Tensor | None, beta1: float, beta2: float, eps: float,
                     step_size: Tensor) -> None:
        # Padding rows must change nothing: the moment deltas and the update carry a 0/1 factor
        # per row. The moments move by index_add_ of their deltas (a CPU index_add_ beats
        # index_copy_ of the new rows); each moment row is read once. Row buffers are reused
        # (fresh ones cost page faults on every step).
        keep = keep_factor(real, p.device)
        m, v, dv, update = (scratch(g.shape, torch.float32, g.device, f"adam_{slot}")
                            for slot in ("m", "v", "dv", "update"))
        torch.index_select(state["exp_avg"], 0, rows, out=m)
        torch.index_select(state["exp_avg_sq"], 0, rows, out=v)
        adam_row_math(g, m, v, dv, update, keep, beta1, beta2, eps, step_size)
        state["exp_avg_sq"].index_add_(0, rows, dv)
        state["exp_avg"].index_add_(0, rows, g)
        add_rows_(p, rows, update, self.stochastic_rounding)


def split_parameters(model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(expert tables, dense weights that decay, dense params that do not: norms, biases)."""
    tables, decay, no_decay = [], [], []
    table_ids = {id(t) for t in expert_tables(model)}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in table_ids:
            tables.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    return tables, decay, no_decay


def table_optimizer(tables: list[Tensor], rule: str, lr: float, deferred: bool = False,
                    fused: bool = False, stochastic_rounding: bool = False) -> torch.optim.Optimizer:
    """The optimiser of the expert tables for one of ``config.EXPERT_OPTIMS``; it sets the
    gradient layout the tables' mixes produce: dense for dense_adamw, else row-sparse, or
    deferred to the step if ``deferred``. ``fused``: lazy Adam's one compiled gather-update-write
    kernel per chunk. ``stochastic_rounding``: bfloat16 rows rounded at random (``add_rows_``)."""
    if rule not in EXPERT_OPTIMS:
        raise ValueError(f"expert_optim={rule!r}: use one of {EXPERT_OPTIMS}")
    if deferred and rule == "dense_adamw":
        raise ValueError("deferred table gradients need a row-sparse expert_optim, not dense_adamw")
    if fused and rule != "lazy_adam":
        raise ValueError(f"a fused row update exists for lazy_adam only, not {rule}")
    if stochastic_rounding and (fused or rule == "dense_adamw"):
        raise ValueError("stochastic rounding needs an eager row-sparse rule (not fused_row_update, not dense_adamw)")
    for p in tables:
        set_grad_layout(p, "dense" if rule == "dense_adamw" else "deferred" if deferred else "sparse")
    if rule == "rowwise_adagrad":
        return RowwiseAdagrad(tables, lr=lr, stochastic_rounding=stochastic_rounding)
    if rule == "lazy_adam":
        return LazyAdam(tables, lr=lr, fused=fused, stochastic_rounding=stochastic_rounding)
    if rule == "row_sgd":
        return RowSGD(tables, lr=lr, stochastic_rounding=stochastic_rounding)
    # no weight decay, like the row-sparse rules; betas as lazy_adam
    return torch.optim.AdamW(tables, lr=lr, weight_decay=0.0, fused=True)


def defers_table_grads(model: nn.Module, asked: bool, rule: str) -> bool:
    """Deferred table gradients when asked, and whenever a row-sparse table is read more than
    once a step: a bank every layer reads (Memory+, ``share_bank``: 4-12 reads), or the bank of a
    fractal of depth C >= 2, which its 2^C - 1 block applications read. Autograd sums a table's
    row-sparse gradients one read at a time, re-copying the growing sum into a fresh buffer
    whose pages fault in (shared bank: 2x the step of a 4-layer FHME; the default model, C = 2:
    1.10x on two threads); deferred, they are summed once in the step. A table read once keeps
    the sparse ``.grad`` (a little faster there), unless it is float16: PyTorch's CPU cannot add
    float16 sparse tensors (micro-batches), and deferred sums are float32."""
    if asked:
        return True
    if rule == "dense_adamw":
        return False
    return (getattr(model, "shared_bank", None) is not None
            or any(isinstance(m, FractalExpert) and m.depth >= 2 for m in model.modules())
            or any(t.dtype == torch.float16 for t in expert_tables(model)))


class ModelOptimizer:
    """AdamW over dense parameters plus the expert tables' optimiser (``table_optimizer``); either
    may be absent (memory fine-tuning trains tables alone)."""

    def __init__(self, model: nn.Module, lr: float, expert_lr: float, weight_decay: float,
                 expert_optim: str = "rowwise_adagrad", beta2: float = 0.95,
                 deferred_table_grads: bool = False, fused_row_update: bool = False,
                 stochastic_rounding: bool = False) -> None:
        tables, decay, no_decay = split_parameters(model)
        groups = [dict(params=decay, weight_decay=weight_decay),
                  dict(params=no_decay, weight_decay=0.0)]
        self.dense: torch.optim.Optimizer | None = None
        if decay or no_decay:  # fused: the step counts stay on the device (foreach reads each on the host)
            self.dense = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr,
                                           betas=(0.9, beta2), fused=True)
        self.sparse: torch.optim.Optimizer | None = None
        if tables:
            self.sparse = table_optimizer(tables, expert_optim, expert_lr, deferred_table_grads,
                                          fused_row_update, stochastic_rounding)
        self._base_lrs = [(opt, base) for opt, base in ((self.dense, lr), (self.sparse, expert_lr))
                          if opt is not None]
        self.dense_params = decay + no_decay
        self.tables = tables

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [opt for opt, _ in self._base_lrs]

    def set_lr_scale(self, scale: float) -> None:
        for opt, base in self._base_lrs:
            for group in opt.param_groups:
                group["lr"] = base * scale

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def finite_flag(self) -> Tensor:
        """0-d bool tensor, on the parameters' device: is every gradient (dense, and the rows of
        sparse ones) finite? No host sync: the trainer reads it together with the loss. A
        gradient sharded by FSDP (a DTensor) is checked in this rank's shard; the trainer
        combines the ranks' flags."""
        params = self.dense_params + self.tables
        flags = [torch.isfinite(_local(p.grad)).all() for p in params if p.grad is not None]
        flags += [grad.finite() for grad in map(deferred_grad, self.tables) if grad is not None]
        if not flags:
            return torch.ones((), dtype=torch.bool, device=params[0].device if params else None)
        return torch.stack(flags).all()

    def clip_dense(self, max_norm: float) -> Tensor:
        """Clip the global gradient norm of dense parameters. Expert rows are not clipped: the
        adaptive rules scale each row's step by its own history; ``row_sgd`` steps lr times the
        raw row gradient."""
        params = [p for p in self.dense_params if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))

    def state_dict(self) -> dict[str, object]:
        return {"dense": self.dense.state_dict() if self.dense is not None else None,
                "sparse": self.sparse.state_dict() if self.sparse is not None else None}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if self.dense is not None and state.get("dense") is not None:
            self.dense.load_state_dict(state["dense"])  # type: ignore[arg-type]
        if self.sparse is not None and state.get("sparse") is not None:
            self.sparse.load_state_dict(state["sparse"])  # type: ignore[arg-type]
