"""Language model: causality for every FFN, KV-cache generation, FLOP accounting, bad input."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from fractalmoe import FHMELanguageModel, ModelConfig
from fractalmoe.baselines import DenseFFN, MoEFFN, pack_blocks
from fractalmoe.config import tiny_model_config
from fractalmoe.conv import CausalConv
from fractalmoe.evaluate import evaluate
from fractalmoe.fhme import FHME
from fractalmoe.model import sample_next
from fractalmoe.stats import collect

FFNS = ["fhme", "dense", "moe", "pkm", "peer", "memplus"]


def _variants():
    for ffn in FFNS:
        yield ffn, {}
    yield "fhme-adaptive", dict(ffn="fhme", adaptive_depth=True, fractal_depth=3, depth_penalty=0.01)
    yield "fhme-running-norm", dict(ffn="fhme", query_norm="running")
    yield "fhme-balanced", dict(ffn="fhme", query_norm="whiten", unit_keys=True, balance_rate=0.1,
                                balance_loss=0.01)
    yield "pkm-balanced", dict(ffn="pkm", balance_rate=0.1, balance_loss=0.01)
    yield "fhme-value", dict(ffn="fhme", block="value")
    yield "fhme-gated", dict(ffn="fhme", block="gated")
    yield "fhme-conv", dict(ffn="fhme", ffn_conv=4)
    yield "pkm-conv", dict(ffn="pkm", ffn_conv=3)
    yield "fhme-block-conv", dict(ffn="fhme", ffn_conv=4, block_conv=3)
    yield "fhme-layer-1-only", dict(ffn="fhme", ffn_conv=4, block_conv=3, routed_layers="1")
    yield "fhme-retrieved-queries", dict(ffn="fhme", block_conv=3, deep_query="retrieved")
    yield "fhme-3-part-keys", dict(ffn="fhme", key_parts=3, key_dim=12, num_experts=512, route_once=True)


@pytest.mark.parametrize("name,extra", list(_variants()), ids=[v[0] for v in _variants()])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_future_tokens_do_not_change_past_logits(name: str, extra: dict, mode: str) -> None:
    cfg = tiny_model_config(**({"ffn": name} | extra if not extra else extra))
    model = FHMELanguageModel(cfg).train(mode == "train")
    _randomize_convs(model)
    idx = torch.randint(0, 256, (3, 32))
    t = 13
    changed = idx.clone()
    changed[:, t:] = torch.randint(0, 256, (3, 32 - t))
    torch.manual_seed(5)
    a = model(idx)  # forward changes no state: nothing carries over between the calls
    torch.manual_seed(5)
    b = model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=1e-5, atol=1e-5)


def _randomize_convs(model: FHMELanguageModel) -> None:
    """FFN and block convolutions start at zero (a no-op): give them weights that a leak would show."""
    for module in model.modules():
        if isinstance(module, CausalConv):
            torch.nn.init.normal_(module.weight, std=0.5)


@pytest.mark.parametrize("ffn,conv,block_conv,layers", [(f, 0, 0, "") for f in FFNS] + [
    ("fhme", 4, 0, ""), ("pkm", 1, 0, ""), ("fhme", 4, 3, ""), ("pkm", 0, 2, ""), ("fhme", 2, 3, "0"),
    ("fhme-retrieved", 0, 3, "")])
def test_greedy_generate_with_cache_equals_full_recompute(ffn: str, conv: int, block_conv: int, layers: str) -> None:
    deep_query = "retrieved" if ffn.endswith("-retrieved") else "input"
    model = FHMELanguageModel(tiny_model_config(ffn=ffn.removesuffix("-retrieved"), seq_len=48, ffn_conv=conv,
                                                block_conv=block_conv, routed_layers=layers,
                                                deep_query=deep_query)).eval()
    _randomize_convs(model)
    prompt = torch.randint(0, 256, (2, 5))
    out = model.generate(prompt, 32, temperature=0.0)
    ref = prompt
    with torch.no_grad():
        for _ in range(32):
            nxt = model(ref)[:, -1].argmax(-1, keepdim=True)
            ref = torch.cat([ref, nxt], dim=1)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("conv,block_conv", [(0, 0), (3, 0), (0, 2)])
def test_generation_past_the_context_equals_recomputation_over_its_window(conv: int, block_conv: int) -> None:
    """Once seq_len tokens are cached, generation goes on from the last seq_len // 2 tokens (the
    window the README documents) and fills the cache again: greedy output equals recomputing the
    logits over that window at every step."""
    seq_len = 16
    model = FHMELanguageModel(tiny_model_config(seq_len=seq_len, ffn_conv=conv, block_conv=block_conv)).eval()
    _randomize_convs(model)
    prompt = torch.randint(0, 256, (2, 5))
    out = model.generate(prompt, 40, temperature=0.0)
    seq, window = prompt, prompt
    with torch.no_grad():
        for _ in range(40):
            nxt = model(window)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            window = seq[:, -(seq_len // 2):] if window.shape[1] >= seq_len else torch.cat([window, nxt], 1)
    assert out.shape == (2, 45) and torch.equal(out, seq)


def _router_flops(dim, heads, key_dim, n_keys, topk):
    return 2 * dim * heads * key_dim + 2 * heads * n_keys * key_dim + heads * topk * topk


def test_flops_and_params_match_hand_counts() -> None:
    d, h, q, n, k = 32, 2, 16, 16, 4
    block = _router_flops(d, h, q, n, k) + 4 * h * k * d
    dense = DenseFFN(d, 64)
    assert dense.flops_per_token() == 6 * d * 64 and dense.active_params_per_token() == 3 * d * 64
    moe = MoEFFN(d, 64, 4, 2, 0.01)
    assert moe.flops_per_token() == 2 * d * 4 + 2 * 6 * d * 64
    assert moe.active_params_per_token() == d * 4 + 2 * 3 * d * 64
    pkm = FHME(d, 256, depth=1, heads=h, topk=k, key_dim=q, block="value")
    assert pkm.flops_per_token() == _router_flops(d, h, q, n, k) + 2 * h * k * d
    gated = FHME(d, 256, depth=1, heads=h, topk=k, key_dim=q, block="gated")
    assert gated.flops_per_token() == _router_flops(d, h, q, n, k) + 2 * h * k * d + 2 * d * d + d
    peer = FHME(d, 256, depth=1, heads=h, topk=k, key_dim=q)
    assert peer.flops_per_token() == block
    fhme = FHME(d, 256, depth=3, heads=h, topk=k, key_dim=q)
    assert fhme.flops_per_token() == 7 * block + 3 * 2 * d  # 7 blocks, 3 join evaluations
    assert fhme.row_bytes_at_depth(3) == 7 * h * k * 2 * d * 4  # neurons: a down and an up row
    assert pkm.row_bytes_per_token() == h * k * d * 4
    router_params = d * h * q + h * 2 * n * (q // 2)
    assert peer.active_params_per_token() == router_params + h * k * 2 * d
    adaptive = FHME(d, 256, depth=3, heads=h, topk=k, key_dim=q, adaptive_depth=True).eval()
    expected = 0.5 * (block + 2 * d * 3) + 0.5 * (7 * block + 3 * 2 * d + 2 * d * 3)
    assert adaptive.flops_per_token(torch.tensor([0.5, 0.0, 0.5])) == pytest.approx(expected)
    assert adaptive.flops_per_token([7, 0, 7]) == pytest.approx(expected)  # counts work too
    assert adaptive.flops_per_token() == 7 * block + 3 * 2 * d + 2 * d * 3  # unmeasured: full depth


def test_routed_layers_count_each_layer_as_built() -> None:
    """Outside routed_layers a layer's FFN is the dense SwiGLU, counted as one."""
    cfg = tiny_model_config(n_layers=3, routed_layers="2", ffn_conv=0)
    model = FHMELanguageModel(cfg)
    assert [type(b.ffn) for b in model.blocks] == [DenseFFN, DenseFFN, FHME]
    fhme, dense = FHMELanguageModel(cfg.replace(routed_layers="")), DenseFFN(cfg.dim, cfg.ffn_hidden)
    assert model.ffn_flops_per_token() == fhme.ffn_flops_per_token() / 3 + 2 * dense.flops_per_token()
    assert model.fhme_layers() == [model.blocks[2].ffn]


