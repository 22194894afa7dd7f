"""Fractal expert and FHME layer: recursion, anytime outputs, gradients, drop-path."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fractalmoe import FHME, FractalExpert
from fractalmoe.fractal import blocks_at_depth
from fractalmoe.stats import collect


def reference_f(fe: FractalExpert, c: int, x: torch.Tensor) -> torch.Tensor:
    """f_1 = B_1; f_c(x) = J_c(f_{c-1}(f_{c-1}(x)), B_c(x)), evaluated literally."""
    if c == 1:
        return fe.blocks[0](x, fe.bank)[0]
    deep = reference_f(fe, c - 1, reference_f(fe, c - 1, x))
    shallow = fe.blocks[c - 1](x, fe.bank)[0]
    g = torch.sigmoid(fe.joins[c - 2].gate(x))
    return g * deep + (1 - g) * shallow


def reference_untied(fe: FractalExpert, c: int, x: torch.Tensor, blocks: Iterator[torch.nn.Module],
                     joins: Iterator[torch.nn.Module]) -> torch.Tensor:
    """The same recursion, every application taking the next fresh block or join in order."""
    if c == 1:
        return next(blocks)(x, fe.bank)[0]
    deep = reference_untied(fe, c - 1, reference_untied(fe, c - 1, x, blocks, joins), blocks, joins)
    shallow = next(blocks)(x, fe.bank)[0]
    g = torch.sigmoid(next(joins).gate(x))
    return g * deep + (1 - g) * shallow


def reference_route_once(fe: FractalExpert, c: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The recursion with every application of column k reading the experts B_k chose for the
    layer input x0, weighted by a softmax of its own query's scores at them (brute force)."""
    def block(k: int, v: torch.Tensor) -> torch.Tensor:
        memory = fe.blocks[k - 1].memory
        idx = memory.route(fe.blocks[k - 1].norm(x0))[1]  # (T, H, K)
        q = memory.router.queries(fe.blocks[k - 1].norm(v))  # (T, H, Q)
        keys = memory.router.sub_keys  # (H, 2, n, Q/2)
        full = torch.cat([keys[:, 0].unsqueeze(2).expand(-1, -1, keys.shape[2], -1),
                          keys[:, 1].unsqueeze(1).expand(-1, keys.shape[2], -1, -1)], -1).flatten(1, 2)
        scores = torch.einsum("thq,thkq->thk", q, full[torch.arange(2).view(1, 2, 1), idx])
        gates = torch.softmax(scores, -1)
        return v + torch.einsum("thk,thkd->td", gates, fe.bank.values[idx])

    if c == 1:
        return block(1, x)
    deep = reference_route_once(fe, c - 1, reference_route_once(fe, c - 1, x, x0), x0)
    g = torch.sigmoid(fe.joins[c - 2].gate(x))
    return g * deep + (1 - g) * block(c, x)


