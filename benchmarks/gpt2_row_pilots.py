"""Pilots that chose the rule of ``add_row_adapters``: which rows of fresh value memories on the
GPT-2 base may learn, and what share of each domain's reads then lands on rows that learnt.

    python benchmarks/gpt2_row_pilots.py --base runs/ft_gpt2/gpt2_base [--experts 65536]
        [--max-kept-windows K] [--all-rows] [--train-router] [--expert-lr 0.1] [--seed 2]

An FHME adapter of value blocks (zero values) beside each MLP, 150 steps on Python's ``email``
package. By default its routing stays frozen and ``--rows`` rows a layer learn at each step, the
batch's top rows by tf-idf against a sample of the base's corpus (``StepRowSelector``);
``--max-kept-windows K`` admits only rows at most K sampled base windows read, ``--all-rows``
lets every row learn, ``--train-router`` lets the routing learn too, ``--fit-keys`` places the sub-keys on both domains'
queries first (``fit_sub_keys``). Prints one JSON line: bpb on
both domains before and after, and per layer the share of each domain's reads (a fresh sample of
its training windows) that land on rows that learnt.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time

import torch

from fractalmoe.adapters import add_fhme_adapters, trainable_parameter_count
from fractalmoe.config import TrainConfig
from fractalmoe.evaluate import val_bpb
from fractalmoe.finetune import load_domain, train_lm
from fractalmoe.sparse_rows import add_hashed_memories, choice_counts, fit_sub_keys, step_row_selectors

SEQ_LEN, BATCH = 128, 16


def read_shares(model, adapters, selectors, data) -> list[float]:
    """Per layer: the share of ``data``'s expert reads that land on rows that learnt."""
    counts = choice_counts(model, adapters, data, SEQ_LEN, BATCH, seed=99)
    return [round(float(c[s.trained.cpu()].sum() / c.sum()), 4) for (c, _), s in zip(counts, selectors.values())]


def main() -> None:
    import transformers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="a GPT-2 base made by benchmarks/finetune_gpt2.py base")
    p.add_argument("--data", default=sysconfig.get_paths()["stdlib"] + "/email")
    p.add_argument("--experts", type=int, default=65536)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--rows", type=int, default=1024, help="rows a layer learning per step")
    p.add_argument("--max-kept-windows", type=int, default=None)
    p.add_argument("--all-rows", action="store_true")
    p.add_argument("--train-router", action="store_true")
    p.add_argument("--context", type=int, default=0,
                   help="queries read the sum of the last N positions' inputs (a frozen block convolution)")
    p.add_argument("--fit-keys", action="store_true", help="sub-keys fitted to both domains' queries (fit_sub_keys)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--expert-lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--eval-bytes", type=int, default=262144)
    a = p.parse_args()
    t0 = time.time()
    torch.manual_seed(a.seed)
    model = transformers.GPT2LMHeadModel.from_pretrained(a.base)
    new, base = load_domain(a.data, 0.1, SEQ_LEN, a.eval_bytes), load_domain(None, 0.1, SEQ_LEN, a.eval_bytes)
    before = [val_bpb(model, d, SEQ_LEN, BATCH) for d in (new, base)]
    add = add_fhme_adapters if a.train_router else add_hashed_memories  # the latter: routing frozen
    adapters = add(model, block="value", num_experts=a.experts, depth=2, heads=a.heads, topk=a.topk, key_dim=32,
                   block_conv=a.context)
    for adapter in adapters if a.context else []:  # each query sums its last --context inputs
        for block in adapter.fractal.blocks:
            block.conv.weight.data.fill_(1.0)
            block.conv.weight.requires_grad_(False)
    if a.fit_keys:
        fit_sub_keys(model, adapters, [new, base], SEQ_LEN, BATCH, a.seed)
    selectors = {} if a.all_rows else step_row_selectors(model, [base], a.rows, SEQ_LEN, BATCH, a.seed,
                                                         max_kept_windows=a.max_kept_windows)
    cfg = TrainConfig(max_steps=a.steps, lr=a.lr, expert_lr=a.expert_lr, seed=a.seed, warmup_steps=a.steps // 10)
    trainable = trainable_parameter_count(model)
    loss = train_lm(model, new, cfg, SEQ_LEN)
    after = [val_bpb(model, d, SEQ_LEN, BATCH) for d in (new, base)]
    print(json.dumps({**{k: v for k, v in vars(a).items() if k not in ("base", "data")},
                      "trainable": trainable, "train_loss": loss, "new_before": before[0], "new": after[0],
                      "base_before": before[1], "base": after[1], "rise": after[1] - before[1],
                      "trained_rows": {k: int(s.trained.sum()) for k, s in selectors.items()},
                      "base_read_share": read_shares(model, adapters, selectors, base) if selectors else None,
                      "new_read_share": read_shares(model, adapters, selectors, new) if selectors else None,
                      "secs": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
