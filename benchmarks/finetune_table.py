"""Markdown tables of the fine-tuning study (benchmarks/finetune.sh): forgetting at matched gain.

    python benchmarks/finetune_table.py benchmarks/results/finetune/finetune.jsonl [MORE.jsonl ...] \
        [--levels 3.8 email:3.5 kjv:2.3] [--methods lora full gated-fhme]

A method's learning-rate sweep traces a curve of (new-domain bpb, base-domain rise). Comparing
methods at one learning rate mixes how far each one got with what it cost, so each method's rise is
read at the same new-domain bpb: the highest of the methods' best bpbs (a level every method
reaches), linearly interpolated between the two sweep points around it (seed means), the
untrained start (no rise) counting as a point and points beaten on both axes by another left
out. A target outside a curve is read at its nearest point (marked *). Rises below 0.01 bpb
count as 0.01, so the ratios stay finite and noise-sized rises do not dominate them. Learning
rates print as dense / expert-table lr. ``--levels`` adds, per domain, each method's rise read
the same way at those new-domain bpbs, and its ratio to LoRA's and full fine-tuning's there
(``DOMAIN:BPB`` reads that domain only: the domains' bpbs lie far apart).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from statistics import mean

FLOOR = 0.01


def load(path: str) -> list[dict]:
    with open(path) as fh:
        return [r for line in fh if line.strip() for r in readings(json.loads(line))]


def readings(row: dict) -> list[dict]:
    """A run read several ways stands for one row per reading, each a method of its own that
    traces a learning-rate curve. With its domain gates at several priors (``bpb_by_prior``):
    one row per prior, tagged ``+gate@prior``, and each again tagged ``+gates``, a method whose
    curve runs over every (learning rate, prior) pair: the prior is set after training, so it is
    read as a second rate (the best prior at each level); a run whose gates were fitted only after
    training (``domain_gate`` off) keeps its own row too, the same adapters without gates. As the
    posterior mixture of the trained model and its base (``bpb_mixed``): a row tagged ``+mix``
    beside its own."""
    own = [] if row.get("bpb_by_prior") and row.get("domain_gate") else [row]
    gated = [{**row, "method": f"{row['method']}{tag}", "val_bpb": bpbs[0], "base_val_bpb": bpbs[1],
              "read_prior": float(prior)}
             for prior, bpbs in (row.get("bpb_by_prior") or {}).items() for tag in (f"+gate@{prior}", "+gates")]
    mixed = [{**row, "method": f"{row['method']}+mix", "val_bpb": row["bpb_mixed"][0],
              "base_val_bpb": row["bpb_mixed"][1]}] if row.get("bpb_mixed") else []
    return own + gated + mixed


def rise(row: dict) -> float:
    return row["base_val_bpb"] - row["base_val_bpb_before"]


def curve(rows: list[dict]) -> list[tuple[tuple[float, ...], float, float, float]]:
    """(lr, mean new bpb, mean base rise, mean trainable) per learning rate (with the gates' prior
    where a row was read at one), by new bpb, ending
    with the untrained start (lr 0: the base's new-domain bpb, no rise), which every method's
    curve passes through: a level between the start and a method's gentlest point is then
    interpolated, not read at that point.

    Points another point beats on both axes (or the start does: a rate so high it learns less
    than a gentler one, or diverges) are dropped: they trace no trade-off, and interpolating
    through them would charge the method a rise that a gentler rate of its own avoids."""
    by_lr: dict[tuple[float, ...], list[dict]] = defaultdict(list)
    for r in rows:
        by_lr[(r["lr"], r["expert_lr"], *(() if r.get("read_prior") is None else (r["read_prior"],)))].append(r)
    pts = [(lr, mean(r["val_bpb"] for r in rs), mean(rise(r) for r in rs),
            mean(r["trainable_params"] for r in rs)) for lr, rs in by_lr.items()]
    start = ((0.0, 0.0), mean(r["val_bpb_before"] for r in rows), 0.0, pts[0][3])
    kept = [p for p in pts if not any(_beats(q, p) for q in [*pts, start])]
    return sorted(kept, key=lambda p: p[1]) + [start]


def _beats(q: tuple, p: tuple) -> bool:
    """q is no worse than p on new-domain bpb and base rise, and better on one of them."""
    return q[1] <= p[1] and q[2] <= p[2] and (q[1] < p[1] or q[2] < p[2])


def at_bpb(pts: list[tuple[tuple[float, ...], float, float, float]], target: float) -> tuple[float, bool]:
    """Rise at new-domain bpb ``target`` (linear between sweep points); True if clamped."""
    for (_, b0, r0, _), (_, b1, r1, _) in zip(pts, pts[1:]):
        if b0 <= target <= b1:
            t = 0.0 if b1 == b0 else (target - b0) / (b1 - b0)
            return r0 + t * (r1 - r0), False
    nearest = min(pts, key=lambda p: abs(p[1] - target))
    return nearest[2], True


def by_method(rows: list[dict]) -> dict[str, list[dict]]:
    methods: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        methods[r["method"]].append(r)
    return methods


def matched_table(rows: list[dict], title: str) -> str:
    methods = by_method(rows)
    curves = {m: curve(rs) for m, rs in methods.items()}
    target = max(min(p[1] for p in pts) for pts in curves.values())
    ref = "lora" if "lora" in curves else next(iter(curves))
    ref_rise = max(at_bpb(curves[ref], target)[0], FLOOR)
    seeds = sorted({r["seed"] for r in rows})

    def seed_rise(m: str, seed: int) -> float | None:  # one seed's curve read at the same level
        own = [r for r in methods[m] if r["seed"] == seed]
        return max(at_bpb(curve(own), target)[0], FLOOR) if own else None

    lines = [f"#### {title} (seeds {', '.join(map(str, seeds))}; base rise read at new-domain bpb {target:.4f})",
             "", "| method | trainable params | best new-domain bpb (lr) | base rise there | "
             f"base rise at bpb {target:.3f} | x {ref} | x {ref} per seed | x full |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    full_rise = max(at_bpb(curves["full"], target)[0], FLOOR) if "full" in curves else None
    for m, pts in sorted(curves.items(), key=lambda kv: kv[0]):
        lr, best, best_rise, trainable = pts[0]
        r, clamped = at_bpb(pts, target)
        r = max(r, FLOOR)
        rates = f"{lr[0]:g} / {lr[1]:g}" + (f", prior {lr[2]:g}" if len(lr) > 2 else "")
        per_seed = [(seed_rise(m, s), seed_rise(ref, s)) for s in seeds]
        ratios = ", ".join(f"{a / b:.2f}" for a, b in per_seed if a is not None and b is not None)
        lines.append(f"| {m} | {trainable:,.0f} | {best:.4f} ({rates}) | {best_rise:+.4f} | "
                     f"{r:.4f}{'*' if clamped else ''} | {r / ref_rise:.2f} | {ratios} | "
                     f"{f'{r / full_rise:.2f}' if full_rise else ''} |")
    return "\n".join(lines)


def sequential_table(rows: list[dict], singles: list[dict]) -> str:
    first = {r["run_dir"]: r for r in singles if "run_dir" in r}
    lines = ["#### Sequential: email, then kjv (middle learning rate; seed means, then each seed's)", "",
             "| method | email bpb after email, after kjv | kjv bpb | email rise during kjv | base rise during kjv | "
             "base rise since the base | email rise per seed |", "|---|---|---:|---:|---:|---:|---|"]
    for m, rs in sorted(by_method(rows).items()):
        a_rise = mean(r["prior_val_bpb"][0] - r["prior_val_bpb_before"][0] for r in rs)
        total = [r["base_val_bpb"] - first[_key(r["base"], first)]["base_val_bpb_before"]
                 for r in rs if _key(r["base"], first) is not None]
        per_seed = ", ".join(f"{r['prior_val_bpb'][0] - r['prior_val_bpb_before'][0]:.4f} (s{r['seed']})"
                             for r in sorted(rs, key=lambda r: r["seed"]))
        email = (f"{mean(r['prior_val_bpb_before'][0] for r in rs):.4f}, "
                 f"{mean(r['prior_val_bpb'][0] for r in rs):.4f}")
        lines.append(f"| {m} | {email} | {mean(r['val_bpb'] for r in rs):.4f} | {max(a_rise, FLOOR):.4f} | "
                     f"{max(mean(rise(r) for r in rs), FLOOR):.4f} | "
                     f"{max(mean(total), FLOOR) if total else float('nan'):.4f} | {per_seed} |")
    return "\n".join(lines)


def _key(base: str, runs: dict[str, dict]) -> str | None:
    """The single-domain run a sequential run started from (run directories may be relative)."""
    return next((k for k in runs if base.endswith(k.lstrip("./"))), None)


def levels_table(rows: list[dict], title: str, levels: list[float]) -> str:
    """Each method's rise at each of ``levels`` (seed means), with its ratio to LoRA's and full's."""
    curves = {m: curve(rs) for m, rs in by_method(rows).items()}
    lines = [f"#### {title}: base rise at new-domain bpb {', '.join(f'{x:g}' for x in levels)}", "",
             "| method | " + " | ".join(f"rise at {x:g} (x lora, x full)" for x in levels) + " |",
             "|---|" + "---:|" * len(levels)]

    def read(m: str, level: float) -> tuple[float, bool]:
        r, clamped = at_bpb(curves[m], level)
        return max(r, FLOOR), clamped

    for m in sorted(curves):
        cells = []
        for level in levels:
            r, clamped = read(m, level)
            refs = [f"{r / read(ref, level)[0]:.2f}" if ref in curves else "" for ref in ("lora", "full")]
            cells.append(f"{r:.3f}{'*' if clamped else ''} ({', '.join(refs)})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def level(spec: str) -> tuple[str | None, float]:
    """``BPB`` (every domain) or ``DOMAIN:BPB`` (that domain only), as (domain or None, bpb)."""
    name, colon, value = spec.rpartition(":")
    try:
        return (name if colon else None), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec}: expected BPB or DOMAIN:BPB") from None


def domain_levels(specs: list[tuple[str | None, float]], domain: str) -> list[float]:
    """The ``--levels`` that apply to ``domain``: plain numbers, and ``DOMAIN:BPB`` of that domain."""
    return [bpb for name, bpb in specs if name in (None, domain)]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="finetune.jsonl files written by benchmarks/finetune.sh and the like")
    p.add_argument("--methods", nargs="+", default=None,
                   help="only these methods (a name matches its gated rows, name+gate@prior and name+gates, too)")
    p.add_argument("--levels", nargs="+", default=[], type=level, metavar="[DOMAIN:]BPB",
                   help="new-domain bpbs to read every rise at (DOMAIN:BPB: that domain only)")
    args = p.parse_args(argv)
    rows = [r for path in args.results for r in load(path)
            if args.methods is None or re.sub(r"\+gate(s|@.*)$", "", r["method"]) in args.methods]
    out = []
    singles = [r for r in rows if r.get("study") == "single"]
    for base_model in ("fractalmoe", "gpt2"):
        for domain in ("email", "kjv"):
            part = [r for r in singles if r.get("base_model") == base_model and r["domain"] == domain]
            if part:
                out.append(matched_table(part, f"{base_model} base adapted to {domain}"))
                if levels := domain_levels(args.levels, domain):
                    out.append(levels_table(part, f"{base_model} base adapted to {domain}", levels))
    seq = [r for r in rows if r.get("study") == "sequential"]
    if seq:
        out.append(sequential_table(seq, [r for r in singles if r.get("base_model") == "fractalmoe"]))
    print("\n\n".join(out))
    print(f"\nRises below {FLOOR} bpb count as {FLOOR}; * = read at the nearest sweep point.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
