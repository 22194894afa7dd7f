"""Markdown tables of the quality runs (benchmarks/quality.py): every search trial, the
reported comparison per corpus with the win rule applied (also with the SiLU output gate and in
shallower models), the expert-table optimizers and the number of experts.

    python benchmarks/quality_tables.py benchmarks/results/quality

A model "wins" against another when it is ahead for every pairing of the two reported seeds
and the gap of the means exceeds the larger of the two half-ranges; two sides run at different
seeds are not judged ("n/a: seeds differ").
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path


TAIL_STEPS = 200  # the training loss is read as its mean over the run's last this many steps


def rows(folder: Path) -> list[dict]:
    """Per-seed result rows of every run under folder, with the run's name and (where kept) its
    training config, periodic validation curve {step: (val bpb, elapsed s)} and training bpb
    over its last TAIL_STEPS steps (``train_bpb_tail``, in training mode: with any dropout on)."""
    out = []
    for path in sorted(folder.glob("*/results.jsonl")):
        config = path.parent / "config.json"
        train = json.loads(config.read_text())["train"] if config.exists() else {}
        metrics = path.parent / "metrics.jsonl"
        curve, losses = {}, []
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                m = json.loads(line)
                if m.get("val_bpb") is not None:
                    curve[m["step"]] = (m["val_bpb"], m["elapsed_s"])
                losses.append((m["step"], m["train_loss"]))
        last = max((s for s, _ in losses), default=0)
        tail = [loss for s, loss in losses if s > last - TAIL_STEPS]
        train_tail = sum(tail) / len(tail) / math.log(2) if tail else None
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "seed" not in row:  # the per-model summary line
                continue
            row["name"], row["curve"], row["train"] = path.parent.name, curve, train
            row["train_bpb_tail"] = train_tail
            out.append(row)
    return out


def search_table(found: list[dict]) -> str:
    lines = ["| trial | model | heads × top-k, key width | val bpb | FFN FLOPs/token | experts used |",
             "|---|---|---|---:|---:|---:|"]
    for r in sorted(found, key=lambda r: (r["model"], r["val_bpb"])):
        c = r["config"]
        heads = c.get("column_heads") or c["expert_heads"]  # per column where set ("1,4")
        shape = f"{heads} × {c['topk']}, {c['key_dim']}" if r["model"] not in ("dense", "moe") else "—"
        used = f"{r['expert_usage']:.1%}" if r.get("expert_usage") is not None else "n/a"
        lines.append(f"| {r['name']} | {r['model']} | {shape} | {r['val_bpb']:.4f} | "
                     f"{r['ffn_flops_per_token']:,.0f} | {used} |")
    return "\n".join(lines)


def _stats(values: list[float]) -> tuple[float, float]:
    return sum(values) / len(values), (max(values) - min(values)) / 2


Runs = list[tuple[int, float]]  # (seed, val bpb) of each run of one side


def _seeds(runs: Runs) -> list[int]:
    return sorted(seed for seed, _ in runs)


def wins(a: Runs, b: Runs) -> bool:
    """a (lower is better) wins against b: ahead for every seed pairing, gap > larger half-range.
    Only sides run at the same seeds are compared (ValueError otherwise)."""
    if _seeds(a) != _seeds(b):
        raise ValueError(f"seeds differ: {_seeds(a)} against {_seeds(b)}")
    va, vb = [v for _, v in a], [v for _, v in b]
    (ma, ha), (mb, hb) = _stats(va), _stats(vb)
    return all(x < y for x, y in itertools.product(va, vb)) and mb - ma > max(ha, hb)


def _verdict(ours: Runs, theirs: Runs) -> str:
    if _seeds(ours) != _seeds(theirs):
        return (f"n/a: seeds differ ({', '.join(map(str, _seeds(ours)))} against "
                f"{', '.join(map(str, _seeds(theirs)))})")
    return "wins" if wins(ours, theirs) else "loses" if wins(theirs, ours) else "no win either way"


def _runs(rs: list[dict]) -> Runs:
    return [(r["seed"], r["val_bpb"]) for r in rs]


def final_table(found: list[dict], corpus: str) -> str:
    """The comparison of the runs named <corpus>_<model>_s<seed>."""
    return comparison_table([r for r in found if r["name"].startswith(corpus + "_")])


def comparison_table(found: list[dict]) -> str:
    """Models ranked by mean val bpb over their seeds, with FHME's verdict against each."""
    by_model: dict[str, list[dict]] = {}
    for r in sorted(found, key=lambda r: r["seed"]):
        by_model.setdefault(r["model"], []).append(r)
    if not by_model:
        return ""
    order = sorted(by_model, key=lambda m: _stats([r["val_bpb"] for r in by_model[m]])[0])
    per_model = {m: ", ".join(str(r["seed"]) for r in by_model[m]) for m in order}
    if len(set(per_model.values())) == 1:
        seeds = f"seeds {per_model[order[0]]}"
    else:  # every side's seeds: verdicts between sides run at different seeds are n/a
        seeds = "seeds " + "; ".join(f"{m}: {v}" for m, v in per_model.items())
    lines = [f"| rank | model | val bpb (mean ± half-range, {seeds}) | FFN FLOPs/token | model FLOPs/token "
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
        fh = _runs(by_model["fhme"])
        verdicts = [f"{m}: {_verdict(fh, _runs(by_model[m]))}" for m in order if m != "fhme"]
        lines.append("FHME against " + "; ".join(verdicts) + ".")
    return "\n".join(lines)


def optim_tables(pilots: list[dict], reported: list[dict], adagrad_16k: list[dict]) -> str:
    """Pilot lrs per optimizer, then each optimizer at its best lr: bpb per step and per second."""
    lines = ["| optimizer | table lr | val bpb (seed 1, 300 steps) |", "|---|---:|---:|"]
    for r in sorted(pilots, key=lambda r: (r["train"]["expert_optim"], r["train"]["expert_lr"])):
        lines.append(f"| {r['train']['expert_optim']} | {r['train']['expert_lr']:g} | {r['val_bpb']:.4f} |")
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in reported + adagrad_16k:
        groups.setdefault((r["config"]["num_experts"], r["train"]["expert_optim"]), []).append(r)
    steps = (400, 800, 1200)
    lines += ["", "| experts | optimizer | table lr | " + " | ".join(f"bpb @ {s}" for s in steps)
              + " | val bpb (whole split, mean ± half-range) | seeds | wall-clock s |",
              "|---:|---|---:|" + "---:|" * len(steps) + "---|---|---:|"]
    for (experts, optim), rs in sorted(groups.items()):
        at = [[r["curve"][s][0] for r in rs if s in r["curve"]] for s in steps]
        mean, half = _stats([r["val_bpb"] for r in rs])
        wall = [r["curve"][max(r["curve"])][1] for r in rs if r["curve"]]
        lines.append(f"| {experts:,} | {optim} | {rs[0]['train']['expert_lr']:g} | "
                     + " | ".join(f"{sum(v) / len(v):.4f}" if v else "—" for v in at)
                     + f" | {mean:.4f} ± {half:.4f} | {', '.join(str(r['seed']) for r in rs)} | "
                     + (f"{sum(wall) / len(wall):,.0f}" if wall else "—") + " |")
    return "\n".join(lines)


def _experts_series(name: str) -> str:
    """Which FLOP knob a run of the experts study turns (its name says): three-part product keys
    (n<N>_p3...: the same top-k at every N), routing once per column
    (..._route_once_...), one head per block at key width 16 (n<N>_h1q<Q>k<K>_...), rows read
    (n<N>_q<Q>k<K>_...), or key width (n<N>_s<seed>); runs with a balance loss
    (..._balance<w>_...) stand apart from every series."""
    if "_balance" in name:
        return "balance loss"
    if "_p3" in name:
        return "three-part keys"
    if "_route_once" in name:
        return "route once"
    return "one head" if "_h1q" in name else "rows read" if "_q" in name else "key width"


def experts_table(found: list[dict]) -> str:
    """FHME at each expert count (equal FFN FLOPs) along four series, the first two sharing the
    default 16K model: key width narrowed as N grows (top-40 kept), rows read per token changed at
    the widest key the budget allows, one head per block at key width 16, or routing once per
    column (top-k, and at 4K heads, for the budget), or three-part keys (the same top-k at every N);
    whether each step up in N wins."""
    groups: dict[tuple[int, int, int, int, float, bool, int], list[dict]] = {}
    for r in found:
        c = r["config"]
        key = (c["num_experts"], c["expert_heads"], c["key_dim"], c["topk"], c.get("balance_loss", 0.0),
               c.get("route_once", False), c.get("key_parts", 2))
        groups.setdefault(key, []).append(r)
    lines = ["| experts | heads | key width | top-k | routing | balance loss | FFN FLOPs/token | val bpb per seed | "
             "mean ± half-range | experts used | usage KL |", "|---:|---:|---:|---:|---|---:|---:|---|---|---:|---:|"]
    for (n, h, q, k, bal, once, parts), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["seed"])
        mean, half = _stats([r["val_bpb"] for r in rs])
        per_seed = ", ".join(f"{r['val_bpb']:.4f} (s{r['seed']})" for r in rs)
        routing = ("once per column" if once else "every run") + (f", {parts}-part keys" if parts != 2 else "")
        lines.append(f"| {n:,} | {h} | {q} | {k} | {routing} | {bal:g} | {rs[0]['ffn_flops_per_token']:,.0f} | "
                     f"{per_seed} | {mean:.4f} ± {half:.4f} | {sum(r['expert_usage'] for r in rs) / len(rs):.1%} | "
                     f"{sum(r['usage_kl'] for r in rs) / len(rs):.2f} |")
    ffn = [rs[0]["ffn_flops_per_token"] for rs in groups.values()]
    lines.append(f"\nFFN FLOPs spread {(max(ffn) - min(ffn)) / min(ffn):.1%}.")
    default = [key for key, rs in groups.items() if key[0] == 16384 and _experts_series(rs[0]["name"]) == "key width"]
    for label in ("key width", "rows read", "one head", "route once", "three-part keys"):
        series = {key: rs for key, rs in groups.items()
                  if (key in default and label in ("key width", "rows read"))
                  or _experts_series(rs[0]["name"]) == label}
        keys = sorted(series)
        bpbs = {key: _runs(rs) for key, rs in series.items()}
        steps = [f"{a[0]:,} -> {b[0]:,}: {_verdict(bpbs[b], bpbs[a])}" for a, b in zip(keys, keys[1:])]
        if steps:
            lines.append(f"More experts against fewer, FLOPs held by {label}: " + "; ".join(steps) + ".")
    return "\n".join(lines)


