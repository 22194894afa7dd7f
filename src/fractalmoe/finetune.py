"""Fine-tuning a trained run on new text, and what it costs the domains the model knew.

Forgetting is what users of fine-tuning fear most, so every run is measured on the new domain
*and* on the base run's own validation split (and, when the base is itself a fine-tuned run, on
each earlier domain's validation split), before and after training. "Before" is the base model:
adapters start as the identity (zero ``up`` table, zero LoRA ``B``), so it equals step 0. The
evaluations use the whole validation split, or a fixed prefix of ``eval_bytes`` of it; every
adapter set is active and no domain label reaches the model.

Methods: FHME adapters (a zero-initialised FHME beside each FFN), LoRA, full fine-tuning, and
``memory``: no new layer at all; the base's own FHME expert tables learn, but only their
``sparse_rows`` rows per layer that the new domain uses most above the kept domains (chosen as
below; the rest of the model, routers included, stays frozen). A base token then changes only
where it reads one of those rows, which by their choice the kept domains seldom do.

A model without expert tables (GPT-2 and the like) gets the same kind of fine-tuning from
``sparse_rows.add_row_adapters``: fresh value memories beside its FFNs whose random, frozen
routing hashes hidden states to rows, of which only rows no sampled window of the kept domains
read learn.

Options that keep more of the base's behaviour (FHME adapters, off by default):

* ``sparse_rows``: sparse memory fine-tuning (module ``sparse_rows``). Each new adapter's expert
  choices are counted on a training sample of the new domain and of the domains to keep (the base
  run's corpus and any earlier fine-tuning corpora); rows are ranked by tf-idf and only the top
  rows of each adapter learn, under the routing they were chosen with (the adapter's routers stay
  frozen): inputs of the old domains rarely reach them.
* ``output_gate``: a learned per-token gate sigmoid(w . x + b), b = -4, on each adapter's output.

A run directory stays an ordinary adapter run (``fractalmoe eval`` / ``generate`` load it); its
metrics.jsonl gains a ``phase: before`` line at step 0 and a ``phase: after`` line at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import (
    DEFAULT_ADAPTER,
    add_lora_adapters,
    attention_lora_targets,
    base_router_queries,
    build_adapted_model,
    check_lora_rank,
    chosen_layers,
    decoder_layers,
    embedding_parameter_count,
    experts_for_budget,
    fhme_adapter_parameter_count,
    hidden_size,
    lora_parameter_count,
    lora_rank_cap,
    lora_rank_for_budget,
    lora_targets,
    max_lora_rank,
    required_memories,
    tied_embeddings,
    trainable_parameter_count,
)
from .config import RunConfig, TrainConfig
from .data import ByteDataset, corpus_files
from .evaluate import lm_logits, val_bpb
from .sparse_rows import (
    StepRowSelector,
    add_row_adapters,
    gate_adapters,
    non_table_trainable,
    row_width,
    save_domain_gates,
    sparse_row_masks,
    step_row_selectors,
    trainable_memories,
)
from .stats import collect, fold_statistics


# --- domains: the validation splits a run reports -------------------------------------------
def load_domain(path: str | None, val_fraction: float, seq_len: int,
                eval_bytes: int | None = None) -> ByteDataset:
    """A corpus split as its run split it; with ``eval_bytes`` only that prefix of validation."""
    data = ByteDataset.load(path, val_fraction, seq_len)
    return data if eval_bytes is None else data.val_prefix(eval_bytes, seq_len)


@dataclass
class Domain:
    """A validation split to report: the new domain, the base run's, or an earlier stage's (in
    that order in a run's list)."""

    path: str | None  # None: the bundled corpus
    data: ByteDataset = field(repr=False)


# --- run lineage ----------------------------------------------------------------------------
def lineage(run: str | Path) -> list[Path]:
    """Run directories from the root (a trained model) to ``run``, following adapter runs'
    bases. Every one must be a run with a checkpoint: one-line errors otherwise."""
    from .checkpoint import latest_checkpoint

    chain: list[Path] = []
    current: Path | None = Path(run).resolve()
    while current is not None:
        if current in chain:
            raise ValueError(f"--base {run}: its bases form a loop at {current}")
        config = current / "config.json"
        if not current.is_dir() or not config.is_file():
            raise ValueError(f"--base {run}: {current} is not a FractalMoE run directory (no config.json)")
        try:
            extra = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"--base {run}: {config} is not valid JSON") from None
        if not isinstance(extra, dict) or "model" not in extra:
            raise ValueError(f"--base {run}: {current} is not a FractalMoE run directory (no model config)")
        if latest_checkpoint(current) is None:
            raise ValueError(f"--base {run}: {current} has no complete checkpoint")
        chain.insert(0, current)
        current = Path(extra["base"]) if extra.get("base") else None
    return chain


