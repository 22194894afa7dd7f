"""Where adaptive depth spends compute: per-byte classes and the depth table."""

from __future__ import annotations

import torch

from fractalmoe import FHMELanguageModel
from fractalmoe.config import tiny_model_config
from fractalmoe.plots import byte_classes, depth_by_byte_class, token_depths


def test_byte_classes_mark_word_starts_and_separators() -> None:
    got = byte_classes(b"Hi, you\n2")
    assert got[0] == {"letter", "start of word"} and got[1] == {"letter"}
    assert got[2] == {"punctuation"} and got[3] == {"space"}
    assert got[4] == {"letter", "start of word"} and got[7] == {"newline"} and got[8] == {"digit"}


def test_depth_table_averages_the_chosen_depths_per_class() -> None:
    model = FHMELanguageModel(tiny_model_config(fractal_depth=3, adaptive_depth=True, seq_len=64))
    for layer in model.fhme_layers():
        torch.nn.init.normal_(layer.depth_router.weight, std=2.0)
    text = "To be, or not to be:\nthat is the question."
    depth = token_depths(model, text)
    table = depth_by_byte_class(model, text)
    spaces = [float(depth[i]) for i, ch in enumerate(text) if ch == " "]
    assert f"| space | {len(spaces)} | {sum(spaces) / len(spaces):.2f} |" in table
    assert f"| all | {len(text)} | {float(depth.mean()):.2f} |" in table


def test_depths_cover_a_text_longer_than_the_context() -> None:
    model = FHMELanguageModel(tiny_model_config(fractal_depth=2, adaptive_depth=True, seq_len=16))
    text = "a longer paragraph than one window of sixteen bytes"
    depth = token_depths(model, text)
    assert depth.shape == (len(text),) and bool(((depth >= 1) & (depth <= 2)).all())
