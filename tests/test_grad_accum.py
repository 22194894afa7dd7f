"""Gradient accumulation: a step run as micro-batches equals the step run as one batch (the
reference), tables, optimizer state and folded statistics included, up to float rounding."""

from __future__ import annotations

import pytest
import torch

from fractalmoe.config import TrainConfig, tiny_model_config
from fractalmoe.model import FHMELanguageModel
from fractalmoe.optim import ModelOptimizer
from fractalmoe.stats import Statistics, collect, fold_statistics
from fractalmoe.train import train_step

VARIANTS = {
    "fhme": dict(ffn_conv=4, block_conv=3), "neuron": dict(block="neuron"), "peer": dict(ffn="peer"),
    "memplus": dict(ffn="memplus"), "dense": dict(ffn="dense"),
    # what folds after the step: routing biases, running query norms, the halting thresholds
    "biases": dict(ffn="pkm", balance_rate=0.1), "running-norm": dict(query_norm="running"),
    "adaptive": dict(adaptive_depth=True, fractal_depth=3, depth_rule="threshold", depth_target=0.45),
}


def _trained(name: str, rule: str, micro_batches: int) -> FHMELanguageModel:
    torch.manual_seed(0)
    model = FHMELanguageModel(tiny_model_config(**({"ffn": "fhme"} | VARIANTS[name]))).train()
    rule, _, deferred = rule.partition("+")
    opt = ModelOptimizer(model, 1e-3, 0.01, 0.0, rule, deferred_table_grads=bool(deferred))
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randint(0, 256, (8, 32), generator=gen)
        assert train_step(model, opt, x, x.roll(-1, 1), 1.0, micro_batches=micro_batches)[1]
    return model


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("rule", ["lazy_adam", "rowwise_adagrad+deferred"])
def test_micro_batches_train_as_one_batch(name: str, rule: str) -> None:
    whole, parts = _trained(name, rule, 1), _trained(name, rule, 4)
    for (key, a), b in zip(whole.state_dict().items(), parts.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5, msg=key)


def test_micro_batch_collectors_fold_once_as_one() -> None:
    model = FHMELanguageModel(tiny_model_config(ffn="pkm", balance_rate=0.1)).train()
    parts = []
    for x in torch.randint(0, 256, (2, 2, 16)):
        with collect(model) as stats:
            model(x)
        parts.append(stats)
    assert len(Statistics.joined(parts).records) == sum(len(p.records) for p in parts)
    fold_statistics(model, parts)
    with pytest.raises(RuntimeError, match="folded already"):
        fold_statistics(model, parts[1])


def test_grad_accum_must_divide_the_batch() -> None:
    assert TrainConfig(batch_size=16, grad_accum=4).grad_accum == 4
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(batch_size=16, grad_accum=3)
