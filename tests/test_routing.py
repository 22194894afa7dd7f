"""Product-key routing: exact top-k against brute force over all N keys."""

from __future__ import annotations

import pytest
import torch

from fractalmoe import FHME, ProductKeyMemory
from fractalmoe.product_keys import (
    _select_on_host,
    key_table_sizes,
    product_key_topk,
    sorted_topk,
    split_index,
)
from fractalmoe.routing import Balancing, ProductKeyRouter
from fractalmoe.stats import BALANCE_LOSS, collect, fold_statistics


def brute_force_topk(router, x):
    """Score every one of the N = n_keys**2 full keys and take the top-k."""
    q1, q2 = router.queries(x).chunk(2, dim=-1)
    keys = router.keys()
    s1 = torch.einsum("...hq,hnq->...hn", q1, keys[:, 0])
    s2 = torch.einsum("...hq,hnq->...hn", q2, keys[:, 1])
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


def brute_force_scores(router, x):
    """Scores (..., H, N) of every full key of any number of parts, index (i_1 n_2 + i_2) n_3 + ..."""
    keys, full = router.keys(), None
    for p, (q, size) in enumerate(zip(router.queries(x).chunk(len(router.sizes), dim=-1), router.sizes)):
        part = torch.einsum("...hq,hnq->...hn", q, keys[:, p, :size])
        full = part if full is None else (full.unsqueeze(-1) + part.unsqueeze(-2)).flatten(-2)
    return full


@pytest.mark.parametrize("num_experts,heads,topk", [(512, 2, 4), (4096, 3, 40), (16384, 2, 22),
                                                    (4096, 1, 200)])
def test_three_part_keys_route_equals_brute_force(num_experts: int, heads: int, topk: int) -> None:
    """Three sub-key tables (n_1 n_2 n_3 = N, unequal where N is no cube): the exact top-k over all
    N full keys, its scores' gradients those of the same scores formed from all N, and ``rescore``
    of the chosen experts gives their scores (top-k may exceed every table's size)."""
    torch.manual_seed(num_experts + topk)
    router = ProductKeyRouter(16, num_experts, heads, topk, key_dim=12, key_parts=3).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    scores, idx = router(x)
    ref_scores, ref_idx = brute_force_scores(router, x).topk(topk, dim=-1)
    assert scores.shape == idx.shape == (3, 5, heads, topk)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    g = torch.randn_like(scores)
    params = (router.query.weight, router.sub_keys)
    grads = torch.autograd.grad(scores, params, g)
    ref_grads = torch.autograd.grad(brute_force_scores(router, x).gather(-1, idx), params, g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(router.rescore(x, idx), scores)


def test_key_table_sizes_and_mixed_radix_indices() -> None:
    assert key_table_sizes(16384, 2) == (128, 128)
    assert key_table_sizes(4096, 3) == (16, 16, 16)
    assert sorted(key_table_sizes(16384, 3)) == [16, 32, 32]
    assert key_table_sizes(262144, 3) == (64, 64, 64)
    assert key_table_sizes(1000, 3) == (10, 10, 10)
    for n, parts in ((16384, 3), (65536, 3), (1 << 20, 4)):
        sizes = key_table_sizes(n, parts)
        assert len(sizes) == parts and torch.tensor(sizes).prod().item() == n and max(sizes) <= 4 * min(sizes)
        idx = torch.arange(n)
        rebuilt = torch.zeros_like(idx)
        for i, size in zip(split_index(idx, sizes), sizes):
            assert (0 <= i).all() and (i < size).all()
            rebuilt = rebuilt * size + i
        assert torch.equal(rebuilt, idx)
    for n, parts, words in ((1009, 3, "near-equal"), (1000, 2, "perfect square")):
        with pytest.raises(ValueError, match=words):
            key_table_sizes(n, parts)
    with pytest.raises(ValueError, match="key_parts = 2"):
        ProductKeyRouter(16, 4096, 1, 8, 12, balancing=Balancing(rate=0.01), key_parts=3)


def test_product_key_topk_of_three_parts_small_exhaustive() -> None:
    s = [torch.randn(40, n, dtype=torch.float64) for n in (6, 3, 5)]
    scores, idx = product_key_topk(*s, k=20)
    full = ((s[0][:, :, None, None] + s[1][:, None, :, None]) + s[2][:, None, None, :]).flatten(-3)
    torch.testing.assert_close(scores, full.topk(20, dim=-1).values)
    torch.testing.assert_close(full.gather(-1, idx), scores)


def test_product_key_topk_small_exhaustive() -> None:
    s1, s2 = torch.randn(50, 10, dtype=torch.float64), torch.randn(50, 10, dtype=torch.float64)
    scores, idx = product_key_topk(s1, s2, k=5)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)
    ref = full.topk(5, dim=-1)
    torch.testing.assert_close(scores, ref.values)
    torch.testing.assert_close(full.gather(-1, idx), scores)