def curves_table(found: list[dict]) -> str:
    """Each run's periodic validation bpb (the fixed periodic slice) every 400 steps, then its
    final bpb on the whole validation split: where along the run one model overtakes another."""
    steps = sorted({s for r in found for s in r["curve"] if s % 400 == 0})
    lines = ["| run | " + " | ".join(f"@{s:,}" for s in steps) + " | final, whole split |",
             "|---|" + "---:|" * (len(steps) + 1)]
    for r in sorted(found, key=lambda r: r["config"]["num_experts"]):
        cells = [f"{r['curve'][s][0]:.4f}" if s in r["curve"] else "" for s in steps]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['val_bpb']:.4f} |")
    return "\n".join(lines)


def fit_table(found: list[dict]) -> str:
    """Each run's validation bpb beside its training bpb over the last steps: how much of what a
    model fits is its training text (the gap), with and without a regulariser."""
    def reg(r: dict) -> tuple[float, float]:
        return r["config"].get("dropout", 0.0), r["config"].get("value_dropout", 0.0)

    lines = [f"| run | dropout, value dropout | val bpb | train bpb, last {TAIL_STEPS} steps | gap |",
             "|---|---:|---:|---:|---:|"]
    for r in sorted(found, key=lambda r: (r["config"]["ffn"], reg(r), r["seed"])):
        tail = r["train_bpb_tail"]
        lines.append(f"| {r['name']} | {reg(r)[0]:g}, {reg(r)[1]:g} | {r['val_bpb']:.4f} | "
                     f"{tail:.4f} | {r['val_bpb'] - tail:.4f} |")
    return "\n".join(lines)


