"""Configs: validation names the field, dict round trip, TOML files, property-based fuzzing."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fractalmoe.cli import main
from fractalmoe.config import ModelConfig, RunConfig, TrainConfig, load_config_file, tiny_model_config
from fractalmoe.model import FHMELanguageModel
from fractalmoe.routing import ProductKeyRouter


def test_heads_per_column() -> None:
    assert ModelConfig().heads_per_column == (2, 2)
    assert ModelConfig(column_heads="1,4").heads_per_column == (1, 4)


def test_layer_config_is_dense_outside_routed_layers() -> None:
    cfg = ModelConfig(routed_layers="1,3", ffn_hidden=160)
    assert [cfg.layer_config(i).ffn for i in range(4)] == ["dense", "fhme", "dense", "fhme"]
    assert cfg.layer_config(0).ffn_hidden == 160 and cfg.layer_config(1) is cfg
    assert all(ModelConfig().layer_config(i).ffn == "fhme" for i in range(4))


def test_layer_balance_loss_gives_each_layer_its_weight() -> None:
    cfg = ModelConfig(balance_loss=0.01, layer_balance_loss="0.03,0,0.005,0.005", routed_layers="0,2,3")
    assert [cfg.layer_config(i).balance_loss for i in (0, 2, 3)] == [0.03, 0.005, 0.005]
    assert cfg.layer_config(1).ffn == "dense"
    assert all(ModelConfig(balance_loss=0.01).layer_config(i).balance_loss == 0.01 for i in range(4))
    model = FHMELanguageModel(tiny_model_config(n_layers=2, layer_balance_loss="0.02,0.001"))
    assert [{r.balancing.loss for r in block.modules() if isinstance(r, ProductKeyRouter)}
            for block in model.blocks] == [{0.02}, {0.001}]


def test_round_trip() -> None:
    cfg = ModelConfig(dim=64, ffn="moe", adaptive_depth=True, fractal_depth=3)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    run = RunConfig(cfg, TrainConfig(lr=1e-3))
    assert RunConfig.from_dict(run.to_dict()) == run


@pytest.mark.parametrize("field,value", [("dim", 0), ("num_experts", 1000), ("ffn", "mlp"),
                                         ("topk", 1000), ("fractal_depth", 0), ("dropout", 1.5),
                                         ("key_dim", 15), ("gate", "tanh"), ("column_heads", "1,x"),
                                         ("column_heads", "0,4"), ("column_heads", "1,2,4"),
                                         ("routed_layers", "4"), ("routed_layers", "1,1"),
                                         ("routed_layers", "a"), ("key_parts", 1), ("key_parts", 5),
                                         ("layer_balance_loss", "0.1,0.1"), ("layer_balance_loss", "1,-1,0,0"),
                                         ("layer_balance_loss", "1,nan,0,0"), ("layer_balance_loss", "a,0,0,0"),
                                         ("deep_query", "output"), ("repeat_rows", "fresh")])
def test_bad_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


@pytest.mark.parametrize("settings,field", [(dict(key_parts=3), "key_dim"),  # 16 is no multiple of 3
                                            (dict(key_parts=3, key_dim=24, num_experts=1009), "num_experts"),
                                            (dict(key_parts=3, key_dim=24, balance_loss=0.01), "key_parts"),
                                            (dict(key_parts=3, key_dim=24, layer_balance_loss="0,0,0,0.01"),
                                             "key_parts")])
def test_three_key_parts_check_their_settings(settings: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig(**settings)
    ok = ModelConfig(key_parts=3, key_dim=24, num_experts=262144, topk=100)  # top-k past any table's 64
    assert ok.max_topk == 262144


def test_table_learning_rate_range_follows_the_rule() -> None:
    """Adaptive rules take rates below 10; SGD's step is rate x gradient (~1e-4), so up to 1e4."""
    with pytest.raises(ValueError, match="expert_lr"):
        TrainConfig(expert_lr=300.0)
    assert TrainConfig(expert_optim="row_sgd", expert_lr=300.0).expert_lr == 300.0
    with pytest.raises(ValueError, match="expert_lr"):
        TrainConfig(expert_optim="row_sgd", expert_lr=2e4)


def test_wrong_types_and_unknown_keys() -> None:
    with pytest.raises(ValueError, match="dim must be int"):
        ModelConfig.from_dict({"dim": "wide"})
    with pytest.raises(ValueError, match="adaptive_depth must be bool"):
        ModelConfig.from_dict({"adaptive_depth": 1})
    with pytest.raises(ValueError, match="valid keys"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_toml_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[model]\ndim = 64\nffn = "dense"\n[train]\nlr = 0.001\n')
    cfg = load_config_file(path).with_overrides(["model.n_layers=2", "batch_size=8"])
    assert (cfg.model.dim, cfg.model.ffn, cfg.model.n_layers) == (64, "dense", 2)
    assert (cfg.train.lr, cfg.train.batch_size) == (0.001, 8)


def test_yaml_file_reads_as_its_toml_twin(tmp_path: Path) -> None:
    toml, yaml = tmp_path / "c.toml", tmp_path / "c.yaml"
    toml.write_text('[model]\ndim = 64\nffn = "dense"\nadaptive_depth = false\n[train]\nlr = 1e-3\n')
    yaml.write_text("model:\n  dim: 64\n  ffn: dense\n  adaptive_depth: false\ntrain:\n  lr: 1e-3\n")
    assert load_config_file(yaml) == load_config_file(toml)
    for text, match in (("model: [1, 2", "not valid YAML"), ("- 1\n- 2\n", "expected a mapping"),
                        ("model:\n  dim: wide\n", "dim must be int")):
        yaml.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_config_file(yaml)


def test_shipped_configs_load() -> None:
    for path in Path(__file__).parents[1].glob("configs/*.toml"):
        load_config_file(path)


_toml_values = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.booleans(),
                         st.text(max_size=8))
_keys = st.sampled_from(ModelConfig.field_names() + ["bogus", ""])


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_keys, _toml_values, max_size=4))
def test_config_loader_only_raises_value_error(data: dict) -> None:
    try:
        RunConfig.from_dict({"model": data})
    except ValueError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(max_size=20), max_size=3))
def test_set_overrides_only_raise_value_error(items: list[str]) -> None:
    try:
        RunConfig(ModelConfig(), TrainConfig()).with_overrides(items)
    except ValueError:
        pass


class _Started(Exception):
    """Raised by the stand-in for training: parsing and validation went through."""


def _fake_run(*args, **kwargs):
    raise _Started


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from(["train", "eval", "generate", "--set", "dim=x", "dim=8", "--max-steps",
                                 "-1", "3", "abc", "--ckpt", "/nonexistent", "--time-budget", "nan",
                                 "--config", "--device", "tpu", "cpu", "--top-k", "0", "--json"]),
                min_size=1, max_size=6))
def test_cli_argument_parsing_never_tracebacks(argv: list[str]) -> None:
    err = io.StringIO()
    with mock.patch("fractalmoe.train.run", _fake_run), contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except _Started:
            code = 0
    assert "Traceback" not in err.getvalue()
    assert code in (0, 2), err.getvalue()
    if code == 2:
        assert len(err.getvalue().strip().splitlines()) == 1
