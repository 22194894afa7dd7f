"""Row-sparse optimisers equal dense implementations of the same rule on touched rows and leave
every other row, and its state, untouched; duplicate rows (a table used twice in one step) and
padding rows (zero values repeating a touched row) change nothing."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fractalmoe import experts, optim
from fractalmoe.config import TrainConfig, tiny_model_config
from fractalmoe.experts import ExpertBank, grad_layout, value_mix
from fractalmoe.model import FHMELanguageModel
from fractalmoe.optim import LazyAdam, ModelOptimizer, RowSGD, RowwiseAdagrad, merge_rows
from fractalmoe.train import balance_scale, lr_scale, train_step

N, D = 50, 6


def _sparse_grad(rows: list[int], seed: int, pad: int = 3) -> torch.Tensor:
    """Values for ``rows`` (duplicates allowed), then ``pad`` zero entries on touched rows."""
    g = torch.Generator().manual_seed(seed)
    padding = [rows[i % len(rows)] for i in range(pad)]
    values = torch.randn(len(rows), D, generator=g, dtype=torch.float64)
    values = torch.cat([values, values.new_zeros(pad, D)])
    return torch.sparse_coo_tensor(torch.tensor(rows + padding).unsqueeze(0), values, (N, D),
                                   check_invariants=True)


def _steps():
    return [[1, 4, 4, 9], [4, 7, 30], [0, 1, 49, 49, 49], [9]]


def _touched(rows: list[int] | torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(N, dtype=torch.bool)
    mask[rows] = True
    return mask


def dense_rowwise_adagrad(w, acc, grad, touched, lr, eps):
    """The rule on a dense (N, D) gradient, applied where `touched`."""
    acc = torch.where(touched, acc + grad.pow(2).mean(1), acc)
    step = lr * grad / (acc.sqrt() + eps).unsqueeze(1)
    return torch.where(touched.unsqueeze(1), w - step, w), acc


def dense_lazy_adam(w, m, v, grad, touched, t, lr, b1, b2, eps):
    t_mask = touched.unsqueeze(1)
    m = torch.where(t_mask, b1 * m + (1 - b1) * grad, m)
    v = torch.where(t_mask, b2 * v + (1 - b2) * grad * grad, v)
    step = lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + eps)
    return torch.where(t_mask, w - step, w), m, v


def test_merge_rows_sums_duplicates_into_exactly_the_touched_rows() -> None:
    grad = _sparse_grad([7, 3, 7, 0, 3, 3], seed=0, pad=4)
    rows, values, real = merge_rows(grad)
    assert rows.shape == real.shape == (min(10, N),) and values.shape == (10, D)  # fixed size
    ref = grad.coalesce()
    assert torch.equal(rows[real], ref.indices()[0]) and real.sum() == 3 and real[:3].all()
    torch.testing.assert_close(values[real].double(), ref.values())
    assert (values[~real] == 0).all() and (rows[~real] == 7).all()  # padding: last row, zero


def test_rowwise_adagrad_equals_dense_rule() -> None:
    w0 = torch.randn(N, D, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = RowwiseAdagrad([p], lr=0.1, eps=1e-8)
    w, acc = w0.clone(), torch.zeros(N, dtype=torch.float64)
    for i, rows in enumerate(_steps()):
        grad = _sparse_grad(rows, i)
        p.grad = grad
        opt.step()
        w, acc = dense_rowwise_adagrad(w, acc, grad.to_dense(), _touched(rows), 0.1, 1e-8)
        torch.testing.assert_close(p.data, w)
        torch.testing.assert_close(opt.state[p]["sum"].double(), acc, rtol=1e-6, atol=1e-7)
    never = ~_touched([x for s in _steps() for x in s])
    assert torch.equal(p.data[never], w0[never]) and (opt.state[p]["sum"][never] == 0).all()


def test_lazy_adam_equals_dense_rule_and_torch_sparse_adam() -> None:
    w0 = torch.randn(N, D, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    ref_p = torch.nn.Parameter(w0.clone())
    opt = LazyAdam([p], lr=0.01)
    torch_opt = torch.optim.SparseAdam([ref_p], lr=0.01)
    w, m, v = w0.clone(), torch.zeros(N, D, dtype=torch.float64), torch.zeros(N, D, dtype=torch.float64)
    for i, rows in enumerate(_steps(), start=1):
        grad = _sparse_grad(rows, i)
        p.grad, ref_p.grad = grad, grad.clone()
        opt.step()
        torch_opt.step()
        w, m, v = dense_lazy_adam(w, m, v, grad.to_dense(), _touched(rows), i, 0.01, 0.9, 0.999, 1e-8)
        torch.testing.assert_close(p.data, w)
        torch.testing.assert_close(p.data, ref_p.data)
        torch.testing.assert_close(opt.state[p]["exp_avg"].double(), m)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"].double(), v)
    never = ~_touched([x for s in _steps() for x in s])
    assert torch.equal(p.data[never], w0[never])
    assert (opt.state[p]["exp_avg"][never] == 0).all()
    assert opt.state[p]["step"].device == p.device and float(opt.state[p]["step"]) == len(_steps())


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("rule", ["rowwise_adagrad", "lazy_adam", "row_sgd"])
def test_a_table_used_twice_in_a_step_equals_the_dense_rule(rule: str, chunk: int | None, monkeypatch) -> None:
    """Two mixes over one table (a block called twice) add two padded gradients: the rows both
    touch, and the padding of each, must count once; also when the merged rows are updated in
    chunks of 3 (padding then repeats a row of an earlier chunk)."""
    if chunk is not None:
        monkeypatch.setattr(optim, "chunk_slots", lambda dim, device, *_: chunk)
    torch.manual_seed(0)
    w0 = torch.randn(N, D, dtype=torch.float64)
    p, ref_p = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = {"rowwise_adagrad": RowwiseAdagrad([p], lr=0.1), "lazy_adam": LazyAdam([p], lr=0.01),
           "row_sgd": RowSGD([p], lr=0.3)}[rule]
    torch_opt = torch.optim.SparseAdam([ref_p], lr=0.01)
    w, acc = w0.clone(), torch.zeros(N, dtype=torch.float64)
    m, v = torch.zeros(N, D, dtype=torch.float64), torch.zeros(N, D, dtype=torch.float64)
    for t in range(1, 4):
        idx_a, idx_b = torch.randint(0, N // 2, (3, 4)), torch.randint(N // 4, N, (2, 4))
        ga, gb = torch.rand(3, 4, dtype=torch.float64), torch.rand(2, 4, dtype=torch.float64)
        y = value_mix(idx_a, ga, p).sum() + value_mix(idx_b, gb, p).square().sum()
        y.backward()
        assert p.grad._nnz() > torch.cat([idx_a, idx_b]).unique().numel()  # duplicates, padding
        dense, touched = p.grad.to_dense(), _touched(torch.cat([idx_a.flatten(), idx_b.flatten()]))
        if rule == "rowwise_adagrad":
            w, acc = dense_rowwise_adagrad(w, acc, dense, touched, 0.1, 1e-8)
        elif rule == "row_sgd":  # plain SGD on the dense gradient: untouched rows get zero
            w = w - 0.3 * dense
        else:
            w, m, v = dense_lazy_adam(w, m, v, dense, touched, t, 0.01, 0.9, 0.999, 1e-8)
            ref_p.grad = p.grad.clone()
            torch_opt.step()
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(p.data, w)
        if rule == "lazy_adam":
            torch.testing.assert_close(p.data, ref_p.data)


def test_lazy_adam_resumes_from_its_state_dict() -> None:
    w0 = torch.randn(N, D)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_a, opt_b = LazyAdam([a], lr=0.01), LazyAdam([b], lr=0.01)
    for i, rows in enumerate(_steps()):
        a.grad = _sparse_grad(rows, i).float()
        opt_a.step()
        if i == 1:
            b.data.copy_(a.data)
            opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as if read from a file
        elif i > 1:
            b.grad = a.grad
            opt_b.step()
    torch.testing.assert_close(a.data, b.data, rtol=0, atol=0)


@pytest.mark.parametrize("rule", [RowwiseAdagrad, LazyAdam])
def test_row_state_of_a_bfloat16_table_stays_float32_when_loaded(rule: type[optim.RowOptimizer]) -> None:
    """torch casts loaded optimizer state to the parameter's dtype; the row rules keep theirs."""
    table = torch.nn.Parameter(torch.randn(N, D).bfloat16())
    opt = rule([table])
    table.grad = _sparse_grad([1, 4, 9], 0).bfloat16()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    other = rule([torch.nn.Parameter(table.detach().clone())])
    other.load_state_dict(saved)
    for key, value in opt.state[table].items():
        loaded = next(iter(other.state.values()))[key]
        assert loaded.dtype == value.dtype and torch.equal(loaded, value), key


