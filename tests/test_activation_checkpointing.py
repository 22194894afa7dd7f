"""Activation checkpointing (``checkpoint_blocks``): training steps that recompute each block in
backward equal those that keep every activation (the reference), and keep far fewer tensors."""

from __future__ import annotations

import pytest
import torch

from fractalmoe.config import tiny_model_config
from fractalmoe.model import FHMELanguageModel
from fractalmoe.optim import ModelOptimizer
from fractalmoe.train import train_step

VARIANTS = {
    "fhme": dict(ffn_conv=4, block_conv=3), "pkm": dict(ffn="pkm"), "peer": dict(ffn="peer"),
    "memplus": dict(ffn="memplus"), "moe": dict(ffn="moe"), "dense": dict(ffn="dense"),
    "halting": dict(adaptive_depth=True, fractal_depth=3, depth_rule="threshold", depth_target=0.45),
    "drop-path": dict(drop_path_local=0.3, drop_path_global=0.3, dropout=0.1),  # random: the same in the recompute
    "biases": dict(ffn="pkm", balance_rate=0.1, balance_loss=0.01),
}


def _trained(name: str, recompute: bool, deferred: bool) -> FHMELanguageModel:
    torch.manual_seed(0)
    model = FHMELanguageModel(tiny_model_config(**({"ffn": "fhme"} | VARIANTS[name]))).train()
    model.checkpoint_blocks = recompute
    opt = ModelOptimizer(model, 3e-3, 0.03, 0.0, "lazy_adam", deferred_table_grads=deferred)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randint(0, 256, (4, 32), generator=gen)
        assert train_step(model, opt, x, x.roll(-1, 1), 1.0)[1]
    return model


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("deferred", [False, True])
def test_recomputed_blocks_train_as_stored_ones(name: str, deferred: bool) -> None:
    stored, recomputed = _trained(name, False, deferred), _trained(name, True, deferred)
    for (key, a), b in zip(stored.state_dict().items(), recomputed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=key)


def test_recomputed_blocks_keep_a_fraction_of_the_activations() -> None:
    model = FHMELanguageModel(tiny_model_config(n_layers=4)).train()
    x = torch.randint(0, 256, (4, 32))
    kept = {}
    for recompute in (False, True):
        model.checkpoint_blocks = recompute
        saved: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, x)
        kept[recompute] = sum(saved)
    assert kept[True] < 0.3 * kept[False], kept