@pytest.mark.parametrize("k1,k2,k", [(16, 16, 16), (5, 16, 16), (16, 3, 16), (4, 4, 40), (1, 7, 3), (22, 22, 22)])
def test_pairs_that_can_win_are_those_with_few_better_pairs(k1: int, k2: int, k: int) -> None:
    from fractalmoe.product_keys import _pairs_that_can_win

    i, j, flat = _pairs_that_can_win(k1, k2, k, torch.device("cpu"))
    want = [(a, b) for a in range(k1) for b in range(k2) if (a + 1) * (b + 1) <= k]
    assert list(zip(i.tolist(), j.tolist())) == want
    assert flat.tolist() == [a * k2 + b for a, b in want]


@pytest.mark.parametrize("k", [1, 2, 3, 5, 16, 40])
def test_combining_only_the_pairs_that_can_win_is_the_full_grid_top_k(k: int) -> None:
    """Summing the ~k ln k pairs with (i+1)(j+1) <= k of two sorted lists gives the top k of all
    k*k sums: the same scores, the same pairs, the same gradients."""
    torch.manual_seed(k)
    n = max(2 * k, 8)
    s1 = torch.randn(30, 3, n, dtype=torch.float64, requires_grad=True)
    s2 = torch.randn(30, 3, n, dtype=torch.float64, requires_grad=True)
    scores, idx = product_key_topk(s1, s2, k=k)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # every one of the n*n pairs
    ref_scores, ref_idx = full.topk(k, dim=-1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(idx, ref_idx)
    g = torch.randn_like(scores)
    grads = torch.autograd.grad(scores, (s1, s2), g)
    ref = torch.autograd.grad(ref_scores, (s1, s2), g)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("n,k", [(128, 40), (74, 22), (512, 76), (16, 16), (1024, 16), (64, 1)])
@pytest.mark.parametrize("ties", [False, True])
def test_sorted_topk_equals_torch_topk(n: int, k: int, ties: bool) -> None:
    """The CPU top-k (numpy where k is a large share of the row: a whole-row sort up to 256 scores,
    a selection past that) gives torch.topk's values in its order and the same indices (with
    ties: indices of equal values), and its values keep their gradient."""
    torch.manual_seed(n + k)
    s = torch.randn(2, 300, n)
    if ties:
        s = s.mul(4).round()
    s.requires_grad_(True)
    assert _select_on_host(s, k) == (8 * k >= n)  # both paths are covered
    vals, idx = sorted_topk(s, k)
    ref_vals, ref_idx = s.topk(k, dim=-1)
    assert torch.equal(vals, ref_vals) and idx.dtype == ref_idx.dtype == torch.long
    assert torch.equal(s.detach().gather(-1, idx), ref_vals.detach())
    if not ties:  # (tied entries may trade places, and their gradients with them)
        assert torch.equal(idx, ref_idx)
        g = torch.randn_like(vals)
        torch.testing.assert_close(torch.autograd.grad(vals, s, g)[0], torch.autograd.grad(ref_vals, s, g)[0])


@pytest.mark.parametrize("kind", ["neuron", "value"])
@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_memory_output_equals_reference_for_each_gate(gate: str, kind: str) -> None:
    """y = sum over heads and top-k of g_j e_j(x), g = softmax over the k scores (competing) or
    sigmoid of each score (non-competing), written out with the bank's tables."""
    mem = ProductKeyMemory(16, 100, heads=2, topk=4, key_dim=8, gate=gate, kind=kind).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    scores, idx = mem.route(x)
    gates = torch.softmax(scores, -1) if gate == "softmax" else 1 / (1 + torch.exp(-scores))
    if kind == "neuron":
        a = torch.einsum("bthkd,btd->bthk", mem.bank.down[idx], x)
        experts = torch.nn.functional.gelu(a).unsqueeze(-1) * mem.bank.up[idx]
    else:
        experts = mem.bank.values[idx]
    reference = (gates.unsqueeze(-1) * experts).sum((2, 3))
    torch.testing.assert_close(mem(x), reference)


def test_value_dropout_drops_slots_in_training_only() -> None:
    """Training: each slot's gate is zeroed with probability p and the rest scaled by 1 / (1 - p)
    (the mask drawn as F.dropout draws it); evaluation reads every slot."""
    mem = ProductKeyMemory(16, 100, heads=2, topk=4, key_dim=8, kind="value", value_dropout=0.25).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    scores, idx = mem.route(x)
    gates = torch.softmax(scores, -1)
    torch.testing.assert_close(mem.eval()(x), (gates.unsqueeze(-1) * mem.bank.values[idx]).sum((2, 3)))
    torch.manual_seed(0)
    y = mem.train()(x)
    torch.manual_seed(0)
    kept = torch.nn.functional.dropout(torch.ones_like(gates), 0.25)
    assert 0 < (kept == 0).sum() < kept.numel()
    torch.testing.assert_close(y, (kept.unsqueeze(-1) * gates.unsqueeze(-1) * mem.bank.values[idx]).sum((2, 3)))


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="perfect square"):
        ProductKeyMemory(16, 1000)
    with pytest.raises(ValueError, match="gate"):
        ProductKeyMemory(16, 256, heads=1, topk=4, key_dim=8, gate="tanh")
    with pytest.raises(ValueError, match="value_dropout"):
        ProductKeyMemory(16, 256, heads=1, topk=4, key_dim=8, value_dropout=1.0)


