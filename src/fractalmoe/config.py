"""Model and training configuration: frozen dataclasses, validated on construction.

Every field is a flat keyword (``ModelConfig(dim=128, ffn="fhme")``) so configs read the same in
Python, TOML files and ``--set key=value`` overrides. Bad values raise ``ValueError`` naming the
field and what to change.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

FFN_TYPES = ("fhme", "dense", "moe", "pkm", "peer", "memplus")
ROUTED_FFNS = ("fhme", "pkm", "peer", "memplus")
BLOCK_KINDS = ("neuron", "value", "gated")
GATES = ("softmax", "sigmoid")
QUERY_NORMS = ("layernorm", "rmsnorm", "running", "whiten", "none")
EXPERT_ACTS = ("gelu", "relu")
EXPERT_OPTIMS = ("rowwise_adagrad", "lazy_adam", "row_sgd", "dense_adamw")
EXPERT_DTYPES = ("float32", "bfloat16", "float16")
AUTOCAST_DTYPES = ("none", "bfloat16")
DEPTH_RULES = ("ponder", "threshold")
DEEP_QUERIES = ("input", "retrieved")
REPEAT_ROWS = ("same", "shifted")

C = TypeVar("C", bound="_Config")
# Model fields whose default changed after they were introduced: their value in runs saved
# before they existed (the output gate and the convolutions were off until they won the
# comparison in docs/results.md; the steered balance weight moved ten times faster).
SAVED_BEFORE: dict[str, Any] = {"output_gate": False, "ffn_conv": 0, "block_conv": 0, "balance_steer_rate": 0.05}


class _Config:
    """Shared (de)serialisation and checks for the frozen config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from a dict, rejecting unknown keys and values of the wrong type."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__} must be a table of key = value pairs")
        names = cls.field_names()
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} key(s) {unknown}; valid keys: {', '.join(names)}"
            )
        types = {f.name: f.type for f in fields(cls)}  # type: ignore[arg-type]
        checked = {k: _check_type(f"{k}", types[k], v) for k, v in data.items()}
        return cls(**checked)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def _require(self, ok: bool, name: str, msg: str) -> None:
        if not ok:
            raise ValueError(f"{name}={getattr(self, name)!r}: {msg}")