def test_dense_adamw_is_torch_adamw_over_dense_table_gradients() -> None:
    bank = ExpertBank(N, D, kind="value")
    w0 = bank.values.detach().clone()
    ref = w0.clone().requires_grad_(True)
    model = torch.nn.ModuleDict(dict(bank=bank, proj=torch.nn.Linear(D, D)))
    opt = ModelOptimizer(model, lr=1e-3, expert_lr=0.01, weight_decay=0.1, expert_optim="dense_adamw")
    torch_opt = torch.optim.AdamW([ref], lr=0.01, weight_decay=0.0)  # tables never decay
    assert grad_layout(bank.values) == "dense"
    for _ in range(3):
        idx, gates, x = torch.randint(0, N, (4, 3)), torch.rand(4, 3), torch.randn(4, D)
        bank(x, idx, gates).square().sum().backward()
        assert not bank.values.grad.is_sparse
        ref.grad = bank.values.grad.clone()
        opt.step()
        torch_opt.step()
        opt.zero_grad()
        torch.testing.assert_close(bank.values.data, ref.data)
    assert (bank.values.data != w0).any()


def test_finite_flag_is_a_device_tensor_and_sees_sparse_rows() -> None:
    bank = ExpertBank(N, D, kind="value")
    proj = torch.nn.Linear(D, 3)
    opt = ModelOptimizer(torch.nn.ModuleDict(dict(bank=bank, proj=proj)), 1e-3, 0.05, 0.0)
    flag = opt.finite_flag()
    assert flag.dtype == torch.bool and flag.shape == () and bool(flag)  # no gradient yet
    x = torch.randn(4, D)
    bank(x, torch.randint(0, N, (4, 3)), proj(x)).sum().backward()
    assert bool(opt.finite_flag())
    bank.values.grad._values()[1, 2] = float("nan")
    assert not bool(opt.finite_flag())


