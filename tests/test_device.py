"""Device discipline, checked on a CPU machine: the meta device stands in for an accelerator.

A training step on meta tensors runs every op of the forward, the backward and the row-sparse
optimizer step without data, so a tensor that a module creates on the CPU and mixes into the
step fails, and a copy between the host and the device shows in ``HostSyncs``: on a GPU it would
be a host sync (or a device mismatch). The dense AdamW is torch's own (its fused kernel has no
meta version); adaptive depth's compaction reads its stage sizes on the host by design
(``test_purity.py``), so adaptive depth runs its masked path here."""

from __future__ import annotations

import pytest
import torch
from host_syncs import HostSyncs
from placement import off_device

from fractalmoe.config import tiny_model_config
from fractalmoe.model import FHMELanguageModel
from fractalmoe.optim import LazyAdam, ModelOptimizer, RowwiseAdagrad, RowOptimizer
from fractalmoe.stats import collect, fold_statistics

MODELS = {"fhme": {}, "fhme-3-part-keys": dict(key_parts=3, key_dim=24, route_once=True),
          "pkm": dict(ffn="pkm"), "peer": dict(ffn="peer"), "memplus": dict(ffn="memplus"),
          "dense": dict(ffn="dense"), "moe": dict(ffn="moe")}


def _train_on_meta(model: FHMELanguageModel, opt: ModelOptimizer, x: torch.Tensor) -> None:
    """Two training steps (the first creates the optimizer state), each with no host sync and no
    host-device copy, leaving everything on the meta device."""
    for _ in range(2):
        with HostSyncs() as syncs:
            with collect(model) as stats:
                _, loss = model(x, x)
                (loss + stats.aux_loss()).backward()
            if opt.sparse is not None:
                opt.sparse.step()
            fold_statistics(model, stats)
        assert syncs.total == 0, syncs.found
        assert loss.is_meta and off_device(model, [opt.sparse] if opt.sparse else [], "meta") == []
        opt.zero_grad()


@pytest.mark.parametrize("rule", ["rowwise_adagrad", "lazy_adam", "rowwise_adagrad+deferred", "row_sgd"])
@pytest.mark.parametrize("name", list(MODELS))
def test_a_training_step_stays_on_its_device(name: str, rule: str) -> None:
    expert_optim, _, deferred = rule.partition("+")
    with torch.device("meta"):
        model = FHMELanguageModel(tiny_model_config(**MODELS[name])).train()
        x = torch.randint(0, 256, (2, 16))
    _train_on_meta(model, ModelOptimizer(model, 1e-3, 0.05, 0.0, expert_optim, deferred_table_grads=bool(deferred)), x)
    model.eval()
    with HostSyncs() as syncs, torch.no_grad():
        assert model(x).is_meta
    assert syncs.total == 0, syncs.found


VARIANTS = {"adaptive-masked": dict(adaptive_depth=True, fractal_depth=3, depth_target=0.5),
            "adaptive-threshold-masked": dict(adaptive_depth=True, fractal_depth=3, depth_target=0.5,
                                              depth_rule="threshold"),
            "balance-rate": dict(balance_rate=0.01), "balance-loss": dict(balance_loss=0.01),
            "running-norm": dict(query_norm="running"), "whitened": dict(query_norm="whiten"),
            "shared-bank": dict(share_bank=True), "neuron": dict(block="neuron"), "gated": dict(block="gated"),
            "drop-path": dict(drop_path_local=0.1, drop_path_global=0.1), "bf16": dict(expert_dtype="bfloat16"),
            "fp16": dict(expert_dtype="float16"), "untied": dict(tie_blocks=False)}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_fhme_variant_trains_on_its_device(name: str) -> None:
    with torch.device("meta"):
        model = FHMELanguageModel(tiny_model_config(**VARIANTS[name])).train()
        x = torch.randint(0, 256, (2, 16))
    for layer in model.fhme_layers():
        layer.compact = False  # adaptive depth's masked path
    _train_on_meta(model, ModelOptimizer(model, 1e-3, 0.05, 0.0, "lazy_adam"), x)


@pytest.mark.parametrize(("output_gate", "embeddings"), [(False, False), (True, False), (False, True)])
def test_adapters_added_to_a_model_on_a_device_train_there(output_gate: bool, embeddings: bool) -> None:
    from fractalmoe.adapters import add_fhme_adapters

    with torch.device("meta"):
        model = FHMELanguageModel(tiny_model_config(ffn="dense")).train()
        x = torch.randint(0, 256, (2, 16))
    add_fhme_adapters(model, num_experts=256, output_gate=output_gate,  # built outside the device block
                      embeddings=embeddings)
    opt = ModelOptimizer(model, 1e-3, 0.05, 0.0, "lazy_adam")
    assert opt.tables  # the adapters' tables, found on their new tensors
    _train_on_meta(model, opt, x)


@pytest.mark.parametrize("rule", [RowwiseAdagrad, LazyAdam])
def test_a_resumed_row_optimizer_copies_nothing_to_the_device_in_its_step(rule: type[RowOptimizer]) -> None:
    """State read from a file is on the host: loading places it beside the table, so the first
    step after a resume makes no copy (on a GPU, one that waits for the device)."""
    from fractalmoe.experts import value_mix

    def step(opt: RowOptimizer) -> None:
        value_mix(idx, torch.ones(4, 3, device="meta"), table).sum().backward()
        opt.step()
        opt.zero_grad()

    table = torch.nn.Parameter(torch.empty(64, 8, device="meta"))
    idx = torch.randint(0, 64, (4, 3), device="meta")
    opt = rule([table])
    step(opt)
    saved = opt.state_dict()
    saved["state"] = {i: {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in st.items()}  # as read: on the host
                      for i, st in saved["state"].items()}
    resumed = rule([table])
    resumed.load_state_dict(saved)
    with HostSyncs() as syncs:
        step(resumed)
    assert syncs.total == 0, syncs.found
    assert all(v.is_meta for v in resumed.state[table].values())


def test_micro_batches_with_recomputed_blocks_stay_on_the_device() -> None:
    """Gradient accumulation's collectors folded together, and activation checkpointing's
    recompute inside backward: still no host sync and nothing off the device."""
    with torch.device("meta"):
        model = FHMELanguageModel(tiny_model_config(balance_rate=0.01)).train()
        x = torch.randint(0, 256, (4, 16))
    model.checkpoint_blocks = True
    opt = ModelOptimizer(model, 1e-3, 0.05, 0.0, "lazy_adam")
    for _ in range(2):
        with HostSyncs() as syncs:
            parts = []
            for x_part in x.chunk(2):
                with collect(model) as stats:
                    _, loss = model(x_part, x_part)
                    ((loss + stats.aux_loss()) / 2).backward()
                parts.append(stats)
            opt.sparse.step()
            fold_statistics(model, parts)
        assert syncs.total == 0, syncs.found
        assert off_device(model, [opt.sparse], "meta") == []
        opt.zero_grad()