@pytest.mark.parametrize("dense_ratio", [8, 1])
def test_sub_key_topk_gradient_equals_dense_autograd(dense_ratio: int, monkeypatch) -> None:
    """Both ways of forming the score gradient: dense products (n <= 8 k) and sorted row sums."""
    from fractalmoe import product_keys
    from fractalmoe.product_keys import sub_key_topk

    monkeypatch.setattr(product_keys, "_DENSE_SCORE_GRAD", dense_ratio)
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


@pytest.mark.parametrize("expert_bias", [False, True])
def test_balance_biases_choose_among_candidates_and_leave_scores_unbiased(expert_bias: bool) -> None:
    """Sub-key biases: exact top-k of the biased sums over all N. Expert biases re-rank the
    K*K candidate pairs of the (biased) per-half top-k lists."""
    mem = ProductKeyMemory(32, 4096, heads=2, topk=8, key_dim=16, balancing=Balancing(rate=0.1)).double()
    router = mem.router
    router.key_bias.normal_()
    if expert_bias:
        router.expert_bias.normal_()
    x = torch.randn(4, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        scores, idx = mem.route(x)
        q1, q2 = router.queries(x).chunk(2, dim=-1)
        keys = router.keys()
        s1 = torch.einsum("...hq,hnq->...hn", q1, keys[:, 0]) + router.key_bias[:, 0]
        s2 = torch.einsum("...hq,hnq->...hn", q2, keys[:, 1]) + router.key_bias[:, 1]
        biased = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2) + router.expert_bias.double()
        if expert_bias:  # only pairs of the per-half top-k lists are candidates
            allowed = torch.zeros_like(biased, dtype=torch.bool)
            i1, i2 = s1.topk(8).indices, s2.topk(8).indices
            allowed.scatter_(-1, (i1.unsqueeze(-1) * 64 + i2.unsqueeze(-2)).flatten(-2), True)
            biased = biased.masked_fill(~allowed, float("-inf"))
        ref_idx = biased.topk(8, dim=-1).indices
        plain_s1 = torch.einsum("...hq,hnq->...hn", q1, keys[:, 0])
        plain_s2 = torch.einsum("...hq,hnq->...hn", q2, keys[:, 1])
        plain = (plain_s1.unsqueeze(-1) + plain_s2.unsqueeze(-2)).flatten(-2)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    torch.testing.assert_close(scores, plain.gather(-1, idx))  # gates see unbiased scores


def _sub_key_kl(router, x: torch.Tensor) -> float:
    """Mean KL(sub-key choice frequencies || uniform) over heads and halves."""
    q1, q2 = router.queries(x).chunk(2, dim=-1)
    keys, n = router.keys(), router.n_keys
    kls = []
    for h in range(router.heads):
        for half, q in enumerate((q1, q2)):
            chosen = (q[:, h] @ keys[h, half].T + router.key_bias[h, half]).topk(router.topk).indices
            p = torch.bincount(chosen.flatten(), minlength=n).double() / chosen.numel()
            kls.append(float((p[p > 0] * (p[p > 0] * n).log()).sum()))
    return sum(kls) / len(kls)


