"""Adaptive depth, both rules (ponder, threshold): compaction equals the masked computation,
causal depth choice, the compute knobs."""

from __future__ import annotations

import pytest
import torch

from fractalmoe import FHME, FHMELanguageModel
from fractalmoe.config import tiny_model_config
from fractalmoe.optim import ModelOptimizer
from fractalmoe.fhme import continue_share
from fractalmoe.fractal import blocks_at_depth
from fractalmoe.stats import DEPTH_COUNTS, FoldInputs, collect, fold_statistics

RULES = ["ponder", "threshold"]


def _mixed_router(layer: FHME) -> None:
    """Random router weights so tokens spread over all depths."""
    torch.nn.init.normal_(layer.depth_router.weight, std=2.0)
    torch.nn.init.zeros_(layer.depth_router.bias)


def _layer(rule: str, **kw: object) -> FHME:
    return FHME(16, 256, depth=3, heads=2, topk=4, key_dim=8, adaptive_depth=True, depth_rule=rule,
                depth_target=0.5 if rule == "threshold" else 0.0, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(("tied", "route_once", "deep_query"), [
    (True, False, "input"), (False, False, "input"), (True, True, "input"), (True, False, "retrieved")])
def test_compacted_layer_equals_masked_full_computation(tied: bool, route_once: bool, deep_query: str,
                                                         rule: str) -> None:
    layer = _layer(rule, tied=tied, route_once=route_once, deep_query=deep_query).eval()
    _mixed_router(layer)
    x = torch.randn(4, 24, 16)
    depth, _ = layer.choose_depth(x.reshape(-1, 16))
    assert len(set(depth.tolist())) == 3  # every depth occurs
    with torch.no_grad():
        compact = layer(x)
        layer.compact = False
        masked = layer(x)
    torch.testing.assert_close(compact, masked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", RULES)
def test_compacted_training_keeps_global_drop_path(rule: str) -> None:
    """Each token trains the single column global drop-path picked for it, compacted or not."""
    layer = _layer(rule, drop_path_global=0.6).train()
    _mixed_router(layer)
    x = torch.randn(4, 24, 16)
    outs = {}
    for compact in (True, False):
        layer.compact = compact
        torch.manual_seed(3)
        outs[compact] = layer(x)
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-5)
    torch.manual_seed(3)
    layer.fractal.drop_global = 0.0
    assert not torch.allclose(layer(x), outs[False], atol=1e-4)  # the columns it picked mattered


def _adaptive_model(rule: str) -> FHMELanguageModel:
    model = FHMELanguageModel(tiny_model_config(fractal_depth=3, adaptive_depth=True, depth_rule=rule,
                                                depth_target=0.5)).eval()
    for layer in model.fhme_layers():
        _mixed_router(layer)
    return model


def _set_compact(model: FHMELanguageModel, on: bool) -> None:
    for layer in model.fhme_layers():
        layer.compact = on


@pytest.mark.parametrize("rule", RULES)
def test_compacted_model_and_generation_equal_masked(rule: str) -> None:
    model = _adaptive_model(rule)
    idx = torch.randint(0, 256, (3, 32))
    with torch.no_grad():
        compact = model(idx)
        _set_compact(model, False)
        masked = model(idx)
    torch.testing.assert_close(compact, masked, rtol=1e-4, atol=1e-4)
    prompt = idx[:, :4]
    masked_gen = model.generate(prompt, 20, temperature=0.0)
    _set_compact(model, True)
    assert torch.equal(model.generate(prompt, 20, temperature=0.0), masked_gen)


@pytest.mark.parametrize("rule", RULES)
def test_compaction_runs_deeper_stages_on_fewer_rows(rule: str) -> None:
    layer = _layer(rule).eval()
    _mixed_router(layer)
    rows = []
    for b in layer.fractal.blocks:
        b.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
    x = torch.randn(64, 16)
    depth, _ = layer.choose_depth(x)
    with torch.no_grad():
        layer(x)
    deeper2, deeper3 = int((depth >= 2).sum()), int((depth >= 3).sum())
    # stage 1: B1 on all; stage 2: f1(f1(x)) + B2 on d >= 2; stage 3: 4 more blocks on d >= 3
    assert rows == [64] + [deeper2] * 2 + [deeper3] * 4


def _depths(model: FHMELanguageModel, idx: torch.Tensor) -> list[torch.Tensor]:
    out = []
    hooks = [layer.register_forward_hook(
        lambda m, inp, o: out.append(m.choose_depth(inp[0].reshape(-1, m.dim))[0].view(inp[0].shape[:-1])))
        for layer in model.fhme_layers()]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("rule", RULES)
def test_depth_of_a_token_ignores_future_tokens(rule: str) -> None:
    model = _adaptive_model(rule)
    idx = torch.randint(0, 256, (2, 32))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, 256, (2, 22))
    for a, b in zip(_depths(model, idx), _depths(model, changed)):
        assert torch.equal(a[:, :10], b[:, :10])


def _mean_depth_after_training(penalty: float, target: float = 0.0, rule: str = "ponder") -> float:
    torch.manual_seed(0)
    model = FHMELanguageModel(tiny_model_config(fractal_depth=3, adaptive_depth=True, depth_rule=rule,
                                                depth_penalty=penalty, depth_target=target))
    opt = ModelOptimizer(model, lr=1e-2, expert_lr=0.05, weight_decay=0.0)
    idx = torch.randint(0, 256, (4, 32))
    for _ in range(15):
        opt.zero_grad()
        with collect(model) as stats:
            _, loss = model(idx, idx)
            (loss + stats.aux_loss()).backward()
        opt.step()
        fold_statistics(model, stats)
    model.eval()
    with collect(model) as stats:
        model(idx)
    hists = [stats.total(layer, DEPTH_COUNTS) / idx.numel() for layer in model.fhme_layers()]
    return sum(float((hist * torch.arange(1, 4)).sum()) for hist in hists) / 2


