"""Forward has no side effects and no host syncs; measurements reach modules only through the fold."""

from __future__ import annotations

import copy
import os
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fractalmoe import FHMELanguageModel, experts, product_keys
from fractalmoe.adapters import add_fhme_adapters, add_lora_adapters, open_memories
from fractalmoe.config import tiny_model_config
from fractalmoe.optim import ModelOptimizer
from fractalmoe.routing import Balancing
from fractalmoe.stats import BALANCE_LOSS, collect, fold_statistics, freeze_statistics
from fractalmoe.train import train_step
from host_syncs import HostSyncs

VARIANTS = {
    "fhme": {}, "peer": dict(ffn="peer"), "pkm": dict(ffn="pkm"), "memplus": dict(ffn="memplus"),
    "dense": dict(ffn="dense"), "moe": dict(ffn="moe"), "fhme-route-once": dict(fractal_depth=3, route_once=True),
    "fhme-balanced": dict(balance_rate=0.1, balance_loss=0.01, balance_target_kl=0.5, query_norm="running"),
    "fhme-whitened": dict(balance_rate=0.1, query_norm="whiten", unit_keys=True),
    "fhme-adaptive": dict(adaptive_depth=True, fractal_depth=3, depth_penalty=0.01, depth_target=0.5,
                          depth_explore=0.2),
    "pkm-conv": dict(ffn="pkm", ffn_conv=4),
    "fhme-block-conv": dict(ffn_conv=4, block_conv=3),
    "fhme-3-part-keys": dict(key_parts=3, key_dim=12, num_experts=512, route_once=True),
}
STATEFUL = {"fhme-balanced", "fhme-whitened", "fhme-adaptive"}  # they learn from past batches


