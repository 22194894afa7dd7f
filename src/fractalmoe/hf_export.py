"""Export a run as a directory that ``transformers`` loads with ``trust_remote_code=True``.

OUT/config.json                 model_type "fractalmoe", the ModelConfig, auto_map
OUT/modeling_fractalmoe.py      a thin PreTrainedModel around FHMELanguageModel (needs fractalmoe)
OUT/model.safetensors           the weights, under the "model." prefix, each tensor once

A tensor reachable under several state-dict names (the head tied to the embedding, an expert
bank shared by several blocks or layers) is written once, under its first name; the other names
are recorded as aliases (config.json "fractalmoe_aliases" and the file's metadata) and tied back
to it on load, so the exported file is no larger than the model's unique tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .checkpoint import load_model_from_run, run_extra
from .config import ModelConfig
from .model import FHMELanguageModel

MODELING = '''"""transformers wrapper of a FractalMoE language model (pip install fractalmoe)."""

import re

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
        self.num_hidden_layers = self.fractalmoe.get("n_layers", 0)  # what generate's cache set-up reads
        super().__init__(**kwargs)


class FractalMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = FractalMoEConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = FHMELanguageModel(ModelConfig.from_dict(config.fractalmoe))
        # Names stored once in model.safetensors: alias -> stored name, tied back after loading
        # (those that name a tensor of this model: a newer fractalmoe may have dropped some).
        names = {n for n, _ in self.named_parameters(remove_duplicate=False)}
        names |= {n for n, _ in self.named_buffers(remove_duplicate=False)}
        aliases = {f"model.{a}": f"model.{s}" for a, s in getattr(config, "fractalmoe_aliases", {}).items()
                   if f"model.{a}" in names and f"model.{s}" in names}
        self._fractalmoe_aliases = aliases
        self._tied_weights_keys = {re.escape(a): re.escape(s) for a, s in aliases.items()}
        self._keys_to_ignore_on_load_missing = [re.escape(a) for a in aliases]
        self.post_init()

    def tie_weights(self, *args, **kwargs):
        """Point every alias at its stored tensor, whatever the loader did with either."""
        out = super().tie_weights(*args, **kwargs)
        named = dict(self.named_parameters(remove_duplicate=False))
        named.update(self.named_buffers(remove_duplicate=False))
        for alias, stored in getattr(self, "_fractalmoe_aliases", {}).items():
            if stored in named and named.get(alias) is not named[stored]:
                parent, _, leaf = alias.rpartition(".")
                module = self.get_submodule(parent)
                if isinstance(named[stored], torch.nn.Parameter):
                    setattr(module, leaf, named[stored])
                else:
                    module.register_buffer(leaf, named[stored])
        return out

    def _init_weights(self, module):
        pass  # weights come from model.safetensors

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        """The whole sequence at every step: the forward keeps no transformers cache."""
        return {"input_ids": input_ids}

    def forward(self, input_ids, labels=None, **kwargs):
        logits = self.model(input_ids[:, -self.model.cfg.seq_len:])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)
'''


def unique_tensors(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(each storage once under its first name, alias name -> that name). Two entries are one
    tensor when they share data pointer, shape, strides and dtype."""
    first: dict[tuple, str] = {}
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() > 0 and key in first:
            aliases[name] = first[key]
            continue
        first[key] = name
        tensors[name] = t
    return tensors, aliases


def export_hf(run_dir: str | Path, out: str | Path) -> Path:
    """Write the transformers directory for a run's latest checkpoint."""
    model, config, _ = load_model_from_run(run_dir)
    base = run_extra(run_dir).get("base")
    if base and set(model.state_dict()) != _plain_names(config.model):
        raise ValueError(f"{run_dir}: fine-tuning runs with adapters (fhme, lora) cannot be exported (their "
                         f"weights would not load); export the base run {base}")
    return export_model(model, config.model, out)


def _plain_names(cfg: ModelConfig) -> set[str]:
    """State-dict names of the plain model the exported wrapper builds (on the meta device): a
    fine-tuning run's model has these only when it trained the base's own weights (memory, full)."""
    with torch.device("meta"):
        return set(FHMELanguageModel(cfg).state_dict())


def export_model(model: nn.Module, model_config: ModelConfig, out: str | Path) -> Path:
    """Write the transformers directory of a FractalMoE language model built from model_config."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "modeling_fractalmoe.py").write_text(MODELING)
    tensors, aliases = unique_tensors(model.state_dict())
    hf_config = {
        "model_type": "fractalmoe",
        "architectures": ["FractalMoEForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_fractalmoe.FractalMoEConfig",
                     "AutoModelForCausalLM": "modeling_fractalmoe.FractalMoEForCausalLM"},
        "fractalmoe": model_config.to_dict(),
        "fractalmoe_aliases": aliases,
        "vocab_size": model_config.vocab_size,
        # transformers ties only when this is set; the aliases say what to tie
        "tie_word_embeddings": bool(aliases),
    }
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    # save_file refuses tensors that share storage: each tensor once, and a copy only of a
    # different view into storage already written (or of a non-contiguous tensor)
    seen: set[int] = set()
    files: dict[str, Tensor] = {}
    for name, t in tensors.items():
        storage = t.untyped_storage().data_ptr()
        files[f"model.{name}"] = t.detach().clone() if storage in seen and t.numel() else t.detach().contiguous()
        seen.add(storage)
    save_file(files, str(out / "model.safetensors"),
              metadata={"format": "pt", "fractalmoe_aliases": json.dumps(aliases)})
    return out
