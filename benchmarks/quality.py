"""Every run behind the quality tables: a fair search, the reported comparison, the fractal and
experts studies. Each run is one `fractalmoe compare` (FFN FLOPs matched to the FHME reference
of the same routing shape); runs are spread over CPU cores, one single-threaded process per core.

    python benchmarks/quality.py pilots            # FHME-only pilots that set its own knobs
    python benchmarks/quality.py search            # every model: seed 1, 300 steps, bundled corpus
    python benchmarks/quality.py final             # seeds 2 and 3, 1,200 steps, both corpora
    python benchmarks/quality.py untie-pilots      # FHME with untied routers vs tied and PKM, 600 steps
    python benchmarks/quality.py usage-pilots      # FHME with the balance loss, 600 steps
    python benchmarks/quality.py optim-pilots      # expert-table optimizers: 4 table lrs each, seed 1
    python benchmarks/quality.py optim             # each at its best lr: seeds 2, 3; 16K and 65K experts
    python benchmarks/quality.py final-lazy        # every model with lazy-Adam tables: seeds 2, 3, 1,200 steps
    python benchmarks/quality.py balance-65k       # FHME at 65K experts with a light balance loss, seed 2
    python benchmarks/quality.py experts           # FHME at 4K .. 262K experts, equal FFN FLOPs, second corpus
    python benchmarks/quality.py one-head-pilots   # one head per block at 65K, every routed model, 600 steps
    python benchmarks/quality.py one-head          # PKM matched to the one-head FHME at 65K and 262K, second corpus
    python benchmarks/quality.py route-once-pilots # FHME routing once per column, 65K, 600 steps
    python benchmarks/quality.py route-once        # the experts series with route_once, second corpus
    python benchmarks/quality.py shallow-pilots    # FHME vs PKM in 1-, 2- and 4-layer models, 600 steps
    python benchmarks/quality.py shallow           # every model in 1-layer models, FHME vs PKM in 2: 1,200 steps
    python benchmarks/quality.py gate-pilots       # FHME, PKM with a SiLU output gate, 1 and 4 layers, 600 steps
    python benchmarks/quality.py gated             # FHME and PKM with the gate, 4 layers: seeds 2, 3, 1,200 steps
    python benchmarks/quality.py conv-pilots       # FHME, PKM with a causal convolution on the queries, 600 steps
    python benchmarks/quality.py conv              # the pair, Memory+, MoE, dense: 1,200 steps, seeds 2, 3, 2 corpora
    python benchmarks/quality.py gate-conv         # the pair with the gate and the convolution together
    python benchmarks/quality.py adaptive-pilots   # adaptive-depth FHME (C = 3) vs PKM shapes, with the convolution
    python benchmarks/quality.py table-lr-pilots   # gate + convolution: the table lr above the optim grid's edge
    python benchmarks/quality.py shape-pilots      # gate + convolution: one head per block reading more rows
    python benchmarks/quality.py peer-conv         # PEER with the balance loss and the convolution, 1,200 steps
    python benchmarks/quality.py conv-width-pilots # the gate + convolution pair with a convolution over 8 positions
    python benchmarks/quality.py conv-width        # PKM with the gate and a convolution over 8 positions, 1,200 steps
    python benchmarks/quality.py shared-bank-pilots  # the default pair with one 65K bank shared by every layer
    python benchmarks/quality.py drop-path-pilots    # FHME with local drop-path, PKM with dropout, 600 steps
    python benchmarks/quality.py sigmoid-gate-pilots # the default pair with sigmoid gates instead of a softmax
    python benchmarks/quality.py block-conv-pilots   # the default FHME with a convolution on each block's query
    python benchmarks/quality.py block-conv          # ... at the reported length, FLOPs restored (top-22)
    python benchmarks/quality.py experts-long-pilots # route-once 65K and 262K at 2,400 steps, seed 1
    python benchmarks/quality.py column-heads-pilots # 1 head on the deep path, 4 on the shallow one (same FLOPs)
    python benchmarks/quality.py column-heads        # the same at 1,200 steps, seeds 2 and 3
    python benchmarks/quality.py shallow-heads       # the same split in the 1-layer model, seed 2
    python benchmarks/quality.py column-heads-seed4  # seed 4 of 1,4 FHME and PKM, standard library
    python benchmarks/quality.py routed-layers-pilots # the default FHME in 3 or 2 of 4 layers, dense FFNs elsewhere
    python benchmarks/quality.py key-parts           # the experts series with three-part product keys
    python benchmarks/quality.py key-parts-pkm       # PKM with the same three-part keys at 262K, seeds 2, 3
    python benchmarks/quality.py key-parts-heads-pilots # FHME and PKM at 262K: 1 or 3 heads, 400 steps
    python benchmarks/quality.py default-length      # the block-conv pair at the default's 2,400 steps, seeds 2, 3
    python benchmarks/quality.py small-stdlib        # the same on a 1 MB cut of the second corpus
    python benchmarks/quality.py kjv                 # the same on the King James Bible (4.3 MB of prose)
    python benchmarks/quality.py small-corpus-seed4  # seed 4 of the pair on Tiny Shakespeare and the 1 MB cut
    python benchmarks/quality.py read-once-seed4     # seed 4 of the pair on the standard library and the Bible
    python benchmarks/quality.py width-256           # the block-conv pair at width 256, both corpora, seeds 2, 3
    python benchmarks/quality.py width-256-lr-pilots # the same pair at dense lr 3e-3 down to 2.5e-4, 600 steps, seed 1
    python benchmarks/quality.py width-256-tuned     # the width-256 pair at the lr both chose (5e-4), seeds 2, 3
    python benchmarks/quality.py lr-pilots           # the default pair (width 128) at lr 3e-3, 1e-3, 5e-4, seed 1
    python benchmarks/quality.py value-dropout-pilots  # PKM's value dropout offered to both, seed 1
    python benchmarks/quality.py dropout             # the pair with the transformer's dropout 0.1, seeds 2, 3
    python benchmarks/quality.py balance-65k-stdlib-pilots # FHME at 65K with balancing, second corpus, seed 1
    python benchmarks/quality.py balance-65k-stdlib  # the light balance loss against none, seed 2
    python benchmarks/quality.py balance-65k-layers  # a balance weight per layer, first layer stronger, seed 1
    python benchmarks/quality.py balance-65k-long    # no measure against balance_loss 0.01 at 2,400 steps, seed 1
    python benchmarks/quality.py deep-query-pilots   # the deep path's second read queries with what the first found
    python benchmarks/quality.py balance-65k-fade    # a balance loss that fades out by step 400 or 1,200
    python benchmarks/quality.py fade-16k            # FHME and PKM at 16K with and without it, seed 2
    python benchmarks/quality.py fade-pilots         # ... on the bundled corpus, 600 steps, seed 1
    python benchmarks/quality.py fade                # FHME with it against PKM, seeds 2, 3, both corpora
    python benchmarks/quality.py fade-base           # FHME without it at those seeds, by the same code
    python benchmarks/quality.py fractal-budget      # C = 1, 2, 3 at a budget that fits C = 3, seeds 2, 3
    python benchmarks/quality.py bf16-tables         # the default FHME, float32 and bfloat16 tables, two roundings
    python benchmarks/quality.py neuron-fractal-pilots # C = 2 against C = 1 (PEER) with neuron blocks, 600 steps
    python benchmarks/quality.py fractal-budget-long-pilot # fractal-budget's C = 2 and PKM at 2,400 steps, seeds 2, 3

Results land in runs/quality/<phase>/<name>/results.jsonl; a finished run (its table.md written,
after every row) is never rerun, an unfinished one (crashed, killed) is cleared and rerun. The
command exits non-zero when any run failed.
`python benchmarks/quality_tables.py` turns them into the tables of docs/results.md.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from corpus_subset import SHAKESPEARE_TRAIN_BYTES, write_subset

ROUTED = ("fhme", "pkm", "peer", "memplus")
# The FHME reference of every comparison: value blocks, C = 2, 2 heads; other models are matched
# to its FFN FLOPs through their own width knob (heads for routed models, hidden width otherwise).
# Row-wise Adagrad at 0.05 was the table optimizer when these studies ran (lazy Adam is the default
# now, chosen by the optim phases); the optim phases set theirs after it.
# The output gate, the query convolution and block convolutions (defaults since the gate-conv and
# block-conv phases) are off unless a phase turns them on, as they were when the earlier phases ran.
REFERENCE = ["--set", "block=value", "--set", "expert_optim=rowwise_adagrad", "--set", "expert_lr=0.05",
             "--set", "output_gate=false", "--set", "ffn_conv=0", "--set", "block_conv=0"]
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


def _data(corpus: str, stdlib: str) -> list[str]:
    """The --data flag of a run on corpus ("shakespeare": the bundled default, or "stdlib")."""
    return ["--data", stdlib] if corpus == "stdlib" else []


def pilot_jobs() -> list[tuple[str, list[str]]]:
    return [(name, [*args, "--max-steps", "300", "--seeds", "1"]) for name, args in PILOTS]


def _pilot(model: str, *extra: str) -> list[str]:
    """A 600-step pilot at seed 1 of the reference shape (300 steps misranked FHME and PKM)."""
    return ["--models", model, *TUNED[model], *extra, *REFERENCE, *SHAPE, "--max-steps", "600", "--seeds", "1"]


def _reported(model: str, seed: str, *extra: str) -> list[str]:
    """A reported run: the model at its tuned settings, 1,200 steps."""
    return ["--models", model, *REFERENCE, *SHAPE, *TUNED[model], *extra, "--max-steps", "1200",
            "--seeds", seed]


def untie_pilot_jobs() -> list[tuple[str, list[str]]]:
    """A trained tied FHME re-reads ~93% of B_1's rows in B_1's second application: does giving
    every application its own router (one bank) buy quality? 600 steps, as 300 misranked FHME
    and PKM against their 1,200-step order."""
    return [("fhme_untied", _pilot("fhme", "--set", "tie_blocks=false")),
            ("fhme_tied", _pilot("fhme")),
            ("pkm", _pilot("pkm"))]


def usage_pilot_jobs() -> list[tuple[str, list[str]]]:
    """FHME uses 83-88% of its experts (KL 1.2) where PKM uses all (KL 0.5-0.6), and falls behind
    PKM between 300 and 1,200 steps: does the balance loss close the gap? Against untie-pilots'
    fhme_tied and pkm (same length and seed)."""
    return [("fhme_balance0.01", _pilot("fhme", "--set", "balance_loss=0.01")),
            # Does the loss cost quality by bending the hidden states the whole model shares?
            ("fhme_balance0.01_router_only", _pilot("fhme", "--set", "balance_loss=0.01",
                                                    "--set", "balance_router_only=true"))]


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


# Chosen on the bundled corpus from the search (docs/results.md, "How the settings were chosen"); run
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
        data = _data(corpus, stdlib)
        jobs.append((f"{corpus}_{model}_s{seed}", _reported(model, seed, *data)))
    return jobs


# Expert-table optimizers on the default FHME: four table learning rates for each Adam variant
# (0.03 added when 0.01 was still the best of the first three); row-wise Adagrad's 0.05 was
# chosen by the search above (against 0.15) and is run once as the reference of the same length
# and seed.
OPTIM_TRIALS = {"rowwise_adagrad": ("0.05",), "lazy_adam": ("0.001", "0.003", "0.01", "0.03"),
                "dense_adamw": ("0.001", "0.003", "0.01", "0.03")}
# Best pilot lr per optimizer (docs/results.md, "Expert-table optimizers").
OPTIM_TUNED = {"rowwise_adagrad": "0.05", "lazy_adam": "0.03", "dense_adamw": "0.03"}


def _default_fhme(optim: str, lr: str, model: str = "fhme") -> list[str]:
    """The default FHME's command with the given table optimizer; with another model, that model
    matched to it."""
    return ["--models", model, *REFERENCE, *SHAPE, *TUNED[model], "--set", f"expert_optim={optim}",
            "--set", f"expert_lr={lr}"]


def _default_pilot(model: str, *extra: str) -> list[str]:
    """A 600-step pilot at seed 1 of the default FHME (the gate; ``extra`` adds the convolution or
    its variant), or of ``model`` matched to it."""
    return [*_default_fhme("lazy_adam", OPTIM_TUNED["lazy_adam"], model), *GATED_FHME, *extra,
            "--max-steps", "600", "--seeds", "1"]


def optim_pilot_jobs() -> list[tuple[str, list[str]]]:
    return [(f"{optim}_elr{lr}", [*_default_fhme(optim, lr), "--max-steps", "300", "--seeds", "1"])
            for optim, lrs in OPTIM_TRIALS.items() for lr in lrs]


def optim_jobs() -> list[tuple[str, list[str]]]:
    """Row-wise Adagrad at 16K experts is the final comparison's FHME (the same run): not repeated."""
    jobs = []
    for experts, seed, optim in itertools.product(("16384", "65536"), ("2", "3"), OPTIM_TUNED):
        if experts == "16384" and optim == "rowwise_adagrad":
            continue
        jobs.append((f"n{experts}_{optim}_s{seed}",
                     [*_default_fhme(optim, OPTIM_TUNED[optim]), "--set", f"num_experts={experts}",
                      "--max-steps", "1200", "--seeds", seed]))
    return jobs