def test_balancing_spreads_clustered_queries_over_the_sub_keys() -> None:
    torch.manual_seed(0)
    mem = ProductKeyMemory(32, 1024, heads=2, topk=4, key_dim=16, balancing=Balancing(rate=0.05)).train()
    centers = torch.randn(4, 32) * 3
    x = centers[torch.randint(0, 4, (2048,))] + 0.5 * torch.randn(2048, 32)  # 4 tight clusters
    with torch.no_grad():
        before = _sub_key_kl(mem.router, x)
        for _ in range(100):
            with collect(mem) as stats:
                mem.route(x)
            fold_statistics(mem, stats)
        after = _sub_key_kl(mem.router, x)
    assert after < 0.5 * before, (before, after)


def test_expert_bias_fold_is_the_dense_rule_up_to_a_constant_per_head() -> None:
    """b_e -= rate * load_e / mean load, written at the chosen rows only, differs from the
    dense rule rate * (1 - load / mean) by a constant per head: the same top-k everywhere."""
    rate, n, heads = 0.1, 16, 2
    mem = ProductKeyMemory(32, n * n, heads=heads, topk=4, key_dim=16, balancing=Balancing(rate=rate)).train()
    x = torch.randn(3, 50, 32)
    with torch.no_grad(), collect(mem) as stats:
        _, idx = mem.route(x)
    before = mem.router.expert_bias.clone()
    fold_statistics(mem, stats)
    load = torch.stack([torch.bincount(idx[..., h, :].flatten(), minlength=n * n) for h in range(heads)]).float()
    dense = before + rate * (1 - load / load.mean(-1, keepdim=True))
    shift = mem.router.expert_bias - dense
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift))
    assert torch.equal(mem.router.expert_bias[load == 0], before[load == 0])  # untouched rows
    with pytest.raises(RuntimeError, match="folded already"):
        fold_statistics(mem, stats)


def test_whitening_gives_identity_covariance_from_past_batches_only() -> None:
    from fractalmoe.query_norm import RunningQueryWhitening

    torch.manual_seed(0)
    norm = RunningQueryWhitening(heads=2, width=6).train()
    mix = torch.eye(6) + 0.5 * torch.randn(2, 6, 6)  # correlated, well-conditioned
    q = torch.einsum("thj,hij->thi", torch.randn(20000, 2, 6), mix) + 3.0
    with collect(norm) as stats:
        first = norm(q)
    torch.testing.assert_close(first, q)  # nothing folded yet: identity transform
    fold_statistics(norm, stats)
    with torch.no_grad():
        out = norm.eval()(q)
    centered = out.reshape(-1, 2, 6)
    cov = torch.einsum("thi,thj->hij", centered, centered) / centered.shape[0]
    torch.testing.assert_close(centered.mean(0), torch.zeros(2, 6), atol=1e-3, rtol=0)
    torch.testing.assert_close(cov, torch.eye(6).expand(2, 6, 6), atol=2e-3, rtol=0)


def _expert_kl(idx: torch.Tensor, n: int) -> float:
    p = torch.bincount(idx.flatten(), minlength=n).double() / idx.numel()
    return float((p[p > 0] * (p[p > 0] * n).log()).sum())