def _check_type(name: str, type_name: Any, value: Any) -> Any:
    """Strict scalar type check; ints are accepted where floats are expected."""
    expected = {"int": int, "float": float, "bool": bool, "str": str}[str(type_name)]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and expected is not bool:
        raise ValueError(f"{name} must be {expected.__name__}, got a boolean")
    if not isinstance(value, expected):
        raise ValueError(f"{name} must be {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def parse_scalar(name: str, type_name: Any, text: str) -> Any:
    """Parse a ``--set`` string into the field's type."""
    kind = str(type_name)
    try:
        if kind == "bool":
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if kind == "int":
            return int(text)
        if kind == "float":
            value = float(text)
            return value
    except ValueError:
        raise ValueError(f"{name} must be {kind}, got {text!r}") from None
    return text


def _is_weight(text: str) -> bool:
    """A finite number >= 0 (one entry of a comma-separated list of weights)."""
    try:
        return math.isfinite(value := float(text)) and value >= 0
    except ValueError:
        return False


@dataclass(frozen=True, kw_only=True)
class ModelConfig(_Config):
    """Architecture of an FHME language model (and of its baselines)."""

    vocab_size: int = 256  # byte-level vocabulary
    dim: int = 128  # residual width D
    n_layers: int = 4
    n_heads: int = 4  # attention heads
    seq_len: int = 128  # context length
    dropout: float = 0.0
    ffn: str = "fhme"  # fhme | dense | moe | pkm | peer | memplus
    # Layers (0-based, "1,2,3") whose FFN is ``ffn``; the others get a dense SwiGLU of ffn_hidden
    # (memory layers in some layers only, as Memory Layers at Scale and PKM place them). Empty: all.
    routed_layers: str = ""
    # Routed experts (fhme, peer, pkm): N = num_experts = n_1 * ... * n_P singleton experts, n_keys**2
    # for two key parts.
    num_experts: int = 16384
    expert_heads: int = 2  # product-key retrieval heads per routed block
    # fhme: heads per column, "h_1,...,h_C" (empty: expert_heads in each). Column c's block runs
    # 2**(C - c) times per token, so "1,4" moves reads from the deep path to the shallow one at
    # the FLOPs of "2,2".
    column_heads: str = ""
    # Experts per head: top-22 pays for the output gate and the block convolutions (top-40 without
    # them costs 0.98x the FFN FLOPs).
    topk: int = 22
    key_dim: int = 16  # query / product-key width (split in key_parts equal parts)
    # Product keys of this many parts: scoring costs 2 key_dim sum_p n_p per head, ~N^(1/P) (3: 262,144
    # experts score 3 x 64 sub-keys instead of 2 x 512). A perfect square N for 2; e.g. a power of two for 3.
    key_parts: int = 2
    gate: str = "softmax"  # softmax (competing) | sigmoid (non-competing)
    # Training: each retrieved slot's gate is dropped with this probability (PKM's value dropout,
    # Lample et al. 2019): a regulariser against a memory storing its training text.
    value_dropout: float = 0.0
    query_norm: str = "layernorm"  # layernorm | rmsnorm | running | whiten (past batches' stats) | none
    unit_keys: bool = False  # score against unit-length sub-keys (no key wins by its norm alone)
    balance_rate: float = 0.0  # > 0: per-step move of selection-only sub-key / expert biases
    balance_loss: float = 0.0  # > 0: weight of the Switch-style balance loss on routed choices
    # balance_loss per layer, "w_1,...,w_L" (empty: balance_loss in each): the first layer, one
    # attention layer above the byte embeddings, spreads its reads least at a shared weight.
    layer_balance_loss: str = ""
    balance_router_only: bool = False  # the balance loss trains routers only, not the hidden states
    # > 0: each router's balance weight starts at its balance_loss and is steered after every step
    # toward the least that holds KL(usage of its last ~1M choices || uniform) at this many nats.
    balance_target_kl: float = 0.0
    # The steered weight's step per optimizer step, (KL / balance_target_kl) ** this: at 0.05 it
    # reached its bound within ~30 steps of a narrow start and cost twice the bpb of 0.005.
    balance_steer_rate: float = 0.005
    block: str = "value"  # fhme's routed blocks: value (PKM) | neuron (PEER) | gated (Memory+)
    share_bank: bool = False  # one expert bank for every layer (stored once)
    expert_act: str = "gelu"
    expert_dtype: str = "float32"  # float32 | bfloat16 | float16 expert tables
    # Fractal expert (fhme): C columns, 2**C - 1 routed blocks at full depth.
    fractal_depth: int = 2
    tie_blocks: bool = True  # False: every block application has its own router (one bank)
    # Each column's router chooses experts once, for the layer's input; its later applications
    # in the recursion re-weight those experts from their own query (no sub-key scoring). Tied only.
    route_once: bool = False
    # What a block applied on a path from the layer input x queries with: its input (input), or
    # what the path has retrieved so far, input - x (retrieved: the deep path's second read is a
    # second hop from what the first read found, which one wide read cannot express).
    deep_query: str = "input"
    # Which rows a tied block's later applications read: the ones its router chose (same), or
    # those shifted by k N / n for its k-th of n applications (shifted: every application reads
    # rows of its own, the router still shared). Tied only.
    repeat_rows: str = "same"
    # A SiLU(W x) gate on the layer's output (Memory+'s gate, once per layer instead of per block).
    output_gate: bool = True
    # > 0: the FFN reads x_t + sum_j w_j * x_(t-j), j < ffn_conv, a causal depthwise convolution
    # over its input (UltraMem's query convolution: a memory's query sees the last few positions).
    ffn_conv: int = 4
    # > 0: every routed block's query input gets its own causal depthwise convolution over this
    # many positions, so FHME's deep path reads again with what the first read retrieved nearby
    # (PKM, PEER, Memory+: one block, a second convolution after ffn_conv's).
    block_conv: int = 4
    join_bias: float = 0.0  # highway gate bias at init: 0 = an even mean of the deep and shallow paths
    drop_path_local: float = 0.0  # per-join probability of dropping a branch in training
    drop_path_global: float = 0.0  # per-token probability of training a single column
    adaptive_depth: bool = False  # per-token depth router
    depth_rule: str = "ponder"  # ponder (softmax choice + cost) | threshold (halting gates + EMA thresholds)
    depth_penalty: float = 0.0  # ponder cost per routed block (nats per block per token)
    depth_explore: float = 0.0  # training: fraction of tokens given a random depth (anytime)
    depth_target: float = 0.0  # > 0: steer the penalty (ponder) or thresholds so blocks used / 2**C - 1 tracks this
    # Dense SwiGLU (dense) and per-expert hidden width (moe).
    ffn_hidden: int = 512
    moe_experts: int = 8
    moe_topk: int = 2
    moe_balance: float = 0.01  # Switch load-balancing loss weight

    def __post_init__(self) -> None:
        r = self._require
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "seq_len", "num_experts",
                     "expert_heads", "topk", "key_dim", "fractal_depth", "ffn_hidden",
                     "moe_experts", "moe_topk"):
            r(getattr(self, name) >= 1, name, "must be a positive integer")
        r(self.vocab_size >= 256, "vocab_size", "must be >= 256: the models read bytes")
        r(self.ffn in FFN_TYPES, "ffn", f"must be one of {FFN_TYPES}")
        r(self.gate in GATES, "gate", f"must be one of {GATES}")
        r(self.block in BLOCK_KINDS, "block", f"must be one of {BLOCK_KINDS}")
        r(self.query_norm in QUERY_NORMS, "query_norm", f"must be one of {QUERY_NORMS}")
        r(0.0 <= self.balance_rate <= 1.0, "balance_rate", "must be in [0, 1] (try 0.01)")
        r(self.balance_loss >= 0.0, "balance_loss", "must be >= 0 (try 0.01)")
        r(self.expert_act in EXPERT_ACTS, "expert_act", f"must be one of {EXPERT_ACTS}")
        r(self.expert_dtype in EXPERT_DTYPES, "expert_dtype", f"must be one of {EXPERT_DTYPES}")
        r(self.dim % self.n_heads == 0, "dim", f"must be divisible by n_heads={self.n_heads}")
        r((self.dim // self.n_heads) % 2 == 0, "n_heads", "dim / n_heads must be even (RoPE)")
        r(2 <= self.key_parts <= 4, "key_parts", "must be 2, 3 or 4")
        from .product_keys import key_table_sizes  # product_keys imports (via experts) this module
        try:
            key_table_sizes(self.num_experts, self.key_parts)
        except ValueError as err:
            r(False, "num_experts", str(err).removeprefix(f"num_experts={self.num_experts} "))
        r(self.key_dim % self.key_parts == 0, "key_dim",
          f"must split into key_parts={self.key_parts} equal parts")
        r(self.topk <= self.max_topk, "topk", f"must be <= {self.max_topk} (n_keys = sqrt(num_experts) "
          "for two key parts)")
        weights = self.layer_balance_loss.split(",") if self.layer_balance_loss else []
        r(all(_is_weight(w) for w in weights), "layer_balance_loss",
          "must be numbers >= 0 separated by commas, e.g. \"0.03,0.005,0.005,0.005\"")
        r(not weights or len(weights) == self.n_layers, "layer_balance_loss",
          f"needs one weight per layer (n_layers={self.n_layers})")
        balanced = self.balance_rate > 0 or any(w > 0 for w in self.balance_loss_per_layer)
        r(self.balance_target_kl >= 0.0, "balance_target_kl", "must be >= 0 nats (try 0.5)")
        r(self.balance_steer_rate > 0.0, "balance_steer_rate", "must be > 0 (try 0.005)")
        r(self.balance_target_kl == 0 or all(w > 0 for w in self.balance_loss_per_layer), "balance_target_kl",
          "steers the balance loss: set balance_loss (or every layer_balance_loss) > 0 as its start, e.g. 0.003")
        r(self.key_parts == 2 or not balanced, "key_parts", "must be 2 with balance_rate or balance_loss")
        r(self.fractal_depth <= 8, "fractal_depth", "must be <= 8 (2**C - 1 blocks per layer)")
        r(self.moe_topk <= self.moe_experts, "moe_topk", "must be <= moe_experts")
        for name in ("dropout", "value_dropout", "drop_path_local", "drop_path_global", "depth_explore"):
            r(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")
        r(0.0 <= self.depth_target <= 1.0, "depth_target", "must be in [0, 1] (0 = fixed penalty)")
        r(self.depth_rule in DEPTH_RULES, "depth_rule", f"must be one of {DEPTH_RULES}")
        r(self.deep_query in DEEP_QUERIES, "deep_query", f"must be one of {DEEP_QUERIES}")
        r(self.repeat_rows in REPEAT_ROWS, "repeat_rows", f"must be one of {REPEAT_ROWS}")
        r(self.repeat_rows == "same" or self.tie_blocks, "repeat_rows", "shifted needs tied blocks (tie_blocks)")
        if self.adaptive_depth and self.depth_rule == "threshold":
            floor = 1 / (2**self.fractal_depth - 1)
            r(floor <= self.depth_target, "depth_target",
              f"the threshold rule needs a compute target in [{floor:.3f}, 1] (one block at least)")
        for name in ("depth_penalty", "moe_balance"):
            r(getattr(self, name) >= 0.0, name, "must be >= 0")
        r(math.isfinite(self.join_bias), "join_bias", "must be finite")
        for name in ("ffn_conv", "block_conv"):
            r(0 <= getattr(self, name) <= self.seq_len, name,
              f"must be in [0, seq_len={self.seq_len}] (0 = off; try 4)")
        r(not (self.block_conv and self.adaptive_depth and self.ffn == "fhme"), "block_conv",
          "must be 0 with adaptive_depth (a token that stops early leaves its neighbours' later blocks "
          "without their inputs): add --set block_conv=0")
        heads = self.column_heads.split(",") if self.column_heads else []
        r(all(h.strip().isdigit() and int(h) >= 1 for h in heads), "column_heads",
          "must be positive integers separated by commas, e.g. \"1,4\"")
        r(not heads or len(heads) == self.fractal_depth, "column_heads",
          f"needs one head count per column (fractal_depth={self.fractal_depth})")
        r(self.tie_blocks or not self.route_once, "route_once", "needs tie_blocks = true (one router per column)")
        layers = self.routed_layers.split(",") if self.routed_layers else []
        r(all(i.strip().isdigit() and int(i) < self.n_layers for i in layers), "routed_layers",
          f"must be layer indices in [0, {self.n_layers}) separated by commas, e.g. \"1,2,3\"")
        r(len(set(self.routed_layer_indices)) == len(self.routed_layer_indices), "routed_layers",
          "must not repeat a layer")

    @property
    def heads_per_column(self) -> tuple[int, ...]:
        """Retrieval heads of each column's routed block, 1..C."""
        if not self.column_heads:
            return (self.expert_heads,) * self.fractal_depth
        return tuple(int(h) for h in self.column_heads.split(","))

    @property
    def balance_loss_per_layer(self) -> tuple[float, ...]:
        """Each layer's balance-loss weight: ``layer_balance_loss``, or ``balance_loss`` in each."""
        if not self.layer_balance_loss:
            return (self.balance_loss,) * self.n_layers
        return tuple(float(w) for w in self.layer_balance_loss.split(","))

    @property
    def routed_layer_indices(self) -> tuple[int, ...]:
        """Layers whose FFN is ``ffn``: those in ``routed_layers``, or every layer when it is empty."""
        if not self.routed_layers:
            return tuple(range(self.n_layers))
        return tuple(int(i) for i in self.routed_layers.split(","))

    def layer_config(self, layer: int) -> ModelConfig:
        """The config of layer ``layer``'s FFN: this one with the layer's own balance weight, or a
        dense SwiGLU outside ``routed_layers``."""
        if layer not in self.routed_layer_indices:
            return self.replace(ffn="dense", routed_layers="")
        if not self.layer_balance_loss:
            return self
        return self.replace(balance_loss=self.balance_loss_per_layer[layer], layer_balance_loss="")

    @property
    def max_topk(self) -> int:
        """Largest top-k: n_keys = sqrt(N) with two key parts (each half's list), N with more."""
        return math.isqrt(self.num_experts) if self.key_parts == 2 else self.num_experts

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True, kw_only=True)
class TrainConfig(_Config):
    """Optimisation, schedule, evaluation and checkpointing of one training run."""

    batch_size: int = 16  # global batch (sequences per step)
    # micro-batches per step (gradient accumulation): each rank's batch runs forward and backward
    # in this many equal parts, so activations take 1 / grad_accum of the memory; the same update
    # up to rounding, but balance losses are taken per part
    grad_accum: int = 1
    max_steps: int = 2400
    time_budget: float = 0.0  # minutes; 0 = no limit
    lr: float = 3e-3  # AdamW for dense parameters
    expert_lr: float = 0.03  # expert tables (row-sparse optimizer; 0.05 suits rowwise_adagrad)
    # lazy_adam (8 D bytes of state per row) | rowwise_adagrad (4 bytes per row: million-row tables)
    # | dense_adamw. Lazy Adam trains the default model best at 1,200 steps (docs/results.md).
    expert_optim: str = "lazy_adam"
    # Row-sparse rules only: form the table gradients inside the optimizer step (one row buffer
    # fewer between backward and step; the same update). False: train still does so for tables
    # read more than once a step (optim.defers_table_grads); true: for every table.
    deferred_table_grads: bool = False
    # lazy_adam only: each chunk's row gather, update and write-back as one torch.compile'd
    # kernel (a C++ compiler on CPU), each touched row and its moments read and written once.
    # Opt-in.
    fused_row_update: bool = False
    # bfloat16 expert tables (model.expert_dtype): round each updated row stochastically, so the
    # stored row is right in expectation, instead of to nearest, which drops every step below half
    # a bfloat16 unit. Eager row-sparse rules only; no effect on float32 or float16 tables.
    stochastic_rounding: bool = False
    # bfloat16: the training forward runs under torch.autocast (matrix products in bfloat16;
    # weights, expert tables, gradients and optimizer state keep their dtypes; evaluation stays
    # float32). float16 is not offered: it needs loss scaling. none: float32 throughout.
    autocast: str = "none"
    # recompute each block's activations in backward (non-reentrant activation checkpointing):
    # activation memory of one block instead of all, for about one more forward per step
    activation_checkpointing: bool = False
    weight_decay: float = 0.1
    beta2: float = 0.95  # AdamW's second-moment decay for dense parameters
    warmup_steps: int = 100
    # > 0: the routers' balance loss (balance_loss, layer_balance_loss) fades linearly from its
    # weight at step 0 to nothing at this step: reads spread while the routes form
    balance_steps: int = 0
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    grad_clip: float = 1.0  # global norm over dense parameters; 0 = off
    eval_every: int = 200
    eval_batches: int = 16
    log_every: int = 10
    save_every: int = 400
    keep_last: int = 2
    # also keep the checkpoint of the lowest periodic validation loss (checkpoints/best), as
    # nanoGPT keeps only improving checkpoints where a small corpus is overfitted
    keep_best: bool = False
    max_bad_steps: int = 5  # consecutive non-finite steps before stopping
    seed: int = 1337
    sample_bytes: int = 300
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        r = self._require
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "log_every",
                     "save_every", "keep_last", "max_bad_steps"):
            r(getattr(self, name) >= 1, name, "must be a positive integer")
        r(self.batch_size % self.grad_accum == 0, "grad_accum", f"must divide batch_size={self.batch_size}")
        r(0.0 < self.lr < 10.0, "lr", "must be in (0, 10)")
        # SGD's step is lr x gradient, and table gradients are ~1e-4 an entry: its rates run to 1,000s
        top = 1e4 if self.expert_optim == "row_sgd" else 10.0
        r(0.0 < self.expert_lr < top, "expert_lr", f"must be in (0, {top:g}) for expert_optim = {self.expert_optim}")
        for name in ("warmup_steps", "sample_bytes", "seed", "balance_steps"):
            r(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("weight_decay", "grad_clip", "time_budget"):
            r(getattr(self, name) >= 0.0, name, "must be >= 0")
        r(0.0 <= self.min_lr_frac <= 1.0, "min_lr_frac", "must be in [0, 1]")
        r(0.0 < self.beta2 < 1.0, "beta2", "must be in (0, 1)")
        r(0.0 < self.val_fraction < 1.0, "val_fraction", "must be in (0, 1)")
        r(self.expert_optim in EXPERT_OPTIMS, "expert_optim", f"must be one of {EXPERT_OPTIMS}")
        r(self.autocast in AUTOCAST_DTYPES, "autocast", f"must be one of {AUTOCAST_DTYPES}")
        r(not (self.deferred_table_grads and self.expert_optim == "dense_adamw"),
          "deferred_table_grads", "needs a row-sparse expert_optim (rowwise_adagrad, lazy_adam, row_sgd)")
        r(not self.fused_row_update or self.expert_optim == "lazy_adam", "fused_row_update",
          "exists for expert_optim = lazy_adam only")
        r(not self.stochastic_rounding or (not self.fused_row_update and self.expert_optim != "dense_adamw"),
          "stochastic_rounding", "needs an eager row-sparse rule (not fused_row_update, not dense_adamw)")


@dataclass(frozen=True)
class RunConfig:
    """A model and how to train it: what ``config.json`` and ``--config`` files hold."""

    model: ModelConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        if not isinstance(data, dict):
            raise ValueError("config must be a table with [model] and [train] sections")
        unknown = sorted(set(data) - {"model", "train"})
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; valid: model, train")
        return cls(ModelConfig.from_dict(data.get("model", {})),
                   TrainConfig.from_dict(data.get("train", {})))

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> RunConfig:
        """A run's saved ``config.json``. Every field is saved, so a missing one was added after the
        run was written; it takes its value of then (``SAVED_BEFORE``) where the default has
        changed since, so that old runs load, resume and evaluate as they trained."""
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(model, dict):
            data = {**data, "model": {**SAVED_BEFORE, **model}}
        return cls.from_dict(data)

    def with_overrides(self, assignments: list[str]) -> RunConfig:
        """Apply ``key=value`` strings; ``key`` may be ``model.dim`` or just ``dim``."""
        model, train = self.model.to_dict(), self.train.to_dict()
        mtypes = {f.name: f.type for f in fields(ModelConfig)}
        ttypes = {f.name: f.type for f in fields(TrainConfig)}
        for item in assignments:
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"--set expects key=value, got {item!r}")
            section, _, name = key.rpartition(".")
            if section not in ("", "model", "train"):
                raise ValueError(f"unknown config section {section!r}; valid: model, train")
            if name in mtypes and section in ("", "model"):
                model[name] = parse_scalar(name, mtypes[name], text)
            elif name in ttypes and section in ("", "train"):
                train[name] = parse_scalar(name, ttypes[name], text)
            else:
                valid = ", ".join(list(mtypes) + list(ttypes))
                raise ValueError(f"unknown config key {key!r}; valid keys: {valid}")
        return RunConfig(ModelConfig(**model), TrainConfig(**train))


def load_config_file(path: str | Path) -> RunConfig:
    """Read a TOML file with ``[model]`` and ``[train]`` tables, or a YAML file (``.yaml``,
    ``.yml``) with ``model:`` and ``train:`` mappings."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        class Loader(yaml.SafeLoader):  # YAML 1.1 reads 1e-3 as a string; YAML 1.2 and TOML: a float
            pass

        exponent = re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$")
        Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789"))
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # a SafeLoader
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with model: and train: sections")
        return RunConfig.from_dict(data)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    return RunConfig.from_dict(data)


def default_run_config() -> RunConfig:
    """The bundled-corpus recipe that ``fractalmoe train`` runs with no arguments."""
    return RunConfig(ModelConfig(), TrainConfig())


def tiny_model_config(**overrides: Any) -> ModelConfig:
    """A seconds-scale model for tests and smoke runs (D=32, 2 layers, 16x16 keys, depth 2)."""
    base: dict[str, Any] = dict(dim=32, n_layers=2, n_heads=2, seq_len=32, num_experts=256,
                                expert_heads=2, topk=4, key_dim=16, fractal_depth=2, block_conv=0,
                                ffn_hidden=64, moe_experts=4)
    base.update(overrides)
    return ModelConfig(**base)