def _train_alike(ffn: str, rule: str, variant: dict[str, bool]) -> None:
    """Six steps under the LR schedule, clipping and a skipped non-finite step, of two copies of
    one model: the plain row-sparse optimizer and ``variant`` of it; the same model after."""
    models = []
    for _ in range(3):  # two to train, one to remember the start
        torch.manual_seed(0)
        models.append(FHMELanguageModel(tiny_model_config(ffn=ffn)))
    base = models.pop()
    opts = [ModelOptimizer(m, 1e-3, 0.05, 0.0, rule, **kw) for m, kw in zip(models, ({}, variant))]
    schedule = TrainConfig(max_steps=6, warmup_steps=2)
    for step in range(6):
        x = torch.randint(0, 256, (2, 16))
        hook = (lambda loss: loss * float("nan")) if step == 3 else None
        out = []
        for model, opt in zip(models, opts):
            opt.set_lr_scale(lr_scale(step, schedule))
            out.append(train_step(model, opt, x, x, grad_clip=0.5, loss_hook=hook))
        assert out[0][1] == out[1][1] == (step != 3)
        assert out[0][0] == pytest.approx(out[1][0], rel=1e-5, nan_ok=True)
    start = dict(base.named_parameters())
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        # the rows are summed in another order; Adam's 1/sqrt(v) magnifies that rounding on rows
        # with tiny gradients to ~1e-5 (an update is ~1e-2)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5, msg=name)
        if any(b is t for t in opts[1].tables):
            assert not torch.equal(b, start[name]), f"{name} was never trained"