def test_balance_loss_is_the_switch_loss_over_candidates_and_teaches_spreading() -> None:
    torch.manual_seed(0)
    mem = ProductKeyMemory(32, 1024, heads=2, topk=4, key_dim=16, balancing=Balancing(loss=1.0)).train()
    router = mem.router
    with torch.no_grad():  # rich-get-richer start: a few long sub-keys win most queries
        router.sub_keys.mul_(torch.exp(1.5 * torch.randn(2, 2, 32, 1)))
    x = torch.randn(2048, 32)
    with collect(mem) as stats:
        _, idx = mem.route(x)
    assert len(stats.values(router, BALANCE_LOSS)) == 1  # one call, one loss
    loss = stats.aux_loss()
    with torch.no_grad():  # reference: N * sum_e f_e * P_e, P_e summed over each token's candidates
        q1, q2 = router.queries(x).chunk(2, dim=-1)
        s1 = torch.einsum("thq,hnq->thn", q1, router.keys()[:, 0])
        s2 = torch.einsum("thq,hnq->thn", q2, router.keys()[:, 1])
        ref = 0.0
        for h in range(2):
            v1, i1 = s1[:, h].topk(4)
            v2, i2 = s2[:, h].topk(4)
            probs = torch.softmax((v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2), -1)
            pairs = (i1.unsqueeze(-1) * 32 + i2.unsqueeze(-2)).flatten(-2)
            f = torch.bincount(idx[:, h].flatten(), minlength=1024).double() / idx[:, h].numel()
            big_p = torch.zeros(1024, dtype=torch.float64).index_add_(0, pairs.flatten(), probs.flatten().double())
            ref += 1024 * float((f * big_p / 2048).sum()) / 2
    assert abs(float(loss.detach()) - ref) < 1e-4 * ref
    opt = torch.optim.Adam(router.parameters(), lr=0.02)
    before = _expert_kl(idx, 1024)
    for _ in range(100):
        with collect(mem) as stats:
            _, idx = mem.route(x)
        opt.zero_grad()
        stats.aux_loss().backward()
        opt.step()
    assert _expert_kl(idx, 1024) < 0.7 * before


def test_a_call_with_no_tokens_adds_no_balance_loss() -> None:
    """A sharded bank's stage that no token of this rank reached still calls the router."""
    mem = ProductKeyMemory(32, 1024, heads=2, topk=4, key_dim=16, balancing=Balancing(loss=1.0)).train()
    with collect(mem) as stats:
        mem.route(torch.randn(0, 32))
        mem.route(torch.randn(8, 32))
    assert len(stats.values(mem.router, BALANCE_LOSS)) == 1
    assert torch.isfinite(stats.aux_loss())


def test_balance_scale_multiplies_each_layers_balance_loss() -> None:
    """The schedule's factor scales the routers' balance losses (in an FHME layer, averaged over
    its blocks) and nothing else."""
    torch.manual_seed(0)
    layer = FHME(32, 1024, depth=2, heads=2, topk=4, key_dim=16, balancing=Balancing(loss=0.1)).train()
    x = torch.randn(4, 16, 32)
    losses = []
    for scale in (1.0, 0.25, 0.0):
        with collect(layer, balance_scale=scale) as stats:
            layer(x)
        losses.append(stats.aux_loss())
    assert float(losses[0].detach()) > 0
    torch.testing.assert_close(losses[1], 0.25 * losses[0])
    assert float(losses[2].detach()) == 0.0


def test_router_only_balance_loss_trains_the_router_alone() -> None:
    """The same loss value and router gradients as the plain balance loss, and none into x."""
    grads = {}
    for router_only in (False, True):
        torch.manual_seed(0)
        mem = ProductKeyMemory(32, 1024, heads=2, topk=4, key_dim=16,
                               balancing=Balancing(loss=1.0, router_only=router_only)).train()
        x = torch.randn(256, 32, requires_grad=True)
        with collect(mem) as stats:
            mem.route(x)
        loss = stats.aux_loss()
        loss.backward()
        grads[router_only] = (loss.detach(), x.grad, mem.router.query.weight.grad, mem.router.sub_keys.grad)
    (loss, x_grad, w_grad, k_grad), (loss_r, x_grad_r, w_grad_r, k_grad_r) = grads[False], grads[True]
    torch.testing.assert_close(loss_r, loss)
    assert x_grad.abs().sum() > 0 and (x_grad_r is None or not x_grad_r.any())
    torch.testing.assert_close(w_grad_r, w_grad)
    torch.testing.assert_close(k_grad_r, k_grad)


@pytest.mark.parametrize("size", [64, 1 << 20])  # a table of counts / binary searches
def test_share_of_choices_at_candidates_equals_brute_force(size: int) -> None:
    from fractalmoe.routing import _share_at

    chosen = torch.randint(0, min(size, 200), (50, 3, 4))
    at = torch.randint(0, min(size, 200), (50, 3, 16))
    expected = torch.stack([(chosen[:, h].reshape(-1, 1) == at[:, h].reshape(1, -1)).sum(0).view(50, 16)
                            for h in range(3)], dim=1).float() / (50 * 4)
    torch.testing.assert_close(_share_at(chosen, at, size), expected)


