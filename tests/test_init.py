"""Materialising a model built on the meta device: after ``to_empty``, ``init_weights`` gives,
from the same RNG state, exactly what it gives an eagerly built model, and that is the
constructor's start (constants equal, random draws of the same spread); tied weights stay tied."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fractalmoe import FHME
from fractalmoe.config import tiny_model_config
from fractalmoe.model import FHMELanguageModel

VARIANTS = {
    "fhme": dict(ffn_conv=4, block_conv=3), "neuron": dict(block="neuron"), "gated": dict(block="gated"),
    "pkm-biases": dict(ffn="pkm", balance_rate=0.1), "peer": dict(ffn="peer"), "memplus": dict(ffn="memplus"),
    "moe": dict(ffn="moe"), "dense": dict(ffn="dense"), "whitened": dict(query_norm="whiten"),
    "running-norm": dict(query_norm="running"), "three-part-keys": dict(key_parts=3, key_dim=12, num_experts=512),
    "halting": dict(adaptive_depth=True, fractal_depth=3, depth_rule="threshold", depth_target=0.45),
    "ponder": dict(adaptive_depth=True, fractal_depth=3, depth_rule="ponder", depth_penalty=0.01),
    "bf16-tables": dict(expert_dtype="bfloat16"), "fp16-tables": dict(expert_dtype="float16"),
}


def _config(name: str):
    return tiny_model_config(**({"ffn": "fhme"} | VARIANTS[name]))


def _from_meta_as_eager(build: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(eager, from meta): one built as usual, one on the meta device and materialised with
    ``to_empty``; both then ``init_weights()`` from the same RNG state, and must agree bitwise."""
    eager = build()
    with torch.device("meta"):
        model = build()
    model.to_empty(device="cpu")
    for m in (eager, model):
        torch.manual_seed(5)
        m.init_weights()
    for (key, a), b in zip(eager.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), key
    return eager, model


@pytest.mark.parametrize("name", VARIANTS)
def test_a_model_materialised_from_meta_initialises_as_an_eager_one(name: str) -> None:
    _from_meta_as_eager(lambda: FHMELanguageModel(_config(name)))


@pytest.mark.parametrize("name", VARIANTS)
def test_init_weights_restarts_the_model_as_its_constructor_started_it(name: str) -> None:
    """Every tensor the constructor sets the same way from any seed comes back equal; every drawn
    one comes back drawn anew (from the same distribution: its spread within 20%, where it has
    enough entries to tell)."""
    starts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        starts.append(FHMELanguageModel(_config(name)).state_dict())
    model = FHMELanguageModel(_config(name))
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.full_like(t, 7))  # what training or to_empty may have left
    torch.manual_seed(2)
    model.init_weights()
    for key, b in model.state_dict().items():
        a, other = starts[0][key], starts[1][key]
        if torch.equal(a, other):  # a constant start
            assert torch.equal(a, b), key
        else:
            assert not torch.equal(a, b), key
            if a.numel() >= 64:
                ratio = float(b.float().std() / a.float().std())
                assert 0.8 < ratio < 1.25, (key, ratio)


def test_the_layer_alone_initialises_in_place() -> None:
    """A drop-in FHME in someone else's model: ``init_weights`` on the layer after ``to_empty``."""
    eager, layer = _from_meta_as_eager(lambda: FHME(16, 256, depth=2, heads=2, topk=4, key_dim=8, block="value",
                                                     adaptive_depth=True, depth_rule="threshold",
                                                     depth_target=0.5))
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(layer(x), eager(x))


@pytest.mark.parametrize("how", ["to_empty", "assign"])
def test_materialising_keeps_the_head_tied_to_the_embeddings(how: str) -> None:
    """``to_empty`` and ``load_state_dict(..., assign=True)`` replace parameters one module at a
    time; untied, the head and the embeddings would train as two parameters on one storage."""
    real = FHMELanguageModel(_config("fhme"))
    with torch.device("meta"):
        model = FHMELanguageModel(_config("fhme"))
    if how == "to_empty":
        model.to_empty(device="cpu")
    else:
        model.load_state_dict(real.state_dict(), assign=True)
    assert model.head.weight is model.embed.weight
    assert len(list(model.parameters())) == len(list(real.parameters()))


@pytest.mark.parametrize("rank", [0, 2])  # the last shard crosses a 64K-row chunk of the draw
def test_a_sharded_bank_redraws_its_rows_from_the_banks_seed(rank: int) -> None:
    """After ``to_empty`` a row-sharded table holds nothing; its reset draws this rank's rows of
    the bank's table again (every rank from the same seed, so the shards stay one table)."""
    from fractalmoe.distributed import DistContext, ShardedExpertBank
    from fractalmoe.experts import ExpertBank

    bank = ExpertBank(70_000, 2, kind="neuron")
    shard = ShardedExpertBank(bank, DistContext(rank, 3)).to_empty(device="cpu")
    shard.reset_parameters()
    for name, table in shard.tables().items():
        assert torch.equal(table, getattr(bank, name)[shard.lo:shard.hi]), name