def test_balance_loss_fades_to_nothing_at_balance_steps() -> None:
    """balance_steps: full weight at step 0, a linear fade, none from that step on; 0 = always on.
    A step at factor 0 trains like the model without the loss."""
    fade = TrainConfig(balance_steps=400)
    assert [balance_scale(s, fade) for s in (0, 100, 400, 1000)] == [1.0, 0.75, 0.0, 0.0]
    assert balance_scale(1000, TrainConfig()) == 1.0
    models = []
    for weight in (0.1, 0.0):
        torch.manual_seed(0)
        models.append(FHMELanguageModel(tiny_model_config(balance_loss=weight)))
    opts = [ModelOptimizer(m, 1e-3, 0.05, 0.0, "lazy_adam") for m in models]
    x = torch.randint(0, 256, (2, 16))
    for model, opt in zip(models, opts):
        train_step(model, opt, x, x, grad_clip=0.5, balance_scale=0.0)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("merged", [True, False])
@pytest.mark.parametrize("ffn", ["fhme", "peer", "memplus"])
@pytest.mark.parametrize("rule", ["rowwise_adagrad", "lazy_adam", "row_sgd"])
def test_deferred_table_grads_train_exactly_like_sparse_ones(ffn: str, rule: str, merged: bool,
                                                             monkeypatch) -> None:
    """Table gradients merged from a sparse .grad or formed in the step (in one buffer, or in
    small chunks with many runs cut) train the same model (FHME reads each table three times a
    step, Memory+ its one bank once per layer)."""
    monkeypatch.setattr(experts, "chunk_slots", lambda dim, device, *_: 37)
    monkeypatch.setattr(optim, "chunk_slots", lambda dim, device, *_: 37)  # the sparse path's chunks
    monkeypatch.setattr(experts, "_MERGED_BYTES", 1 << 30 if merged else 0)
    _train_alike(ffn, rule, {"deferred_table_grads": True})


@pytest.mark.parametrize("deferred", [False, True])
def test_fused_row_update_trains_like_the_eager_one(deferred: bool, needs_compiler: None) -> None:
    """The one-kernel update (gather, row math, write-back) is the same update as the eager
    passes in the model's training step: LR schedule, clipping, a skipped non-finite step."""
    _train_alike("fhme", "lazy_adam", {"fused_row_update": True, "deferred_table_grads": deferred})


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("deferred", [False, True])
def test_fused_row_update_runs_the_kernel_and_equals_the_eager_one(chunked: bool, deferred: bool,
                                                                   monkeypatch, needs_compiler: None) -> None:
    """On a table the fused kernel can serve (one chunk, or chunks of c rows with N >= c + S), it
    runs for every chunk, repeated rows and padding included, and updates as the eager rule does
    under a changing learning rate."""
    if chunked:
        monkeypatch.setattr(experts, "_MERGED_BYTES", 0)
        monkeypatch.setattr(experts, "chunk_slots", lambda dim, device, *_: 37)
        monkeypatch.setattr(optim, "chunk_slots", lambda dim, device, *_: 37)
    ran: list[str] = []
    compiled = optim.fused_kernel

    def counted(fn):  # type: ignore[no-untyped-def]
        kernel = compiled(fn)

        def run(*args):  # type: ignore[no-untyped-def]
            ran.append(fn.__name__)
            return kernel(*args)
        return run

    monkeypatch.setattr(optim, "fused_kernel", counted)
    rows = 4096
    banks = []
    for fused in (False, True):
        torch.manual_seed(0)
        bank = ExpertBank(rows, 8, kind="value")
        banks.append((bank, optim.table_optimizer([bank.values], "lazy_adam", 0.05, deferred=deferred,
                                                  fused=fused)))
    for step in range(4):
        x, idx, w = torch.randn(64, 8), torch.randint(0, 300, (64, 5)), torch.rand(64, 5)
        for bank, opt in banks:
            for group in opt.param_groups:
                group["lr"] = 0.05 * (step + 1)
            bank(x, idx, w).square().sum().backward()
            opt.step()
            opt.zero_grad()
    assert ran and len(ran) >= 4
    torch.testing.assert_close(banks[1][0].values, banks[0][0].values, rtol=1e-5, atol=1e-6)