def _steer(router: ProductKeyRouter, x: torch.Tensor, steps: int) -> list[float]:
    """The router's balance weight after each of ``steps`` folds of its choices on x."""
    weights = []
    for _ in range(steps):
        with collect(router) as stats:
            router(x)
        fold_statistics(router, stats)
        weights.append(float(router.balance_weight))
    return weights


def test_steered_balance_weight_follows_the_usage_of_the_last_choices(monkeypatch) -> None:
    """usage <- usage * (1 - c / W) + counts; once it holds W / 2 choices, weight *=
    (KL(usage || uniform) / target) ** rate: up while the choices crowd, down once they spread."""
    from fractalmoe import routing

    monkeypatch.setattr(routing, "USAGE_WINDOW", 4096)
    torch.manual_seed(0)
    router = ProductKeyRouter(32, 1024, heads=2, topk=4, key_dim=16,
                              balancing=Balancing(loss=0.01, target_kl=0.5, steer_rate=0.2)).train()
    x = torch.randn(256, 32)  # 2,048 choices a step: the window is half full after the first
    with collect(router) as stats:
        _, idx = router(x)
    fold_statistics(router, stats)
    counts = torch.bincount(idx.flatten(), minlength=1024).float()
    torch.testing.assert_close(router.usage_ema, counts)
    share = counts / counts.sum()
    kl = float((share[share > 0] * (share[share > 0] * 1024).log()).sum())
    assert kl > 0.5  # 2,048 choices of 1,024 experts leave many unchosen
    assert float(router.balance_weight) == pytest.approx(0.01 * (kl / 0.5) ** 0.2, rel=1e-5)
    ema = router.usage_ema.clone()
    with collect(router) as stats:
        _, idx = router(x)
    fold_statistics(router, stats)
    torch.testing.assert_close(router.usage_ema, ema * 0.5 + torch.bincount(idx.flatten(), minlength=1024).float())
    # the loss is formed with the steered weight
    with collect(router) as stats:
        router(x)
    weight = float(router.balance_weight)
    router.balancing = Balancing(loss=weight)  # the same loss at a fixed weight
    with collect(router) as fixed:
        router(x)
    torch.testing.assert_close(stats.aux_loss(), fixed.aux_loss())


def test_steered_weight_waits_for_the_window_and_falls_when_usage_is_even(monkeypatch) -> None:
    from fractalmoe import routing

    monkeypatch.setattr(routing, "USAGE_WINDOW", 1 << 20)
    torch.manual_seed(0)
    router = ProductKeyRouter(32, 64, heads=1, topk=2, key_dim=8,
                              balancing=Balancing(loss=0.01, target_kl=0.5)).train()
    assert _steer(router, torch.randn(64, 32), 3) == pytest.approx([0.01] * 3)  # 384 of 2**20
    monkeypatch.setattr(routing, "USAGE_WINDOW", 512)
    router.usage_ema.fill_(100.0)  # even usage: KL 0 < target
    with collect(router) as stats:
        router(torch.randn(64, 32))
    fold_statistics(router, stats)
    assert float(router.balance_weight) < 0.01
    # nothing recorded: nothing folded. From mid-range, where a fold of empty counts (usage still
    # even: KL 0 < target) would lower the weight, not from the floor that the clamp holds it at.
    assert routing.WEIGHT_RANGE[0] < 0.01 < routing.WEIGHT_RANGE[1]
    router.balance_weight.fill_(0.01)
    ema = router.usage_ema.clone()
    fold_statistics(router, stats.__class__(router))
    assert float(router.balance_weight) == pytest.approx(0.01, rel=1e-6)
    assert torch.equal(router.usage_ema, ema)


def test_a_usage_target_needs_a_starting_weight() -> None:
    from fractalmoe.config import tiny_model_config

    with pytest.raises(ValueError, match="needs loss > 0"):
        ProductKeyRouter(32, 64, heads=1, topk=2, key_dim=8, balancing=Balancing(target_kl=0.5))
    with pytest.raises(ValueError, match="balance_target_kl"):
        tiny_model_config(balance_target_kl=0.5)
    with pytest.raises(ValueError, match="balance_target_kl"):
        tiny_model_config(balance_target_kl=-1.0, balance_loss=0.01)
    assert tiny_model_config(balance_target_kl=0.5, balance_loss=0.01).balance_target_kl == 0.5
    with pytest.raises(ValueError, match="balance_steer_rate"):
        tiny_model_config(balance_target_kl=0.5, balance_loss=0.01, balance_steer_rate=0.0)
