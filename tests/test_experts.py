"""Fused gather-mix: equals the autograd reference, float64 gradcheck, row-sparse gradients."""

from __future__ import annotations

import pytest
import torch

from fractalmoe.experts import (
    ExpertBank,
    RowScatter,
    expert_mix,
    expert_mix_reference,
    set_sparse_grad,
    value_mix,
)


def _inputs(n=40, d=6, t=9, m=5, dtype=torch.float64):
    x = torch.randn(t, d, dtype=dtype, requires_grad=True)
    idx = torch.randint(0, n, (t, m))
    gates = torch.rand(t, m, dtype=dtype, requires_grad=True)
    down = torch.randn(n, d, dtype=dtype, requires_grad=True)
    up = torch.randn(n, d, dtype=dtype, requires_grad=True)
    return x, idx, gates, down, up


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_gradcheck_float64(act: str) -> None:
    x, idx, gates, down, up = _inputs()
    # gradcheck wants strided gradients: same backward, rows scattered into a dense layout.
    fn = lambda x, g, d, u: expert_mix(x, idx, g, d, u, act, sparse_grad=False)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, gates, down, up))


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_matches_reference_forward_and_backward(act: str) -> None:
    x, idx, gates, down, up = _inputs()
    y = expert_mix(x, idx, gates, down, up, act)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, gates, down, up), gy)
    y_ref = expert_mix_reference(x, idx, gates, down, up, act)
    ref = torch.autograd.grad(y_ref, (x, gates, down, up), gy)
    torch.testing.assert_close(y, y_ref)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g.to_dense() if g.is_sparse else g, r)


@pytest.mark.parametrize("n", [1000, 20])  # more rows than slots, and fewer
def test_table_gradients_have_a_fixed_size_and_hold_exactly_the_touched_rows(n: int) -> None:
    """Sorted touched rows, then padding rows that repeat the last one with a zero value: the size,
    min(T*M, N), is known without reading the indices, and merging duplicates leaves the touched
    rows."""
    x, idx, gates, down, up = _inputs(n=n)
    expert_mix(x, idx, gates, down, up).sum().backward()
    touched = torch.unique(idx)
    r = touched.numel()
    for table in (down, up):
        grad = table.grad
        assert grad.is_sparse and grad._nnz() == min(idx.numel(), n)
        rows, values = grad._indices()[0], grad._values()
        assert torch.equal(rows[:r], touched) and (rows[r:] == touched[-1]).all()
        assert (values[r:] == 0).all() and (values[:r].abs().sum(1) > 0).all()
        assert torch.equal(grad.coalesce().indices()[0], touched)
        untouched = torch.ones(n, dtype=torch.bool)
        untouched[touched] = False
        assert (grad.to_dense()[untouched] == 0).all()


@pytest.mark.parametrize("sparse", [True, False])
def test_row_scatter_equals_a_plain_index_add(sparse: bool) -> None:
    idx = torch.randint(0, 30, (7, 5))
    w, z = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    ref = torch.zeros(30, 4, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), (w.unsqueeze(-1) * z.unsqueeze(1)).reshape(-1, 4))
    out = RowScatter(idx, 30)(w, z, torch.float64, sparse=sparse)
    assert out.is_sparse == sparse
    torch.testing.assert_close(out.to_dense() if sparse else out, ref)


def test_tables_choose_their_gradient_layout() -> None:
    """A dense optimiser marks its tables; the mixes then give dense gradients, equal to the
    sparse ones."""
    x, idx, gates, down, up = _inputs()
    grads = {}
    for sparse in (True, False):
        for table in (down, up):
            set_sparse_grad(table, sparse)
            table.grad = None
        expert_mix(x, idx, gates, down, up).square().sum().backward()
        value_mix(idx, gates, up).sum().backward()
        assert down.grad.is_sparse == up.grad.is_sparse == sparse
        grads[sparse] = (down.grad.to_dense(), up.grad.to_dense())
    for s, d in zip(grads[True], grads[False]):
        torch.testing.assert_close(s, d)


def test_bank_bfloat16_tables_run_and_return_input_dtype() -> None:
    bank = ExpertBank(64, 8, dtype=torch.bfloat16)
    x = torch.randn(4, 8)
    y = bank(x, torch.randint(0, 64, (4, 3)), torch.rand(4, 3))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


def test_any_row_range_of_a_table_is_built_alone_identically() -> None:
    from fractalmoe.experts import init_rows

    full = init_rows(7, 0, 150_000, 150_000, 4, torch.float32)
    for lo, hi in [(0, 10), (65_530, 65_540), (100_000, 150_000), (131_072, 131_073)]:
        assert torch.equal(init_rows(7, lo, hi, 150_000, 4, torch.float32), full[lo:hi])


def test_no_tokens_is_fine() -> None:
    """A shard may own no slot of a batch (e.g. one token during generation)."""
    x, idx, gates, down, up = _inputs(t=0)
    y = expert_mix(x, idx, gates, down, up)
    y.sum().backward()
    assert y.shape == (0, 6) and down.grad._nnz() == 0


def test_value_mix_matches_embedding_reference_and_gradcheck() -> None:
    _, idx, gates, _, values = _inputs()
    y = value_mix(idx, gates, values)
    gy = torch.randn_like(y)
    g_gates, g_values = torch.autograd.grad(y, (gates, values), gy)
    y_ref = torch.einsum("tm,tmd->td", gates, values[idx])
    r_gates, r_values = torch.autograd.grad(y_ref, (gates, values), gy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(g_gates, r_gates)
    assert g_values.is_sparse and torch.equal(g_values.coalesce().indices()[0], torch.unique(idx))
    torch.testing.assert_close(g_values.to_dense(), r_values)
    fn = lambda g, v: value_mix(idx, g, v, sparse_grad=False)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (gates, values))


@pytest.mark.parametrize("kind,tables", [("neuron", ("down", "up")), ("value", ("values",)),
                                         ("gated", ("values",))])
def test_bank_kinds_hold_their_tables(kind: str, tables: tuple[str, ...]) -> None:
    bank = ExpertBank(64, 8, kind=kind)
    assert tuple(bank.tables()) == tables
    assert [n for n, _ in bank.named_parameters()] == list(tables)
    torch.testing.assert_close(bank.rows(tables[-1], 3, 9), getattr(bank, tables[-1])[3:9])
