"""Host syncs (DESIGN.md, performance design): backward and the optimizer step read nothing on
the host, so a training step's only sync is the trainer's one read of loss and finiteness
(``ModelOptimizer.finite_flag()``)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fractalmoe.config import tiny_model_config
from fractalmoe.experts import expert_mix, set_grad_layout, value_mix
from fractalmoe.model import FHMELanguageModel
from fractalmoe.optim import LazyAdam, ModelOptimizer, RowwiseAdagrad, table_optimizer

DATA_DEPENDENT = {"nonzero", "bincount", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                  "unique_dim_consecutive", "masked_select", "equal", "is_nonzero"}


class SyncCounter(TorchDispatchMode):
    """Ops that make the host wait for the device: a value read on the host (``.item()``,
    ``int()``, ``bool()``) and ops whose output size depends on values."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if (name == "_local_scalar_dense" or name in DATA_DEPENDENT
                or (name == "repeat_interleave" and kwargs.get("output_size") is None)
                or (name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1]))):
            self.syncs.append(name)
        return func(*args, **kwargs)


def test_the_counter_sees_syncs() -> None:
    x = torch.randn(6)
    with SyncCounter() as counter:
        x.sum().item()
        bool(x.sum() > 0)
        x[x > 0]
        torch.nonzero(x)
        torch.unique_consecutive(x.sort().values, return_counts=True)
        torch.tensor([1, 2]).repeat_interleave(torch.tensor([2, 1]))
    assert len(counter.syncs) == 6, counter.syncs


@pytest.mark.parametrize("layout", ["sparse", "dense", "deferred"])
def test_mix_backwards_never_sync(layout: str) -> None:
    x = torch.randn(9, 8, requires_grad=True)
    idx, gates = torch.randint(0, 40, (9, 5)), torch.rand(9, 5, requires_grad=True)
    down, up = (torch.randn(40, 8, requires_grad=True) for _ in range(2))
    y = expert_mix(x, idx, gates, down, up, layout=layout) + value_mix(idx, gates, up, layout)
    with SyncCounter() as counter:
        y.square().sum().backward()
    assert counter.syncs == []
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
        with SyncCounter() as counter:
            opt.step()
        opt.zero_grad()
        assert counter.syncs == []


@pytest.mark.parametrize("rule", ["rowwise_adagrad", "lazy_adam"])
def test_stochastic_rounding_never_syncs(rule: str) -> None:
    table = torch.nn.Parameter(torch.randn(40, 8).bfloat16())
    opt = table_optimizer([table], rule, 0.01, deferred=True, stochastic_rounding=True)
    for _ in range(2):
        value_mix(torch.randint(0, 40, (9, 5)), torch.rand(9, 5), table).float().sum().backward()
        with SyncCounter() as counter:
            opt.step()
        opt.zero_grad()
        assert counter.syncs == []


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
        with SyncCounter() as counter:
            loss.backward()
            value, finite = torch.stack([loss.detach(), opt.finite_flag().to(loss.dtype)]).tolist()
            if finite:
                opt.step()
        opt.zero_grad()
        assert len(counter.syncs) <= 1 and finite == 1.0 and value > 0, counter.syncs
