"""FLOP counts of every routed block kind against torch's FlopCounterMode on a dense reference.

The fused kernels (embedding_bag mixes) are invisible to FlopCounterMode, so the bank is swapped
for the plain einsum definition of the same mix; the router's projections and sub-key scoring
are counted as they run. What FlopCounterMode never counts (top-k, the K*K candidate sums, the
gates' elementwise products) is a few percent at most.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fractalmoe import FHME
from fractalmoe.experts import ExpertBank, expert_mix_reference
from fractalmoe.fractal import application_columns


def _reference_mix(bank: ExpertBank, x: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    if bank.kind == "neuron":
        return expert_mix_reference(x, idx, gates, bank.down, bank.up, bank.act)
    return torch.einsum("tm,tmd->td", gates.to(x.dtype), bank.values[idx])


@pytest.mark.parametrize("kind", ["neuron", "value", "gated"])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("route_once", [False, True])
@pytest.mark.parametrize("output_gate", [False, True])
def test_flops_per_token_match_flop_counter(kind: str, depth: int, route_once: bool, output_gate: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    layer = FHME(64, 4096, depth=depth, heads=2, topk=8, key_dim=32, block=kind, route_once=route_once,
                 output_gate=output_gate).eval()
    _check_count(layer, monkeypatch)


def test_flops_with_retrieved_queries_match_flop_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = FHME(64, 4096, depth=3, heads=2, topk=8, key_dim=32, block="value", deep_query="retrieved").eval()
    _check_count(layer, monkeypatch)


@pytest.mark.parametrize("route_once", [False, True])
def test_flops_with_three_key_parts_match_flop_counter(route_once: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    layer = FHME(64, 16384, depth=2, heads=2, topk=8, key_dim=24, block="value", route_once=route_once,
                 key_parts=3).eval()
    assert layer.fractal.blocks[0].memory.router.sizes == (32, 16, 32)
    _check_count(layer, monkeypatch)


def _check_count(layer: FHME, monkeypatch: pytest.MonkeyPatch, tokens: int = 32) -> None:
    """FlopCounterMode's count per token of the layer's forward is within 3% of flops_per_token
    and never above it (the count never leaves out a matmul)."""
    monkeypatch.setattr(ExpertBank, "forward", _reference_mix)
    x = torch.randn(tokens, layer.dim)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(x)
    counted = counter.get_total_flops() / tokens
    assert counted == pytest.approx(layer.flops_per_token(), rel=0.03)
    assert counted <= layer.flops_per_token()


@pytest.mark.parametrize("heads,tied,route_once", [((1, 3), True, False), ((1, 3), True, True),
                                                    ((3, 1), False, False), ((1, 2, 4), True, True)])
def test_flops_with_heads_per_column_match_flop_counter(heads: tuple[int, ...], tied: bool, route_once: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    layer = FHME(64, 4096, depth=len(heads), heads=heads, topk=8, key_dim=32, block="value",
                 tied=tied, route_once=route_once).eval()
    columns = range(1, len(heads) + 1) if tied else application_columns(len(heads), 1)
    assert [b.memory.router.heads for b in layer.fractal.blocks] == [heads[c - 1] for c in columns]
    _check_count(layer, monkeypatch)


def test_moving_heads_to_the_shallow_column_keeps_the_flops() -> None:
    """C = 2 runs column 1 twice and column 2 once: 1 + 1 + 4 heads cost what 2 + 2 + 2 do."""
    even = FHME(64, 4096, depth=2, heads=2, topk=8, key_dim=32, block="value")
    shallow = FHME(64, 4096, depth=2, heads=(1, 4), topk=8, key_dim=32, block="value")
    assert shallow.flops_per_token() == even.flops_per_token()
    assert shallow.active_params_per_token() > even.active_params_per_token()  # 5 router heads, not 4


@pytest.mark.parametrize("rule, outputs", [("ponder", 3), ("threshold", 2)])
def test_the_depth_router_costs_its_outputs(rule: str, outputs: int) -> None:
    """Ponder scores every depth (C outputs), the threshold rule the C - 1 stages past the first."""
    fixed = FHME(64, 4096, depth=3, heads=2, topk=8, key_dim=32, block="value")
    adaptive = FHME(64, 4096, depth=3, heads=2, topk=8, key_dim=32, block="value", adaptive_depth=True,
                    depth_rule=rule, depth_target=0.5)
    for depth in (1, 2, 3):
        assert adaptive.flops_at_depth(depth) - fixed.flops_at_depth(depth) == 2 * 64 * outputs


def test_compare_counts_an_ffn_whose_balance_weights_are_set_per_layer() -> None:
    """``compare`` matches FFN FLOPs on the first routed layer's FFN, which carries that layer's
    balance weight: a steered weight needs one to start from, and balance_loss alone is 0."""
    from fractalmoe.compare import ffn_flops
    from fractalmoe.config import tiny_model_config

    base = tiny_model_config(n_layers=2, balance_loss=0.01, balance_target_kl=0.5)
    per_layer = base.replace(balance_loss=0.0, layer_balance_loss="0.01,0.002")
    assert ffn_flops(per_layer) == ffn_flops(base) > 0
