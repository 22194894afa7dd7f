"""Shared fixtures: a seconds-scale model config and a fixed seed."""

from __future__ import annotations

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