def test_ffn_conv_is_counted_and_matches_its_definition() -> None:
    d, w = 8, 3
    plain = FHMELanguageModel(tiny_model_config(dim=d * 4, ffn_conv=0))
    conv = FHMELanguageModel(tiny_model_config(dim=d * 4, ffn_conv=w))
    layers = conv.cfg.n_layers
    assert conv.ffn_flops_per_token() - plain.ffn_flops_per_token() == layers * 2 * w * d * 4
    assert conv.active_params_per_token() - plain.active_params_per_token() == layers * w * d * 4
    assert conv.num_params() - plain.num_params() == layers * w * d * 4
    layer = CausalConv(d, w)
    torch.nn.init.normal_(layer.weight)
    x = torch.randn(2, 10, d)
    by_hand = x.clone()
    for t in range(10):
        for j in range(min(w, t + 1)):
            by_hand[:, t] += layer.weight[:, 0, w - 1 - j] * x[:, t - j]
    torch.testing.assert_close(layer(x), by_hand)
    assert _counted_flops(lambda v: layer(v[None]), x[0]) == pytest.approx(layer.flops_per_token())


def test_model_flops_at_the_depth_evaluate_measures() -> None:
    from fractalmoe.data import ByteDataset

    model = FHMELanguageModel(tiny_model_config(fractal_depth=3, adaptive_depth=True))
    for layer in model.fhme_layers():
        torch.nn.init.normal_(layer.depth_router.weight, std=2.0)
    data = ByteDataset.from_bytes(bytes(range(256)) * 16, 0.5, 32)
    ev = evaluate(model, data, batch_size=4, max_windows=8)
    hists = [ev.measured_depth[layer] for layer in model.fhme_layers()]
    assert all(float(h.sum()) == ev.tokens for h in hists)
    by_hand = model.flops_per_token() - sum(
        layer.flops_per_token() - layer.flops_per_token(h) for layer, h in zip(model.fhme_layers(), hists))
    assert ev.flops_per_token == pytest.approx(by_hand) and ev.flops_per_token < model.flops_per_token()