def test_raising_the_compute_penalty_lowers_mean_depth() -> None:
    depths = [_mean_depth_after_training(p) for p in (0.0, 0.05, 0.5)]
    assert depths[0] >= depths[1] >= depths[2] and depths[0] > depths[2]


@pytest.mark.parametrize("rule", RULES)
def test_lowering_the_target_cost_lowers_mean_depth(rule: str) -> None:
    depths = [_mean_depth_after_training(0.0, target, rule) for target in (0.9, 0.2)]
    assert depths[0] > depths[1]


@pytest.mark.parametrize("depth", [2, 3, 4])
@pytest.mark.parametrize("target", [0.2, 0.45, 0.65, 1.0])
def test_continue_share_spends_the_target_blocks(depth: int, target: float) -> None:
    """P(d >= c) = q**(c-1), and stage c adds 2**(c-1) blocks."""
    target = max(target, 1 / blocks_at_depth(depth))  # at least one block
    q = continue_share(depth, target)
    blocks = sum(q ** (c - 1) * 2 ** (c - 1) for c in range(1, depth + 1))
    assert blocks == pytest.approx(target * blocks_at_depth(depth), rel=1e-6)


def test_thresholds_rise_while_too_many_tokens_go_on() -> None:
    layer = _layer("threshold")  # q = continue_share(3, 0.5) ~ 0.58
    layer.fold(FoldInputs([torch.tensor([[90.0, 80.0], [100.0, 90.0]])]))  # 90% and 89% went on
    assert (layer.depth_thresholds > 0).all()
    for _ in range(40):
        layer.fold(FoldInputs([torch.tensor([[10.0, 1.0], [100.0, 10.0]])]))  # 10% went on
    assert (layer.depth_thresholds < 0).all()


def test_threshold_gates_mix_the_anytime_outputs() -> None:
    """At a forced depth d the layer returns f_1 + sum_{c<=d} sigmoid(s_c) (f_c - f_{c-1})."""
    layer = _layer("threshold").eval()
    _mixed_router(layer)
    x = torch.randn(10, 16)
    with torch.no_grad():
        f = layer.fractal(x, return_all_depths=True)
        g = torch.sigmoid(layer.depth_router(x))
        layer.forced_depth = 3
        y = layer(x) + x
    torch.testing.assert_close(y, f[0] + g[:, :1] * (f[1] - f[0]) + g[:, 1:] * (f[2] - f[1]))


@pytest.mark.parametrize("rule", RULES)
def test_training_compaction_equals_masked_in_output_and_gradients(rule: str) -> None:
    """Training skips deeper stages for shallow tokens, yet computes what the masked reference
    (every depth for every token) computes: same output, same gradients everywhere."""
    layer = _layer(rule, depth_penalty=0.01).double().train()
    _mixed_router(layer)
    x = torch.randn(4, 24, 16, dtype=torch.float64)
    results = []
    for compact in (True, False):
        layer.compact = compact
        layer.zero_grad()
        with collect(layer) as stats:
            y = layer(x)
            (y.square().mean() + stats.aux_loss()).backward()
        grads = {n: p.grad.to_dense() if p.grad.is_sparse else p.grad
                 for n, p in layer.named_parameters() if p.grad is not None}
        results.append((y.detach(), grads))
    (y_c, g_c), (y_m, g_m) = results
    torch.testing.assert_close(y_c, y_m)
    assert g_c.keys() == g_m.keys() and "depth_router.weight" in g_c
    for name in g_c:
        torch.testing.assert_close(g_c[name], g_m[name], msg=name)


def test_training_runs_deeper_stages_only_for_deeper_tokens() -> None:
    layer = FHME(16, 256, depth=3, heads=2, topk=4, key_dim=8, adaptive_depth=True).train()
    _mixed_router(layer)
    x = torch.randn(96, 16)
    rows: list[int] = []
    for block in layer.fractal.blocks:
        block.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
    depth, _ = layer.choose_depth(x)
    layer(x)
    expected = sum(int((depth >= c).sum()) * 2 ** (c - 1) for c in (1, 2, 3))
    assert sum(rows) == expected < 7 * 96


def test_target_controller_turns_into_a_bonus_below_the_target() -> None:
    from fractalmoe.stats import FoldInputs

    layer = FHME(16, 256, depth=3, heads=2, topk=4, key_dim=8, adaptive_depth=True, depth_target=0.5)
    for _ in range(20):  # every token at depth 1: 1 of 7 blocks, far below half
        layer.fold(FoldInputs([torch.tensor([100.0, 100.0])]))
    assert float(layer.depth_penalty) < 0
    for _ in range(200):  # every token at depth 3: above the target, the penalty climbs back
        layer.fold(FoldInputs([torch.tensor([700.0, 100.0])]))
    assert float(layer.depth_penalty) > 0


def test_threshold_rule_refuses_a_target_below_one_block() -> None:
    with pytest.raises(ValueError, match="depth_target"):
        FHME(16, 256, depth=3, heads=2, topk=4, key_dim=8, adaptive_depth=True, depth_rule="threshold")
