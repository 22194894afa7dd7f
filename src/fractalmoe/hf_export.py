"""Export a run as a directory that ``transformers`` loads with ``trust_remote_code=True``.

OUT/config.json                 model_type "fractalmoe", the ModelConfig, auto_map
OUT/modeling_fractalmoe.py      a thin PreTrainedModel around FHMELanguageModel (needs fractalmoe)
OUT/model.safetensors           the weights, under the "model." prefix
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from .checkpoint import load_model_from_run

MODELING = '''"""transformers wrapper of a FractalMoE language model (pip install fractalmoe)."""

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from fractalmoe.config import ModelConfig
from fractalmoe.model import FHMELanguageModel


class FractalMoEConfig(PretrainedConfig):
    model_type = "fractalmoe"

    def __init__(self, fractalmoe=None, **kwargs):
        self.fractalmoe = fractalmoe or {}
        super().__init__(**kwargs)


class FractalMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = FractalMoEConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = FHMELanguageModel(ModelConfig.from_dict(config.fractalmoe))
        self.post_init()

    def _init_weights(self, module):
        pass  # weights come from model.safetensors

    def forward(self, input_ids, labels=None, **kwargs):
        logits = self.model(input_ids[:, -self.model.cfg.seq_len:])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)
'''


def export_hf(run_dir: str | Path, out: str | Path) -> Path:
    """Write the transformers directory for a run's latest checkpoint."""
    model, config, _ = load_model_from_run(run_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "modeling_fractalmoe.py").write_text(MODELING)
    hf_config = {
        "model_type": "fractalmoe",
        "architectures": ["FractalMoEForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_fractalmoe.FractalMoEConfig",
                     "AutoModelForCausalLM": "modeling_fractalmoe.FractalMoEForCausalLM"},
        "fractalmoe": config.model.to_dict(),
        "vocab_size": config.model.vocab_size,
        "tie_word_embeddings": False,  # the tie lives inside FHMELanguageModel
    }
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    # Every state-dict entry, tied ones as their own copies, so loading needs no tying logic.
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