def kept_domains(chain: list[Path], eval_bytes: int | None) -> list[Domain]:
    """The base run's domain, then each earlier fine-tuning stage's, as each run split it."""
    from .checkpoint import load_run_config, run_extra

    out = []
    for run_dir in chain:
        config = load_run_config(run_dir)
        path = run_extra(run_dir).get("data")
        data = load_domain(path, config.train.val_fraction, config.model.seq_len, eval_bytes)
        out.append(Domain(path, data))
    return out


# --- a training loop for any causal LM (transformers models included) -----------------------
def train_lm(model: nn.Module, data: ByteDataset, cfg: TrainConfig, seq_len: int,
             device: str = "cpu") -> float:
    """``cfg.max_steps`` steps of the project's optimiser (AdamW + row-sparse tables), warm-up and
    cosine schedule and aux losses, on a model ``train.run`` cannot drive (it needs a FractalMoE
    model). Returns the mean training loss of the last 10 steps."""
    from .optim import ModelOptimizer
    from .train import lr_scale

    opt = ModelOptimizer(model, cfg.lr, cfg.expert_lr, cfg.weight_decay, cfg.expert_optim, cfg.beta2,
                         cfg.deferred_table_grads, cfg.fused_row_update, cfg.stochastic_rounding)
    model.train()
    losses: list[float] = []
    for step in range(cfg.max_steps):
        opt.set_lr_scale(lr_scale(step, cfg))
        x, y = data.train_batch(step, cfg.batch_size, seq_len, cfg.seed)
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        with collect(model) as stats:
            logits = lm_logits(model, x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.reshape(-1))
            (loss + stats.aux_loss()).backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"non-finite loss at step {step + 1}; lower the learning rate")
        opt.clip_dense(cfg.grad_clip)
        opt.step()
        fold_statistics(model, stats)
        losses.append(value)
    return sum(losses[-10:]) / max(len(losses[-10:]), 1)


# --- sizing ---------------------------------------------------------------------------------
@dataclass
class Sizing:
    """The adapter spec of a run and both methods' trainable counts where a rank is involved."""

    spec: dict[str, Any]
    lora_rank: int | None = None
    lora_params: int | None = None
    fhme_experts: int | None = None
    fhme_params: int | None = None

    def line(self) -> str:
        parts = []
        if self.lora_params is not None:
            parts.append(f"LoRA rank {self.lora_rank}: {self.lora_params:,} trainable params")
        if self.fhme_params is not None:
            attention = self.spec.get("attention")
            at = f" (and {attention['num_experts']:,} at each attention input)" if attention else ""
            if self.spec.get("attention_lora"):
                at += f" (and LoRA rank {self.spec['attention_lora']} on attention)"
            parts.append(f"FHME adapters with {self.fhme_experts:,} experts{at}: {self.fhme_params:,} trainable params")
        return "; ".join(parts)


@dataclass
class FinetuneRequest:
    """What ``fractalmoe finetune`` asks for (see its --help)."""

    base: str
    data: str
    adapter: str = "fhme"
    layers: list[int] | None = None
    experts: int | None = None  # None: 1024, or matched with match_lora_rank
    depth: int | None = None  # None: DEFAULT_ADAPTER's (so are heads and topk)
    heads: int | None = None
    topk: int | None = None
    out: str | None = None
    max_steps: int = 300
    overrides: list[str] = field(default_factory=list)
    eval_bytes: int | None = None
    lora_rank: int | None = None
    match_lora_rank: int | None = None
    lora_targets: str = "all"
    output_gate: bool = False
    reroute: bool = False
    attention_experts: int | None = None
    attention_lora: int | None = None
    sparse_rows: int | None = None
    rows_per_step: bool = False
    rows_by_gain: bool = False
    with_embeddings: bool = False
    domain_gate: bool = False
    gate_prior: float = 0.0
    device: str = "cpu"
    progress: bool = True


