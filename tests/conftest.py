"""Shared fixtures: a seconds-scale model config, a fixed seed, a skip where torch.compile
cannot build CPU kernels, and a loader of the scripts under benchmarks/."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

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


@pytest.fixture
def load_benchmark(monkeypatch) -> Callable[[str], ModuleType]:
    """Loads benchmarks/NAME.py as a module (the folder on sys.path for its sibling imports)."""
    folder = Path(__file__).parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