def _counted_flops(module, x) -> float:
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() / x.shape[0]


def test_dense_and_moe_flops_match_flop_counter() -> None:
    d = 8
    dense = DenseFFN(d, 32)
    assert _counted_flops(dense, torch.randn(64, d)) == pytest.approx(dense.flops_per_token(), rel=0.05)
    moe = MoEFFN(d, 32, 4, 2, 0.0)
    x = torch.randn(64, d)
    # the routed work, plus the padding rows of the static block count: 64 tokens x top-2 = 128
    # slots in blocks of 32 rows, (128 + 4 x 31) // 32 = 7 blocks of 32 rows where 128 carry slots
    b = moe.block_rows(128)
    assert b == 32
    expert_flops = moe.flops_per_token() - 2 * d * 4
    assert _counted_flops(moe, x) == pytest.approx(2 * d * 4 + expert_flops * 7 * b / 128, rel=0.01)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=9).filter(lambda loads: sum(loads) > 0),
       st.integers(1, 8), st.integers(0, 2**16))
def test_moe_blocks_hold_one_expert_each_and_every_slot_once(loads: list[int], b: int, seed: int) -> None:
    expert_S = torch.tensor([e for e, n in enumerate(loads) for _ in range(n)])
    expert_S = expert_S[torch.randperm(expert_S.numel(), generator=torch.Generator().manual_seed(seed))]
    order, row, block_e = pack_blocks(expert_S, torch.tensor(loads), b)
    assert block_e.numel() == (sum(loads) + len(loads) * (b - 1)) // b
    assert len(set(row.tolist())) == row.numel() and int(row.max()) < block_e.numel() * b  # a row each
    assert torch.equal(block_e[row // b], expert_S[order])  # each slot in a block of its expert
    assert torch.equal(expert_S[order], expert_S.sort(stable=True).values)


def test_moe_matches_each_token_through_its_own_experts() -> None:
    torch.manual_seed(0)
    moe = MoEFFN(8, 16, 4, 2, 0.0)
    x = torch.randn(37, 8)
    probs = torch.softmax(moe.router(x), -1)
    gate, expert = probs.topk(2, -1)
    gate = gate / gate.sum(-1, keepdim=True)
    expected = torch.stack([
        sum(g * (torch.nn.functional.silu(x[t] @ moe.w1[e]) * (x[t] @ moe.w3[e])) @ moe.w2[e]
            for g, e in zip(gate[t], expert[t].tolist())) for t in range(37)])
    torch.testing.assert_close(moe(x), expected)


def test_a_top_1_moe_router_learns_from_the_output() -> None:
    """Switch routing: the chosen expert's output scaled by its router probability, so the task
    loss reaches the router (renormalised over one expert the gate would be 1)."""
    torch.manual_seed(0)
    moe = MoEFFN(8, 16, 4, 1, 0.0)
    x = torch.randn(37, 8)
    probs = torch.softmax(moe.router(x), -1)
    gate, expert = probs.max(-1)
    expected = torch.stack([gate[t] * (torch.nn.functional.silu(x[t] @ moe.w1[e]) * (x[t] @ moe.w3[e])) @ moe.w2[e]
                            for t, e in enumerate(expert.tolist())])
    out = moe(x)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    assert moe.router.weight.grad.abs().max() > 1e-3


def test_generation_at_a_context_of_one_byte_and_a_tiny_temperature() -> None:
    model = FHMELanguageModel(tiny_model_config(seq_len=1, ffn_conv=0, block_conv=0)).eval()
    prompt = torch.randint(0, 256, (2, 3))
    greedy = model.generate(prompt, 6, temperature=0.0)
    assert greedy.shape == (2, 9)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(prompt, 6, temperature=1e-40, generator=gen), greedy)


def test_top_k_keeps_exactly_k_candidates_when_logits_tie() -> None:
    logits = torch.zeros(4, 256)
    gen = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, 1, gen)[r]) for r in range(4) for _ in range(8)}
    assert len(picks) == 1  # top-1 of all-equal logits is one token, not any of them


