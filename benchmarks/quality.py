"""Every run behind the quality tables: a fair search, the reported comparison, the fractal and
experts studies. Each run is one `fractalmoe compare` (FFN FLOPs matched to the FHME reference
of the same routing shape); runs are spread over CPU cores, one single-threaded process per core.

    python benchmarks/quality.py pilots            # FHME-only pilots that set its own knobs
    python benchmarks/quality.py search            # every model: seed 1, 300 steps, bundled corpus
    python benchmarks/quality.py final             # seeds 2 and 3, 1,200 steps, both corpora

Results land in runs/quality/<phase>/<name>/results.jsonl; a finished run is never rerun.
`python benchmarks/quality_tables.py` turns them into the README's tables.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
from pathlib import Path

ROUTED = ("fhme", "pkm", "peer", "memplus")
# The FHME reference of every comparison: value blocks, C = 2, 2 heads; other models are matched
# to its FFN FLOPs through their own width knob (heads for routed models, hidden width otherwise).
REFERENCE = ["--set", "block=value"]
# Trials of the search, the same number for every model. Routed models share two routing shapes
# of about equal FLOPs per head for value blocks; dense and MoE try two learning rates.
ROUTED_TRIALS = [("16", "40", "0.05"), ("32", "8", "0.05")]
DENSE_TRIALS = ["0.003", "0.01"]
# FHME's own pilots before the search (block kind, shape, join start, summed join, table lr).
PILOTS = [("value", ["--models", "fhme,pkm,dense", "--set", "block=value"]),
          ("value_q16k32", ["--models", "fhme,pkm", "--set", "block=value", "--set", "key_dim=16",
                            "--set", "topk=32"]),
          ("value_q16k32_jb0", ["--models", "fhme", "--set", "block=value", "--set", "key_dim=16",
                                "--set", "topk=32", "--set", "join_bias=0"]),
          ("value_q32k8_elr0.15", ["--models", "fhme", "--set", "block=value", "--set", "expert_lr=0.15"])]


def pilot_jobs() -> list[tuple[str, list[str]]]:
    return [(name, [*args, "--max-steps", "300", "--seeds", "1"]) for name, args in PILOTS]


def search_jobs() -> list[tuple[str, list[str]]]:
    jobs = []
    for (q, k, elr), model in itertools.product(ROUTED_TRIALS, ROUTED):
        jobs.append((f"{model}_q{q}k{k}_elr{elr}",
                     ["--models", model, *REFERENCE, "--set", f"key_dim={q}", "--set", f"topk={k}",
                      "--set", f"expert_lr={elr}", "--max-steps", "300", "--seeds", "1"]))
    for model, lr in itertools.product(("dense", "moe"), DENSE_TRIALS):
        jobs.append((f"{model}_lr{lr}", ["--models", model, *REFERENCE, "--set", f"lr={lr}",
                                         "--max-steps", "300", "--seeds", "1"]))
    return jobs


# Chosen on the bundled corpus from the search (README "How the settings were chosen"); run
# unchanged on the second corpus. Every routed model reads 40 rows per head at key width 16.
TUNED = {"fhme": ["--set", "join_bias=0"], "pkm": [], "dense": [], "moe": [], "memplus": [], "peer": []}
SHAPE = ["--set", "key_dim=16", "--set", "topk=40"]
# Most decisive first: FHME, the strongest baseline and dense on both corpora, then the others.
ORDER = [("shakespeare", "fhme"), ("shakespeare", "pkm"), ("shakespeare", "dense"), ("stdlib", "fhme"),
         ("stdlib", "pkm"), ("stdlib", "dense"), ("shakespeare", "moe"), ("shakespeare", "memplus"),
         ("shakespeare", "peer"), ("stdlib", "memplus"), ("stdlib", "peer"), ("stdlib", "moe")]


def final_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    jobs = []
    for (corpus, model), seed in itertools.product(ORDER, ("2", "3")):
        data = ["--data", stdlib] if corpus == "stdlib" else []
        jobs.append((f"{corpus}_{model}_s{seed}",
                     ["--models", model, *REFERENCE, *SHAPE, *TUNED[model], *data, "--max-steps", "1200",
                      "--seeds", seed]))
    return jobs


def run(phase: str, jobs: list[tuple[str, list[str]]], cores: int, core: int | None) -> None:
    if core is None:  # one worker per core
        procs = [subprocess.Popen([sys.executable, __file__, phase, "--cores", str(cores), "--core", str(c)])
                 for c in range(cores)]
        sys.exit(max(p.wait() for p in procs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path("runs/quality") / phase
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, args) in enumerate(jobs):
        out = root / name
        if i % cores != core or out.exists():
            continue
        cmd = ["taskset", "-c", str(core), sys.executable, "-m", "fractalmoe", "compare", *args,
               "--out", str(out), "--json"]
        with open(f"{out}.log", "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=("pilots", "search", "final"))
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--core", type=int)
    p.add_argument("--stdlib", default="data/stdlib", help="built with `fractalmoe corpus stdlib`")
    args = p.parse_args()
    jobs = {"pilots": pilot_jobs, "search": search_jobs, "final": lambda: final_jobs(args.stdlib)}[args.phase]()
    run(args.phase, jobs, args.cores, args.core)


if __name__ == "__main__":
    main()
