"""Fair comparisons: FHME against dense, MoE, PKM and PEER at equal active FLOPs per token.

Every model shares the attention stack, data order, seed, steps and schedule; each FFN's free
width knob is chosen so that its forward FLOPs per token match FHME's (the table shows the spread).
Each run trains in its own process, so peak RSS is per run.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bench import ChildFailed, run_child
from .config import ModelConfig, RunConfig
from .host_memory import keep_freed_memory

MODELS = ("fhme", "dense", "moe", "pkm", "peer", "memplus")


def ffn_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of the FFN cfg describes, as the module reports them (expert
    tables are not allocated): that of its first routed layer, built with that layer's settings."""
    from .baselines import build_ffn
    from .experts import meta_expert_tables

    with meta_expert_tables():
        return float(build_ffn(cfg.layer_config(cfg.routed_layer_indices[0])).flops_per_token())


def matched_config(base: ModelConfig, ffn: str, target: float) -> ModelConfig:
    """base with ffn swapped and its width knob set so FFN FLOPs/token are closest to target:
    the hidden width (dense, MoE), or the heads and then the top-k within a factor 2 of base's
    (routed models: heads alone are too coarse a step to match within a few percent)."""
    cfg = base.replace(ffn=ffn)
    if ffn == "fhme":
        return cfg
    if ffn in ("dense", "moe"):
        return _closest(cfg, "ffn_hidden", range(1, 4097), target)
    lo, hi = max(1, cfg.topk // 2), min(2 * cfg.topk, cfg.max_topk)
    best = None
    for heads in range(1, 65):
        trial = _closest(cfg.replace(expert_heads=heads), "topk", range(lo, hi + 1), target)
        if best is None or abs(ffn_flops(trial) - target) < abs(ffn_flops(best) - target):
            best = trial
        if ffn_flops(cfg.replace(expert_heads=heads, topk=lo)) > target:
            break
    return best  # type: ignore[return-value]


def _closest(cfg: ModelConfig, knob: str, values: range, target: float) -> ModelConfig:
    """cfg with knob set to the value in values (FLOPs increase with it) closest to target."""
    lo, hi = 0, len(values) - 1
    while lo < hi:  # first value whose FLOPs reach the target
        mid = (lo + hi) // 2
        if ffn_flops(cfg.replace(**{knob: values[mid]})) < target:
            lo = mid + 1
        else:
            hi = mid
    near = [cfg.replace(**{knob: values[i]}) for i in {max(lo - 1, 0), lo}]
    return min(near, key=lambda c: abs(ffn_flops(c) - target))


@dataclass
class CompareSpec:
    config: dict[str, Any]
    data: str | None
    out: str
    model: str
    seed: int


def _child(spec: CompareSpec) -> dict[str, Any]:
    """Train one model in this process and evaluate it on the full validation split."""
    from .bench import peak_rss_gb
    from .checkpoint import load_model_from_run
    from .data import ByteDataset
    from .evaluate import evaluate
    from .train import run

    config = RunConfig.from_dict(spec.config)
    result = run(config, out=Path(spec.out), data_path=spec.data, progress=False, log=lambda s: None)
    model, _, _ = load_model_from_run(spec.out)
    data = ByteDataset.load(spec.data, config.train.val_fraction, config.model.seq_len)
    ev = evaluate(model, data, config.train.batch_size)
    depth = ev.measured_depth  # FHME layers at the depth they chose on the validation split
    dead = [u.dead for layer in ev.usage for u in layer]
    return {"model": spec.model, "seed": spec.seed, "val_bpb": ev.val_bpb, "val_loss": ev.val_loss,
            "params": model.num_params(), "active_params_per_token": model.active_params_per_token(depth),
            "flops_per_token": ev.flops_per_token, "ffn_flops_per_token": model.ffn_flops_per_token(depth),
            "train_tok_s": result.tok_s, "peak_rss_gb": peak_rss_gb(), "elapsed_s": result.elapsed_s,
            "expert_usage": ev.expert_usage, "usage_kl": ev.usage_kl, "mean_depth": ev.mean_depth,
            "blocks_per_token": ev.blocks_per_token, "dead_experts": sum(dead) if dead else None, "steps": result.step,
            "usage_per_block": ev.usage_per_block(),
            "config": config.model.to_dict(), "run_dir": spec.out}


def _spawn(spec: CompareSpec) -> dict[str, Any]:
    try:
        return run_child(["fractalmoe.compare", json.dumps(spec.__dict__)])
    except ChildFailed as exc:
        raise ChildFailed(f"{spec.model} (seed {spec.seed}) failed: {exc}") from None


def plan(base: RunConfig, models: list[str], sweep: tuple[str, list[str]] | None) -> list[tuple[str, RunConfig]]:
    """(label, config) of every run: models matched to FHME's FFN FLOPs, or one model swept."""
    if sweep is not None:
        key, values = sweep
        return [(f"{models[0]} {key}={v}", base.with_overrides([f"ffn={models[0]}", f"{key}={v}"]))
                for v in values]
    target = ffn_flops(base.model.replace(ffn="fhme"))
    return [(m, RunConfig(matched_config(base.model, m, target), base.train)) for m in models]


def check_corpus(data: str | None, configs: list[RunConfig]) -> None:
    """Split the corpus as each run will: one too small for a run fails here, in one line, before
    any run starts (not in a child, after the runs before it have trained)."""
    from .data import ByteDataset

    for val_fraction, seq_len in {(c.train.val_fraction, c.model.seq_len) for c in configs}:
        ByteDataset.load(data, val_fraction, seq_len)


def compare(base: RunConfig, models: list[str], seeds: list[int], out: Path, data: str | None,
            sweep: tuple[str, list[str]] | None = None, echo=print) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Train every (model, seed), write results.jsonl, table.md and plots under out."""
    if (out / "results.jsonl").exists():
        raise ValueError(f"{out} already holds a comparison; choose another --out")
    runs = plan(base, models, sweep)
    check_corpus(data, [cfg for _, cfg in runs])
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with (out / "results.jsonl").open("a") as fh:
        for label, cfg in runs:
            for seed in seeds:
                run_cfg = RunConfig(cfg.model, cfg.train.replace(seed=seed, sample_bytes=0))
                run_dir = out / "runs" / f"{label.replace(' ', '_').replace('=', '')}-seed{seed}"
                spec = CompareSpec(run_cfg.to_dict(), data, str(run_dir), label, seed)
                row = _spawn(spec)
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                rows.append(row)
                echo(f"{label:>24} seed {seed}: val_bpb {row['val_bpb']:.4f}  "
                     f"FLOPs/token {row['flops_per_token'] / 1e6:.2f}M  {row['train_tok_s']:.0f} tok/s")
    summary = summarize(rows)
    (out / "table.md").write_text(markdown_table(summary))
    from .plots import plot_comparison

    plot_comparison(rows, out)
    return summary


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over seeds per model, with the val_bpb spread (max - min), ranked by val_bpb."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["model"], []).append(r)
    out = []
    for model, rs in groups.items():
        def mean(key: str) -> float | None:
            vals = [r[key] for r in rs if r.get(key) is not None]
            return sum(vals) / len(vals) if vals else None

        bpbs = [r["val_bpb"] for r in rs]
        out.append({"model": model, "steps": mean("steps"), "val_loss": mean("val_loss"), "val_bpb": mean("val_bpb"),
                    "val_bpb_spread": max(bpbs) - min(bpbs), "seeds": len(rs), "params": mean("params"),
                    "active_params_per_token": mean("active_params_per_token"),
                    "flops_per_token": mean("flops_per_token"), "train_tok_s": mean("train_tok_s"),
                    "peak_rss_gb": mean("peak_rss_gb"), "expert_usage": mean("expert_usage"),
                    "usage_kl": mean("usage_kl"), "dead_experts": mean("dead_experts"),
                    "mean_depth": mean("mean_depth"), "blocks_per_token": mean("blocks_per_token")})
    return sorted(out, key=lambda r: r["val_bpb"])


def markdown_table(summary: list[dict[str, Any]]) -> str:
    flops = [r["flops_per_token"] for r in summary]
    spread = (max(flops) - min(flops)) / min(flops) if flops else 0.0
    lines = ["| rank | model | val bpb (± spread) | params | active params/token | FLOPs/token | "
             "train tok/s | peak RSS GB | experts used | usage KL |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(summary, 1):
        used = f"{r['expert_usage']:.1%}" if r["expert_usage"] is not None else "n/a"
        kl = f"{r['usage_kl']:.2f}" if r["usage_kl"] is not None else "n/a"
        lines.append(f"| {i} | {r['model']} | {r['val_bpb']:.4f} ± {r['val_bpb_spread'] / 2:.4f} | "
                     f"{r['params'] / 1e6:.2f}M | {r['active_params_per_token'] / 1e3:.0f}K | "
                     f"{r['flops_per_token'] / 1e6:.3f}M | {r['train_tok_s']:.0f} | "
                     f"{r['peak_rss_gb']:.2f} | {used} | {kl} |")
    lines.append("")
    lines.append(f"FLOPs/token spread across models: {spread:.1%} (forward, whole model; "
                 f"val bpb ± half the range over {summary[0]['seeds'] if summary else 0} seeds)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    keep_freed_memory()  # as `train` does (``cli.console``)
    print(json.dumps(_child(CompareSpec(**json.loads(sys.argv[1])))))