def test_fused_row_update_on_bfloat16_tables(needs_compiler: None) -> None:
    """bf16 tables: the fused kernel rounds the updated row once, the eager path its update and
    then the sum; after one step the two are within a unit in the last place. (Over more steps
    a one-ulp difference can flip the sign of a near-zero gradient and Adam's step with it.)"""
    x, idx, w = torch.randn(64, 8), torch.randint(0, 300, (64, 5)), torch.rand(64, 5)
    tables = []
    for fused in (False, True):
        torch.manual_seed(0)
        bank = ExpertBank(4096, 8, dtype=torch.bfloat16, kind="value")
        opt = optim.table_optimizer([bank.values], "lazy_adam", 0.05, deferred=True, fused=fused)
        start = bank.values.detach().clone()
        bank(x, idx, w).float().square().sum().backward()
        opt.step()
        assert not torch.equal(bank.values, start)
        tables.append(bank.values.detach())
    assert tables[1].dtype == torch.bfloat16
    torch.testing.assert_close(tables[1].float(), tables[0].float(), rtol=2 ** -8, atol=2 ** -10)


def test_stochastic_round_is_unbiased_between_the_two_bfloat16_neighbours() -> None:
    torch.manual_seed(0)
    x = torch.tensor([1.0 + 2 ** -10, -3.0 - 2 ** -9, 0.1, -1e-3, 2.5])
    draws = optim.stochastic_round(x.expand(20000, -1).contiguous())
    below = (x.view(torch.int32) & -(1 << 16)).view(torch.float32)  # bfloat16 toward zero
    above = (below.view(torch.int32) + (1 << 16)).view(torch.float32)  # the next one out
    assert ((draws == below) | (draws == above)).all()
    torch.testing.assert_close(draws.double().mean(0), x.double(), rtol=2 ** -12, atol=0)
    # Noise drawn per row and per column: any two entries' rounding errors are uncorrelated over
    # the draws (same row, same column, neither), as with a draw per entry.
    two = x.expand(2, -1).contiguous()
    pairs = torch.stack([optim.stochastic_round(two) for _ in range(3000)])
    errors = (pairs - two).flatten(1).double().T  # entries (0, 0), (0, 1), ..., (1, 0), ...
    corr = torch.corrcoef(errors[[0, 1, 5, 6]])  # (0, 0), (0, 1), (1, 0), (1, 1)
    assert corr.sub(torch.eye(4, dtype=torch.double)).abs().max() < 0.07
    exact = torch.tensor([1.0, -0.5, 0.0, 3.0]).bfloat16().float()
    assert torch.equal(optim.stochastic_round(exact), exact)


