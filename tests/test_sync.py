"""Host syncs (DESIGN.md, performance design): backward and the optimizer step read nothing on
the host, so a training step's only sync is the trainer's one read of loss and finiteness
(``ModelOptimizer.finite_flag()``)."""

from __future__ import annotations

import functools

import pytest
import torch

from fractalmoe.config import tiny_model_config
from fractalmoe.experts import expert_mix, set_grad_layout, value_mix
from fractalmoe.model import FHMELanguageModel
from fractalmoe.optim import LazyAdam, ModelOptimizer, RowwiseAdagrad, table_optimizer
from host_syncs import HostSyncs


@pytest.mark.parametrize("layout", ["sparse", "dense", "deferred"])
def test_mix_backwards_never_sync(layout: str) -> None:
    x = torch.randn(9, 8, requires_grad=True)
    idx, gates = torch.randint(0, 40, (9, 5)), torch.rand(9, 5, requires_grad=True)
    down, up = (torch.randn(40, 8, requires_grad=True) for _ in range(2))
    y = expert_mix(x, idx, gates, down, up, layout=layout) + value_mix(idx, gates, up, layout)
    with HostSyncs() as counter:
        y.square().sum().backward()
    assert counter.total == 0, counter.found
    assert (up.grad is None) if layout == "deferred" else (up.grad.is_sparse == (layout == "sparse"))


@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("rule", [RowwiseAdagrad, LazyAdam, functools.partial(LazyAdam, fused=True)],
                         ids=["rowwise_adagrad", "lazy_adam", "lazy_adam_fused"])
def test_row_sparse_steps_never_sync(rule: type[torch.optim.Optimizer], deferred: bool,
                                     request: pytest.FixtureRequest) -> None:
    """The fused update finds its padding rows in static sizes too."""
    if isinstance(rule, functools.partial):
        request.getfixturevalue("needs_compiler")
    table = torch.nn.Parameter(torch.randn(40, 8))
    set_grad_layout(table, "deferred" if deferred else "sparse")
    opt = rule([table])
    for _ in range(2):  # the first step creates the state
        idx = torch.randint(0, 40, (9, 5))
        (value_mix(idx, torch.rand(9, 5), table).sum() + value_mix(idx[:3], torch.rand(3, 5), table).sum()).backward()
        with HostSyncs() as counter:
            opt.step()
        opt.zero_grad()
        assert counter.total == 0, counter.found


@pytest.mark.parametrize("rule", ["rowwise_adagrad", "lazy_adam"])
def test_stochastic_rounding_never_syncs(rule: str) -> None:
    table = torch.nn.Parameter(torch.randn(40, 8).bfloat16())
    opt = table_optimizer([table], rule, 0.01, deferred=True, stochastic_rounding=True)
    for _ in range(2):
        value_mix(torch.randint(0, 40, (9, 5)), torch.rand(9, 5), table).float().sum().backward()
        with HostSyncs() as counter:
            opt.step()
        opt.zero_grad()
        assert counter.total == 0, counter.found


@pytest.mark.parametrize("expert_optim", ["rowwise_adagrad", "lazy_adam", "dense_adamw",
                                          "rowwise_adagrad+deferred", "lazy_adam+deferred"])
@pytest.mark.parametrize("ffn", ["fhme", "peer", "pkm"])
def test_backward_and_optimizer_step_never_sync(ffn: str, expert_optim: str) -> None:
    """A training step from the loss on (the forward is counted by the model's own tests):
    backward, one read of loss and finite flag together (the trainer's), the step."""
    model = FHMELanguageModel(tiny_model_config(ffn=ffn)).train()
    rule, _, deferred = expert_optim.partition("+")
    opt = ModelOptimizer(model, 1e-3, 0.05, 0.0, rule, deferred_table_grads=bool(deferred))
    x = torch.randint(0, 256, (2, 32))
    for _ in range(2):  # the first step creates the optimizer state
        _, loss = model(x, x)
        with HostSyncs() as counter:
            loss.backward()
            value, finite = torch.stack([loss.detach(), opt.finite_flag().to(loss.dtype)]).tolist()
            if finite:
                opt.step()
        opt.zero_grad()
        assert counter.total <= 1 and finite == 1.0 and value > 0, counter.found


@pytest.mark.parametrize("setting", ["plain", "autocast", "micro-batches", "recompute", "all"])
@pytest.mark.parametrize("ffn", ["fhme", "peer", "pkm"])
def test_a_whole_training_step_reads_the_host_once(ffn: str, setting: str) -> None:
    """``train_step`` from forward to fold, under each loop setting GPU stacks use: bfloat16
    autocast, gradient accumulation, activation checkpointing (the recompute runs the forward
    again, inside backward); the one read is the trainer's loss and finiteness."""
    from fractalmoe.train import train_step

    model = FHMELanguageModel(tiny_model_config(ffn=ffn)).train()
    model.checkpoint_blocks = setting in ("recompute", "all")
    autocast = torch.bfloat16 if setting in ("autocast", "all") else None
    parts = 2 if setting in ("micro-batches", "all") else 1
    opt = ModelOptimizer(model, 1e-3, 0.03, 0.0, "lazy_adam")
    x = torch.randint(0, 256, (4, 32))
    for _ in range(2):  # the first step creates the optimizer state
        with HostSyncs() as counter:
            assert train_step(model, opt, x, x, 1.0, autocast=autocast, micro_batches=parts)[1]
    assert counter.found == {"Tensor.tolist": 1}, counter.found