def balance_table(folders: list[Path]) -> str:
    """Each run of a balancing study beside its expert usage over each block's first 10^6 routing
    choices (``usage_1m_choices.json``, from ``fractalmoe eval --usage-choices 1000000``): the
    share of experts used and KL(usage || uniform), mean over blocks and worst block."""
    def measure(r: dict) -> str:
        named = [f"{k} = {r['config'][k]:g}" for k in ("balance_loss", "balance_rate") if r["config"].get(k)]
        if r["config"].get("layer_balance_loss"):
            named.append(f"balance_loss per layer {r['config']['layer_balance_loss']}")
        if r["train"].get("balance_steps"):
            named.append(f"fading out by step {r['train']['balance_steps']}")
        return ", ".join(named) or "none"

    lines = [f"| run | measure | steps | val bpb | train bpb, last {TAIL_STEPS} steps | "
             "experts used, mean (worst block) | usage KL, mean (worst block) |", "|---|---|---:|---:|---:|---:|---:|"]
    found = [(folder, r) for folder in folders for r in rows(folder)]
    for folder, r in sorted(found, key=lambda fr: (fr[1]["steps"], fr[1]["seed"], fr[1]["val_bpb"])):
        path = folder / r["name"] / "usage_1m_choices.json"
        used = kl = "n/a"
        if path.exists():  # the eval's own means over blocks, beside the worst block
            usage = json.loads(path.read_text())
            blocks = [b for layer in usage["usage_per_block"] for b in layer]
            used = f"{usage['expert_usage']:.1%} ({min(u for u, _ in blocks):.1%})"
            kl = f"{usage['usage_kl']:.2f} ({max(k for _, k in blocks):.2f})"
        lines.append(f"| {r['name']} | {measure(r)} | {r['steps']:,} | {r['val_bpb']:.4f} | "
                     f"{r['train_bpb_tail']:.4f} | {used} | {kl} |")
    return "\n".join(lines)