def check_request(req: FinetuneRequest) -> None:
    """One-line errors for option combinations that make no sense."""
    if req.output_gate and req.adapter != "fhme":
        raise ValueError("--output-gate: only for --adapter fhme")
    if req.domain_gate and req.adapter != "fhme":
        raise ValueError("--domain-gate: only for --adapter fhme")
    if req.reroute and req.adapter != "fhme":
        raise ValueError("--reroute: only for --adapter fhme")
    for flag, given in (("--attention-experts", req.attention_experts), ("--attention-lora", req.attention_lora)):
        if given is None:
            continue
        if req.adapter != "fhme":
            raise ValueError(f"{flag}: only for --adapter fhme")
        if req.sparse_rows is not None:
            raise ValueError(f"{flag}: not with --sparse-rows, which acts on the FFN adapters alone")
    if req.attention_experts is not None and (
            req.attention_experts < 4 or math.isqrt(req.attention_experts) ** 2 != req.attention_experts):
        raise ValueError(f"--attention-experts must be a perfect square >= 4 (product keys), "
                         f"got {req.attention_experts}")
    if req.gate_prior and not req.domain_gate:
        raise ValueError("--gate-prior sets the domain gates' prior: add --domain-gate")
    if not math.isfinite(req.gate_prior):
        raise ValueError(f"--gate-prior must be a finite log-odds, got {req.gate_prior}")
    routed = [flag for flag, on in (("--sparse-rows", req.sparse_rows is not None),
                                    ("--match-lora-rank", req.match_lora_rank is not None)) if on]
    if req.adapter not in ("fhme", "memory") and routed:
        raise ValueError(f"{', '.join(routed)}: only for --adapter fhme or memory")
    if req.adapter == "memory" and not routed:
        raise ValueError("--adapter memory needs --sparse-rows T or --match-lora-rank R (rows that learn)")
    if req.rows_per_step and req.adapter != "memory":
        raise ValueError("--rows-per-step: only for --adapter memory")
    if req.with_embeddings and req.adapter not in ("fhme", "memory"):
        raise ValueError("--with-embeddings: only for --adapter fhme or memory")
    if req.with_embeddings and req.sparse_rows is not None and req.adapter == "fhme":
        raise ValueError("--with-embeddings: not with --sparse-rows, which acts on the FFN adapters alone")
    if req.rows_by_gain and not req.rows_per_step:
        raise ValueError("--rows-by-gain chooses the rows of each step: add --rows-per-step")
    if req.adapter == "memory" and req.sparse_rows is not None and req.match_lora_rank is not None:
        raise ValueError("--adapter memory: give --sparse-rows or --match-lora-rank, not both")
    if req.lora_rank is not None and req.adapter != "lora":
        raise ValueError("--lora-rank needs --adapter lora (FHME adapters: --match-lora-rank)")
    if req.match_lora_rank is not None and req.experts is not None:
        raise ValueError("give --experts or --match-lora-rank, not both")
    if req.adapter == "lora" and req.lora_rank is not None and req.experts is not None:
        raise ValueError("--experts sizes LoRA only without --lora-rank: give one of them")
    fhme_sizing = [flag for flag, given in (("--experts", req.experts), ("--depth", req.depth), ("--heads", req.heads),
                                            ("--topk", req.topk)) if given is not None]
    if req.adapter in ("memory", "full") and fhme_sizing:
        raise ValueError(f"{', '.join(fhme_sizing)}: only for --adapter fhme or lora (FHME adapters' size)")
    if req.adapter == "full" and req.layers is not None:
        raise ValueError("--layers: not for --adapter full, which trains every weight")