def reference_retrieved(fe: FractalExpert, c: int, v: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The literal recursion on v, every block applied off the layer input x0 querying with v - x0."""
    def block(k: int, u: torch.Tensor) -> torch.Tensor:
        b = fe.blocks[k - 1]
        return u + b.memory(b.norm(u if u is x0 else u - x0), fe.bank)

    if c == 1:
        return block(1, v)
    deep = reference_retrieved(fe, c - 1, reference_retrieved(fe, c - 1, v, x0), x0)
    g = torch.sigmoid(fe.joins[c - 2].gate(v))
    return g * deep + (1 - g) * block(c, v)


def _fractal(depth: int, tied: bool = True, deep_query: str = "input") -> FractalExpert:
    fe = FractalExpert(16, 256, depth=depth, heads=2, topk=4, key_dim=8, tied=tied,
                       deep_query=deep_query).double().eval()
    for j in fe.joins:  # non-trivial gates, so both branches matter
        torch.nn.init.normal_(j.gate.weight, std=0.5)
    return fe


def test_all_depths_equal_reference_recursion() -> None:
    fe = _fractal(4)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        outs = fe(x, return_all_depths=True)
        assert len(outs) == 4
        for c, out in enumerate(outs, start=1):
            torch.testing.assert_close(out, reference_f(fe, c, x.reshape(-1, 16)).view_as(x))
        torch.testing.assert_close(fe(x), outs[-1])


def test_retrieved_queries_read_what_the_path_added_to_the_layer_input() -> None:
    fe = _fractal(3, deep_query="retrieved")
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        outs = fe(x, return_all_depths=True)
        x0 = x.reshape(-1, 16)
        for c, out in enumerate(outs, start=1):
            torch.testing.assert_close(out, reference_retrieved(fe, c, x0, x0).view_as(x))
        torch.testing.assert_close(outs[0], reference_f(fe, 1, x0).view_as(x))  # f_1 reads x itself
        assert not torch.allclose(outs[1], reference_f(fe, 2, x0).view_as(x))


def test_untied_recursion_uses_each_application_once() -> None:
    fe = _fractal(3, tied=False)
    assert len(fe.blocks) == 7 and len(fe.joins) == 3
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        outs = fe(x, return_all_depths=True)
        for c, out in enumerate(outs, start=1):
            ref = reference_untied(fe, c, x.reshape(-1, 16), iter(fe.blocks), iter(fe.joins))
            torch.testing.assert_close(out, ref.view_as(x))
    fe.train()
    fe(x).sum().backward()
    assert all(b.memory.router.query.weight.grad.abs().sum() > 0 for b in fe.blocks)
    assert all(j.gate.weight.grad.abs().sum() > 0 for j in fe.joins)


def test_route_once_reads_each_columns_experts_for_the_layer_input() -> None:
    fe = FractalExpert(16, 256, depth=3, heads=2, topk=4, key_dim=8, kind="value", route_once=True).double().eval()
    for j in fe.joins:
        torch.nn.init.normal_(j.gate.weight, std=0.5)
    x = torch.randn(10, 16, dtype=torch.float64)
    choices = []
    for b in fe.blocks:
        b.memory.router.register_forward_hook(lambda m, inp, out: choices.append(1))
    with torch.no_grad():
        outs = fe(x, return_all_depths=True)
    assert len(choices) == 3  # one choice per column, not one per application (7)
    for c, out in enumerate(outs, start=1):
        torch.testing.assert_close(out, reference_route_once(fe, c, x, x))
    with torch.no_grad():  # the second application of B_1 is not B_1 routed afresh
        assert not torch.allclose(outs[1], reference_f(fe, 2, x))


def test_route_once_trains_queries_and_keys_through_the_re_weighted_applications() -> None:
    fe = FractalExpert(16, 256, depth=2, heads=2, topk=4, key_dim=8, kind="value", route_once=True)
    x = torch.randn(10, 16)
    fe(x).square().sum().backward()
    router = fe.blocks[0].memory.router
    assert router.query.weight.grad.abs().sum() > 0 and router.sub_keys.grad.abs().sum() > 0


def test_shifted_repeat_rows_read_the_chosen_experts_rows_moved_by_k_n_over_n() -> None:
    """C = 3 routed once: column 1's four applications read its experts' rows + 0, N/4, N/2,
    3N/4; column 2's two + 0, N/2; column 3's one as chosen."""
    fe = FractalExpert(16, 256, depth=3, heads=2, topk=4, key_dim=8, kind="value", route_once=True,
                       repeat_rows="shifted").eval()
    read: list[torch.Tensor] = []
    fe.bank.register_forward_hook(lambda m, inp, out: read.append(inp[1].clone()))
    with torch.no_grad():
        fe(torch.randn(10, 16))
    # calls: stage 1 B_1(x); stage 2 B_2(x), then B_1 on the path; stage 3 B_3(x), then the
    # deep path's B_1, B_2, B_1 in the order the recursion reaches them
    applications = dict(zip([0, 2, 1, 6, 3, 5, 4], read))
    chosen = {0: applications[0], 1: applications[2], 2: applications[6]}  # each column's first: + 0
    for a, (block, k, n) in enumerate([(0, 0, 4), (0, 1, 4), (1, 0, 2), (0, 2, 4), (0, 3, 4), (1, 1, 2),
                                       (2, 0, 1)]):
        assert torch.equal(applications[a], (chosen[block] + k * 256 // n) % 256), a


def test_shifted_repeat_rows_need_tied_blocks() -> None:
    with pytest.raises(ValueError, match="repeat_rows"):
        FractalExpert(16, 256, depth=2, heads=2, topk=4, key_dim=8, tied=False, repeat_rows="shifted")


def test_route_once_needs_tied_blocks() -> None:
    with pytest.raises(ValueError, match="route_once"):
        FractalExpert(16, 256, depth=2, heads=2, topk=4, key_dim=8, tied=False, route_once=True)


def test_single_pass_costs_2c_minus_1_blocks() -> None:
    fe = _fractal(3)
    calls = []
    for b in fe.blocks:
        b.register_forward_hook(lambda *a: calls.append(1))
    fe(torch.randn(4, 16, dtype=torch.float64), return_all_depths=True)
    assert len(calls) == blocks_at_depth(3) == 7


def test_depth_one_is_flat_peer() -> None:
    layer = FHME(16, 256, depth=1, heads=2, topk=4, key_dim=8)
    x = torch.randn(2, 6, 16)
    block = layer.fractal.blocks[0]
    torch.testing.assert_close(layer(x), block.memory(block.norm(x), layer.fractal.bank))


def test_join_gate_starts_toward_shallow_path() -> None:
    layer = FHME(16, 256, depth=2, heads=2, topk=4, key_dim=8, join_bias=-2.0)
    with collect(layer) as stats:
        layer(torch.randn(10, 16))
    metrics = layer.mixing_metrics(stats)
    assert metrics["join_gate_means"][0] < 0.2
    assert metrics["depth_hist"] == [0.0, 1.0] and metrics["blocks_per_token"] == 3


def test_gradients_reach_keys_queries_touched_rows_and_joins() -> None:
    layer = FHME(16, 1024, depth=2, heads=2, topk=4, key_dim=8)
    x = torch.randn(2, 5, 16)
    touched = []
    for b in layer.fractal.blocks:
        b.register_forward_hook(lambda m, inp, out: touched.append(out[1]))
    layer(x).square().sum().backward()
    touched_rows = torch.unique(torch.cat([t.reshape(-1) for t in touched]))
    for b in layer.fractal.blocks:
        assert b.memory.router.sub_keys.grad.abs().sum() > 0
        assert b.memory.router.query.weight.grad.abs().sum() > 0
    assert layer.fractal.joins[0].gate.bias.grad.abs() > 0
    for table in (layer.fractal.bank.down, layer.fractal.bank.up):
        rows = table.grad.coalesce().indices()[0]
        assert torch.equal(rows, touched_rows)  # the touched rows, and only those
        assert (table.grad.coalesce().values().abs().sum(-1) > 0).all()


def _column_alone(fe: FractalExpert, k: int, c: int, x: torch.Tensor) -> torch.Tensor:
    """Column k of f_c alone: B_k at level k, each level above it applied twice (its deep path)."""
    if c == k:
        return fe.blocks[k - 1](x, fe.bank)[0]
    return _column_alone(fe, k, c - 1, _column_alone(fe, k, c - 1, x))


def test_global_drop_path_trains_each_token_on_its_column_alone(monkeypatch) -> None:
    fe = FractalExpert(16, 256, depth=3, heads=2, topk=4, key_dim=8, drop_path_global=1.0).double().train()
    for j in fe.joins:  # gates away from 0.5, so a wrong mix of branches would show
        torch.nn.init.normal_(j.gate.weight, std=0.5)
    x = torch.randn(12, 16, dtype=torch.float64)
    columns = torch.tensor([1, 2, 3] * 4)
    monkeypatch.setattr(fe, "sample_columns", lambda n, device: columns)
    with torch.no_grad():
        out = fe(x)
        for k in (1, 2, 3):
            rows = columns == k
            torch.testing.assert_close(out[rows], _column_alone(fe, k, 3, x[rows]))
        assert not torch.allclose(out, fe.eval()(x))  # eval mixes every column


def test_global_drop_path_column_c_is_shallow_branch_alone() -> None:
    fe = FractalExpert(16, 256, depth=2, heads=2, topk=4, key_dim=8, drop_path_global=1.0).train()
    x = torch.randn(6, 16)
    column = torch.tensor([2] * 6)
    with torch.no_grad():
        b1, b2 = (lambda v: fe.blocks[0](v, fe.bank)[0]), (lambda v: fe.blocks[1](v, fe.bank)[0])
        out = fe.stage(2, x, b1(x), column)
        torch.testing.assert_close(out, b2(x))
        column = torch.tensor([1] * 6)
        out = fe.stage(2, x, b1(x), column)
        torch.testing.assert_close(out, b1(b1(x)))


@pytest.mark.parametrize("bias", [40.0, -40.0])
def test_drop_path_with_a_saturated_join_keeps_the_branch_it_keeps(bias: float) -> None:
    """With g = 1 (or 0) exactly, the branch left by drop-path is returned as is, not 0 / 0."""
    fe = FractalExpert(16, 256, depth=2, heads=2, topk=4, key_dim=8, join_bias=bias,
                       drop_path_local=0.5).train()
    x = torch.randn(64, 16, requires_grad=True)
    out = fe(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    with torch.no_grad():
        b1, b2 = (lambda v: fe.blocks[0](v, fe.bank)[0]), (lambda v: fe.blocks[1](v, fe.bank)[0])
        deep, shallow = b1(b1(x)), b2(x)
    alone = [torch.allclose(o, d) or torch.allclose(o, s) for o, d, s in zip(out, deep, shallow)]
    assert all(alone)  # a saturated gate leaves one branch, kept or dropped