@pytest.mark.parametrize("rule, lr", [("rowwise_adagrad", 1e-3), ("lazy_adam", 1e-3), ("row_sgd", 2e-4)])
def test_stochastic_rounding_keeps_steps_below_half_a_bfloat16_unit(rule: str, lr: float) -> None:
    """Rows near 1 (a bfloat16 unit of 2^-8 to 2^-7) and steps below half a unit: rounded to
    nearest the table hardly moves; rounded stochastically it follows the float32 table without
    bias. Untouched rows stay."""
    idx = torch.randint(0, 40, (32, 4), generator=torch.Generator().manual_seed(1))
    w = torch.rand(32, 4, generator=torch.Generator().manual_seed(2))
    moved = {}
    for name, dtype, stochastic in (("fp32", torch.float32, False), ("nearest", torch.bfloat16, False),
                                    ("stochastic", torch.bfloat16, True)):
        torch.manual_seed(0)
        bank = ExpertBank(N, 16, dtype=dtype, kind="value")
        bank.values.data.copy_(bank.values.data.float().add_(1.0).bfloat16())
        start = bank.values.detach().float().clone()
        opt = optim.table_optimizer([bank.values], rule, lr, stochastic_rounding=stochastic)
        for _ in range(400):  # the same gradient every step
            value_mix(idx, w, bank.values).float().sum().backward()
            opt.step()
            opt.zero_grad()
        moved[name] = bank.values.detach().float() - start
    used = torch.zeros(N, dtype=torch.bool)
    used[idx.unique()] = True
    scale = moved["fp32"][used].abs().mean()
    err = moved["stochastic"][used] - moved["fp32"][used]
    assert moved["nearest"][used].abs().mean() < 0.05 * scale
    assert err.mean().abs() < 0.02 * scale and err.abs().mean() < 0.35 * scale
    assert moved["stochastic"][~used].eq(0).all()


def test_stochastic_rounding_needs_an_eager_row_rule() -> None:
    table = [torch.nn.Parameter(torch.zeros(4, 2))]
    for kw in (dict(rule="lazy_adam", fused=True), dict(rule="dense_adamw")):
        with pytest.raises(ValueError, match="eager row-sparse rule"):
            optim.table_optimizer(table, lr=0.05, stochastic_rounding=True, **kw)
    with pytest.raises(ValueError, match="stochastic_rounding"):
        TrainConfig(fused_row_update=True, stochastic_rounding=True)


def test_distinct_padding_moves_padding_to_untouched_rows(monkeypatch) -> None:
    """Every chunk's rows are distinct, real rows stay, padding goes to rows no slot names."""
    monkeypatch.setattr(experts, "_MERGED_BYTES", 0)
    monkeypatch.setattr(experts, "chunk_slots", lambda dim, device, *_: 16)
    bank = ExpertBank(500, 4, kind="value")
    optim.table_optimizer([bank.values], "lazy_adam", 0.01, deferred=True)
    idx = torch.randint(0, 40, (30, 6))  # 180 slots on 40 rows: long runs, cut by chunk ends
    bank(torch.randn(30, 4), idx, torch.rand(30, 6)).sum().backward()
    chunks, distinct = optim.distinct_padding(bank.values)
    assert distinct
    seen = torch.zeros(500, dtype=torch.long)
    for rows, g, real in chunks:
        assert rows.unique().numel() == rows.numel()
        assert not torch.isin(rows[~real], idx.reshape(-1)).any()
        assert g[~real].eq(0).all()
        seen.index_add_(0, rows[real], torch.ones_like(rows[real]))
    assert torch.equal(seen.nonzero().flatten(), idx.unique()) and seen.max() == 1


def test_fused_row_update_falls_back_where_padding_rows_may_run_out(monkeypatch) -> None:
    """Chunks of c rows with N < c + S: no guarantee of free rows, so the eager update runs."""
    monkeypatch.setattr(experts, "_MERGED_BYTES", 0)
    monkeypatch.setattr(experts, "chunk_slots", lambda dim, device, *_: 37)
    bank = ExpertBank(N, 4, kind="value")
    optim.table_optimizer([bank.values], "lazy_adam", 0.01, deferred=True)
    bank(torch.randn(30, 4), torch.randint(0, N, (30, 6)), torch.rand(30, 6)).sum().backward()
    assert optim.distinct_padding(bank.values)[1] is False