def balance_65k_jobs() -> list[tuple[str, list[str]]]:
    """At 65,536 experts, the default FHME (lazy-Adam tables) with a light balance loss (0.01 cost
    0.04 bpb at 16K): every block >= 90% used at KL <= 0.7, at no worse bpb? Against the optim
    phase's n65536_lazy_adam_s2 (the same command without it). Then selection-only biases
    (``balance_rate``), which change which experts are chosen but no gradient: sub-key scores of a
    trained model have a standard deviation of 0.9-1.0 (the optim phase's 65K run) and its top-40
    span about 1.1, so rates of 1e-4 and 3e-4 move a mean bias by 0.12 and 0.36 over the run."""
    def run(name: str, *measure: str) -> tuple[str, list[str]]:
        return (f"n65536_lazy_adam_{name}_s2",
                [*_default_fhme("lazy_adam", OPTIM_TUNED["lazy_adam"]), "--set", "num_experts=65536", *measure,
                 "--max-steps", "1200", "--seeds", "2"])
    return [run("balance0.003", "--set", "balance_loss=0.003"),
            run("rate0.0001", "--set", "balance_rate=0.0001"), run("rate0.0003", "--set", "balance_rate=0.0003")]


def final_lazy_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The comparison again with lazy-Adam tables (lr 0.03), which beat row-wise Adagrad for FHME
    at 1,200 steps: the table optimizer is offered to every routed model. First the bundled
    corpus's two best models (FHME's runs are the optim phase's n16384_lazy_adam_s{2,3}, the same
    command), then every other model on both corpora (dense has no tables: its bundled runs are
    the final phase's), PEER also with the balance loss at 0.01; seeds 2 and 3 of a model run
    side by side, most decisive first."""
    lazy = ["--set", "expert_optim=lazy_adam", "--set", f"expert_lr={OPTIM_TUNED['lazy_adam']}"]
    jobs = [(f"shakespeare_{model}_s{seed}", _reported(model, seed, *lazy))
            for seed, model in itertools.product(("2", "3"), ("fhme", "pkm"))]
    for (corpus, model), seed in itertools.product(LAZY_REST, ("2", "3")):
        data = _data(corpus, stdlib)
        jobs.append((f"{corpus}_{model}_s{seed}",
                     _reported(model.split("_")[0], seed, *SHALLOW_MODELS.get(model, []), *lazy, *data)))
    return jobs


# Experts at equal FFN FLOPs: scoring sub-keys costs 2 * sqrt(N) * key_dim per head, so the key
# width shrinks as N grows; top-k (rows read per token) stays at 40. FFN FLOPs/token within 4% of
# the default 16K model's: 1.013, 1.000, 0.974, 0.974 (`compare.ffn_flops`).
EXPERTS_KEY_DIM = {"4096": "22", "16384": "16", "65536": "10", "262144": "6"}
# The other knob: FLOPs held by the rows read, at the widest key the budget allows: 4K at key
# width 16 with top-46 (1.000), 65K at 16 with top-27 (0.995), 262K at 12 with top-17 (0.998).
EXPERTS_BY_TOPK = {"65536": ("16", "27"), "262144": ("12", "17"), "4096": ("16", "46")}
# 262K at the full key width 16: the scoring of 2 x 512 sub-keys leaves room for one head per
# block, reading 60 rows (0.984 of 16K's FLOPs): is the rise at 262K the narrow key's? 65K with
# one head of 80 rows (0.978) tells what one head instead of two costs; 16K with one head of 90
# (0.982) completes that series (4K cannot: one head reads at most sqrt(4096) = 64 rows).
EXPERTS_ONE_HEAD = {"262144": ("16", "60"), "65536": ("16", "80"), "16384": ("16", "90")}


def _experts_run(experts: str, key_dim: str, seed: str, stdlib: str, *extra: str,
                 model: str = "fhme", steps: str = "1200") -> list[str]:
    return [*_default_fhme("lazy_adam", OPTIM_TUNED["lazy_adam"], model), "--set", f"num_experts={experts}",
            "--set", f"key_dim={key_dim}", *extra, "--data", stdlib, "--max-steps", steps, "--seeds", seed]


def _one_head_name(experts: str) -> str:
    key_dim, topk = EXPERTS_ONE_HEAD[experts]
    return f"n{experts}_h1q{key_dim}k{topk}"


def _one_head_run(experts: str, seed: str, stdlib: str, *extra: str, model: str = "fhme") -> list[str]:
    """A run of the one-head series: one head per block at key width 16, top-k for equal FLOPs."""
    key_dim, topk = EXPERTS_ONE_HEAD[experts]
    return _experts_run(experts, key_dim, seed, stdlib, "--set", "expert_heads=1", "--set", f"topk={topk}", *extra,
                        model=model)


def experts_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The default FHME (lazy-Adam tables) on the second corpus at four expert counts, seed 2: key
    width as the FLOP knob, then top-k; seed 3 for the top-k series (it is the one that falls), 262K
    last since it is the slowest; then the one-head series (262K and 65K, 262K with a balance loss,
    16K, seed 3)."""
    by_key_dim = [(f"n{experts}_s2", _experts_run(experts, key_dim, "2", stdlib))
                  for experts, key_dim in EXPERTS_KEY_DIM.items()]

    def by_topk(seed: str) -> list[tuple[str, list[str]]]:
        return [(f"n{experts}_q{key_dim}k{topk}_s{seed}",
                 _experts_run(experts, key_dim, seed, stdlib, "--set", f"topk={topk}"))
                for experts, (key_dim, topk) in EXPERTS_BY_TOPK.items()]
    seed3 = [("n16384_s3", _experts_run("16384", EXPERTS_KEY_DIM["16384"], "3", stdlib))]
    seed3 += sorted(by_topk("3"), key=lambda job: job[0].startswith("n262144"))
    one_head = [(f"{_one_head_name('262144')}_s2", _one_head_run("262144", "2", stdlib)),
                (f"{_one_head_name('65536')}_s2", _one_head_run("65536", "2", stdlib)),
                # 262K with one head routes to 29% of its experts: does a light balance loss (0.003
                # spread 65K's choices to 84%) make its table count?
                (f"{_one_head_name('262144')}_balance0.003_s2",
                 _one_head_run("262144", "2", stdlib, "--set", "balance_loss=0.003")),
                (f"{_one_head_name('16384')}_s2", _one_head_run("16384", "2", stdlib)),
                # Seed 3 of the series (65K's is the one-head phase's).
                (f"{_one_head_name('16384')}_s3", _one_head_run("16384", "3", stdlib)),
                (f"{_one_head_name('262144')}_s3", _one_head_run("262144", "3", stdlib))]
    return by_key_dim + by_topk("2") + seed3 + one_head


def one_head_pilot_jobs() -> list[tuple[str, list[str]]]:
    """One head per block reading 80 rows was the best FHME of the experts study (65K experts,
    0.025 below two heads): offered to the routed models at 65K on the bundled corpus, each
    matched to that FHME's FFN FLOPs through its own heads and top-k (lazy-Adam tables, the
    default). 600 steps, seed 1, as the other pilots."""
    key_dim, topk = EXPERTS_ONE_HEAD["65536"]
    shape = ["--set", "num_experts=65536", "--set", "expert_heads=1", "--set", f"topk={topk}"]
    return [(f"{model}_n65536_h1k{topk}", [*_default_fhme("lazy_adam", OPTIM_TUNED["lazy_adam"], model), *shape,
                                           "--max-steps", "600", "--seeds", "1"]) for model in ROUTED]


# Route once: each column chooses its experts once per token and the deep path's applications
# re-weight them, so FHME pays C sub-key scorings per layer instead of 2**C - 1; the FLOPs saved
# buy rows. Top-k for the one-head 65K FLOPs (117,760 per layer): C = 2 reads 91 rows per block
# (1.005), C = 3 reads 32 (1.007).
ROUTE_ONCE_TOPK = {"2": "91", "3": "32"}


def route_once_pilot_jobs() -> list[tuple[str, list[str]]]:
    """FHME with route_once at the one-head pilots' shape and FLOPs (65K experts, one head per
    block, bundled corpus, 600 steps, seed 1), against their FHME (2.3157) and PKM (2.3045)."""
    return [(f"fhme_c{depth}_route_once_n65536_h1k{topk}",
             [*_default_fhme("lazy_adam", OPTIM_TUNED["lazy_adam"]), "--set", "num_experts=65536",
              "--set", "expert_heads=1", "--set", f"topk={topk}", "--set", "route_once=true",
              "--set", f"fractal_depth={depth}", "--max-steps", "600", "--seeds", "1"])
            for depth, topk in ROUTE_ONCE_TOPK.items()]


# The experts series with route_once (one head, key width 16; top-k for 262K's FFN FLOPs, 117,664
# per layer: 16K 0.996, 65K 0.995). One head reads at most sqrt(4096) = 64 rows at 4K (0.65 of the
# budget), so 4K takes two heads x top-47 (0.995).
ROUTE_ONCE_SERIES = {"262144": ("1", "76"), "65536": ("1", "90"), "16384": ("1", "97"), "4096": ("2", "47")}


def _route_once_run(experts: str, seed: str, stdlib: str, steps: str = "1200") -> tuple[str, list[str]]:
    heads, topk = ROUTE_ONCE_SERIES[experts]
    return (f"n{experts}_h{heads}q16k{topk}_route_once_s{seed}" + ("" if steps == "1200" else f"_{steps}steps"),
            _experts_run(experts, "16", seed, stdlib, "--set", f"expert_heads={heads}", "--set", f"topk={topk}",
                         "--set", "route_once=true", steps=steps))


def route_once_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """route_once where it saves most: 262K experts, one head (top-76 instead of 60 at 0.977 of
    16K's FFN FLOPs), second corpus, seed 2. At 262K FHME's three sub-key scorings per layer cost
    more than PKM's two heads; route_once makes them two. Then the experts series at those FLOPs
    (seeds 2, 3; ordered so that two workers finish together, 262K being the slowest): does the
    bpb fall from 65K to 262K once scoring no longer eats the rows?"""
    order = [("65536", "2"), ("262144", "3"), ("65536", "3"), ("16384", "2"), ("16384", "3"), ("4096", "2"),
             ("4096", "3"), ("262144", "2")]
    return [_route_once_run(experts, seed, stdlib) for experts, seed in order]


def experts_long_pilot_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """Is 262K held back by its data? Over the 1,200-step runs of the route-once series 262K trails
    65K early and closes the gap step by step (seed 2: 0.096, 0.027, 0.021, 0.005, 0.004, 0.000 bpb
    at steps 200 .. 1,200). The two at twice the tokens (2,400 steps, 4.9 MB of the 9.96 MB, each
    byte still seen at most once), seed 1: if 262K now wins, the experts limit at 65K is the length
    of the run, not product keys (16K and 4K, which 65K and 16K beat at 1,200 steps, are left out)."""
    return [_route_once_run(experts, "1", stdlib, steps="2400") for experts in ("262144", "65536")]


def one_head_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """PKM matched to the experts study's best FHME (65K, one head x top-80, second corpus), the
    same command but the model; seed 2 against the experts phase's n65536_h1q16k80_s2, then seed 3
    of both. Then PKM matched to the one-head 262K FHME (seeds 2, 3): does PKM's bpb rise from 65K to
    262K at these FLOPs too, i.e. is the limit the product-key scoring at width 128, not the fractal?
    And PKM matched to the one-head 16K FHME, which completes PKM's series."""
    jobs = [(f"{model}_{_one_head_name('65536')}_s{seed}", _one_head_run("65536", seed, stdlib, model=model))
            for seed, model in (("2", "pkm"), ("3", "fhme"), ("3", "pkm"))]
    jobs += [(f"pkm_{_one_head_name('262144')}_s{seed}", _one_head_run("262144", seed, stdlib, model="pkm"))
             for seed in ("2", "3")]
    return jobs + [(f"pkm_{_one_head_name('16384')}_s{seed}", _one_head_run("16384", seed, stdlib, model="pkm"))
                   for seed in ("2", "3")]


def shallow_pilot_jobs() -> list[tuple[str, list[str]]]:
    """Is the fractal's second, sequential read worth more where the network lacks depth? In the
    4-layer model one read of 6 heads (PKM) beats FHME's three reads of 2 heads joined; the same
    pair (default FHME, PKM matched to its FFN FLOPs) in models of 1, 2 and 4 layers, bundled
    corpus, 600 steps, seed 1."""
    return [(f"{model}_L{layers}", [*_default_fhme("lazy_adam", OPTIM_TUNED["lazy_adam"], model),
                                    "--set", f"n_layers={layers}", "--max-steps", "600", "--seeds", "1"])
            for layers, model in itertools.product(("1", "2", "4"), ("fhme", "pkm"))]


LAZY_REST = [("stdlib", "fhme"), ("stdlib", "pkm"), ("shakespeare", "memplus"), ("stdlib", "memplus"),
             ("shakespeare", "peer_balance0.01"), ("stdlib", "peer_balance0.01"), ("stdlib", "dense"),
             ("shakespeare", "moe"), ("stdlib", "moe"), ("shakespeare", "peer"), ("stdlib", "peer")]
# In the order run. PEER with balancing: the balance loss at the weight of docs/results.md's
# routing-balance study (0.01). fhme_c3: C = 3 at the same FFN FLOPs (0.966) with 2 heads x top-8 at key width 12.
SHALLOW_MODELS = {"fhme": [], "pkm": [], "dense": [], "moe": [], "memplus": [], "peer": [],
                  "peer_balance0.01": ["--set", "balance_loss=0.01"],
                  "fhme_c3": ["--set", "fractal_depth=3", "--set", "key_dim=12", "--set", "topk=8"]}


def shallow_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The shallow pilots' order at the reported length: every model of the comparison at its
    tuned settings (lazy-Adam tables for every routed model) in a 1-layer model, FHME and PKM in a
    2-layer one; seeds 2 and 3, both corpora. FHME and PKM at 1 layer first, then the other
    baselines, FHME at C = 3, then 2 layers."""
    def job(corpus: str, model: str, layers: str, seed: str) -> tuple[str, list[str]]:
        data = _data(corpus, stdlib)
        ffn = model.split("_")[0]
        return (f"{corpus}_{model}_L{layers}_s{seed}",
                [*_default_fhme("lazy_adam", OPTIM_TUNED["lazy_adam"], ffn), *SHALLOW_MODELS[model],
                 "--set", f"n_layers={layers}", *data, "--max-steps", "1200", "--seeds", seed])
    runs = [("1", m) for m in SHALLOW_MODELS] + [("2", "fhme"), ("2", "pkm")]
    return [job(corpus, model, layers, seed) for layers, model in runs
            for corpus, seed in itertools.product(("shakespeare", "stdlib"), ("2", "3"))]


# FHME with one SiLU(W x) gate on the layer's output, at the default FHME's FFN FLOPs (1.018x:
# the gate's 2 D^2 paid with top-24 instead of top-40 per head).
GATED_FHME = ["--set", "output_gate=true", "--set", "topk=24"]


def gate_pilot_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """Memory+ leads the 1-layer comparison on both corpora, and what it adds to PKM is a SiLU
    gate on the read. Does FHME gain as much from one gate on its output? 600 steps, seed 1.
    1 layer: FHME with the gate and Memory+ (matched to the default FHME) on both corpora, plain
    FHME on the second (the shallow pilots ran it on the bundled one). 4 layers: FHME and PKM, each
    with and without the gate (PKM with it is Memory+ without the shared bank), on both corpora
    (plain ones on the bundled corpus are the shallow pilots')."""
    def job(corpus: str, model: str, layers: str) -> tuple[str, list[str]]:
        data = _data(corpus, stdlib)
        extra = GATED_FHME if model.endswith("_gated") else []
        return (f"{corpus}_{model}_L{layers}",
                [*_default_fhme("lazy_adam", OPTIM_TUNED["lazy_adam"], model.split("_")[0]), *extra,
                 "--set", f"n_layers={layers}", *data, "--max-steps", "600", "--seeds", "1"])
    one = [("shakespeare", "fhme_gated"), ("shakespeare", "memplus"), ("stdlib", "fhme_gated"),
           ("stdlib", "memplus"), ("stdlib", "fhme")]
    four = [("shakespeare", "fhme_gated"), ("shakespeare", "pkm_gated"), ("stdlib", "fhme_gated"),
            ("stdlib", "pkm_gated"), ("stdlib", "fhme"), ("stdlib", "pkm")]
    return [job(c, m, "1") for c, m in one] + [job(c, m, "4") for c, m in four]


def _pair_jobs(stdlib: str, tag: str, extra: list[str], order: list[tuple[str, str]],
               models: tuple[str, ...] = ("pkm", "fhme"), steps: str = "1200",
               paths: dict[str, str] | None = None) -> list[tuple[str, list[str]]]:
    """PKM and FHME (or ``models``) with ``extra`` at the reported length (or ``steps``): lazy-Adam
    tables, for each (corpus, seed) of ``order`` in turn; ``paths`` names corpora beyond the two."""
    def data(corpus: str) -> list[str]:
        return ["--data", paths[corpus]] if paths and corpus in paths else _data(corpus, stdlib)

    return [(f"{corpus}_{model}_{tag}_s{seed}",
             [*_default_fhme("lazy_adam", OPTIM_TUNED["lazy_adam"], model), *extra, *data(corpus),
              "--max-steps", steps, "--seeds", seed])
            for corpus, seed in order for model in models]


SEED_FIRST = [(corpus, seed) for seed in ("2", "3") for corpus in ("shakespeare", "stdlib")]
CORPUS_FIRST = [(corpus, seed) for corpus in ("shakespeare", "stdlib") for seed in ("2", "3")]


def gated_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The gate pilots' 4-layer pair at the reported length: FHME and PKM, each with the SiLU
    output gate (both gained from it in the pilots, PKM more), seeds 2 and 3, both corpora; seed
    2 of every pair first."""
    return _pair_jobs(stdlib, "gated", GATED_FHME, SEED_FIRST)


# UltraMem's query convolution: every FFN reads its input convolved over the last 4 positions.
CONV = ["--set", "ffn_conv=4"]


def conv_pilot_jobs() -> list[tuple[str, list[str]]]:
    """The query convolution (``CONV``) offered to FHME and PKM in the 4-layer model:
    600 steps, seed 1, bundled corpus, against the shallow pilots' runs without it."""
    return [(f"{model}_conv4", [*_default_fhme("lazy_adam", OPTIM_TUNED["lazy_adam"], model), *CONV,
                                "--max-steps", "600", "--seeds", "1"]) for model in ("fhme", "pkm")]


def conv_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The conv pilots' pair at the reported length: FHME and PKM with ``ffn_conv = 4``, seeds 2
    and 3, both corpora; seed 2 on the bundled corpus first (the runs without it are final-lazy's).
    Then the convolution offered to the other baselines of the comparison but PEER (Memory+, MoE,
    dense; PEER's runs cost 2-3x a PKM run), a model's two seeds side by side."""
    others = [job for model in ("memplus", "moe", "dense")
              for job in _pair_jobs(stdlib, "conv4", CONV, CORPUS_FIRST, (model,))]
    return _pair_jobs(stdlib, "conv4", CONV, SEED_FIRST) + others


def gate_conv_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """Both of the pair's additions at once: the SiLU output gate and the query convolution, as a
    user following the recommendation would combine them. Not piloted (each was on its own);
    the bundled corpus's seeds 2 and 3 first, then the second corpus's."""
    return _pair_jobs(stdlib, "gated_conv4", [*GATED_FHME, *CONV], CORPUS_FIRST)


# Adaptive depth as FHME's own knob: C = 3 with the threshold rule, its compute target and rows per
# head set so that the blocks it runs cost the C = 2 reference's FFN FLOPs (3 of 7 blocks at top-40;
# 30% of them at top-64: 1.01x each by `FHME.flops_at_depth` at the target; the depths the trained
# routers chose cost 1.02x and 1.03x). PKM gets as many trials of its own routing shape at the same
# FLOPs (3 heads x top-92: 1.001x; 8 x top-24: 0.990x).
ADAPTIVE = ["--set", "fractal_depth=3", "--set", "adaptive_depth=true", "--set", "depth_rule=threshold"]
ADAPTIVE_TRIALS = {"fhme_c3_t43": [*ADAPTIVE, "--set", "depth_target=0.43"],
                   "fhme_c3_t30_k64": [*ADAPTIVE, "--set", "depth_target=0.30", "--set", "topk=64"]}
PKM_SHAPE_TRIALS = {"pkm_h3k92": ("3", "92"), "pkm_h8k24": ("8", "24")}


def adaptive_pilot_jobs() -> list[tuple[str, list[str]]]:
    """Does a per-token depth let FHME spend the C = 2 budget better than a fixed depth, and so
    pass PKM? Adaptive C = 3 FHME (two trials) and PKM (two routing shapes), all with the query
    convolution: 600 steps, seed 1, bundled corpus, against the conv pilots' FHME and PKM."""
    base = [*_default_fhme("lazy_adam", OPTIM_TUNED["lazy_adam"]), *CONV, "--max-steps", "600", "--seeds", "1"]
    jobs = [(f"{name}_conv4", [*base, *extra]) for name, extra in ADAPTIVE_TRIALS.items()]
    for name, (heads, topk) in PKM_SHAPE_TRIALS.items():  # a sweep of one: the shape as given, unmatched
        pkm = [*_default_fhme("lazy_adam", OPTIM_TUNED["lazy_adam"], "pkm"), *CONV, "--set", f"expert_heads={heads}",
               "--sweep", f"topk={topk}", "--max-steps", "600", "--seeds", "1"]
        jobs.append((f"{name}_conv4", pkm))
    return jobs


# The optim pilots' best lazy-Adam table lr (0.03) was the edge of their grid, and bpb still fell
# towards it. The gate + convolution pair at 0.03 and at 0.1, the next step up the grid.
TABLE_LRS = ("0.03", "0.1")


def table_lr_pilot_jobs() -> list[tuple[str, list[str]]]:
    """Is the lazy-Adam table lr above 0.03 better for the default FHME (the gate and the
    convolution)? 600 steps, seed 1, bundled corpus. (It was not: 2.3109 at 0.03, 2.3106 at 0.1,
    so the knob was not offered to the other models.)"""
    return [(f"fhme_gated_conv4_elr{lr}",
             [*_default_fhme("lazy_adam", lr), *GATED_FHME, *CONV, "--max-steps", "600", "--seeds", "1"])
            for lr in TABLE_LRS]


def peer_conv_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The convolution offered to the last baseline of the comparison: PEER with the balance loss
    (its reported variant at 4 layers), seeds 2 and 3, both corpora, seed 2 of both first."""
    return _pair_jobs(stdlib, "balance0.01_conv4", ["--set", "balance_loss=0.01", *CONV], SEED_FIRST, ("peer",))


def conv_width_pilot_jobs() -> list[tuple[str, list[str]]]:
    """The convolution helped FHME more than PKM at 1,200 steps: does a query that sees 8 positions
    instead of 4 widen that? FHME and PKM with the gate, ``ffn_conv`` 8 (and PKM at 4, FHME's run at
    4 being table-lr-pilots' lr 0.03 one), 600 steps, seed 1, bundled corpus."""
    def job(model: str, width: str) -> tuple[str, list[str]]:
        return f"{model}_gated_conv{width}", _default_pilot(model, "--set", f"ffn_conv={width}")
    return [job("fhme", "8"), job("pkm", "8"), job("pkm", "4")]


def conv_width_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The pilot's one gain, PKM with the gate and a convolution over 8 positions, at the reported
    length on the bundled corpus, seeds 2 and 3 (against gate-conv's PKM at 4)."""
    return _pair_jobs(stdlib, "gated_conv8", [*GATED_FHME, "--set", "ffn_conv=8"],
                      [("shakespeare", "2"), ("shakespeare", "3")], ("pkm",))


def shape_pilot_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """PKM read better with fewer, longer reads (3 x top-92 against 6 x top-40), and FHME with one
    head per block in the experts study: the default FHME (gate and convolution, 2 heads x top-24)
    against one head x top-67 per block (1.0002x its FFN FLOPs), 600 steps, seed 1; on the
    bundled corpus against table-lr-pilots' run at lr 0.03, on the second corpus both."""
    def job(corpus: str, heads: str, topk: str) -> tuple[str, list[str]]:
        return (f"{corpus}_fhme_gated_conv4_h{heads}k{topk}",
                _default_pilot("fhme", *CONV, "--set", f"expert_heads={heads}", "--set", f"topk={topk}",
                               *_data(corpus, stdlib)))
    return [job("shakespeare", "1", "67"), job("stdlib", "1", "67"), job("stdlib", "2", "24")]


# Memory Layers at Scale's shared value pool: every layer reads one bank of 4 x 16,384 = 65,536
# experts (the same parameters as 16,384 per layer). Scoring 2 * 256 sub-keys instead of 2 * 128
# is paid for with key width 12 and top-21 for FHME (1.006x the default's FFN FLOPs); PKM is
# matched to it as always (5 heads x top-31, 1.007x).
SHARED = ["--set", "share_bank=true", "--set", "num_experts=65536", "--set", "key_dim=12", "--set", "topk=21"]


def shared_bank_pilot_jobs() -> list[tuple[str, list[str]]]:
    """Does one bank shared by every layer (more rows for each layer to choose from at the same
    parameters) help FHME, whose 12 routers per model would all read it, more than PKM? The
    default FHME and PKM (the gate and the convolution), 600 steps, seed 1, bundled corpus,
    against table-lr-pilots' FHME at lr 0.03 and conv-width-pilots' PKM at 4."""
    return [(f"{model}_gated_conv4_shared65k", _default_pilot(model, *CONV, *SHARED)) for model in ("fhme", "pkm")]


def drop_path_pilot_jobs() -> list[tuple[str, list[str]]]:
    """The bundled corpus is seen 2.5 times in 1,200 steps, and the default FHME's training loss
    runs 0.16 nats below its validation loss by step 600: is regularisation worth a trial?
    FractalNet's own, local drop-path at its rate 0.15 (each join drops one branch per token with
    that probability), for FHME; one trial for PKM too, which has no paths to drop: dropout 0.1 on
    the residual branches. 600 steps, seed 1, bundled corpus, against table-lr-pilots' FHME at
    lr 0.03 and conv-width-pilots' PKM at 4."""
    def job(model: str, name: str, *extra: str) -> tuple[str, list[str]]:
        return f"{model}_gated_conv4_{name}", _default_pilot(model, *CONV, *extra)
    return [job("fhme", "dpl0.15", "--set", "drop_path_local=0.15"),
            job("pkm", "dropout0.1", "--set", "dropout=0.1")]


def sigmoid_gate_pilot_jobs() -> list[tuple[str, list[str]]]:
    """Non-competing gates (an independent sigmoid of each retrieved score instead of a softmax
    over the k), a routing knob offered to FHME and PKM alike: 600 steps, seed 1, bundled corpus,
    against table-lr-pilots' FHME at lr 0.03 and conv-width-pilots' PKM at 4."""
    return [(f"{model}_gated_conv4_sigmoid", _default_pilot(model, *CONV, "--set", "gate=sigmoid"))
            for model in ("fhme", "pkm")]


# The pilots' FHME with block convolutions (top-24 from GATED_FHME, 2.5% more FFN FLOPs than
# without them): the reference of every pilot on the block-conv default.
BCONV_PILOT = [*CONV, "--set", "block_conv=4"]


def block_conv_pilot_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """A sequential second read that only re-reads what the first read saw buys nothing over
    parallel heads (untie-pilots, route-once-pilots). With its own causal convolution on each
    block's query input, the deep path's second read sees what the first retrieved at the last
    positions too: something one wide read cannot do. The default FHME with ``block_conv = 4``
    (2.5% more FFN FLOPs), 600 steps, seed 1, both corpora, against table-lr-pilots' and
    shape-pilots' runs of the default. PKM is offered the knob too (one block: a second convolution
    after the first). Last, untied blocks (``tie_blocks = false``): each application its own router
    and convolution, so the deep path's second read can learn a convolution of its own."""
    fhme = [(f"{corpus}_fhme_gated_conv4_bconv4", _default_pilot("fhme", *BCONV_PILOT, *_data(corpus, stdlib)))
            for corpus in ("shakespeare", "stdlib")]
    return [*fhme, ("shakespeare_pkm_gated_conv4_bconv4", _default_pilot("pkm", *BCONV_PILOT)),
            ("shakespeare_fhme_gated_conv4_bconv4_untied",
             _default_pilot("fhme", *BCONV_PILOT, "--set", "tie_blocks=false"))]


# Block convolutions at the FFN FLOPs of the default: 4 x 3 convolutions of 2 x 128 x 4 FLOPs per
# token cost 2.5% of the FFN, paid with top-22 instead of 24 (0.996x the default's FFN FLOPs).
BLOCK_CONV = ["--set", "block_conv=4", "--set", "topk=22"]
# The default FHME since the block-conv phase (gate, query convolution, block convolutions), and its
# heads moved to the shallow column at the same FLOPs.
BCONV_FHME = [*GATED_FHME, *CONV, *BLOCK_CONV]
HEADS_1_4 = ["--set", "column_heads=1,4"]


def block_conv_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The block-conv pilots at the reported length: FHME with FLOPs restored (``BLOCK_CONV``), then
    PKM with its block convolution (it gained in its pilot too) matched to that FHME; seeds 2 and 3,
    both corpora, against gate-conv's runs of the pair without them."""
    return [*_pair_jobs(stdlib, "gated_conv4_bconv4", BCONV_FHME, CORPUS_FIRST, ("fhme",)),
            *_pair_jobs(stdlib, "gated_conv4_bconv4", BCONV_FHME, CORPUS_FIRST, ("pkm",))]


def default_length_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The block-conv pair at the default recipe's length, 2,400 steps (twice the reported length,
    the default since the wall-clock race): does the verdict between the fractal and one wide read
    move when both train longer? Seeds 2 and 3, both corpora; FHME and PKM of each pair run side
    by side (worker 0 takes every FHME job, worker 1 every PKM job)."""
    return _pair_jobs(stdlib, "gated_conv4_bconv4_2400", BCONV_FHME, SEED_FIRST, ("fhme", "pkm"), steps="2400")


def small_stdlib_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """default-length's pair on a 1 MB cut of the second corpus (``corpus_subset.py``: Tiny
    Shakespeare's training size, 16 pieces spread over the standard library's training text; the
    same validation files). FHME won on Tiny Shakespeare, read ~5 times in 2,400 steps, and PKM on
    the standard library, read once: is that the corpus's size or its kind of text? Seeds 2 and 3,
    FHME and PKM side by side."""
    return _small_corpus_pair(stdlib, [("stdlib1mb", "2"), ("stdlib1mb", "3")])


def _small_corpus_pair(stdlib: str, order: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """default-length's pair, FHME and PKM side by side, for each (corpus, seed) of order; the
    corpus ``stdlib1mb`` is the 1 MB cut of the second corpus (made here when missing)."""
    small = Path(f"{stdlib.rstrip('/')}-1mb")
    if not (small / "train.txt").exists():
        write_subset(Path(stdlib), small, SHAKESPEARE_TRAIN_BYTES, pieces=16)
    return _pair_jobs(stdlib, "gated_conv4_bconv4_2400", BCONV_FHME, order, ("fhme", "pkm"), steps="2400",
                      paths={"stdlib1mb": str(small)})


def small_corpus_seed4_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """A third seed where FHME won at the default length, on 1 MB read about five times (Tiny
    Shakespeare, by 0.009; the 1 MB cut of the standard library, by 0.012): gaps near what rounding
    alone moved same-seed reruns (docs/results.md). FHME and PKM side by side."""
    return _small_corpus_pair(stdlib, [("shakespeare", "4"), ("stdlib1mb", "4")])


# The default FHME (and PKM matched to it) at twice the width.
WIDTH_256 = [*BCONV_FHME, "--set", "dim=256"]


def width_256_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """block-conv's pair at twice the width (dim 256; PKM matched to FHME's FFN FLOPs at that width
    by the comparison, as at 128): does the gap between the fractal and one wide read move with
    width? The second corpus first (PKM leads there by 0.011 at width 128), then the bundled one
    (level at 128); seeds 2 and 3, FHME and PKM side by side."""
    order = [("stdlib", "2"), ("stdlib", "3"), ("shakespeare", "2"), ("shakespeare", "3")]
    return _pair_jobs(stdlib, "gated_conv4_bconv4_d256", WIDTH_256, order, ("fhme", "pkm"))


def _lr_pilots(stdlib: str, tag: str, extra: list[str], rates: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """FHME and PKM with ``extra`` at each dense learning rate of ``rates``: a search of the same
    size for both, 600 steps, seed 1, bundled corpus."""
    return [job for lr in rates
            for job in _pair_jobs(stdlib, f"{tag}_lr{lr}", [*extra, "--set", f"lr={lr}"],
                                  [("shakespeare", "1")], ("fhme", "pkm"), steps="600")]


def width_256_lr_pilot_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """At width 256 FHME gained nothing on the bundled corpus where PKM gained 0.023: is it the
    dense learning rate, set at width 128? The pair at the default 3e-3, then 1e-3, 5e-4 and 2.5e-4
    (each added while both still fell)."""
    return _lr_pilots(stdlib, "gated_conv4_bconv4_d256", WIDTH_256, ("0.003", "0.001", "0.0005", "0.00025"))


def lr_pilot_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """At width 256 the rate that both chose (5e-4) lowered FHME by 0.034 and left PKM where it was
    on the bundled corpus: the default pair at width 128 at the rates that search ran down to it."""
    return _lr_pilots(stdlib, "gated_conv4_bconv4", BCONV_FHME, ("0.003", "0.001", "0.0005"))


def width_256_tuned_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The width-256 pair at the dense learning rate its pilots chose for both (5e-4, the best of
    3e-3, 1e-3, 5e-4 and 2.5e-4 for FHME and for PKM), 1,200 steps, seeds 2 and 3, the bundled
    corpus and the second, unchanged; seed 2 of both first."""
    return _pair_jobs(stdlib, "gated_conv4_bconv4_d256_lr0.0005", [*WIDTH_256, "--set", "lr=0.0005"],
                      SEED_FIRST, ("fhme", "pkm"))


# The King James Bible from Debian's bible-kjv package (-l80 fixes the line width), as in
# finetune.sh; validation is its last 10%, as for Tiny Shakespeare.
KJV = Path("data/kjv.txt")
KJV_SHA256 = "ba7c84a755b5ecc052222311dc2d785cd6cf9c0875ca26fc31de1138501496d5"


def _kjv_corpus() -> Path:
    if not KJV.exists():
        try:
            text = subprocess.run(["bible", "-l80", "Genesis1:1-Revelation22:21"], check=True,
                                  capture_output=True).stdout
        except FileNotFoundError:
            sys.exit("the kjv phase needs Debian's bible-kjv package: apt-get install -y bible-kjv")
        if hashlib.sha256(text).hexdigest() != KJV_SHA256:
            sys.exit(f"bible -l80 gave a text other than the one measured (sha256 {KJV_SHA256})")
        KJV.parent.mkdir(parents=True, exist_ok=True)
        KJV.write_bytes(text)
    return KJV


def kjv_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """default-length's pair on English prose of 4.3 MB, read about 1.3 times in 2,400 steps:
    with small-stdlib, the other two corners of corpus size x kind of text (needs Debian's
    bible-kjv: ``apt-get install -y bible-kjv``). Seeds 2 and 3, FHME and PKM side by side."""
    return _pair_jobs(stdlib, "gated_conv4_bconv4_2400", BCONV_FHME, [("kjv", "2"), ("kjv", "3")],
                      ("fhme", "pkm"), steps="2400", paths={"kjv": str(_kjv_corpus())})


def read_once_seed4_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The third seed for the other two corners, where PKM won at the default length on text read
    about once (the standard library, by 0.010; the King James Bible, by 0.009 with PKM's seed 3
    only 0.0003 ahead of FHME's seed 2). FHME and PKM side by side."""
    return _pair_jobs(stdlib, "gated_conv4_bconv4_2400", BCONV_FHME, [("stdlib", "4"), ("kjv", "4")],
                      ("fhme", "pkm"), steps="2400", paths={"kjv": str(_kjv_corpus())})


# PKM's value dropout (Lample et al. 2019): each retrieved slot's gate dropped in training.
VALUE_DROPOUT = ["--set", "value_dropout=0.2"]


def value_dropout_pilot_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """Where the text repeats, PKM fits its training text better than FHME and generalises worse
    (small-stdlib, kjv): does a regulariser aimed at the memory take FHME's small-corpus wins
    away, or help both? default-length's pair with and without ``value_dropout = 0.2``, seed 1,
    2,400 steps on the bundled corpus (read ~5 times), FHME and PKM side by side."""
    return [*_pair_jobs(stdlib, "gated_conv4_bconv4_2400_vd0.2", [*BCONV_FHME, *VALUE_DROPOUT],
                        [("shakespeare", "1")], ("fhme", "pkm"), steps="2400"),
            *_pair_jobs(stdlib, "gated_conv4_bconv4_2400", BCONV_FHME, [("shakespeare", "1")],
                        ("fhme", "pkm"), steps="2400")]


# The transformer's own dropout (attention weights, residual branches, embeddings), as nanoGPT's
# small-corpus recipes use it.
DROPOUT = ["--set", "dropout=0.1"]


def dropout_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The model-wide regulariser instead of the memory's own: default-length's pair with
    ``dropout = 0.1``, seeds 2 and 3 (bundled corpus, 2,400 steps), against its runs without it."""
    return _pair_jobs(stdlib, "gated_conv4_bconv4_2400_drop0.1", [*BCONV_FHME, *DROPOUT],
                      [("shakespeare", "2"), ("shakespeare", "3")], ("fhme", "pkm"), steps="2400")


def column_heads_pilot_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """FHME at C = 2 spends 4 of its 6 head reads on the deep path (B_1 runs twice); PKM, all 6
    on one wide read, wins. With 1 head in column 1 and 4 in column 2 (``column_heads = "1,4"``,
    the same FFN FLOPs) the layer is a wide read plus a light two-step one: does that beat both?
    The block-conv pilots' FHME so, both corpora, and PKM's pilot on the second corpus, which
    block-conv-pilots did not run."""
    return [("shakespeare_fhme_gated_conv4_bconv4_h14", _default_pilot("fhme", *BCONV_PILOT, *HEADS_1_4)),
            ("stdlib_fhme_gated_conv4_bconv4_h14",
             _default_pilot("fhme", *BCONV_PILOT, *HEADS_1_4, *_data("stdlib", stdlib))),
            ("stdlib_pkm_gated_conv4_bconv4", _default_pilot("pkm", *BCONV_PILOT, *_data("stdlib", stdlib)))]


def column_heads_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The default FHME (``BLOCK_CONV``) with ``column_heads = "1,4"`` at the reported length,
    seeds 2 and 3, both corpora: the same FFN FLOPs, so block-conv's PKM runs are its match."""
    return _pair_jobs(stdlib, "gated_conv4_bconv4_h14", [*BCONV_FHME, *HEADS_1_4], SEED_FIRST, ("fhme",))


def column_heads_seed4_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """A third seed for the standard-library verdict, 1,4 FHME against PKM: the gap (0.006) is below
    what rounding alone moved same-seed reruns (0.007-0.025, docs/results.md)."""
    return [*_pair_jobs(stdlib, "gated_conv4_bconv4_h14", [*BCONV_FHME, *HEADS_1_4], [("stdlib", "4")], ("fhme",)),
            *_pair_jobs(stdlib, "gated_conv4_bconv4", BCONV_FHME, [("stdlib", "4")], ("pkm",))]


def shallow_heads_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """Where the fractal beat PKM (1 layer, bundled corpus), does the win come from composing
    reads? The shallow phase's 1-layer FHME with ``column_heads = "1,4"``, seed 2, both corpora,
    against that phase's runs (fractal_paths on both tells how much each composes)."""
    shallow = dict(shallow_jobs(stdlib))
    return [(f"{corpus}_fhme_L1_s2_h14", [*shallow[f"{corpus}_fhme_L1_s2"], *HEADS_1_4])
            for corpus in ("shakespeare", "stdlib")]


# A dense SwiGLU of hidden width 160 costs what one default FHME layer does (123,904 against
# 123,096 FFN FLOPs per token, the query convolution included).
DENSE_AT_FHME = ["--set", "ffn_hidden=160"]


def routed_layers_pilot_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """Memory layers pay most away from the first layer (PKM's placement study; Memory Layers at
    Scale put them in a few layers only), and on a CPU each FHME layer costs ~6x a dense FFN of
    equal FLOPs. The block-conv pilots' FHME with layer 0, or layers 0 and 2, dense at equal FFN
    FLOPs, 600 steps, seed 1, both corpora: how much of the quality needs every layer routed?"""
    jobs = []
    for corpus in ("shakespeare", "stdlib"):
        for layers in ("1,2,3", "1,3"):
            name = f"{corpus}_fhme_gated_conv4_bconv4_rl{layers.replace(',', '')}"
            jobs.append((name, _default_pilot("fhme", *BCONV_PILOT, "--set", f"routed_layers={layers}",
                                              *DENSE_AT_FHME, *_data(corpus, stdlib))))
    return jobs


# Three-part product keys: scoring costs 2 Q sum_p n_p per head, 3 x 64 sub-keys at 262K instead of
# 2 x 512, so every N of the series reads the same rows: one head, key width 24 (8 per part, as
# the two-part series' 8 per half), top-112 at every N (FFN FLOPs 0.958 .. 1.004 of the route-once
# series' budget, 117,664 per layer: 4.8% from 4K to 262K). Deferred table gradients: at 262K the
# sparse (R, D) gradients of three block runs per layer cost 1.7x the step in page faults.
KEY_PARTS_TOPK = "112"
KEY_PARTS = ("--set", "key_parts=3", "--set", "expert_heads=1", "--set", f"topk={KEY_PARTS_TOPK}",
             "--set", "route_once=true", "--set", "deferred_table_grads=true")


def key_parts_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The experts series with three-part keys, second corpus, seed 2 (then seed 3), 1,200 steps:
    with scoring no longer growing as sqrt(N), does the bpb fall at every step 4K .. 262K? Ordered
    so that two workers finish together (262K is the slowest)."""
    order = [("262144", "2"), ("65536", "2"), ("4096", "2"), ("16384", "2"), ("262144", "3"), ("65536", "3"),
             ("4096", "3"), ("16384", "3")]
    return [(f"n{experts}_p3h1q24k{KEY_PARTS_TOPK}_route_once_s{seed}",
             _experts_run(experts, "24", seed, stdlib, *KEY_PARTS)) for experts, seed in order]


def key_parts_pkm_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """PKM offered the same three-part keys at 262K, matched to the three-part FHME's FFN FLOPs
    (seeds 2, 3): the routed baseline gets every knob that is not FHME's own."""
    return [(f"pkm_n262144_p3q24_s{seed}", _experts_run("262144", "24", seed, stdlib, *KEY_PARTS, model="pkm"))
            for seed in ("2", "3")]


def key_parts_heads_pilot_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """PKM reads 93-95% of the 262K table with three heads, the one-head FHME 52-59%: is the gap
    the spread of reads rather than the recursion? 262K experts, three-part keys, 400 steps (the
    schedule ends at 400), seed 1 unless named. Every FHME block application pays its own query
    projection, so each shape's top-k is what its heads and key width leave of the one-head FHME's
    118,144 FFN FLOPs a layer: three heads at width 12 (4 per part) top-33 (117,004); PKM with three
    heads matched as in key-parts-pkm, with one top-413 (one query and one scoring leave more rows,
    118,169); which of the three-head FHME's changes cost it: one head at width 12 top-130 (117,730)
    or three at width 24 top-18 (118,744); three heads on the shallow column only, 1,3 x top-55
    (118,152); then the one-head pair and PKM's three heads at seed 2."""
    def pilot(seed: str, *extra: str, model: str = "fhme") -> list[str]:
        return _experts_run("262144", "24", seed, stdlib, *KEY_PARTS, *extra, model=model, steps="400")

    def one_head_pair(seed: str) -> list[tuple[str, list[str]]]:
        return [(f"n262144_p3h1q24k{KEY_PARTS_TOPK}_route_once_s{seed}_400", pilot(seed)),
                (f"pkm_n262144_p3h1q24k413_s{seed}_400", pilot(seed, "--sweep", "topk=413", model="pkm"))]

    fhme_one, pkm_one = one_head_pair("1")
    return [("n262144_p3h3q12k33_route_once_s1_400",
             pilot("1", "--set", "expert_heads=3", "--set", "key_dim=12", "--set", "topk=33")),
            fhme_one,
            ("pkm_n262144_p3q24_s1_400", pilot("1", model="pkm")),
            pkm_one,
            ("n262144_p3h1q12k130_route_once_s1_400", pilot("1", "--set", "key_dim=12", "--set", "topk=130")),
            ("n262144_p3h3q24k18_route_once_s1_400", pilot("1", "--set", "expert_heads=3", "--set", "topk=18")),
            ("n262144_p3h13q24k55_route_once_s1_400", pilot("1", "--set", "column_heads=1,3", "--set", "topk=55")),
            *one_head_pair("2"),
            ("pkm_n262144_p3q24_s2_400", pilot("2", model="pkm"))]


def _steered(target: float, rate: float, start: str = "balance_loss=0.003") -> list[str]:
    """A balance weight steered toward ``target`` nats at ``rate`` a step, starting from ``start``."""
    return ["--set", start, "--set", f"balance_target_kl={target}", "--set", f"balance_steer_rate={rate}"]


# Balancing measures tried at 65,536 experts on the second corpus: run-name tag -> settings.
BALANCE_65K = {"": [], "balance0.01": ["--set", "balance_loss=0.01"], "balance0.003": ["--set", "balance_loss=0.003"],
               "rate0.0001": ["--set", "balance_rate=0.0001"],
               "layers0.03_0.005": ["--set", "layer_balance_loss=0.03,0.005,0.005,0.005"],
               "layers0.1_0.005": ["--set", "layer_balance_loss=0.1,0.005,0.005,0.005"],
               "fade0.01_400": ["--set", "balance_loss=0.01", "--set", "balance_steps=400"],
               "fade0.03_400": ["--set", "balance_loss=0.03", "--set", "balance_steps=400"],
               "fade0.01_1200": ["--set", "balance_loss=0.01", "--set", "balance_steps=1200"],
               "fade0.03_1200": ["--set", "balance_loss=0.03", "--set", "balance_steps=1200"],
               "target0.5": _steered(0.5, 0.05), "target0.6": _steered(0.6, 0.05),
               "target0.6_slow": _steered(0.6, 0.005), "target0.5_slow": _steered(0.5, 0.005),
               "target0.5_slow_layers": _steered(0.5, 0.005, "layer_balance_loss=0.01,0.002,0.002,0.002")}


def deep_query_pilot_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The deep path's second read re-reads most of what its first read saw, because both query
    with (nearly) the same token: x and x + y_1 normalise alike. With ``deep_query = "retrieved"``
    the second read queries with y_1 alone, what the first read found: a second hop, which one
    wide read cannot make. Tied (one router for both hops) and untied (each application its own
    router and convolution); the block-conv pilots' default FHME, 600 steps, seed 1, both corpora,
    and that default again with today's code (the last bits move between versions)."""
    hop, untie = ["--set", "deep_query=retrieved"], ["--set", "tie_blocks=false"]
    return [(f"{corpus}_fhme_gated_conv4_bconv4{name}",
             _default_pilot("fhme", *BCONV_PILOT, *extra, *_data(corpus, stdlib)))
            for name, extra in (("_hop", hop), ("_hop_untied", [*hop, *untie]), ("_rerun", []))
            for corpus in ("shakespeare", "stdlib")]


def repeat_rows_pilot_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """Does the deep path's second read lose by re-reading most of the first read's rows? With
    ``repeat_rows = "shifted"`` a tied block's second application reads its experts' rows moved
    by N / 2: rows of its own, the router still shared. The deep-query pilots' default (their
    rerun is the baseline, same code path), 600 steps, seed 1, both corpora."""
    return [(f"{corpus}_fhme_gated_conv4_bconv4_shifted",
             _default_pilot("fhme", *BCONV_PILOT, "--set", "repeat_rows=shifted", *_data(corpus, stdlib)))
            for corpus in ("shakespeare", "stdlib")]


def repeat_rows_one_layer_pilot_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The same in a 1-layer model, where the fractal's sequential read counted most (it beat one
    wide read on the bundled corpus in "In shallower models"): FHME with and without the shifted
    rows, and PKM matched to it; 600 steps, seed 1, both corpora."""
    one = ["--set", "n_layers=1"]
    runs = (("fhme", "", []), ("fhme", "_shifted", ["--set", "repeat_rows=shifted"]), ("pkm", "", []))
    return [(f"{corpus}_{model}_gated_conv4_bconv4_1layer{tag}",
             _default_pilot(model, *BCONV_PILOT, *one, *extra, *_data(corpus, stdlib)))
            for corpus in ("shakespeare", "stdlib") for model, tag, extra in runs]


def one_layer_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The block-conv pair (today's default FHME and PKM matched to it) in a 1-layer model at the
    reported length, seeds 2 and 3, both corpora: does the 1-layer pilot's lead for PKM hold?"""
    return _pair_jobs(stdlib, "gated_conv4_bconv4_1layer", [*BCONV_FHME, "--set", "n_layers=1"], SEED_FIRST,
                      ("fhme", "pkm"))


def _balance_65k_run(stdlib: str, seed: str, measure: str, steps: int = 1200) -> tuple[str, list[str]]:
    """The default FHME (``BCONV_FHME``) at 65,536 experts on the second corpus, 1,200 steps (or
    ``steps``), with the balancing measure ``BALANCE_65K[measure]``."""
    tag = (f"_{measure}" if measure else "") + (f"_{steps}" if steps != 1200 else "")
    return (f"stdlib_fhme_gated_conv4_bconv4_n65536{tag}_s{seed}",
            [*_default_fhme("lazy_adam", OPTIM_TUNED["lazy_adam"]), *BCONV_FHME, "--set", "num_experts=65536",
             *BALANCE_65K[measure], *_data("stdlib", stdlib), "--max-steps", str(steps), "--seeds", seed])


def balance_65k_stdlib_pilot_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """balance-65k ran on the bundled corpus, read ~2.5 times in 1,200 steps, where every measure
    that spread the choices cost bpb. On text read once (the second corpus), where FHME fits its
    training text less closely than PKM, is spreading the choices free? The default FHME at 65K,
    seed 1, without a measure and with each of ``BALANCE_65K``: the balance loss at 0.01 (the weight
    that spread every block at 16K); when that cost bpb, a lighter loss and the selection-only
    biases at the rate that led through step 600 on the bundled corpus. Usage from ``fractalmoe
    eval --usage-choices 1000000``."""
    return [_balance_65k_run(stdlib, "1", measure) for measure in ("", "balance0.01", "balance0.003", "rate0.0001")]


def balance_65k_stdlib_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The pilots' light balance loss (0.003: within 0.003 bpb of no measure at seed 1, where 0.01
    cost 0.013) at seed 2 against the same model without it, side by side."""
    return [_balance_65k_run(stdlib, "2", measure) for measure in ("", "balance0.003")]


def balance_65k_target_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """One weight over-spreads some routers to spread the one that needs it most (the first
    layer's), and a weight of its own per layer costs as much. ``balance_target_kl`` steers each
    router's weight after every step toward the least that holds its usage (the last ~1M choices)
    at 0.5 nats from uniform, starting from the light 0.003; seed 1, beside no measure rerun by the
    same code. Its steered run was made with the rule of commit f47fd22 (a step exp(0.02 (KL - target)),
    weight <= 0.1); today's rule is balance-65k-target-ratio's."""
    return [_balance_65k_run(stdlib, "1", measure) for measure in ("", "target0.5")]


def balance_65k_target_ratio_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The steered weight of balance-65k-target rose ~10x faster than it fell (a step exp(rate *
    (KL - target))) and held the reads over-spread (KL 0.37-0.47 against its 0.5 target) for most
    of the run. Steered by the ratio instead, (KL / target) ** 0.05 a step, at most 0.03, toward 0.6
    nats (the bar is 0.7 in every block); seed 1, and no measure at seed 2 beside it; then the
    steered run at seed 2."""
    return [_balance_65k_run(stdlib, "1", "target0.6"), _balance_65k_run(stdlib, "2", ""),
            _balance_65k_run(stdlib, "2", "target0.6")]


def balance_65k_target_slow_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The ratio rule paid early: at a rate of 0.05 its weights reached their bound within ~30
    steps while the reads were narrow, spread 92-96% of the table by step 200 and trailed no
    measure by 0.06-0.09 bpb there, a gap that stayed; the constant 0.003 it starts from lets the
    reads spread over the run (87% used, the first layer least) for ~0.002. Steered ten times
    slower (``balance_steer_rate = 0.005``: a weight moves at most ~10x in 300 steps), toward the
    same 0.6 nats; seeds 1 and 2 side by side, against balance-65k-target-ratio's runs without a
    measure by the same code."""
    return [_balance_65k_run(stdlib, seed, "target0.6_slow") for seed in ("1", "2")]


def balance_65k_target_slow_05_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """0.6 nats on the training choices lands near 0.7 on held-out text, 87-90% of the table used:
    the slow steering toward 0.5 instead, seeds 1 and 2."""
    return [_balance_65k_run(stdlib, seed, "target0.5_slow") for seed in ("1", "2")]


def balance_65k_target_slow_seed3_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The slow steering toward 0.6 cost 0.001 and 0.016 bpb at seeds 1 and 2, where reruns of one
    setting move by up to 0.008 with the last bits: a third seed of it and of no measure, side by
    side."""
    return [_balance_65k_run(stdlib, "3", measure) for measure in ("", "target0.6_slow")]


def balance_65k_target_slow_layers_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """Steered slowly from 0.003 everywhere, the first layer's weights were still climbing at the
    end (0.009-0.016; 89.5-90.6% used toward 0.5 nats) while the others, over-spread by that start,
    fell (KL ~0.45 against 0.5). Each starting nearer where it ended: 0.01 in the first layer, 0.002
    in the others; toward 0.5 nats, seeds 1 and 2."""
    return [_balance_65k_run(stdlib, seed, "target0.5_slow_layers") for seed in ("1", "2")]


def balance_65k_layers_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """At one weight the first layer spreads least (72-80% used at 0.003, 87-89% at 0.01, where
    every other layer passes 90%). Can a weight of its own spread it, and at what cost? Seed 1:
    the first layer at 0.03 and at 0.1, the others at 0.005 (between the weight that left some of
    their blocks at 84-89% and the one that cost 0.013 bpb)."""
    return [_balance_65k_run(stdlib, "1", measure) for measure in ("layers0.03_0.005", "layers0.1_0.005")]


def balance_65k_long_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """If spread reads cost bpb because each of the rows they spread over is updated less often,
    the price should fall as every row gets more updates. Through the 1,200-step runs the price of
    the balance loss at 0.01 showed no trend after step 600 (0.003-0.019 bpb on the periodic
    slice). At twice the steps (seed 1, no measure against 0.01), is it lower?"""
    return [_balance_65k_run(stdlib, "1", measure, 2400) for measure in ("", "balance0.01")]


def balance_65k_fade_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """Without a measure the reads start narrow (29% of the table at step 200) and widen slowly
    (47% at 1,200); with the loss at 0.01 they are spread by step 200 and the bpb is level with no
    measure until step 600, the price coming later. If the narrow reads are formed early, a loss that
    only acts early (``balance_steps = 400``: its weight fades linearly to 0 at step 400) should
    leave them spread at no price in fit. Seed 1: 0.01 and, for the first layer, 0.03. Those ran
    level with or below no measure from step 600 on, their reads narrowing a little once the loss
    was gone (81-87% of the periodic slice's table at step 800); then the same weights fading over
    the whole run, so that a lighter loss holds the reads to the end. Last, seed 2 of 0.01 fading
    by step 400, which ended below no measure at seed 1 (against balance-65k-stdlib's seed-2 run
    without a measure)."""
    return [*(_balance_65k_run(stdlib, "1", measure)
              for measure in ("fade0.01_400", "fade0.03_400", "fade0.01_1200", "fade0.03_1200")),
            _balance_65k_run(stdlib, "2", "fade0.01_400")]


def fade_16k_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """At 65K a balance loss that fades out by step 400 lowered FHME's bpb (seed 1). At the
    comparison's 16,384 experts, where FHME reads 80-89% of its table and PKM all of it, does it
    lower FHME's bpb against PKM's? Both, with and without it, on the second corpus at seed 2 with
    today's code (block-conv's settings)."""
    fade, order = BALANCE_65K["fade0.01_400"], [("stdlib", "2")]
    return [*_pair_jobs(stdlib, "gated_conv4_bconv4_fade0.01_400", [*BCONV_FHME, *fade], order, ("fhme",)),
            *_pair_jobs(stdlib, "gated_conv4_bconv4", BCONV_FHME, order, ("pkm", "fhme")),
            *_pair_jobs(stdlib, "gated_conv4_bconv4_fade0.01_400", [*BCONV_FHME, *fade], order, ("pkm",))]


def fade_pilot_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The comparison's settings are chosen on the bundled corpus: the balance loss fading out by
    step 400, offered to FHME and PKM alike, against each without it (block-conv's settings, 600
    steps, seed 1, every run by today's code). FHME and PKM of each pair side by side."""
    fade, order = BALANCE_65K["fade0.01_400"], [("shakespeare", "1")]
    return [*_pair_jobs(stdlib, "gated_conv4_bconv4_fade0.01_400", [*BCONV_FHME, *fade], order, ("fhme", "pkm"),
                        steps="600"),
            *_pair_jobs(stdlib, "gated_conv4_bconv4", BCONV_FHME, order, ("fhme", "pkm"), steps="600")]


# The reported seeds fade-16k left to run: both on the bundled corpus, the third on the second.
FADE_ORDER = [("shakespeare", "2"), ("shakespeare", "3"), ("stdlib", "3")]


def fade_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The pilots' choices at the reported length: FHME with the fading loss (it was 0.002 lower
    with it), PKM without (0.014 higher with it); seeds 2 and 3, both corpora, FHME and PKM of each
    pair side by side. The standard library's seed 2 is fade-16k's pair (the same code)."""
    fade = BALANCE_65K["fade0.01_400"]
    fhme = _pair_jobs(stdlib, "gated_conv4_bconv4_fade0.01_400", [*BCONV_FHME, *fade], FADE_ORDER, ("fhme",))
    pkm = _pair_jobs(stdlib, "gated_conv4_bconv4", BCONV_FHME, FADE_ORDER, ("pkm",))
    return [job for pair in zip(fhme, pkm) for job in pair]


def fade_base_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """FHME without the fading loss for the fade phase's other seeds, by the same code (reruns of
    block-conv's settings move by rounding alone): does the loss lower FHME over both seeds?"""
    return _pair_jobs(stdlib, "gated_conv4_bconv4", BCONV_FHME, FADE_ORDER, ("fhme",))


# A budget at which C = 3 keeps 2 heads x top-4 per block (7 block applications): 684,416 FFN FLOPs
# per token with the default's gate and convolutions, 1.39x the default's. C = 2 fits it with
# 2 x top-47 (687,384), PKM (C = 1 of the same value blocks) matched to that by the usual rule
# (9 x top-25, 687,588): all three within 0.5%.
FRACTAL_BUDGET = {"c3": ["--set", "fractal_depth=3", "--set", "topk=4"],
                  "c2": ["--set", "fractal_depth=2", "--set", "topk=47"]}


def fractal_budget_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """The fractal claim at equal FFN FLOPs and block kind: C = 1 (PKM), 2 and 3 at a budget that
    leaves C = 3 two heads x top-4 per block; the default's gate and convolutions, lazy-Adam
    tables, 1,200 steps, seeds 2 and 3, the bundled corpus first (where settings are chosen)."""
    runs = [("fhme", "c3"), ("fhme", "c2"), ("pkm", "c2")]
    return [(f"{corpus}_{model}_{depth}_s{seed}",
             [*_default_fhme("lazy_adam", OPTIM_TUNED["lazy_adam"], model), *GATED_FHME, *CONV,
              "--set", "block_conv=4", *FRACTAL_BUDGET[depth], *_data(corpus, stdlib),
              "--max-steps", "1200", "--seeds", seed])
            for corpus, seed in CORPUS_FIRST for model, depth in runs]


def fractal_budget_long_pilot_jobs(_: str) -> list[tuple[str, list[str]]]:
    """At the default length (2,400 steps) FHME led PKM on Tiny Shakespeare at the default budget:
    at the budget that fits C = 3, does C = 2 lead C = 1 there too? fractal-budget's C = 2 and PKM
    at 2,400 steps, seeds 2 and 3, bundled corpus, each pair side by side."""
    return [(f"shakespeare_{model}_c2_2400_s{seed}",
             [*_default_fhme("lazy_adam", OPTIM_TUNED["lazy_adam"], model), *GATED_FHME, *CONV,
              "--set", "block_conv=4", *FRACTAL_BUDGET["c2"], "--max-steps", "2400", "--seeds", seed])
            for seed in ("2", "3") for model in ("fhme", "pkm")]


# The fractal claim with neuron blocks (PEER's e_j(x) = gelu(u_j . x) v_j, a nonlinearity per
# expert, where a value row has none), at a budget where C = 3 still has 2 x top-4 per block
# (737,664 FFN FLOPs per token, 1.5x the default's): C = 2 takes 2 x top-30 (735,840) and PEER, C = 1
# of the same neuron blocks, is matched to that by the usual rule (5 x top-39, 733,396).
NEURON_C2 = ["--set", "block=neuron", "--set", "fractal_depth=2", "--set", "topk=30"]


def neuron_fractal_pilot_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """With value blocks C = 2 never beat C = 1 (PKM) at 1,200 steps: is a second, sequential read
    worth more when each expert is a nonlinear neuron, so that f_1(f_1(x)) is a deeper function and
    not a second lookup? The default FHME (``BCONV_FHME``, lazy-Adam tables) at C = 2 with neuron
    blocks against PEER, each pair side by side, 600 steps, seed 1, both corpora."""
    return [(f"{corpus}_{model}_c2", [*_default_fhme("lazy_adam", OPTIM_TUNED["lazy_adam"], model), *BCONV_FHME,
                                      *NEURON_C2, *_data(corpus, stdlib), "--max-steps", "600", "--seeds", "1"])
            for corpus in ("shakespeare", "stdlib") for model in ("fhme", "peer")]


BF16_TABLES = {"float32": ["--set", "expert_dtype=float32"], "bfloat16": ["--set", "expert_dtype=bfloat16"],
               "bfloat16_sr": ["--set", "expert_dtype=bfloat16", "--set", "stochastic_rounding=true"]}


def bf16_tables_jobs(stdlib: str) -> list[tuple[str, list[str]]]:
    """bfloat16 expert tables halve a million-row layer's memory: what do they cost in quality,
    rounded to nearest and stochastically? The default FHME (``BCONV_FHME``) with float32 and
    bfloat16 tables (optimizer state stays float32), 1,200 steps, seeds 2 and 3, both corpora."""
    return [(f"{corpus}_fhme_{tables}_s{seed}",
             [*_default_fhme("lazy_adam", OPTIM_TUNED["lazy_adam"], "fhme"), *BCONV_FHME, *BF16_TABLES[tables],
              *_data(corpus, stdlib), "--max-steps", "1200", "--seeds", seed])
            for seed in ("2", "3") for corpus in ("shakespeare", "stdlib") for tables in BF16_TABLES]


def finished(out: Path) -> bool:
    """Whether the `compare` run in ``out`` finished: it opens results.jsonl before its first
    model trains, so only table.md (written after every row) marks a complete run."""
    return (out / "results.jsonl").is_file() and (out / "table.md").is_file()


def run(phase: str, jobs: list[tuple[str, list[str]]], cpus: list[int], worker: int | None) -> None:
    if worker is None:  # one single-threaded worker per CPU, worker w takes jobs w, w + len(cpus), ...
        flag = ["--cpus", ",".join(map(str, cpus))]
        procs = [subprocess.Popen([sys.executable, __file__, phase, *flag, "--worker", str(w)])
                 for w in range(len(cpus))]
        sys.exit(max(p.wait() for p in procs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path("runs/quality") / phase
    root.mkdir(parents=True, exist_ok=True)
    failed = []
    for i, (name, args) in enumerate(jobs):
        out = root / name
        if i % len(cpus) != worker or finished(out):
            continue
        if out.exists():  # an unfinished run (`compare` refuses a folder with results.jsonl): start over
            shutil.rmtree(out)
        cmd = ["taskset", "-c", str(cpus[worker]), sys.executable, "-m", "fractalmoe", "compare", *args,
               "--out", str(out), "--json"]
        with open(f"{out}.log", "w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
        if code != 0 or not finished(out):
            failed.append(name)
            print(f"quality.py: {phase}/{name} failed (exit {code}): see {out}.log", file=sys.stderr, flush=True)
    if failed:
        sys.exit(1)


# Every phase: its jobs, given the second corpus's path.
PHASES: dict[str, Callable[[str], list[tuple[str, list[str]]]]] = {
    "pilots": lambda _: pilot_jobs(), "untie-pilots": lambda _: untie_pilot_jobs(),
    "usage-pilots": lambda _: usage_pilot_jobs(), "search": lambda _: search_jobs(), "final": final_jobs,
    "optim-pilots": lambda _: optim_pilot_jobs(), "optim": lambda _: optim_jobs(), "final-lazy": final_lazy_jobs,
    "balance-65k": lambda _: balance_65k_jobs(), "experts": experts_jobs,
    "one-head-pilots": lambda _: one_head_pilot_jobs(), "one-head": one_head_jobs,
    "route-once-pilots": lambda _: route_once_pilot_jobs(), "route-once": route_once_jobs,
    "shallow-pilots": lambda _: shallow_pilot_jobs(), "shallow": shallow_jobs, "gate-pilots": gate_pilot_jobs,
    "gated": gated_jobs, "conv-pilots": lambda _: conv_pilot_jobs(), "conv": conv_jobs, "gate-conv": gate_conv_jobs,
    "adaptive-pilots": lambda _: adaptive_pilot_jobs(), "table-lr-pilots": lambda _: table_lr_pilot_jobs(),
    "shape-pilots": shape_pilot_jobs, "peer-conv": peer_conv_jobs,
    "conv-width-pilots": lambda _: conv_width_pilot_jobs(), "conv-width": conv_width_jobs,
    "shared-bank-pilots": lambda _: shared_bank_pilot_jobs(),
    "drop-path-pilots": lambda _: drop_path_pilot_jobs(),
    "sigmoid-gate-pilots": lambda _: sigmoid_gate_pilot_jobs(),
    "block-conv-pilots": block_conv_pilot_jobs, "block-conv": block_conv_jobs,
    "experts-long-pilots": experts_long_pilot_jobs, "column-heads-pilots": column_heads_pilot_jobs,
    "column-heads": column_heads_jobs, "shallow-heads": shallow_heads_jobs,
    "column-heads-seed4": column_heads_seed4_jobs, "routed-layers-pilots": routed_layers_pilot_jobs,
    "key-parts": key_parts_jobs, "key-parts-pkm": key_parts_pkm_jobs,
    "key-parts-heads-pilots": key_parts_heads_pilot_jobs, "default-length": default_length_jobs,
    "small-stdlib": small_stdlib_jobs, "small-corpus-seed4": small_corpus_seed4_jobs, "width-256": width_256_jobs,
    "width-256-lr-pilots": width_256_lr_pilot_jobs, "width-256-tuned": width_256_tuned_jobs,
    "lr-pilots": lr_pilot_jobs,
    "kjv": kjv_jobs, "read-once-seed4": read_once_seed4_jobs,
    "value-dropout-pilots": value_dropout_pilot_jobs,
    "dropout": dropout_jobs, "balance-65k-stdlib-pilots": balance_65k_stdlib_pilot_jobs,
    "balance-65k-stdlib": balance_65k_stdlib_jobs, "balance-65k-layers": balance_65k_layers_jobs,
    "balance-65k-long": balance_65k_long_jobs, "deep-query-pilots": deep_query_pilot_jobs,
    "repeat-rows-pilots": repeat_rows_pilot_jobs, "repeat-rows-1-layer-pilots": repeat_rows_one_layer_pilot_jobs,
    "one-layer": one_layer_jobs,
    "balance-65k-fade": balance_65k_fade_jobs, "fade-16k": fade_16k_jobs,
    "fade-pilots": fade_pilot_jobs, "fade": fade_jobs, "fade-base": fade_base_jobs,
    "fractal-budget": fractal_budget_jobs, "bf16-tables": bf16_tables_jobs,
    "neuron-fractal-pilots": neuron_fractal_pilot_jobs, "fractal-budget-long-pilot": fractal_budget_long_pilot_jobs,
    "balance-65k-target": balance_65k_target_jobs, "balance-65k-target-ratio": balance_65k_target_ratio_jobs,
    "balance-65k-target-slow": balance_65k_target_slow_jobs,
    "balance-65k-target-slow-0.5": balance_65k_target_slow_05_jobs,
    "balance-65k-target-slow-seed3": balance_65k_target_slow_seed3_jobs,
    "balance-65k-target-slow-layers": balance_65k_target_slow_layers_jobs,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=tuple(PHASES))
    p.add_argument("--cpus", default="0,1", help="CPUs to pin one worker each to")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--stdlib", default="data/stdlib", help="built with `fractalmoe corpus stdlib`")
    args = p.parse_args()
    run(args.phase, PHASES[args.phase](args.stdlib), [int(c) for c in args.cpus.split(",")], args.worker)


if __name__ == "__main__":
    main()