def size_adapters(req: FinetuneRequest, model: nn.Module) -> Sizing:
    """The adapter spec: FHME adapters at --experts or matched to LoRA at --match-lora-rank
    (largest perfect square at or below LoRA's count), LoRA at --lora-rank or at the FHME
    adapters' count, or full fine-tuning."""
    spec: dict[str, Any] = {"kind": req.adapter, "layers": req.layers}
    if req.adapter == "full":
        return Sizing(spec)
    dim = hidden_size(model)
    layers = chosen_layers(decoder_layers(model), req.layers)  # out of range: an error before any run starts
    fhme_cfg = {k: DEFAULT_ADAPTER[k] if v is None else v
                for k, v in (("depth", req.depth), ("heads", req.heads), ("topk", req.topk))}

    attention = None  # the attention-side adapters: their own table, topk at most its key width
    if req.attention_experts is not None:
        attention = {"num_experts": req.attention_experts,
                     "topk": min(fhme_cfg["topk"], math.isqrt(req.attention_experts))}
    beside = 0  # trainable beside the FFN adapters, within the same count
    if req.reroute:  # the base's router queries
        beside += sum(w.numel() for w in base_router_queries(model, req.layers))
    if attention is not None:
        beside += len(layers) * fhme_adapter_parameter_count(dim, **{**fhme_cfg, **attention})
    if req.attention_lora is not None:
        check_lora_rank(req.attention_lora, max_lora_rank(model), "all")
        beside += lora_parameter_count(attention_lora_targets(model, req.layers), req.attention_lora)
    if req.with_embeddings and req.adapter == "fhme":  # a change to the tied embeddings
        tied_embeddings(model)
        beside += embedding_parameter_count(model)

    def fhme_count(experts: int) -> int:
        return len(layers) * fhme_adapter_parameter_count(dim, req.output_gate, num_experts=experts,
                                                          **fhme_cfg) + beside

    rank = req.match_lora_rank if req.adapter in ("fhme", "memory") else req.lora_rank
    sizing = Sizing(spec)
    if rank is not None or req.adapter == "lora":
        targets = lora_targets(model, req.layers, req.lora_targets)
        if not targets:
            raise ValueError(f"found no LoRA targets ({req.lora_targets}) in the base model")
        cap = lora_rank_cap(model, targets, req.lora_targets)
        if rank is None:  # LoRA at the FHME adapters' budget
            rank = lora_rank_for_budget(targets, fhme_count(req.experts or 1024), cap)
        check_lora_rank(rank, cap, req.lora_targets)
        sizing.lora_rank, sizing.lora_params = rank, lora_parameter_count(targets, rank)
    if req.adapter == "memory":  # rows x width x tables per layer within LoRA's count
        memories = required_memories(model, req.layers)
        row_params = len(memories) * sum(t.shape[1] for t in memories[0][1].fractal.bank.tables().values())
        embeddings = embedding_parameter_count(model) if req.with_embeddings else 0
        rows = req.sparse_rows if req.sparse_rows is not None else (sizing.lora_params - embeddings) // row_params
        if rows < 1:
            raise ValueError(f"--match-lora-rank {rank}: LoRA's {sizing.lora_params:,} parameters do not hold "
                             f"the embeddings ({embeddings:,}) and a row a layer ({row_params:,}); raise the rank")
        sizing.fhme_experts, sizing.fhme_params = rows, rows * row_params + embeddings
        spec["sparse_rows"] = rows
        if req.with_embeddings:
            spec["embeddings"] = True
        if req.rows_per_step:
            spec["rows_per_step"] = True
        if req.rows_by_gain:
            spec["rows_by_gain"] = True
        return sizing
    if req.adapter == "lora":
        spec.update(rank=sizing.lora_rank, targets=req.lora_targets)
        with contextlib.suppress(ValueError):  # the matched FHME size, for the record
            sizing.fhme_experts, sizing.fhme_params = experts_for_budget(
                model, sizing.lora_params, req.layers, req.output_gate, **fhme_cfg)
        return sizing
    if req.match_lora_rank is not None:
        experts, _ = experts_for_budget(model, sizing.lora_params - beside, req.layers, req.output_gate, **fhme_cfg)
    else:
        experts = req.experts or 1024
    sizing.fhme_experts, sizing.fhme_params = experts, fhme_count(experts)
    spec.update(fhme={"num_experts": experts, **fhme_cfg}, output_gate=req.output_gate)
    if req.reroute:
        spec["reroute"] = True
    if attention is not None:
        spec["attention"] = attention
    if req.attention_lora is not None:
        spec["attention_lora"] = req.attention_lora
    if req.with_embeddings:
        spec["embeddings"] = True
    if req.domain_gate:
        spec.update(domain_gate=True, gate_prior=req.gate_prior)
    if req.sparse_rows is not None:
        spec["sparse_rows"] = req.sparse_rows
    return sizing


