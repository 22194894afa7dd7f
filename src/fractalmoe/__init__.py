"""FractalMoE: language models whose FFNs are a Fractal Hyper-Mixture of Experts (FHME)."""

from .config import ModelConfig, RunConfig, TrainConfig
from .fhme import FHME
from .fractal import FractalExpert
from .model import FHMELanguageModel, FHMETransformerBlock
from .routing import Balancing, ProductKeyMemory
from .stats import collect, fold_statistics

__all__ = [
    "FHME",
    "Balancing",
    "FHMELanguageModel",
    "FHMETransformerBlock",
    "FractalExpert",
    "ModelConfig",
    "ProductKeyMemory",
    "RunConfig",
    "TrainConfig",
    "collect",
    "fold_statistics",
]
__version__ = "0.1.0"
