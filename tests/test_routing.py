"""Product-key routing: exact top-k against brute force over all N keys."""

from __future__ import annotations

import pytest
import torch

from fractalmoe import ProductKeyMemory
from fractalmoe.routing import product_key_topk


def brute_force_topk(router, x):
    """Score every one of the N = n_keys**2 full keys and take the top-k."""
    q = router.norm(router.query(x).unflatten(-1, (router.heads, router.key_dim)))
    q1, q2 = q.chunk(2, dim=-1)
    s1 = torch.einsum("...hq,hnq->...hn", q1, router.sub_keys[:, 0])
    s2 = torch.einsum("...hq,hnq->...hn", q2, router.sub_keys[:, 1])
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (..., H, N), index i * n + j
    return full.topk(router.topk, dim=-1)


@pytest.mark.parametrize("num_experts,heads,topk", [(256, 1, 4), (4096, 4, 16), (65536, 3, 8)])
def test_route_equals_brute_force(num_experts: int, heads: int, topk: int) -> None:
    mem = ProductKeyMemory(32, num_experts, heads=heads, topk=topk, key_dim=16).double()
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    with torch.no_grad():
        scores, idx = mem.route(x)
        ref_scores, ref_idx = brute_force_topk(mem.router, x)
    assert scores.shape == idx.shape == (3, 7, heads, topk)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    assert (idx >= 0).all() and (idx < num_experts).all()
    assert (scores[..., :-1] >= scores[..., 1:]).all()  # sorted descending


def test_product_key_topk_small_exhaustive() -> None:
    s1, s2 = torch.randn(50, 10, dtype=torch.float64), torch.randn(50, 10, dtype=torch.float64)
    scores, idx = product_key_topk(s1, s2, 5)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)
    ref = full.topk(5, dim=-1)
    torch.testing.assert_close(scores, ref.values)
    torch.testing.assert_close(full.gather(-1, idx), scores)


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_memory_forward_shape_and_gates(gate: str) -> None:
    mem = ProductKeyMemory(16, 100, heads=2, topk=4, key_dim=8, gate=gate)
    x = torch.randn(2, 5, 16)
    y = mem(x)
    assert y.shape == x.shape
    scores, _ = mem.route(x)
    gates = torch.softmax(scores, -1) if gate == "softmax" else torch.sigmoid(scores)
    if gate == "softmax":
        torch.testing.assert_close(gates.sum(-1), torch.ones(2, 5, 2))


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="perfect square"):
        ProductKeyMemory(16, 1000)
    with pytest.raises(ValueError, match="gate"):
        ProductKeyMemory(16, 256, heads=1, topk=4, key_dim=8, gate="tanh")


def test_sub_key_topk_gradient_equals_dense_autograd() -> None:
    from fractalmoe.routing import sub_key_topk

    q = torch.randn(6, 3, 8, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(3, 20, 8, dtype=torch.float64, requires_grad=True)
    vals, idx = sub_key_topk(q, keys, 4)
    g = torch.randn_like(vals)
    grads = torch.autograd.grad(vals, (q, keys), g)
    ref_vals, ref_idx = torch.einsum("thq,hnq->thn", q, keys).topk(4, dim=-1)
    ref = torch.autograd.grad(ref_vals, (q, keys), g)
    assert torch.equal(idx, ref_idx)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda q, k: sub_key_topk(q, k, 4)[0], (q, keys))