def test_the_vocabulary_holds_every_byte() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_model_config(vocab_size=100)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _ops(model, idx) -> Counter:
    with _OpCounter() as counter, torch.no_grad():
        model(idx)
    return counter.ops


@pytest.mark.parametrize("ffn", FFNS)
def test_no_python_loop_over_tokens_or_experts(ffn: str) -> None:
    """The dispatched op sequence does not grow with tokens or with the number of experts."""
    small = FHMELanguageModel(tiny_model_config(ffn=ffn, num_experts=256)).eval()
    large = FHMELanguageModel(tiny_model_config(ffn=ffn, num_experts=1024)).eval()
    short, long = torch.randint(0, 256, (1, 8)), torch.randint(0, 256, (4, 32))
    _ops(large, long), _ops(small, short)  # warm-up: gather workspace, RoPE tables
    assert _ops(small, short) == _ops(small, long) == _ops(large, long)


def test_bad_input_raises_value_error_saying_what_to_change() -> None:
    model = FHMELanguageModel(tiny_model_config())
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.rand(1, 4))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model.check_input(torch.tensor([[1, 256]]))  # entry points check values on the host
    with pytest.raises(RuntimeError, match=r"\[0, 256\)"):
        model(torch.tensor([[1, 256]]))  # forward checks them asynchronously
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model.generate(torch.tensor([[-1]]), 2)
    with pytest.raises(ValueError, match="seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="num_experts"):
        ModelConfig(num_experts=1000)
    with pytest.raises(ValueError, match="ffn"):
        ModelConfig(ffn="mlp")


def test_losses_and_aux_losses() -> None:
    for ffn in FFNS:
        model = FHMELanguageModel(tiny_model_config(ffn=ffn)).train()
        idx = torch.randint(0, 256, (2, 16))
        with collect(model) as stats:
            logits, loss = model(idx, idx)
        assert logits.shape == (2, 16, 256) and loss.ndim == 0
        aux = stats.aux_loss()
        assert torch.isfinite(aux) and (aux > 0) == (ffn == "moe")


def test_one_batch_overfitting_lowers_the_loss() -> None:
    from fractalmoe.optim import ModelOptimizer

    model = FHMELanguageModel(tiny_model_config())
    opt = ModelOptimizer(model, lr=3e-3, expert_lr=0.05, weight_decay=0.0)
    idx = torch.randint(0, 256, (4, 32))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0]


def test_memplus_shares_one_bank_stored_once() -> None:
    model = FHMELanguageModel(tiny_model_config(ffn="memplus"))
    banks = {id(b.ffn.fractal.bank) for b in model.blocks}
    assert banks == {id(model.shared_bank)}
    names = [n for n in model.state_dict() if n.endswith("values")]
    assert names == ["shared_bank.values"]


def test_block_conv_is_counted_per_block_application() -> None:
    """Every one of the 2**C - 1 block applications convolves its query input (2 W D FLOPs);
    a token reads each column's convolution once (W D parameters per router)."""
    d, w = 32, 3
    plain = FHMELanguageModel(tiny_model_config(dim=d, fractal_depth=3))
    conv = FHMELanguageModel(tiny_model_config(dim=d, fractal_depth=3, block_conv=w))
    layers = conv.cfg.n_layers
    assert conv.ffn_flops_per_token() - plain.ffn_flops_per_token() == layers * 7 * 2 * w * d
    assert conv.active_params_per_token() - plain.active_params_per_token() == layers * 3 * w * d
    assert conv.num_params() - plain.num_params() == layers * 3 * w * d


@pytest.mark.parametrize(("make", "name"), [
    (lambda: FHME(16, 256, depth_rule="pondr"), "depth_rule"),
    (lambda: FHME(16, 256, act="silu"), "act"),
    (lambda: FHME(16, 256, query_norm="layer_norm"), "query_norm"),
    (lambda: FHME(16, 256, gate="relu"), "gate"),
    (lambda: FHME(16, 256, block="values"), "block kind"),
])
def test_layers_built_directly_reject_unknown_names(make, name: str) -> None:
    """The library's constructors check what ModelConfig checks: a typo is an error, not a default."""
    with pytest.raises(ValueError, match=name):
        make()
