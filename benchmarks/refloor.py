"""Layer-benchmark results re-read at today's roofline floor.

Floors written before the backward's second read of the expert rows was counted
(``roofline.step_bytes``: the rows are gathered by the forward and again by the backward) are
low by tables x slots x row bytes at the run's random-row bandwidth. This adds that term to each
row of a committed ``fractalmoe bench layer --json`` file (everything else it needs is in the
row) and prints the corrected ``roofline_frac`` and the ceilings of the same-run ratios: another
impl's median step over this impl's floor, at the largest N, and its own smallest N's step over
its largest N's floor.

    python benchmarks/refloor.py benchmarks/results/layer_ceilings.jsonl [...]
"""

from __future__ import annotations

import json
import sys

from fractalmoe.bench_layer import IMPLS
from fractalmoe.experts import TABLE_DTYPES


def reread_ms(row: dict) -> float:
    """The backward's second read of the rows the forward gathered, at the run's bandwidth."""
    elem = TABLE_DTYPES[row.get("expert_dtype", "float32")].itemsize
    nbytes = IMPLS[row["impl"]].tables * row["tokens"] * row["heads"] * row["topk"] * row["dim"] * elem
    return nbytes / (row["bandwidth_gbps"] * 1e9) * 1e3


def refloor(rows: list[dict]) -> list[dict]:
    """Our impls' rows with the floor as counted today (rows already counting it are kept)."""
    out = []
    for row in rows:
        if "error" in row or not row["impl"].startswith("fractalmoe") or "bytes_per_token" in row:
            continue
        floor = row["floor_ms"] + reread_ms(row)
        out.append({**row, "floor_ms_before": row["floor_ms"], "floor_ms": floor,
                    "roofline_frac_before": row["roofline_frac"], "roofline_frac": floor / row["step_ms"]})
    return out


def main(paths: list[str]) -> None:
    for path in paths:
        rows = [json.loads(line) for line in open(path)]
        ours = refloor(rows)
        top = max(r["N"] for r in ours)
        print(f"{path}")
        for r in ours:
            print(f"  {r['impl']:30s} N={r['N']:>8}  floor {r['floor_ms_before']:6.1f} -> {r['floor_ms']:6.1f} ms"
                  f"  roofline_frac {r['roofline_frac_before']:.2f} -> {r['roofline_frac']:.2f}")
        for a in (r for r in ours if r["N"] == top):
            others = [r for r in rows if "error" not in r and r["N"] == top and not r["impl"].startswith("fractalmoe")]
            small = [r for r in rows if r["impl"] == a["impl"] and "error" not in r and r["N"] < top]
            for b in others:
                print(f"  ceiling {a['impl']} vs {b['impl']} at N={top}: {b['step_ms'] / a['floor_ms_before']:.2f}x"
                      f" -> {b['step_ms'] / a['floor_ms']:.2f}x")
            for b in small:
                print(f"  ceiling {a['impl']} N={top} vs N={b['N']}: {b['step_ms'] / a['floor_ms_before']:.2f}x"
                      f" -> {b['step_ms'] / a['floor_ms']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
