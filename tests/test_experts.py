"""Fused gather-mix: equals the autograd reference, float64 gradcheck, row-sparse gradients."""

from __future__ import annotations

import pytest
import torch

from fractalmoe.experts import ExpertBank, expert_mix, expert_mix_reference, value_mix


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


def test_table_gradients_are_sparse_and_only_touched_rows() -> None:
    x, idx, gates, down, up = _inputs(n=1000)
    expert_mix(x, idx, gates, down, up).sum().backward()
    touched = torch.unique(idx)
    for table in (down, up):
        assert table.grad.is_sparse
        assert table.grad._nnz() == touched.numel()  # one row per touched expert, no duplicates
        assert torch.equal(table.grad.coalesce().indices()[0], touched)
        dense = table.grad.to_dense()
        untouched = torch.ones(1000, dtype=torch.bool)
        untouched[touched] = False
        assert (dense[untouched] == 0).all()


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
    assert g_values.is_sparse and g_values._nnz() == torch.unique(idx).numel()
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