def shallow_tables(found: list[dict]) -> str:
    """The shallow phase (runs named <corpus>_<model>_L<layers>_s<seed>): one comparison per
    corpus and number of layers, models labelled by run name (PEER with and without balancing)."""
    out = []
    found = [dict(r, model=r["name"].split("_", 1)[1].rsplit("_L", 1)[0]) for r in found]
    for layers, corpus in itertools.product(sorted({r["config"]["n_layers"] for r in found}),
                                            ("shakespeare", "stdlib")):
        table = final_table([r for r in found if r["config"]["n_layers"] == layers], corpus)
        if table:
            out.append(f"\n### {corpus}, {layers}-layer models (1,200 steps)\n\n{table}")
    return "\n".join(out)


def print_per_corpus(found: list[dict], title: str, steps: str = "1,200",
                     corpora: tuple[str, ...] = ("shakespeare", "stdlib")) -> None:
    """The comparison of found's runs on each corpus that has any, under one heading each."""
    for corpus in corpora:
        table = final_table(found, corpus)
        if table:
            print(f"\n### {corpus} ({steps} steps){title}\n")
            print(table)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/quality")
    if (root / "search").is_dir():
        print("### Search (seed 1, 300 steps, bundled corpus)\n")
        print(search_table(rows(root / "search")))
    final = rows(root / "final") if (root / "final").is_dir() else []
    print_per_corpus(final, "")
    # Dense has no expert tables: its final runs are its lazy-Adam runs too. Models are labelled by
    # run name (PEER with and without the balance loss).
    lazy = (rows(root / "final-lazy") if (root / "final-lazy").is_dir() else []) + [
        r for r in final if r["model"] == "dense"]
    lazy = [dict(r, model=r["name"].split("_", 1)[1].rsplit("_s", 1)[0]) for r in lazy]
    print_per_corpus(lazy, ", lazy-Adam expert tables (lr 0.03) for every routed model")
    for phases, title in ((["gated"], "FHME and PKM with the SiLU output gate"),
                          (["conv", "peer-conv"], "every model with the query convolution (ffn_conv = 4)"),
                          (["gate-conv"], "FHME and PKM with the gate and the query convolution"),
                          (["conv-width"], "PKM with the gate and a convolution over 8 positions")):
        if (root / phases[0]).is_dir():
            print_per_corpus([r for p in phases if (root / p).is_dir() for r in rows(root / p)],
                             f", {title}, lazy-Adam tables")
    if (root / "block-conv").is_dir() and (root / "gate-conv").is_dir():  # FHME (the one judged) with them
        without = [dict(r, model=f"{r['model']} without block convolutions") for r in rows(root / "gate-conv")]
        with_ = [dict(r, model="fhme" if r["model"] == "fhme" else f"{r['model']}, block_conv = 4")
                 for r in rows(root / "block-conv")]
        print_per_corpus(with_ + without, ", the pair with block convolutions (block_conv = 4), lazy-Adam tables")
    if (root / "column-heads").is_dir() and (root / "block-conv").is_dir():  # the 1,4 split judged
        split = [dict(r, model="fhme") for r in rows(root / "column-heads")]
        even = [dict(r, model="fhme, 2,2 heads" if r["model"] == "fhme" else f"{r['model']}, block_conv = 4")
                for r in rows(root / "block-conv")]
        print_per_corpus(split + even, ", FHME with column_heads = 1,4 (fhme) against the 2,2 default and PKM, "
                         "both with block convolutions, lazy-Adam tables")
    if (root / "fade-16k").is_dir():  # the pair with and without an early balance loss, one code, seed 2
        fade = [dict(r, model=r["model"] + (", balance loss fading out by step 400" if "_fade" in r["name"] else ""))
                for r in rows(root / "fade-16k")]
        print_per_corpus(fade, ", FHME and PKM (block convolutions) with and without a balance loss of 0.01 "
                         "fading out by step 400, seed 2", corpora=("stdlib",))
    if all((root / p).is_dir() for p in ("fade", "fade-base", "fade-16k")):  # seeds 2 and 3, one code
        seed2 = [r for r in rows(root / "fade-16k") if r["name"] in (
            "stdlib_fhme_gated_conv4_bconv4_fade0.01_400_s2", "stdlib_fhme_gated_conv4_bconv4_s2",
            "stdlib_pkm_gated_conv4_bconv4_s2")]
        runs = rows(root / "fade") + rows(root / "fade-base") + seed2
        faded = [dict(r, model=r["model"] if "_fade" in r["name"] or r["model"] != "fhme"
                      else "fhme without the balance loss") for r in runs]
        print_per_corpus(faded, ", FHME with a balance loss of 0.01 fading out by step 400 (fhme) against "
                         "FHME without it and PKM without it (all with block convolutions), lazy-Adam tables")
        plain = [r for r in runs if "_fade" not in r["name"]]
        print_per_corpus(plain, ", FHME and PKM as by default (no balance loss, block convolutions), the same "
                         "code and seeds, lazy-Adam tables")
    if (root / "fractal-budget").is_dir():  # C = 1, 2, 3 at a budget that leaves C = 3 2 x top-4
        budget = rows(root / "fractal-budget")
        for judged, other in (("2", "3"), ("3", "2")):
            named = [dict(r, model="fhme" if r["model"] == "fhme" and f"_c{judged}_" in r["name"]
                          else f"fhme C = {other}" if r["model"] == "fhme" else "pkm (C = 1)")
                     for r in budget]
            print_per_corpus(named, f", C = 1, 2 and 3 at one budget, FHME at C = {judged} judged "
                             "(2 heads x top-47 at C = 2, top-4 at C = 3; PKM 9 x top-25), lazy-Adam tables")
    if (root / "bf16-tables").is_dir():  # the default FHME with float32 and bfloat16 tables
        tables = {"float32": "float32 tables", "bfloat16": "bfloat16 tables, rounded to nearest",
                  "bfloat16_sr": "bfloat16 tables, rounded stochastically"}
        runs = [dict(r, tables=r["name"].split("_fhme_", 1)[1].rsplit("_s", 1)[0]) for r in rows(root / "bf16-tables")]
        for judged in ("bfloat16", "bfloat16_sr"):
            named = [dict(r, model="fhme" if r["tables"] == judged else f"fhme, {tables[r['tables']]}") for r in runs]
            print_per_corpus(named, f", the default FHME with {tables[judged]} judged (fhme) against the others, "
                             "lazy-Adam tables")
    if (root / "default-length").is_dir():  # the block-conv pair at the default's length
        long_pair = rows(root / "default-length")
        print_per_corpus(long_pair, ", the pair with block convolutions at the default length, lazy-Adam tables",
                         steps="2,400")
        print("\nPeriodic bpb along the runs:\n")
        print(curves_table(long_pair))
    # The same pair on the other two corners of corpus size x kind of text: 1 MB of code, 4 MB of prose
    other = [r for p in ("small-stdlib", "kjv") if (root / p).is_dir() for r in rows(root / p)]
    if other:
        print_per_corpus(other, ", the default-length pair on a 1 MB cut of the standard library (stdlib1mb) "
                         "and on the King James Bible (kjv)", steps="2,400", corpora=("stdlib1mb", "kjv"))
        print("\nPeriodic bpb along the runs:\n")
        print(curves_table(other))
    if (root / "dropout").is_dir() and (root / "default-length").is_dir():  # a regulariser on both
        reg = [dict(r, model=f"{r['model']}, dropout 0.1") for r in rows(root / "dropout")]
        base = [r for r in rows(root / "default-length") if r["name"].startswith("shakespeare_")]
        print_per_corpus(reg + base, ", the pair with and without the transformer's dropout (0.1), lazy-Adam "
                         "tables", steps="2,400", corpora=("shakespeare",))
        print()
        print(fit_table(reg + base))
    if (root / "value-dropout-pilots").is_dir():
        print("\n### Value dropout pilots (seed 1, 2,400 steps, bundled corpus)\n")
        print(fit_table(rows(root / "value-dropout-pilots")))
    balance = [root / p for p in ("balance-65k-stdlib-pilots", "balance-65k-stdlib", "balance-65k-layers",
                                  "balance-65k-long", "balance-65k-fade")
               if (root / p).is_dir()]
    if balance:
        print("\n### The default FHME at 65,536 experts with and without balancing (standard library, "
              "pilots at seed 1; usage over each block's first 10^6 routing choices)\n")
        print(balance_table(balance))
    if (root / "shallow").is_dir():
        print(shallow_tables(rows(root / "shallow")))
    if (root / "optim").is_dir() or (root / "optim-pilots").is_dir():
        pilots = rows(root / "optim-pilots") if (root / "optim-pilots").is_dir() else []
        reported = rows(root / "optim") if (root / "optim").is_dir() else []
        adagrad = [r for r in final if r["name"].startswith("shakespeare_fhme_")]
        print("\n### Expert-table optimizers (default FHME, bundled corpus)\n")
        print(optim_tables(pilots, reported, adagrad))
    one_head = rows(root / "one-head") if (root / "one-head").is_dir() else []
    experts = rows(root / "experts") if (root / "experts").is_dir() else []
    route_once = rows(root / "route-once") if (root / "route-once").is_dir() else []
    key_parts = rows(root / "key-parts") if (root / "key-parts").is_dir() else []
    if experts:
        print("\n### Experts at equal FFN FLOPs (default FHME, standard-library corpus, 1,200 steps)\n")
        print(experts_table(experts + [r for r in one_head if r["model"] == "fhme"] + route_once + key_parts))
    if key_parts:
        print("\nPeriodic bpb along the three-part-key runs:\n")
        print(curves_table(key_parts))
    if (root / "experts-long-pilots").is_dir():
        long_runs = rows(root / "experts-long-pilots")
        print("\n### 65K and 262K experts at 2,400 steps (route once, standard-library corpus, seed 1)\n")
        print(experts_table(long_runs))
        print("\nPeriodic bpb along the runs:\n")
        print(curves_table(long_runs))
    for phases, title in ((["one-head-pilots"], "One head per block at 65K experts, every routed model matched"),
                          (["adaptive-pilots", "conv-pilots"],
                           "Adaptive-depth FHME and PKM routing shapes, with the query convolution"),
                          (["table-lr-pilots", "shape-pilots", "conv-width-pilots", "shared-bank-pilots",
                            "drop-path-pilots", "sigmoid-gate-pilots", "block-conv-pilots",
                            "column-heads-pilots", "deep-query-pilots", "fade-pilots"],
                           "The default FHME (gate and convolution): table lr 0.1, one head x top-67 per "
                           "block, a convolution over 8 positions, one 65K bank shared by every layer, "
                           "local drop-path 0.15, sigmoid gates, block convolutions, heads 1,4 per column, "
                           "deep paths querying with what they retrieved (hop; the default rerun beside it: rerun), "
                           "a balance loss fading out by step 400 (fade) "
                           "(and PKM with the gate: convolution 4 and 8, shared, dropout 0.1, sigmoid gates, "
                           "a block convolution, the fading loss)")):
        if (root / phases[0]).is_dir():
            print(f"\n### {title} (seed 1, 600 steps, bundled unless the name says stdlib)\n")
            print(search_table([r for p in phases if (root / p).is_dir() for r in rows(root / p)]))
    fhme_one_head = [r for r in experts + one_head if r["model"] == "fhme" and _experts_series(r["name"]) == "one head"]
    pkm_rows = [r for r in one_head if r["model"] == "pkm"]
    matched = pkm_rows + fhme_one_head
    for n in sorted({r["config"]["num_experts"] for r in one_head}):
        print(f"\n### One-head FHME at {n:,} experts against PKM matched to it (standard library, 1,200 steps)\n")
        print(comparison_table([r for r in matched if r["config"]["num_experts"] == n]))
    for n in sorted({r["config"]["num_experts"] for r in route_once} & {r["config"]["num_experts"] for r in pkm_rows}):
        print(f"\n### FHME routing once per column at {n:,} experts against the same PKM (standard library)\n")
        print(comparison_table([r for r in route_once + pkm_rows if r["config"]["num_experts"] == n]))
    pkm: dict[int, Runs] = {}
    for r in pkm_rows:
        pkm.setdefault(r["config"]["num_experts"], []).append((r["seed"], r["val_bpb"]))
    steps = [f"{a:,} -> {b:,}: {_verdict(pkm[b], pkm[a])}" for a, b in zip(sorted(pkm), sorted(pkm)[1:])]
    if steps:
        print("\nPKM matched to the one-head FHME, more experts against fewer: " + "; ".join(steps) + ".")
    if (root / "key-parts-pkm").is_dir():  # both with three-part keys, and PKM's two-part run for scale
        three = [r for r in rows(root / "key-parts-pkm") + key_parts if r["config"]["num_experts"] == 262144]
        two = [dict(r, model="pkm, two-part keys") for r in pkm_rows if r["config"]["num_experts"] == 262144]
        print("\n### Three-part-key FHME at 262,144 experts against PKM with the same keys (standard library, "
              "1,200 steps)\n")
        print(comparison_table(three + two))
    if (root / "key-parts-heads-pilots").is_dir():
        print("\n### One or three heads at 262,144 experts, three-part keys, FHME and PKM (standard library, "
              "400 steps; seed 1, and seed 2 for the one-head pair and PKM with three heads)\n")
        print(search_table(rows(root / "key-parts-heads-pilots")))


if __name__ == "__main__":
    main()
