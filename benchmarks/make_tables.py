"""Print the result tables of docs/results.md from the committed JSON under benchmarks/results.

    .venv/bin/python benchmarks/make_tables.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

R = Path(__file__).parent / "results"


def _jsonl(name: str) -> list[dict]:
    path = R / name
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def _rule(row: dict) -> str:
    """The row's expert-table update rule; rows older than the "rule" key ran the impl's rule,
    which has not changed for the impls they hold."""
    from fractalmoe.bench_layer import IMPLS
    from fractalmoe.roofline import RULE_NAMES

    rule = row.get("rule") or (IMPLS[row["impl"]].rule if row["impl"] in IMPLS else "unknown")
    return RULE_NAMES.get(rule, rule)


def layer_table() -> str:
    from fractalmoe.bench_layer import impl_name

    rows = _jsonl("layer.jsonl") + _jsonl("layer_4m.jsonl")
    if not rows:
        return ""
    dtype = lambda r: r.get("expert_dtype", "float32")  # noqa: E731 - rows before the key: float32
    base = {(r["impl"], dtype(r), r["N"]): r for r in rows if "error" not in r}
    peers = {p: next((_rule(r) for (i, _, _), r in base.items() if i == p), "n/a")
             for p in ("peer-dense", "peer-pytorch")}
    out = [f"| impl | expert rule | N | train tok/s | vs peer-dense ({peers['peer-dense']}) | "
           f"vs peer-pytorch ({peers['peer-pytorch']}) | infer tok/s | fwd / bwd / opt ms | peak RSS GB | "
           "roofline_frac |",
           "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        if "error" in r:
            continue
        dense = base.get(("peer-dense", "float32", r["N"]))  # the peers keep float32 tables
        peer = base.get(("peer-pytorch", "float32", r["N"]))
        rel = lambda other: f"{r['train_tok_s'] / other['train_tok_s']:.1f}x" if other else "n/a"  # noqa: E731
        out.append(f"| {impl_name(r['impl'], dtype(r))} | {_rule(r)} | {r['N']:,} | {r['train_tok_s']:.0f} | "
                   f"{rel(dense)} | {rel(peer)} | "
                   f"{r['infer_tok_s']:.0f} | {r['fwd_ms']:.0f} / {r['bwd_ms']:.0f} / {r['opt_ms']:.0f} | "
                   f"{r['peak_rss_gb']:.2f} | {r['roofline_frac']:.2f} |")
    hw = rows[0]
    out.append("")
    out.append("The peer columns are ratios of whole training steps, each implementation under its own expert "
               "rule: across different rules they compare design and optimizer together.")
    if "copy_gbps" in hw:  # bandwidth_gbps: the random-row gather rate (the floor's), copy_gbps: a large copy
        bandwidth = (f"{hw['bandwidth_gbps']:.0f} GB/s (random-row gather of {dtype(hw)} rows) and "
                     f"{hw['copy_gbps']:.0f} GB/s (large-tensor copy, read + write)")
    else:  # rows from before the gather rate was measured: bandwidth_gbps was the copy rate
        bandwidth = f"{hw['bandwidth_gbps']:.0f} GB/s (copy, read + write)"
    out.append(f"Measured peak {hw['peak_gflops']:.0f} GFLOP/s (fp32 2048² matmul) and {bandwidth} at the "
               "start of the first run.")
    return "\n".join(out)


def adaptive_table() -> str:
    rows = _jsonl("adaptive.jsonl")
    full = _jsonl("adaptive_full.jsonl")
    if not rows:
        return ""
    deepest = [r for r in rows if r["mode"].startswith("depth")][-1]
    out = ["| model / mode | val bpb | blocks/token | blocks vs own full depth | FHME ms (val split) | "
           "time vs full depth |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| adaptive-trained, {r['mode']} | {r['val_bpb']:.4f} | {r['blocks_per_token']:.2f} | "
                   f"{r['blocks_per_token'] / deepest['blocks_per_token']:.0%} | {r['fhme_ms']:.0f} | "
                   f"{r['fhme_ms'] / deepest['fhme_ms']:.0%} |")
    for r in full:
        out.append(f"| full-depth-trained, {r['mode']} | {r['val_bpb']:.4f} | {r['blocks_per_token']:.2f} | "
                   f"| {r['fhme_ms']:.0f} | |")
    return "\n".join(out)


def compare_table(name: str = "table.md") -> str:
    table = R / name
    return table.read_text() if table.is_file() else ""


def _fmt(value, spec: str) -> str:  # type: ignore[no-untyped-def]
    return "n/a" if value is None else format(value, spec)


def sweep_table(name: str) -> str:
    """One row per swept value ("model key=value" labels), in the order of the values."""
    rows = sorted(_jsonl(name), key=lambda r: float(r["model"].rsplit("=", 1)[-1]))
    if not rows:
        return ""
    out = ["| run | val bpb | params | FLOPs/token | train tok/s | experts used | usage KL |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['val_bpb']:.4f} | {r['params'] / 1e6:.2f}M | "
                   f"{r['flops_per_token'] / 1e6:.2f}M | {r['train_tok_s']:.0f} | "
                   f"{_fmt(r.get('expert_usage'), '.1%')} | {_fmt(r.get('usage_kl'), '.2f')} |")
    return "\n".join(out)


def usage_table(name: str) -> str:
    """Per layer and block position: (fraction of experts used, KL from uniform)."""
    rows = _jsonl(name)
    out = ["| model | val bpb | per layer: [(used, KL) per block] |", "|---|---:|---|"]
    for r in rows:
        layers = "; ".join("[" + ", ".join(f"({u:.0%}, {kl:.2f})" for u, kl in layer) + "]"
                           for layer in r["usage_per_block"])
        out.append(f"| {r['model']} | {r['val_bpb']:.4f} | {layers} |")
    return "\n".join(out) if rows else ""


def balance_table(name: str) -> str:
    """Routing-balance settings at one size: quality, usage (mean and worst block) and speed."""
    rows = _jsonl(name)
    out = ["| model | query norm | unit keys | balance_rate | balance_loss | val bpb | experts used (worst block) "
           "| usage KL (worst block) | train tok/s |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c, blocks = r["config"], [b for layer in r["usage_per_block"] for b in layer]
        out.append(f"| {r['model']} | {c['query_norm']} | {'yes' if c['unit_keys'] else 'no'} | "
                   f"{c['balance_rate']:g} | {c['balance_loss']:g} | {r['val_bpb']:.4f} | "
                   f"{r['expert_usage']:.1%} ({min(u for u, _ in blocks):.1%}) | "
                   f"{r['usage_kl']:.2f} ({max(kl for _, kl in blocks):.2f}) | {r['train_tok_s']:.0f} |")
    return "\n".join(out) if rows else ""


def rerun_table() -> str:
    """The committed comparison against a rerun of the same command, per model and seed."""
    first = {(r["model"], r["seed"]): r["val_bpb"] for r in _jsonl("compare_results.jsonl")}
    again = {(r["model"], r["seed"]): r["val_bpb"] for r in _jsonl("compare_rerun_results.jsonl")}
    if not again:
        return ""
    out = ["| model | seed | committed val bpb | rerun val bpb | difference |", "|---|---:|---:|---:|---:|"]
    for key in sorted(first.keys() & again.keys()):
        out.append(f"| {key[0]} | {key[1]} | {first[key]:.4f} | {again[key]:.4f} | "
                   f"{again[key] - first[key]:+.4f} |")
    return "\n".join(out)


def finetune_table() -> str:
    base = R / "finetune_base_eval.json"
    if not base.is_file():
        return ""
    out = ["| model | val bpb on the new domain | trainable params |", "|---|---:|---:|"]
    out.append(f"| base (no adaptation) | {json.loads(base.read_text())['val_bpb']:.4f} | 0 |")
    for kind in ("fhme", "lora", "full"):
        log = R / f"finetune_{kind}.log"
        if log.is_file():
            m = re.search(r"val_bpb ([0-9.]+)\n", log.read_text())
            params = re.search(r"trainable ([0-9]+)", log.read_text())
            out.append(f"| {kind} | {m.group(1) if m else 'n/a'} | {params.group(1) if params else 'see log'} |")
    return "\n".join(out)


if __name__ == "__main__":
    for title, body in (("layer", layer_table()), ("adaptive", adaptive_table()),
                        ("compare", compare_table()), ("rerun", rerun_table()),
                        ("usage 65K", usage_table("usage65k_results.jsonl")),
                        ("balance 65K", balance_table("balance65k_results.jsonl")),
                        ("usage 65K balanced", usage_table("usage65k_balanced_results.jsonl")),
                        ("balanced vs plain, 16K", compare_table("compare_balanced_table.md")),
                        ("experts sweep", sweep_table("scaling_experts.jsonl")),
                        ("experts sweep, balance loss", sweep_table("scaling_experts_balanced.jsonl")),
                        ("depth sweep", sweep_table("scaling_depth.jsonl")),
                        ("finetune", finetune_table())):
        print(f"## {title}\n\n{body}\n")