# --- the command ----------------------------------------------------------------------------
def _bpbs(model: nn.Module, domains: list[Domain], seq_len: int, batch_size: int,
          device: str) -> list[float]:
    return [val_bpb(model, d.data, seq_len, batch_size, device) for d in domains]


def _metric_line(step: int, phase: str, bpbs: list[float]) -> dict[str, Any]:
    return {"step": step, "phase": phase, "val_bpb": bpbs[0], "base_val_bpb": bpbs[1],
            "prior_val_bpb": bpbs[2:]}


def train_overrides(overrides: list[str]) -> list[str]:
    """``--set`` items as training fields (KEY=VALUE means train.KEY): the model is the base's,
    so a model (or any other) section is a one-line error, not a model the weights do not fit."""
    out = []
    for item in overrides:
        section, dot, _ = item.split("=", 1)[0].rpartition(".")
        if dot and section != "train":
            raise ValueError(f"--set {item}: finetune takes training fields only (train.KEY=VALUE or KEY=VALUE)")
        out.append(item if dot else f"train.{item}")
    return out


def finetune(req: FinetuneRequest, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Adapt ``req.base`` to ``req.data`` and report every domain's bpb before and after."""
    from .checkpoint import load_model_from_run, load_run_config
    from .train import run

    check_request(req)
    corpus_files(req.data)  # fail early, before a run directory is made
    chain = lineage(req.base)
    base = str(chain[-1])
    base_cfg = load_run_config(base)
    config = RunConfig(base_cfg.model, base_cfg.train.replace(
        max_steps=req.max_steps, eval_every=min(base_cfg.train.eval_every, req.max_steps),
        warmup_steps=min(base_cfg.train.warmup_steps, req.max_steps // 10)))
    config = config.with_overrides(train_overrides(req.overrides))
    if config.train.deferred_table_grads and (req.sparse_rows is not None or req.adapter == "memory"):
        raise ValueError("sparse rows mask table gradients in backward: set deferred_table_grads=false")
    if req.rows_per_step and config.train.grad_accum > 1:
        raise ValueError("--rows-per-step chooses rows in each backward: with grad_accum > 1 every "
                         "micro-batch would choose its own; set grad_accum=1")
    seq_len, batch = config.model.seq_len, config.train.batch_size
    new = load_domain(req.data, config.train.val_fraction, seq_len, req.eval_bytes)
    domains = [Domain(req.data, new)] + kept_domains(chain, req.eval_bytes)

    before_model, _, _ = load_model_from_run(base, req.device)
    sizing = size_adapters(req, before_model)
    before = _bpbs(before_model, domains, seq_len, batch, req.device)
    del before_model

    run_dir = Path(req.out) if req.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if (run_dir / "config.json").exists():
        raise ValueError(f"{run_dir} already holds a run; choose another --out")
    if run_dir.resolve() in chain:
        raise ValueError("--out must differ from --base and its bases")
    spec = sizing.spec
    masks: dict[str, Tensor] = {}
    selectors: dict[str, StepRowSelector] = {}
    if spec.get("sparse_rows") is not None and not spec.get("rows_per_step"):
        spec["row_mask"] = str((run_dir / "row_mask.safetensors").resolve())
    if spec.get("domain_gate"):  # fitted after training, on the trained adapters
        spec["domain_gate"] = str((run_dir / "domain_gates.safetensors").resolve())
    built_now = {k: v for k, v in spec.items() if k not in ("row_mask", "domain_gate")}

    def model_factory() -> nn.Module:
        model = build_adapted_model(base, built_now, req.device)
        if spec.get("rows_per_step"):
            selectors.update(step_row_selectors(model, [d.data for d in domains[1:]], spec["sparse_rows"],
                                                seq_len, batch, config.train.seed, req.device,
                                                by_gain=bool(spec.get("rows_by_gain"))))
        elif spec.get("sparse_rows") is not None:
            from safetensors.torch import save_file

            masks.update(sparse_row_masks(model, new, [d.data for d in domains[1:]], spec["sparse_rows"],
                                          seq_len, batch, config.train.seed, req.device))
            save_file({k: m.to(torch.uint8) for k, m in masks.items()}, spec["row_mask"])
        return model

    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "metrics.jsonl").open("w") as fh:  # the run's first line (drops a failed try's)
        fh.write(json.dumps(_metric_line(0, "before", before)) + "\n")
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's progress lines: not the report
        result = run(config, out=run_dir, data_path=req.data, device=req.device, progress=req.progress,
                     model_factory=model_factory, extra={"base": base, "adapter": spec},
                     log=lambda s: print(s, file=sys.stderr))

    if spec.get("domain_gate"):
        _fit_gates_after(run_dir, base, built_now, spec, domains, seq_len, batch, config.train.seed, req.device)
    model, _, _ = load_model_from_run(run_dir, req.device)
    after = _bpbs(model, domains, seq_len, batch, req.device)
    with (run_dir / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps(_metric_line(result.step, "after", after)) + "\n")
    full = spec["kind"] == "full"
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)
    trained_rows = {k: int(m.sum()) for k, m in masks.items()}
    trained_rows.update({k: int(sel.trained.sum()) for k, sel in selectors.items()})
    if full:
        trainable = sum(p.numel() for p in model.parameters())
    elif spec["kind"] == "memory":  # the rows chosen (per step: the budget's) times a row's width
        bank = required_memories(model, req.layers)[0][1].fractal.bank
        rows = len(selectors) * spec["sparse_rows"] if selectors else sum(trained_rows.values())
        trainable = rows * sum(t.shape[1] for t in bank.tables().values())
        trainable += embedding_parameter_count(model) if spec.get("embeddings") else 0
    else:
        trainable = trainable_parameter_count(model)
    return {
        "run_dir": str(run_dir), "base": base, "data": req.data, "adapter": spec["kind"],
        "steps": result.step, "lr": config.train.lr, "expert_lr": config.train.expert_lr,
        "seed": config.train.seed, "eval_bytes": req.eval_bytes,
        "trainable_params": trainable,
        "active_params_per_token": model.active_params_per_token() + lora,
        **_sizing_fields(sizing), "trained_rows": trained_rows or None,
        **_domain_fields(domains, before, after),
    }


def _fit_gates_after(run_dir: Path, base: str, built: dict[str, Any], spec: dict[str, Any], domains: list[Domain],
                     seq_len: int, batch: int, seed: int, device: str) -> None:
    """The trained adapters behind domain gates fitted on the trained model's FFN inputs, saved to
    the run's ``domain_gate`` file. Adapters trained without gates and gated afterwards learn the
    new domain everywhere, shut positions included, and forget less than ones trained behind their
    gates (docs/results.md, "Gates fitted after training, and their prior")."""
    from .checkpoint import latest_checkpoint, load_model_checkpoint

    model = build_adapted_model(base, built, device)
    load_model_checkpoint(model, latest_checkpoint(run_dir))
    gate_adapters(model, domains[0].data, [d.data for d in domains[1:]], seq_len, batch, seed, device,
                  spec["gate_prior"])
    save_domain_gates(model, spec["domain_gate"])


def _sizing_fields(sizing: Sizing) -> dict[str, Any]:
    return {"lora_rank": sizing.lora_rank, "lora_params": sizing.lora_params,
            "fhme_experts": sizing.fhme_experts, "fhme_params": sizing.fhme_params,
            "fhme_shape": {k: v for k, v in sizing.spec.get("fhme", {}).items() if k != "num_experts"} or None,
            "output_gate": bool(sizing.spec.get("output_gate")), "reroute": bool(sizing.spec.get("reroute")),
            "attention": sizing.spec.get("attention"), "attention_lora": sizing.spec.get("attention_lora"),
            "sparse_rows": sizing.spec.get("sparse_rows"),
            "rows_per_step": bool(sizing.spec.get("rows_per_step")),
            "rows_by_gain": bool(sizing.spec.get("rows_by_gain")),
            "with_embeddings": bool(sizing.spec.get("embeddings"))}


def _domain_fields(domains: list[Domain], before: list[float], after: list[float]) -> dict[str, Any]:
    return {"val_bpb_before": before[0], "val_bpb": after[0],
            "base_data": domains[1].path, "base_val_bpb_before": before[1], "base_val_bpb": after[1],
            "prior_data": [d.path for d in domains[2:]], "prior_val_bpb_before": before[2:],
            "prior_val_bpb": after[2:]}


def report_line(s: dict[str, Any]) -> str:
    """One line with every domain's bpb before -> after (rises signed)."""
    parts = [f"step {s['steps']}: val_bpb {s['val_bpb_before']:.4f} -> {s['val_bpb']:.4f} (new domain)",
             f"base_val_bpb {s['base_val_bpb_before']:.4f} -> {s['base_val_bpb']:.4f} "
             f"({s['base_val_bpb'] - s['base_val_bpb_before']:+.4f}, base domain)"]
    for i, (b, a) in enumerate(zip(s["prior_val_bpb_before"], s["prior_val_bpb"])):
        parts.append(f"prior_val_bpb[{i}] {b:.4f} -> {a:.4f} ({a - b:+.4f}, {Path(s['prior_data'][i] or '').name})")
    return "; ".join(parts)


def print_report(s: dict[str, Any], sizing_line: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps(s))
        return
    if sizing_line:
        print(sizing_line)
    print(f"trainable {s['trainable_params']} params, active {s['active_params_per_token']:.0f} params/token")
    if s["trained_rows"]:
        print(f"trained expert rows per adapter layer: {s['trained_rows']}")
    print(f"run directory: {s['run_dir']}")
    print(report_line(s))


def sizing_line(s: dict[str, Any]) -> str:
    return Sizing({}, s["lora_rank"], s["lora_params"], s["fhme_experts"], s["fhme_params"]).line()


def adapt_in_memory(model: nn.Module, method: str, lora_rank: int, depth: int = 2,
                    output_gate: bool = False, layers: list[int] | None = None,
                    heads: int | None = None, topk: int | None = None, reroute: bool = False,
                    attention_experts: int | None = None, attention_lora: int | None = None,
                    lora_on: str = "all", embeddings: bool = False) -> Sizing:
    """Adapters on a model held in memory (a transformers causal LM): FHME adapters matched to
    LoRA at ``lora_rank`` (``heads`` and ``topk`` a block: None, DEFAULT_ADAPTER's; ``reroute``:
    the base's own routers' query projections learn too, ``attention_experts``: an FHME of that
    many experts at each attention input too, ``attention_lora``: LoRA of that rank on the
    attention projections too, ``embeddings``: a change to the tied embeddings too, all within the
    same count), LoRA at that rank on
    every dense projection (``lora_on``: or the attention or FFN block's only, ``LORA_TARGETS``), or
    every weight trainable."""
    from .adapters import add_fhme_adapters

    fhme = method == "fhme"
    req = FinetuneRequest(base="", data="", adapter=method, layers=layers, depth=None if method == "full" else depth,
                          heads=heads if fhme else None, topk=topk if fhme else None, output_gate=output_gate,
                          match_lora_rank=lora_rank if fhme else None, reroute=reroute,
                          attention_experts=attention_experts, attention_lora=attention_lora,
                          lora_targets=lora_on, with_embeddings=embeddings,
                          lora_rank=lora_rank if method == "lora" else None)
    check_request(req)
    sizing = size_adapters(req, model)
    if method == "fhme":
        add_fhme_adapters(model, layers, output_gate=output_gate, reroute=reroute,
                          attention=sizing.spec.get("attention"), attention_lora=sizing.spec.get("attention_lora"),
                          embeddings=bool(sizing.spec.get("embeddings")), **sizing.spec["fhme"])
    elif method == "lora":
        add_lora_adapters(model, rank=lora_rank, layers=layers, targets=lora_on)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return sizing


def finetune_in_memory(model: nn.Module, method: str, lora_rank: int, domains: list[Domain],
                       cfg: TrainConfig, seq_len: int, device: str = "cpu",
                       output_gate: bool = False, experts: int = 1_048_576,
                       max_kept_windows: int | None = 0, fit_keys: bool = False,
                       domain_gate: bool = False, train_queries: bool = False,
                       gate_prior: float = 0.0, depth: int = 2, heads: int | None = None,
                       topk: int | None = None, reroute: bool = False,
                       attention_experts: int | None = None, attention_lora: int | None = None,
                       lora_on: str = "all", embeddings: bool = False) -> dict[str, Any]:
    """``finetune``'s report for a model held in memory (the GPT-2 base, or a loaded FractalMoE run
    for the methods ``fractalmoe finetune`` does not offer, ``rows``):
    adapt (``adapt_in_memory``, or for ``rows`` ``add_row_adapters`` with ``experts`` rows a layer
    and, of them, as many learning per step as fit LoRA's count at ``lora_rank`` beside the
    adapters' other trainable parameters; ``fit_keys``: sub-keys fitted to every domain's queries
    first; ``domain_gate``: each row memory, or with ``fhme`` each FHME adapter
    (``gate_adapters``, at ``gate_prior``), behind a ``DomainGate`` for ``domains[0]``;
    ``train_queries``: the memories' query projections learn), train on ``domains[0]`` with
    ``train_lm``, and measure
    every domain (new, base, earlier) before and after."""
    model.to(device)
    before = _bpbs(model, domains, seq_len, cfg.batch_size, device)
    selectors: dict[str, StepRowSelector] = {}
    if method == "rows":
        sizing = Sizing({"kind": "rows"}, lora_rank, lora_parameter_count(lora_targets(model), lora_rank))
        new, kept = domains[0].data, [d.data for d in domains[1:]]
        selectors = add_row_adapters(
            model, kept, None, seq_len, cfg.batch_size, cfg.seed, device, max_kept_windows,
            num_experts=experts, fit_to=new if fit_keys else None, gate_on=new if domain_gate else None,
            train_queries=train_queries, budget=sizing.lora_params,
            **{k: v for k, v in DEFAULT_ADAPTER.items() if k != "num_experts"})
        rows = next(iter(selectors.values())).top
        width = sum(row_width(m) for _, m in trainable_memories(model))
        sizing.fhme_experts, sizing.fhme_params = rows, rows * width + non_table_trainable(model)
        sizing.spec.update(sparse_rows=rows, rows_per_step=True)
        trainable = sizing.fhme_params
    else:
        sizing = adapt_in_memory(model, method, lora_rank, depth, output_gate=output_gate, heads=heads, topk=topk,
                                 reroute=reroute, attention_experts=attention_experts,
                                 attention_lora=attention_lora, lora_on=lora_on, embeddings=embeddings)
        if domain_gate:
            new, kept = domains[0].data, [d.data for d in domains[1:]]
            gate_adapters(model, new, kept, seq_len, cfg.batch_size, cfg.seed, device, gate_prior)
        trainable = trainable_parameter_count(model)
    model.to(device)
    train_loss = train_lm(model, domains[0].data, cfg, seq_len, device)
    after = _bpbs(model, domains, seq_len, cfg.batch_size, device)
    return {"data": domains[0].path, "adapter": method, "steps": cfg.max_steps, "lr": cfg.lr,
            "expert_lr": cfg.expert_lr, "seed": cfg.seed, "trainable_params": trainable,
            "train_loss": train_loss, **_sizing_fields(sizing),
            "trained_rows": {k: int(sel.trained.sum()) for k, sel in selectors.items()} or None,
            "max_kept_windows": max_kept_windows if method == "rows" else None,
            "fit_keys": fit_keys if method == "rows" else None,
            "domain_gate": domain_gate if method in ("rows", "fhme") else None,
            "gate_prior": gate_prior if domain_gate and method == "fhme" else None,
            "train_queries": train_queries if method == "rows" else None,
            **_domain_fields(domains, before, after)}
