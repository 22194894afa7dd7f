"""Where adaptive depth spends compute: per-byte classes and the depth table."""

from __future__ import annotations

import json

import pytest
import torch

from fractalmoe import FHMELanguageModel
from fractalmoe.config import tiny_model_config
from fractalmoe.plots import byte_classes, depth_by_byte_class, token_depths


def test_byte_classes_mark_word_starts_and_separators() -> None:
    got = byte_classes(b"Hi, you\n2")
    assert got[0] == {"letter", "start of word"} and got[1] == {"letter"}
    assert got[2] == {"punctuation"} and got[3] == {"space"}
    assert got[4] == {"letter", "start of word"} and got[7] == {"newline"} and got[8] == {"digit"}


def _mixed_depths(model: FHMELanguageModel) -> FHMELanguageModel:
    """Random depth routers, so tokens spread over the depths (at init every token runs full depth)."""
    for layer in model.fhme_layers():
        torch.nn.init.normal_(layer.depth_router.weight, std=2.0)
    return model.eval()


def _chosen_depths(model: FHMELanguageModel, text: str) -> torch.Tensor:
    """(layers, T): each FHME layer's own choose_depth on the input it receives, the text read in
    consecutive windows of the context."""
    data = torch.tensor(list(text.encode("utf-8")))
    per_window = []
    for start in range(0, data.numel(), model.cfg.seq_len):
        seen: list[torch.Tensor] = []
        hooks = [layer.register_forward_pre_hook(
            lambda mod, args: seen.append(mod.choose_depth(args[0].reshape(-1, mod.dim))[0]))
            for layer in model.fhme_layers()]
        with torch.no_grad():
            model(data[start:start + model.cfg.seq_len].unsqueeze(0))
        for hook in hooks:
            hook.remove()
        per_window.append(torch.stack(seen))
    return torch.cat(per_window, dim=1)


def test_depth_table_averages_the_chosen_depths_per_class() -> None:
    model = _mixed_depths(FHMELanguageModel(tiny_model_config(fractal_depth=3, adaptive_depth=True, seq_len=32)))
    text = "To be, or not to be:\nthat is the question."  # 42 bytes: two windows
    chosen = _chosen_depths(model, text)
    assert chosen.shape == (2, len(text)) and len(set(chosen.flatten().tolist())) == 3
    depth = token_depths(model, text)
    torch.testing.assert_close(depth, chosen.float().mean(0))
    table = depth_by_byte_class(model, text)
    spaces = [float(depth[i]) for i, ch in enumerate(text) if ch == " "]
    assert f"| space | {len(spaces)} | {sum(spaces) / len(spaces):.2f} |" in table
    assert f"| all | {len(text)} | {float(depth.mean()):.2f} |" in table


def test_depths_cover_a_text_longer_than_the_context() -> None:
    model = _mixed_depths(FHMELanguageModel(tiny_model_config(fractal_depth=2, adaptive_depth=True, seq_len=16)))
    text = "a longer paragraph than one window of sixteen bytes"
    depth = token_depths(model, text)
    assert depth.shape == (len(text),) and bool(((depth >= 1) & (depth <= 2)).all())
    assert len(set(depth.tolist())) > 1  # the depths vary, in every window
    assert all(float(w.min()) < float(w.max()) for w in depth.split(16)[:-1])
    layers = len(model.fhme_layers())  # a mean over layers of whole depths
    torch.testing.assert_close(depth * layers, (depth * layers).round())


def test_depth_map_draws_one_cell_per_byte_with_each_character_on_its_first_byte(monkeypatch, tmp_path) -> None:
    """Multi-byte characters must not shift the labels against the per-byte depths."""
    import matplotlib.axes

    from fractalmoe.plots import byte_labels, plot_depth_map

    assert byte_labels("aé 日b") == ["a", "é", "", " ", "日", "", "", "b"]
    drawn: list[tuple[float, float, str]] = []
    real_text = matplotlib.axes.Axes.text

    def text_recorded(ax, x, y, s, *args, **kwargs):
        drawn.append((x, y, s))
        return real_text(ax, x, y, s, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "text", text_recorded)
    model = FHMELanguageModel(tiny_model_config(fractal_depth=2, adaptive_depth=True, seq_len=16))
    text = "café, naïve"
    plot_depth_map(model, text, tmp_path)
    cells = [(x, y, s) for x, y, s in drawn if s]
    assert len(drawn) == len(text.encode("utf-8")) == token_depths(model, text).numel()
    assert [s for _, _, s in cells] == list(text)
    assert cells[4][2] == "," and cells[4][0] == 5.5  # after "é", two bytes: the fifth character sits in cell 5


@pytest.mark.parametrize("key, values", [("gate", ["softmax", "sigmoid"]), ("adaptive_depth", ["true", "false"]),
                                         ("num_experts", ["1024", "256"])])
def test_sweep_plot_takes_any_values(key: str, values: list[str], tmp_path) -> None:
    """compare --sweep over a non-numeric field plots the values as categories."""
    from fractalmoe.plots import plot_comparison

    rows = []
    for i, value in enumerate(values):
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 2, "val_bpb": 2.0 + i, "elapsed_s": 1.0}) + "\n")
        (run_dir / "config.json").write_text(json.dumps({"train": {"batch_size": 4}}))
        rows.append({"model": f"fhme {key}={value}", "seed": 1, "val_bpb": 2.0 + i, "flops_per_token": 1e6,
                     "config": {"seq_len": 16}, "run_dir": str(run_dir)})
    paths = plot_comparison(rows, tmp_path)
    assert tmp_path / f"bpb_vs_{key}.png" in paths and (tmp_path / f"bpb_vs_{key}.png").stat().st_size > 0
