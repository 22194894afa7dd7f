"""Markdown tables of the quality runs (benchmarks/quality.py): every search trial, and the
reported comparison per corpus with the win rule applied.

    python benchmarks/quality_tables.py benchmarks/results/quality

A model "wins" against another when it is ahead for every pairing of the two reported seeds
and the gap of the means exceeds the larger of the two half-ranges.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path


def rows(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*/results.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            row["name"] = path.parent.name
            out.append(row)
    return out


def search_table(found: list[dict]) -> str:
    lines = ["| trial | model | heads × top-k, key width | val bpb (seed 1) | FFN FLOPs/token | experts used |",
             "|---|---|---|---:|---:|---:|"]
    for r in sorted(found, key=lambda r: (r["model"], r["val_bpb"])):
        c = r["config"]
        shape = f"{c['expert_heads']} × {c['topk']}, {c['key_dim']}" if r["model"] not in ("dense", "moe") else "—"
        used = f"{r['expert_usage']:.1%}" if r.get("expert_usage") is not None else "n/a"
        lines.append(f"| {r['name']} | {r['model']} | {shape} | {r['val_bpb']:.4f} | "
                     f"{r['ffn_flops_per_token']:,.0f} | {used} |")
    return "\n".join(lines)


def _stats(values: list[float]) -> tuple[float, float]:
    return sum(values) / len(values), (max(values) - min(values)) / 2


def wins(a: list[float], b: list[float]) -> bool:
    """a (lower is better) wins against b: ahead for every seed pairing, gap > larger half-range."""
    (ma, ha), (mb, hb) = _stats(a), _stats(b)
    return all(x < y for x, y in itertools.product(a, b)) and mb - ma > max(ha, hb)


def _verdict(ours: list[float], theirs: list[float]) -> str:
    return "wins" if wins(ours, theirs) else "loses" if wins(theirs, ours) else "no win either way"


def final_table(found: list[dict], corpus: str) -> str:
    by_model: dict[str, list[dict]] = {}
    for r in found:
        if r["name"].startswith(corpus + "_"):
            by_model.setdefault(r["model"], []).append(r)
    if not by_model:
        return ""
    order = sorted(by_model, key=lambda m: _stats([r["val_bpb"] for r in by_model[m]])[0])
    seeds = ", ".join(str(r["seed"]) for r in by_model[order[0]])
    lines = [f"| rank | model | val bpb (mean ± half-range, seeds {seeds}) | FFN FLOPs/token | model FLOPs/token "
             "| params | experts used | usage KL | train tok/s |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for rank, m in enumerate(order, 1):
        rs = by_model[m]
        mean, half = _stats([r["val_bpb"] for r in rs])
        used = f"{rs[0]['expert_usage']:.1%}" if rs[0].get("expert_usage") is not None else "n/a"
        kl = f"{rs[0]['usage_kl']:.2f}" if rs[0].get("usage_kl") is not None else "n/a"
        tok_s = sum(r["train_tok_s"] for r in rs) / len(rs)
        lines.append(f"| {rank} | {m} | {mean:.4f} ± {half:.4f} | {rs[0]['ffn_flops_per_token']:,.0f} | "
                     f"{rs[0]['flops_per_token']:,.0f} | {rs[0]['params'] / 1e6:.2f}M | {used} | {kl} | {tok_s:,.0f} |")
    ffn = [by_model[m][0]["ffn_flops_per_token"] for m in order]
    lines.append(f"\nFFN FLOPs spread {(max(ffn) - min(ffn)) / min(ffn):.1%}.")
    if "fhme" in by_model:
        fh = [r["val_bpb"] for r in by_model["fhme"]]
        verdicts = [f"{m}: {_verdict(fh, [r['val_bpb'] for r in by_model[m]])}" for m in order if m != "fhme"]
        lines.append("FHME against " + "; ".join(verdicts) + ".")
    return "\n".join(lines)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/quality")
    if (root / "search").is_dir():
        print("### Search (seed 1, 300 steps, bundled corpus)\n")
        print(search_table(rows(root / "search")))
    final = rows(root / "final") if (root / "final").is_dir() else []
    for corpus in ("shakespeare", "stdlib"):
        table = final_table(final, corpus)
        if table:
            print(f"\n### {corpus} (1,200 steps)\n")
            print(table)


if __name__ == "__main__":
    main()