def _snapshot(value: object) -> object:
    if isinstance(value, Tensor):
        return ("tensor", value.detach().clone(), value.device, value.requires_grad)
    if isinstance(value, nn.Module):
        return ("module", id(value))
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_snapshot(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return ("object", id(value))


def _same(a: object, b: object) -> bool:
    if isinstance(a, tuple) and a[0] == "tensor":
        return (isinstance(b, tuple) and b[0] == "tensor" and a[1].dtype == b[1].dtype
                and a[1].shape == b[1].shape and torch.equal(a[1], b[1]) and a[2:] == b[2:])
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def state(model: nn.Module) -> dict[str, object]:
    """Every attribute of every module (parameters, buffers, tensors, containers, flags)."""
    return {name: _snapshot(vars(m)) for name, m in model.named_modules(remove_duplicate=False)}


def _model(name: str) -> FHMELanguageModel:
    return FHMELanguageModel(tiny_model_config(**VARIANTS[name]))


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_changes_no_module_state(name: str) -> None:
    model = _model(name)
    x = torch.randint(0, 256, (2, 16))
    for training in (True, False):
        model.train(training)
        before = state(model)
        model(x, x)
        with collect(model) as stats:
            _, loss = model(x, x)
            if training:
                stats.aux_loss()
        assert stats.records or name == "dense"  # the collector path ran
        assert _same(state(model), before), f"forward changed state ({'train' if training else 'eval'})"
    model.train()
    before = state(model)
    model.generate(x[:, :4], 8, temperature=1.0, top_k=5)
    assert _same(state(model), before), "generate() in train mode changed state"


@pytest.mark.parametrize("name", VARIANTS)
def test_the_fold_is_the_only_change(name: str) -> None:
    model = _model(name).train()
    x = torch.randint(0, 256, (2, 16))
    before = state(model)
    with collect(model) as stats:
        model(x, x)
    fold_statistics(model, stats)
    assert _same(state(model), before) == (name not in STATEFUL)


def _balanced_adapter_model() -> tuple[FHMELanguageModel, nn.Module]:
    model = FHMELanguageModel(tiny_model_config(ffn="dense"))
    (adapter,) = add_fhme_adapters(model, layers=[1], num_experts=256, depth=2, heads=2, topk=4,
                                   key_dim=16, query_norm="running", balancing=Balancing(rate=0.1))
    return model, adapter


def test_adapters_added_after_construction_are_folded() -> None:
    model, adapter = _balanced_adapter_model()
    router = adapter.fractal.blocks[0].memory.router
    x = torch.randint(0, 256, (2, 16))
    model.train()
    with collect(model) as stats:
        model(x, x)
    fold_statistics(model, stats)
    assert int(router.norm.batches) == 1 and router.expert_bias.abs().sum() > 0
    assert router.key_bias.abs().sum() > 0


@pytest.mark.parametrize("kind", ["fhme", "memory", "lora"])
def test_a_fine_tuned_base_keeps_its_statistics(kind: str) -> None:
    """Adapters freeze the base's past-batch statistics (routing biases, running norms, the
    balance weight) and its balance loss with its weights; the adapters' own still fold, and
    unfreezing (full fine-tuning) folds the base's again."""
    model = _model("fhme-balanced").train()
    base = list(model.modules())
    adapter = None
    if kind == "fhme":
        (adapter,) = add_fhme_adapters(model, layers=[1], num_experts=256, depth=2, heads=2, topk=4,
                                       key_dim=16, query_norm="running", balancing=Balancing(rate=0.1))
    elif kind == "memory":
        open_memories(model)
    else:
        add_lora_adapters(model, rank=2)
    before = [_snapshot(vars(m)) for m in base]
    x = torch.randint(0, 256, (2, 16))
    with collect(model) as stats:
        model(x, x)
    assert stats.values(model.blocks[0].ffn.fractal.blocks[0].memory.router, BALANCE_LOSS)  # measured ...
    assert float(stats.aux_loss().detach()) == 0.0  # ... but not trained on
    fold_statistics(model, stats)
    assert all(_same(_snapshot(vars(m)), b) for m, b in zip(base, before))
    if adapter is not None:
        assert int(adapter.fractal.blocks[0].memory.router.norm.batches) == 1
    freeze_statistics(model, frozen=False)
    with collect(model) as stats:
        model(x, x)
    assert float(stats.aux_loss().detach()) > 0.0
    fold_statistics(model, stats)
    assert int(model.blocks[0].ffn.fractal.blocks[0].memory.router.norm.batches) == 1


def test_train_step_folds_and_a_skipped_step_does_not() -> None:
    model, adapter = _balanced_adapter_model()
    norm = adapter.fractal.blocks[1].memory.router.norm
    opt = ModelOptimizer(model, 1e-3, 0.05, 0.0)
    x = torch.randint(0, 256, (2, 16))
    model.train()
    assert train_step(model, opt, x, x, 1.0)[1] and int(norm.batches) == 1
    bias = adapter.fractal.blocks[1].memory.router.expert_bias.clone()
    _, applied = train_step(model, opt, x, x, 1.0, loss_hook=lambda loss: loss * float("nan"))
    assert not applied and int(norm.batches) == 1
    assert torch.equal(adapter.fractal.blocks[1].memory.router.expert_bias, bias)


def test_train_step_drives_a_compiled_model() -> None:
    """A torch.compile'd model refuses len() (so bool()); train_step must call it, not test it."""
    model = _model("fhme")
    opt = ModelOptimizer(model, 1e-3, 0.05, 0.0)
    x = torch.randint(0, 256, (2, 16))
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(TypeError):
        bool(compiled)
    loss, applied = train_step(model, opt, x, x, 1.0, forward=compiled)
    assert applied and loss > 0


class _Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.inner, self.reentrant = inner, reentrant

    def forward(self, x: Tensor) -> Tensor:
        return checkpoint(self.inner, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_records_once(reentrant: bool) -> None:
    """The recompute in backward runs forward again; its records are not counted twice, so the
    folded statistics equal the plain model's, and (non-reentrant checkpointing, whose first
    forward keeps grad) so do the losses and gradients. Reentrant checkpointing runs the first
    forward without grad: no differentiable aux loss can come out of it."""
    plain = _model("fhme-balanced").train()
    checkpointed = copy.deepcopy(plain)
    for block in checkpointed.blocks:
        block.ffn = _Checkpointed(block.ffn, reentrant)
    x = torch.randint(0, 256, (2, 16))
    results = []
    for model in (plain, checkpointed):
        with collect(model) as stats:
            _, loss = model(x, x)
            (loss + stats.aux_loss()).backward()
        fold_statistics(model, stats)
        kinds = Counter(kind for _, kind, _, _ in stats.records)
        results.append((kinds, dict(model.named_parameters()), dict(model.named_buffers())))
    (kinds_a, params_a, bufs_a), (kinds_b, params_b, bufs_b) = results
    if reentrant:
        del kinds_a[BALANCE_LOSS]
    assert kinds_a == kinds_b
    for (name, a), b in zip(bufs_a.items(), bufs_b.values()):
        torch.testing.assert_close(a, b, msg=name)
    if not reentrant:
        for (name, a), b in zip(params_a.items(), params_b.values()):
            if a.grad is not None:
                torch.testing.assert_close(_dense(a.grad), _dense(b.grad), msg=name)


def _dense(t: Tensor) -> Tensor:
    return t.to_dense() if t.is_sparse else t


# --- folding over data-parallel ranks ----------------------------------------------------------

FOLDED = dict(balance_rate=0.1, balance_loss=0.01, balance_target_kl=0.5, query_norm="whiten",
              adaptive_depth=True, fractal_depth=3, depth_penalty=0.01, depth_target=0.5)


def _fold_once(model: FHMELanguageModel, x: Tensor) -> dict[str, Tensor]:
    model.train()
    with collect(model) as stats:
        model(x, x)
    fold_statistics(model, stats)
    return {n: b.clone() for n, b in model.named_buffers()}


def _rank_fold(rank: int, world: int, port: int, x: Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = FHMELanguageModel(tiny_model_config(**FOLDED))
    torch.save(_fold_once(model, x.chunk(world)[rank]), f"{out}.{rank}")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fold_over_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """Sums and counts all-reduced, choices all-gathered: P ranks on halves of a batch fold the
    same running norms, routing biases and depth cost controller as one process on all of it."""
    x = torch.randint(0, 256, (4, 16))
    torch.manual_seed(0)
    single = _fold_once(FHMELanguageModel(tiny_model_config(**FOLDED)), x)
    out = str(tmp_path / "buffers")
    mp.spawn(_rank_fold, args=(2, _free_port(), x, out), nprocs=2)
    for rank in range(2):
        folded = torch.load(f"{out}.{rank}")
        assert folded.keys() == single.keys()
        for name, value in single.items():
            if name.endswith("expert_bias"):  # equal steps added in any order: bit-identical
                assert torch.equal(folded[name], value), name
            else:
                torch.testing.assert_close(folded[name], value, rtol=1e-5, atol=1e-6, msg=name)
        assert any(folded[n].abs().sum() > 0 for n in folded if n.endswith("expert_bias"))
        assert any(folded[n].sum() > 0 for n in folded if n.endswith("usage_ema"))


# --- host syncs ----------------------------------------------------------------------------------


def test_the_sync_counter_sees_what_it_claims() -> None:
    t, two, rows = torch.arange(6.0), torch.tensor(2), torch.tensor([1, 2])
    with HostSyncs() as syncs:
        t.sum().item(), t.nonzero(), t[t > 2], t.tolist(), bool(t.any()), t.repeat_interleave(two)
        torch.unique_consecutive(t, return_counts=True), torch.tensor([1.0, 2.0])
        t.repeat_interleave(2), t[rows], torch.arange(3), torch.full((2,), 1.0)  # fixed sizes, no host data
    assert syncs.total == 8, syncs.found


@pytest.mark.parametrize("name", ["fhme", "fhme-route-once", "peer", "pkm", "memplus", "dense", "moe", "pkm-conv",
                                  "fhme-3-part-keys"])
def test_no_host_sync_in_forward_and_one_per_training_step(name: str) -> None:
    model = _model(name)
    opt = ModelOptimizer(model, 1e-3, 0.05, 0.0)
    x = torch.randint(0, 256, (2, 16))
    train_step(model, opt, x, x, 1.0)  # optimizer state exists: a steady-state step follows
    model.train()
    with HostSyncs() as train, collect(model) as stats:
        _, loss = model(x, x)
        stats.aux_loss()
    model.eval()
    with HostSyncs() as evaluation, torch.no_grad():
        model(x)
    assert train.total == 0 and evaluation.total == 0, (train.found, evaluation.found)
    model.train()
    with HostSyncs() as step:
        train_step(model, opt, x, x, 1.0)  # forward, backward, optimizer step and fold
    assert step.total <= 1, step.found


@pytest.mark.parametrize("name", ["fhme", "fhme-3-part-keys"])
def test_the_first_forward_of_a_process_makes_no_tensor_from_host_data(name: str) -> None:
    """Constants the router builds once (and caches) are made on the device, not copied there."""
    model = _model(name).eval()
    product_keys._pairs_that_can_win.cache_clear()
    with HostSyncs() as syncs, torch.no_grad():
        model(torch.randint(0, 256, (2, 16)))
    assert syncs.total == 0, syncs.found


@pytest.mark.parametrize("name", ["fhme", "fhme-3-part-keys"])
def test_what_an_inference_mode_forward_caches_serves_training(name: str) -> None:
    """The router's pair lists and the gathers' scratch buffers outlive the call that made them:
    made under inference mode, they would break the next training step."""
    model = _model(name)
    product_keys._pairs_that_can_win.cache_clear()
    experts._workspace.buffers.clear()
    x = torch.randint(0, 256, (2, 16))
    with torch.inference_mode():
        model(x, x)
    _, loss = model(x, x)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("rule", ["ponder", "threshold"])
def test_adaptive_depth_syncs_once_per_layer(rule: str) -> None:
    model = FHMELanguageModel(tiny_model_config(adaptive_depth=True, fractal_depth=3, depth_rule=rule,
                                                depth_target=0.5)).eval()
    for layer in model.fhme_layers():  # tokens spread over every depth
        torch.nn.init.normal_(layer.depth_router.weight, std=2.0)
    x = torch.randint(0, 256, (4, 32))
    with HostSyncs() as syncs, torch.no_grad(), collect(model):
        model(x)
    assert syncs.total == model.cfg.n_layers, syncs.found  # the stage sizes, read once
    model.train()
    with HostSyncs() as train, collect(model):
        model(x, x)
    assert train.total == model.cfg.n_layers, train.found
