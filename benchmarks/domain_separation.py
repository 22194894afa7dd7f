"""Can a trained base tell its own domain's tokens from a new domain's, per token and causally?

A gate that opens an adapter only on new-domain text needs such a signal. Two candidates, each
scored by the AUC of new-domain (Python's ``email`` package) against base-domain validation
tokens, per layer:

* routing novelty: the mean -log p_base(row) of the expert rows a token chose, row frequencies
  counted over the base's training windows (what memory fine-tuning's tf-idf builds on);
* a linear probe on the FFN's input, fitted on training windows of both domains.

    python benchmarks/domain_separation.py RUN > benchmarks/results/domain_separation.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sysconfig

import torch
import torch.nn.functional as F
from torch import Tensor

from fractalmoe.adapters import base_memories, decoder_layers, find_ffn
from fractalmoe.checkpoint import load_model_from_run
from fractalmoe.data import ByteDataset
from fractalmoe.evaluate import lm_logits
from fractalmoe.finetune import load_domain
from fractalmoe.stats import CHOICES, collect

BATCH = 16


def auc(pos: Tensor, neg: Tensor) -> float:
    """P(a random positive scores above a random negative), by ranks (Mann-Whitney U)."""
    ranks = torch.cat([pos, neg]).argsort().argsort().double() + 1
    return ((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))).item()


def windows(data: ByteDataset, train: bool, batches: int, seq_len: int) -> list[Tensor]:
    """Training batches 0.. of seed 0, or the validation split's first windows."""
    if train:
        return [data.train_batch(s, BATCH, seq_len, 0)[0] for s in range(batches)]
    return [x for x, _ in itertools.islice(data.val_batches(BATCH, seq_len), batches)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a trained FractalMoE run directory (FHME layers)")
    p.add_argument("--batches", type=int, default=8, help="batches of 16 windows per domain and split")
    args = p.parse_args()
    torch.manual_seed(0)
    model, config, _ = load_model_from_run(args.run)
    model.eval()
    seq_len, val_fraction = config.model.seq_len, config.train.val_fraction
    base = load_domain(None, val_fraction, seq_len)
    email = load_domain(sysconfig.get_paths()["stdlib"] + "/email", val_fraction, seq_len)
    memories = [m for _, m in base_memories(model)]
    layers = decoder_layers(model)
    ffn_in: dict[int, Tensor] = {}
    for i, layer in enumerate(layers):
        getattr(layer, find_ffn(layer)).register_forward_hook(
            lambda m, a, o, i=i: ffn_in.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))

    @torch.no_grad()
    def run(xs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per layer: every token's chosen rows (T, choices) and FFN input (T, D)."""
        rows: list[list[Tensor]] = [[] for _ in memories]
        feats: list[list[Tensor]] = [[] for _ in layers]
        for x in xs:
            with collect(model) as stats:
                lm_logits(model, x)
            for acc, m in zip(rows, memories):
                acc.append(torch.cat([idx.reshape(x.numel(), -1) for b in m.fractal.blocks
                                      for idx in stats.values(b.memory.router, CHOICES)], 1))
            for i, acc in enumerate(feats):
                acc.append(ffn_in[i].clone())
        return [torch.cat(r) for r in rows], [torch.cat(f) for f in feats]

    n = args.batches
    (base_rows, base_train), (_, email_train) = (run(windows(d, True, n, seq_len)) for d in (base, email))
    (base_val_rows, base_val), (email_val_rows, email_val) = (run(windows(d, False, n // 2, seq_len))
                                                              for d in (base, email))
    out = {"run": args.run, "windows_per_domain": {"fit": n * BATCH, "score": n // 2 * BATCH}, "layers": []}
    for i in range(len(layers)):
        counts = torch.bincount(base_rows[i].reshape(-1), minlength=memories[i].fractal.bank.num_experts)
        log_p = torch.log((counts + 0.5) / (counts + 0.5).sum())
        novelty = auc(-log_p[email_val_rows[i]].mean(1), -log_p[base_val_rows[i]].mean(1))
        x = torch.cat([base_train[i], email_train[i]])
        y = torch.cat([torch.zeros(len(base_train[i])), torch.ones(len(email_train[i]))])
        mu, sd = x.mean(0), x.std(0) + 1e-5
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros((), requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.05)
        for _ in range(300):
            loss = F.binary_cross_entropy_with_logits((x - mu) / sd @ w + b, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            s_base, s_email = (base_val[i] - mu) / sd @ w + b, (email_val[i] - mu) / sd @ w + b
            at_1pct = (s_email > s_base.quantile(0.99)).float().mean().item()
        out["layers"].append({"layer": i, "routing_novelty_auc": round(novelty, 4),
                              "probe_auc": round(auc(s_email, s_base), 4),
                              "email_passed_at_1pct_base": round(at_1pct, 4)})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