def test_fused_row_update_is_for_lazy_adam_only() -> None:
    with pytest.raises(ValueError, match="lazy_adam only"):
        optim.table_optimizer([torch.nn.Parameter(torch.zeros(4, 2))], "rowwise_adagrad", 0.05, fused=True)
    with pytest.raises(ValueError, match="fused_row_update"):
        TrainConfig(expert_optim="rowwise_adagrad", fused_row_update=True)


def test_a_non_finite_deferred_gradient_is_flagged() -> None:
    bank = ExpertBank(N, D, kind="value")
    model = torch.nn.ModuleDict(dict(bank=bank, proj=torch.nn.Linear(D, D)))
    opt = ModelOptimizer(model, 1e-3, 0.05, 0.0, "rowwise_adagrad",
                         deferred_table_grads=True)
    gy = torch.ones(4, D)
    gy[2, 1] = float("inf")
    x = torch.randn(4, D)
    (bank(x, torch.randint(0, N, (4, 3)), torch.rand(4, 3)) * gy).sum().backward()
    assert bank.values.grad is None and not bool(opt.finite_flag())
    opt.zero_grad()
    bank(x, torch.randint(0, N, (4, 3)), torch.rand(4, 3)).sum().backward()
    assert bool(opt.finite_flag())


@pytest.mark.parametrize("how", ["to_empty", "assign"])
def test_tables_are_found_however_the_model_was_materialised(how: str) -> None:
    """Built on the meta device and materialised as large models are (``to_empty``, or
    ``load_state_dict(..., assign=True)``), the model's parameters are new tensors: the optimizer
    still gives its tables the row rule."""
    from fractalmoe.config import tiny_model_config
    from fractalmoe.model import FHMELanguageModel

    real = FHMELanguageModel(tiny_model_config(ffn="fhme"))
    with torch.device("meta"):
        model = FHMELanguageModel(tiny_model_config(ffn="fhme"))
    if how == "to_empty":
        model.to_empty(device="cpu")
    else:
        model.load_state_dict(real.state_dict(), assign=True)
    opt = ModelOptimizer(model, 1e-3, 0.05, 0.0, "lazy_adam")
    banks = [m.fractal.bank for m in model.fhme_layers()]
    assert [id(t) for t in opt.tables] == [id(t) for b in banks for t in b.tables().values()]
    assert not any(id(t) in {id(p) for p in opt.dense_params} for t in opt.tables)


@pytest.mark.parametrize("ffn", ["pkm", "fhme"])
@pytest.mark.parametrize("rule", ["rowwise_adagrad", "lazy_adam"])
def test_float16_tables_train_read_once_or_more_and_over_micro_batches(ffn: str, rule: str) -> None:
    """CPU PyTorch cannot add float16 sparse gradients, so float16 tables always take the deferred
    (float32) gradients; their rows move and the loss falls."""
    from fractalmoe.optim import defers_table_grads
    from fractalmoe.train import train_step

    torch.manual_seed(0)
    model = FHMELanguageModel(tiny_model_config(ffn=ffn, expert_dtype="float16"))
    assert defers_table_grads(model, False, rule)
    opt = ModelOptimizer(model, 1e-3, 0.05, 0.0, rule, deferred_table_grads=defers_table_grads(model, False, rule))
    tables = [p for p in model.parameters() if p.dtype == torch.float16]
    before = [t.detach().clone() for t in tables]
    x = torch.randint(0, 256, (4, 16))
    losses = [train_step(model, opt, x, x, 1.0, micro_batches=2)[0] for _ in range(4)]
    assert all(not torch.equal(t, b) for t, b in zip(tables, before)) and losses[-1] < losses[0]
