"""The GPT-2 architecture base of the fine-tuning study (no downloads).

    python benchmarks/finetune_gpt2.py base --out runs/gpt2_base [--steps 1200] [--data PATH]
    python benchmarks/finetune_gpt2.py finetune --base runs/gpt2_base --data PATH \\
        --adapter fhme|rows|lora|full --lora-rank 64 [--lora-targets all|attention|ffn] [--depth C] \\
        [--heads H] [--topk K] [--reroute] [--attention-experts N] [--attention-lora R] [--with-embeddings] \\
        [--lr 3e-3] [--expert-lr 0.05] [--seed 2] \\
        [--max-steps 150] [--eval-bytes N] [--experts 1048576] [--max-kept-windows 0|N|any] [--fit-keys]
        [--domain-gate [--gate-off-too]] [--train-queries] [--gate-after] [--gate-prior P] [--priors 0,4,8]

``base`` trains a transformers GPT2LMHeadModel (byte vocabulary 256, the shape of the default
FractalMoE run: width 128, 4 layers, 4 heads, context 128) with the project's optimiser and
schedule, and saves it with ``save_pretrained`` plus ``fractalmoe_base.json`` (its corpus and
split). ``finetune`` adds FHME adapters matched to LoRA at --lora-rank (``--attention-experts``: and
one of N experts at each attention input, ``--attention-lora``: LoRA on the attention projections,
``--with-embeddings``: a change to the tied byte embeddings, each within the same count); ``rows``: value memories of
--experts rows a layer with frozen random routing, of which LoRA's count in rows learns at each
step, only rows no sampled base window read (``add_row_adapters``; ``--fit-keys``: the sub-keys
first fitted to both domains' queries; ``--domain-gate`` (rows or fhme): each memory behind a ``DomainGate``;
``--train-queries``: the memories' query projections learn too; ``--gate-after``: every update
that trained, FHME adapters and LoRA alike, behind a gate fitted on the trained model;
``--gate-prior``: the gates at that prior log-odds, ``--priors``: every domain's bpb after training with the gates moved
to each prior in turn, ``bpb_by_prior``); LoRA at that rank on every
dense projection (c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj); or trains every weight, and prints
one JSON line with the keys of ``fractalmoe finetune --json`` (bpb on the new and the base domain,
before and after).

``finetune --base`` also takes a FractalMoE run: its latest checkpoint is adapted in memory the
same way (row adapters beside its FHME layers, LoRA on its attention, or every weight), by the
same training loop for every method, so that the row adapters, which ``fractalmoe finetune`` does
not offer, compare with LoRA and full fine-tuning on a FractalMoE base too.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from fractalmoe.adapters import LORA_TARGETS, AdaptedFFN
from fractalmoe.config import TrainConfig
from fractalmoe.evaluate import val_bpb
from fractalmoe.finetune import Domain, finetune_in_memory, load_domain, train_lm
from fractalmoe.mixture import PosteriorMixture
from fractalmoe.sparse_rows import gate_adapters, set_gate_prior

SEQ_LEN = 128


def gpt2(dim: int = 128, layers: int = 4, heads: int = 4, seq_len: int = SEQ_LEN):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=256, n_positions=seq_len, n_embd=dim, n_layer=layers,
                                  n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=10, eos_token_id=10)
    return transformers.GPT2LMHeadModel(cfg)


def cmd_base(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    if (out / "fractalmoe_base.json").exists():
        raise SystemExit(f"error: {out} already holds a base")
    torch.manual_seed(args.seed)
    model = gpt2(args.dim, args.layers, args.heads).to(args.device)
    data = load_domain(args.data, 0.1, SEQ_LEN)
    cfg = TrainConfig(max_steps=args.steps, seed=args.seed)
    train_loss = train_lm(model, data, cfg, SEQ_LEN, args.device)
    bpb = val_bpb(model, data, SEQ_LEN, cfg.batch_size, args.device)
    model.save_pretrained(out)
    info = {"data": args.data, "val_fraction": 0.1, "seq_len": SEQ_LEN, "steps": args.steps,
            "train_loss": train_loss, "val_bpb": bpb, "params": sum(p.numel() for p in model.parameters())}
    (out / "fractalmoe_base.json").write_text(json.dumps(info, indent=2))
    return {"base": str(out), **info}


def load_base(args: argparse.Namespace) -> tuple[torch.nn.Module, list[Domain], str]:
    """The base model, the domains to report (new, then the base's own) and its kind: a GPT-2
    base made by ``base``, or a FractalMoE run (its latest checkpoint, its corpus split as it was)."""
    import transformers

    from fractalmoe.checkpoint import load_model_from_run
    from fractalmoe.finetune import kept_domains, lineage

    base = Path(args.base)
    info_path = base / "fractalmoe_base.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        model = transformers.GPT2LMHeadModel.from_pretrained(base)
        return model, [Domain(args.data, load_domain(args.data, 0.1, SEQ_LEN, args.eval_bytes)),
                       Domain(info["data"], load_domain(info["data"], info["val_fraction"], SEQ_LEN,
                                                        args.eval_bytes))], "gpt2"
    if not (base / "config.json").is_file():
        raise SystemExit(f"error: --base {args.base} is neither a GPT-2 base made by this script "
                         f"(no fractalmoe_base.json) nor a FractalMoE run (no config.json)")
    model, config, _ = load_model_from_run(base)
    if config.model.seq_len != SEQ_LEN:
        raise SystemExit(f"error: --base {args.base} has context {config.model.seq_len}; this study uses {SEQ_LEN}")
    new = load_domain(args.data, config.train.val_fraction, SEQ_LEN, args.eval_bytes)
    return model, [Domain(args.data, new), *kept_domains(lineage(base), args.eval_bytes)], "fractalmoe"


def cmd_finetune(args: argparse.Namespace) -> dict:
    gated = (args.adapter == "fhme" and args.domain_gate) or args.gate_after
    if (args.gate_prior or args.priors) and not gated:
        raise ValueError("--gate-prior and --priors are for --adapter fhme with --domain-gate, or --gate-after")
    if args.gate_after and args.adapter not in ("fhme", "lora"):
        raise ValueError("--gate-after: for --adapter fhme or lora")
    torch.manual_seed(args.seed)
    model, domains, kind = load_base(args)
    base = copy.deepcopy(model) if args.mix else None  # the base as it was, for the mixture
    cfg = TrainConfig(max_steps=args.max_steps, lr=args.lr, expert_lr=args.expert_lr, seed=args.seed,
                      warmup_steps=min(100, args.max_steps // 10))
    row = finetune_in_memory(model, args.adapter, args.lora_rank, domains, cfg, SEQ_LEN, args.device,
                             experts=args.experts, max_kept_windows=args.max_kept_windows,
                             fit_keys=args.fit_keys, domain_gate=args.domain_gate,
                             train_queries=args.train_queries, gate_prior=args.gate_prior,
                             depth=args.depth, heads=args.heads, topk=args.topk, reroute=args.reroute,
                             attention_experts=args.attention_experts, attention_lora=args.attention_lora,
                             lora_on=args.lora_targets, embeddings=args.with_embeddings)
    if base is not None:  # the trained model and its base, weighted by the posterior
        mixture = PosteriorMixture([base, model])
        row["bpb_mixed"] = [val_bpb(mixture, d.data, SEQ_LEN, cfg.batch_size, args.device) for d in domains]
    if args.gate_after:  # gates fitted on the trained model, for updates that trained without them
        row["gates"] = gate_adapters(model, domains[0].data, [d.data for d in domains[1:]], SEQ_LEN,
                                     cfg.batch_size, args.seed, args.device, args.gate_prior)
        if not args.priors:
            row["bpb_gated_after"] = [val_bpb(model, d.data, SEQ_LEN, cfg.batch_size, args.device) for d in domains]
    if args.priors:  # one trained model, its gates' prior moved: the trade-off with no step taken
        row["bpb_by_prior"] = {}
        for prior in args.priors:
            set_gate_prior(model, prior)
            row["bpb_by_prior"][f"{prior:g}"] = [val_bpb(model, d.data, SEQ_LEN, cfg.batch_size, args.device)
                                                 for d in domains]
        set_gate_prior(model, args.gate_prior)
    if args.gate_off_too:  # the same trained adapters with their gates taken out: what the gate keeps
        for m in model.modules():
            if isinstance(m, AdaptedFFN):
                m.domain_gate = None
        row["bpb_gate_off"] = [val_bpb(model, d.data, SEQ_LEN, cfg.batch_size, args.device) for d in domains]
    return {"base": str(args.base), "base_model": kind, "eval_bytes": args.eval_bytes, **row}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("base", help="train the GPT-2 base")
    b.add_argument("--out", required=True)
    b.add_argument("--data", default=None, help="corpus (default: the bundled Tiny Shakespeare)")
    b.add_argument("--steps", type=int, default=1200)
    b.add_argument("--dim", type=int, default=128)
    b.add_argument("--layers", type=int, default=4)
    b.add_argument("--heads", type=int, default=4)
    b.add_argument("--seed", type=int, default=1337)
    f = sub.add_parser("finetune", help="adapt the GPT-2 base to new text")
    f.add_argument("--base", required=True, help="a GPT-2 base made by `base`, or a FractalMoE run")
    f.add_argument("--data", required=True)
    f.add_argument("--adapter", choices=["fhme", "rows", "lora", "full"], default="fhme")
    f.add_argument("--lora-rank", type=int, default=64, help="LoRA's rank; FHME adapters match its count")
    f.add_argument("--lora-targets", choices=LORA_TARGETS, default="all",
                   help="lora: every dense projection, or the attention or FFN block's only")
    f.add_argument("--depth", type=int, default=2, help="fhme: fractal depth C of the adapters (2^C - 1 blocks)")
    f.add_argument("--heads", type=int, default=None, help="fhme: heads a block (default: DEFAULT_ADAPTER's)")
    f.add_argument("--topk", type=int, default=None, help="fhme: experts a head reads (default: DEFAULT_ADAPTER's)")
    f.add_argument("--reroute", action="store_true",
                   help="fhme on a FractalMoE base: its routers' query projections learn too, within LoRA's count")
    f.add_argument("--attention-experts", type=int, default=None, metavar="N",
                   help="fhme: also an FHME of N experts at each attention input, within LoRA's count")
    f.add_argument("--attention-lora", type=int, default=None, metavar="R",
                   help="fhme: also LoRA of rank R on the attention projections, within LoRA's count")
    f.add_argument("--with-embeddings", action="store_true",
                   help="fhme: a change to the tied byte embeddings learns too, within the same count "
                        "(behind gates of its own with --gate-after)")
    f.add_argument("--lr", type=float, default=3e-3)
    f.add_argument("--expert-lr", type=float, default=0.05)
    f.add_argument("--experts", type=int, default=1_048_576, help="rows: rows per layer (a perfect square)")
    f.add_argument("--max-kept-windows", type=lambda v: None if v == "any" else int(v), default=0,
                   help="rows: only rows at most this many sampled base windows read may learn (any: no limit)")
    f.add_argument("--fit-keys", action="store_true",
                   help="rows: sub-keys fitted to both domains' queries first (fit_sub_keys)")
    f.add_argument("--domain-gate", action="store_true",
                   help="rows, fhme: each adapter scaled by a domain gate read from its routing (DomainGate)")
    f.add_argument("--train-queries", action="store_true", help="rows: the memories' query projections learn too")
    f.add_argument("--gate-off-too", action="store_true",
                   help="with --domain-gate: also report every domain's bpb with the gates taken out (bpb_gate_off)")
    f.add_argument("--gate-after", action="store_true",
                   help="fhme without --domain-gate, or lora: after training, also report every domain's bpb "
                        "with every trained update (FHME adapters, LoRA) behind a gate fitted on the trained "
                        "model (bpb_gated_after)")
    f.add_argument("--gate-prior", type=float, default=0.0,
                   help="fhme with --domain-gate, or --gate-after: the gates' prior log-odds for the new domain")
    f.add_argument("--priors", type=lambda v: [float(x) for x in v.split(",")], default=None,
                   help="gated: also report every domain's bpb with the gates at each of these priors "
                        "(comma-separated; bpb_by_prior)")
    f.add_argument("--mix", action="store_true",
                   help="also report every domain's bpb under the posterior mixture of the trained model and "
                        "its base at even odds (PosteriorMixture; bpb_mixed)")
    f.add_argument("--seed", type=int, default=1337)
    f.add_argument("--max-steps", type=int, default=150)
    f.add_argument("--eval-bytes", type=int, default=None)
    for q in (b, f):
        q.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        row = cmd_base(args) if args.command == "base" else cmd_finetune(args)
    except ValueError as exc:  # one line, as the CLI does
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
