"""Fused gather-mix: equals the autograd reference, float64 gradcheck, row-sparse gradients."""

from __future__ import annotations

import pytest
import torch

from fractalmoe.experts import (
    DeferredRowGrad,
    ExpertBank,
    RowScatter,
    deferred_grad,
    expert_mix,
    expert_mix_reference,
    set_grad_layout,
    sort_rows,
    value_mix,
)


@pytest.mark.parametrize("num_rows", [50, 2**31 + 7])
def test_sort_rows_is_a_stable_sort(num_rows: int) -> None:
    """Equal rows keep their slot order, whatever the key width (int32 keys below 2**31 rows)."""
    idx = torch.randint(0, 50, (5000,)) * (num_rows // 50)
    rows, order = sort_rows(idx, num_rows)
    assert rows.dtype == idx.dtype and torch.equal(rows, idx[order])
    runs = rows[1:] == rows[:-1]
    assert torch.all(rows[1:] >= rows[:-1]) and torch.all(order[1:][runs] > order[:-1][runs])


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
    fn = lambda x, g, d, u: expert_mix(x, idx, g, d, u, act, layout="dense")  # noqa: E731
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
    """A dense optimiser marks its tables dense, a deferring one deferred; the mixes then give
    dense gradients, or none and the ingredients whose summed rows are the sparse gradient's."""
    x, idx, gates, down, up = _inputs()
    grads = {}
    for layout in ("sparse", "dense", "deferred"):
        for table in (down, up):
            set_grad_layout(table, layout)
            table.grad = None
        expert_mix(x, idx, gates, down, up).square().sum().backward()
        value_mix(idx, gates, up).sum().backward()  # up is read twice: two deferred parts
        if layout == "deferred":
            assert down.grad is None and up.grad is None and len(deferred_grad(up).parts) == 2
            grads[layout] = tuple(_chunks_to_dense(deferred_grad(t), t.shape) for t in (down, up))
        else:
            assert down.grad.is_sparse == up.grad.is_sparse == (layout == "sparse")
            grads[layout] = (down.grad.to_dense(), up.grad.to_dense())
    for layout in ("dense", "deferred"):
        for s, d in zip(grads["sparse"], grads[layout]):
            torch.testing.assert_close(s.float(), d.float())


def _chunks_to_dense(grad: DeferredRowGrad, shape: torch.Size) -> torch.Tensor:
    """A deferred gradient as a dense table; every touched row must be real exactly once and
    every entry that is not real zero."""
    out, seen = torch.zeros(shape), []
    for rows, g, real in grad.chunks():
        assert (g[~real] == 0).all()
        out.index_add_(0, rows[real], g[real])
        seen.append(rows[real])
    seen_rows = torch.cat(seen)
    assert seen_rows.unique().numel() == seen_rows.numel()
    return out


@pytest.mark.parametrize("merged", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_deferred_chunks_sum_each_row_once_across_chunk_cuts(chunk: int, merged: bool,
                                                              monkeypatch) -> None:
    """Rows read by many slots (a run longer than several chunks) come out whole, once, whether
    summed into one buffer or carried across chunk cuts; two mixes over one table are one
    gradient."""
    import fractalmoe.experts as experts

    monkeypatch.setattr(experts, "chunk_slots", lambda dim, device, *_: chunk)
    monkeypatch.setattr(experts, "_MERGED_BYTES", 1 << 30 if merged else 0)
    torch.manual_seed(0)
    values = torch.randn(12, 4, requires_grad=True)
    set_grad_layout(values, "deferred")
    idx_a, idx_b = torch.randint(0, 3, (9, 5)), torch.randint(2, 12, (4, 2))  # rows 0-2: long runs
    ga, gb = torch.rand(9, 5), torch.rand(4, 2)
    (value_mix(idx_a, ga, values).square().sum() + value_mix(idx_b, gb, values).sum()).backward()
    ref = torch.zeros(12, 4)
    for idx, gates, gy in ((idx_a, ga, 2 * value_mix(idx_a, ga, values.detach())),
                           (idx_b, gb, torch.ones(4, 4))):
        ref.index_add_(0, idx.reshape(-1), (gates.unsqueeze(-1) * gy.unsqueeze(1)).reshape(-1, 4))
    torch.testing.assert_close(_chunks_to_dense(deferred_grad(values), values.shape), ref)


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


def test_tables_follow_a_device_block_like_every_other_parameter() -> None:
    """``with torch.device("meta")`` (how large models are built before sharding) allocates no
    table; the rows it would have held are still the seed's."""
    from fractalmoe.config import tiny_model_config
    from fractalmoe.model import FHMELanguageModel

    with torch.device("meta"):
        model = FHMELanguageModel(tiny_model_config(ffn="fhme"))
    assert all(p.is_meta for p in model.parameters())
    torch.manual_seed(3)
    real = ExpertBank(300, 8, kind="value")
    torch.manual_seed(3)
    with torch.device("meta"):
        meta = ExpertBank(300, 8, kind="value")
    assert meta.values.is_meta and torch.equal(meta.rows("values", 5, 30), real.values.detach()[5:30])


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
    fn = lambda g, v: value_mix(idx, g, v, layout="dense")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (gates, values))


@pytest.mark.parametrize("kind,tables", [("neuron", ("down", "up")), ("value", ("values",)),
                                         ("gated", ("values",))])
def test_bank_kinds_hold_their_tables(kind: str, tables: tuple[str, ...]) -> None:
    bank = ExpertBank(64, 8, kind=kind)
    assert tuple(bank.tables()) == tables
    assert [n for n, _ in bank.named_parameters()] == list(tables)
    torch.testing.assert_close(bank.rows(tables[-1], 3, 9), getattr(bank, tables[-1])[3:9])


def test_threads_serving_one_layer_get_the_same_outputs_as_one_thread() -> None:
    """The gathers' reused buffers are per thread: concurrent forwards must not share them."""
    import threading

    from fractalmoe.fhme import FHME

    torch.manual_seed(0)
    layer = FHME(64, 4096, depth=2, heads=2, topk=8, key_dim=16).eval()
    xs = [torch.randn(1, 512, 64) for _ in range(4)]
    with torch.no_grad():
        want = [layer(x) for x in xs]
    wrong = []

    def serve(i: int) -> None:
        with torch.no_grad():
            wrong.extend(i for _ in range(20) if not torch.equal(layer(xs[i]), want[i]))

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
