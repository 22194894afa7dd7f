"""Shared fixtures: a seconds-scale model config, a fixed seed, and a skip where torch.compile
cannot build CPU kernels."""

from __future__ import annotations

import functools

import pytest
import torch

from fractalmoe.config import ModelConfig, tiny_model_config


@pytest.fixture(autouse=True)
def seed() -> int:
    torch.manual_seed(0)
    return 0


@pytest.fixture
def tiny_config() -> ModelConfig:
    return tiny_model_config()


@functools.cache
def _compiles() -> bool:
    """Can torch.compile build a CPU kernel here (a C++ compiler and headers)?"""
    try:
        return bool(torch.compile(lambda t: t + 1)(torch.zeros(2)).eq(1).all())
    except Exception:  # noqa: BLE001 - any toolchain failure means: not on this machine
        return False


@pytest.fixture
def needs_compiler() -> None:
    """Skips the test where torch.compile cannot build CPU kernels (the fused row update)."""
    if not _compiles():
        pytest.skip("torch.compile cannot build CPU kernels here (needs a C++ compiler)")
