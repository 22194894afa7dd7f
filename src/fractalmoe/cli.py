"""Command line: ``fractalmoe train | eval | generate | plot | bench | compare | finetune | export-hf | corpus``.

User mistakes print one line on stderr and exit with code 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

import torch

from .adapters import ADAPTER_KINDS
from .bench import ChildFailed
from .bench_layer import LAYER_IMPLS
from .config import EXPERT_DTYPES, RunConfig, default_run_config, load_config_file
from .host_memory import keep_freed_memory
from .train import TrainingStopped


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise UserError(f"{self.prog}: {message} (see --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _device(text: str) -> str:
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine; use --device cpu")
    if text != "cpu" and not text.startswith("cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or auto")
    return text


def _idle_arguments(parser: argparse.ArgumentParser) -> None:
    """A timing command's refusal of a busy machine, and the ways around it."""
    parser.add_argument("--force", action="store_true",
                        help="run even while another PyTorch process runs or the load average is > 0.5")
    parser.add_argument("--wait-idle", type=_nonneg_float, default=0.0, metavar="SECONDS",
                        help="wait up to this long for the machine to become idle before refusing")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fractalmoe", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a language model (default: FHME on Tiny Shakespeare)")
    t.add_argument("--data", help="text file or folder of text files (default: bundled corpus)")
    t.add_argument("--config", help="TOML file with [model] and [train] tables, or YAML with model: and train:")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set dim=256 --set train.lr=1e-3")
    t.add_argument("--out", help="run directory to create (default: runs/<timestamp>)")
    t.add_argument("--resume", help="run directory to continue from its latest checkpoint")
    t.add_argument("--max-steps", type=_positive_int, help="training steps")
    t.add_argument("--time-budget", type=_nonneg_float, help="stop after this many minutes")
    t.add_argument("--save-every", type=_positive_int, help="checkpoint every N steps")
    t.add_argument("--seed", type=int, help="random seed (model init and data order)")
    t.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or auto")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="validation loss and bits per byte of a run")
    e.add_argument("--ckpt", required=True, help="run directory (uses its latest checkpoint)")
    e.add_argument("--best", action="store_true",
                   help="the checkpoint of the lowest periodic validation loss (trained with keep_best)")
    e.add_argument("--data", help="corpus to evaluate on (default: the run's own)")
    e.add_argument("--depth", type=_positive_int, help="force every FHME layer to this depth")
    e.add_argument("--usage-choices", type=_positive_int,
                   help="expert usage over each routed block's first N routing choices "
                        "(default: all of the validation split's)")
    e.add_argument("--mix-lineage", action="store_true",
                   help="a fine-tuning run: score the posterior mixture of it, its base and any earlier stage, "
                        "each weighted by how well it has predicted the text so far (PosteriorMixture)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--device", type=_device, default="cpu")

    g = sub.add_parser("generate", help="sample text from a run")
    g.add_argument("--ckpt", required=True, help="run directory (uses its latest checkpoint)")
    g.add_argument("--prompt", default="\n", help="text to continue")
    g.add_argument("--max-new-tokens", type=_positive_int, default=300, help="bytes to generate")
    g.add_argument("--temperature", type=_nonneg_float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=_positive_int, default=None, help="sample from the k best")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mix-lineage", action="store_true",
                   help="a fine-tuning run: sample from the posterior mixture of it, its base and any earlier stage")
    g.add_argument("--device", type=_device, default="cpu")

    pl = sub.add_parser("plot", help="PNG plots of a run (loss curves, expert usage, depth map)")
    pl.add_argument("run", help="run directory")
    pl.add_argument("--out", help="folder for the PNGs (default: RUN/plots)")
    pl.add_argument("--depth-map", action="store_true", help="colour a text by per-byte depth")
    pl.add_argument("--text", default=None, help="text for --depth-map")
    b = sub.add_parser("bench", help="throughput benchmarks (layer, model, adaptive depth)")
    bsub = b.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    bl = bsub.add_parser("layer", help="one routed layer per implementation vs number of experts "
                         "(alternated fresh-process repeats, medians, roofline, headline ratios)")
    bl.add_argument("--experts", type=_int_list, default=[16384, 262144, 1048576])
    bl.add_argument("--impl", type=_str_list, default=None,
                    help=f"comma list of {', '.join(LAYER_IMPLS)} (default: all that are installed)")
    bl.add_argument("--dim", type=_positive_int, default=256)
    bl.add_argument("--heads", type=_positive_int, default=8)
    bl.add_argument("--topk", type=_positive_int, default=16)
    bl.add_argument("--key-dim", type=_positive_int, default=256, help="query width (all key parts)")
    bl.add_argument("--key-parts", type=_positive_int, default=2,
                    help="fractalmoe impls: product keys of P parts (3 or 4 score far fewer sub-keys at 1M)")
    bl.add_argument("--tokens", type=_positive_int, default=2048)
    bl.add_argument("--steps", type=_positive_int, default=5, help="timed steps after 2 warm-up")
    bl.add_argument("--expert-dtype", type=_dtype_list, default=["float32"],
                    help=f"fractalmoe impls' table dtypes, alternated: a comma list of {', '.join(EXPERT_DTYPES)}")
    bl.add_argument("--repeats", type=_positive_int, default=3,
                    help="fresh processes per configuration, alternated round-robin (>= 3; medians)")
    _idle_arguments(bl)
    bl.add_argument("--gather-table-mb", type=_positive_int, default=1024,
                    help="table size of the random-row gather that measures bandwidth")
    bl.add_argument("--device", default="cpu",
                    help="cpu, cuda or cuda:N (on CUDA each phase is timed after a device synchronize)")
    bl.add_argument("--json", action="store_true",
                    help="one JSON line per configuration on stdout (the rest on stderr)")
    bm = bsub.add_parser("model", help="a whole FHME language model vs number of experts")
    bm.add_argument("--experts", type=_int_list, default=[16384, 262144, 1048576])
    bm.add_argument("--config", help="TOML or YAML model config (default: the training default)")
    _idle_arguments(bm)
    bm.add_argument("--batch-size", type=_positive_int, default=8)
    bm.add_argument("--steps", type=_positive_int, default=5)
    bm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, as for train (e.g. --set autocast=bfloat16)")
    bm.add_argument("--device", default="cpu",
                    help="cpu, cuda or cuda:N (on CUDA each phase is timed after a device synchronize)")
    bm.add_argument("--json", action="store_true")
    ft = sub.add_parser("finetune", help="train adapters (FHME, LoRA) or all weights on new text; "
                        "reports bpb on the new and the base domain, before and after")
    ft.add_argument("--base", required=True,
                    help="run directory of the trained base model, or of an earlier finetune "
                         "(sequential adaptation: its adapters stay, frozen and active)")
    ft.add_argument("--data", required=True, help="text file or folder to adapt to")
    ft.add_argument("--adapter", choices=ADAPTER_KINDS, default="fhme",
                    help="fhme adapters, memory (the base's own expert rows), LoRA (peft) on every dense "
                         "projection, or full fine-tuning")
    ft.add_argument("--layers", type=_int_list_zero,
                    help="comma list of layer indices (default: all; not for --adapter full)")
    ft.add_argument("--experts", type=_positive_int, default=None,
                    help="experts per FHME adapter, a perfect square (default: 1024); lora without "
                         "--lora-rank: those of the FHME adapters whose budget it matches")
    ft.add_argument("--match-lora-rank", type=_positive_int, metavar="R",
                    help="fhme: as many experts (a perfect square) as keep the adapters' trainable "
                         "parameters at or below LoRA's at rank R")
    ft.add_argument("--lora-rank", type=_positive_int, metavar="R",
                    help="lora: rank, at most width / 2 (attention targets: the narrowest projection's "
                         "rank; default: the FHME adapters' budget at --experts)")
    ft.add_argument("--lora-targets", choices=["all", "attention", "ffn"], default="all",
                    help="all: every dense projection of the decoder layers (attention, MLP, FHME "
                         "routers' queries; not gates or routers' logits); attention or ffn: that block only")
    ft.add_argument("--depth", type=_positive_int,
                    help="fractal depth of FHME adapters (fhme, lora's matched budget; default: 2)")
    ft.add_argument("--heads", type=_positive_int,
                    help="heads of each FHME adapter block (fhme, lora's matched budget; default: 2)")
    ft.add_argument("--topk", type=_positive_int,
                    help="experts each head of an FHME adapter block reads (fhme, lora's matched budget; default: 8)")
    ft.add_argument("--output-gate", action="store_true",
                    help="fhme: scale each adapter's output by a learned gate sigmoid(w.x + b), b = -4 at start")
    ft.add_argument("--reroute", action="store_true",
                    help="fhme on a FractalMoE base: the query projections of the base's own routers learn too "
                         "(which of its rows a token reads), within the same trainable count")
    ft.add_argument("--attention-experts", type=_positive_int, metavar="N",
                    help="fhme: also an FHME adapter of N experts (a perfect square) at each layer's attention "
                         "input, attention(x + FHME(x)), so its queries, keys and values adapt; within the "
                         "same trainable count")
    ft.add_argument("--attention-lora", type=_positive_int, metavar="R",
                    help="fhme: also LoRA of rank R (at most width / 2) on each layer's attention projections, "
                         "within the same trainable count: the FHME adapters beside the FFN, LoRA on attention")
    ft.add_argument("--domain-gate", action="store_true",
                    help="fhme: after training, scale each update (FFN and attention-input adapters, LoRA on "
                         "attention) by the posterior that the text so far is the new domain's, read from frozen "
                         "hashing routing fitted on samples of both (DomainGate); keeps the base domain's bpb, "
                         "generation re-reads the context at every step")
    ft.add_argument("--gate-prior", type=float, default=0.0, metavar="P",
                    help="with --domain-gate: the gates' prior log-odds that text is the new domain's (default 0, "
                         "even odds); higher learns the new domain further for more rise on the base's")
    ft.add_argument("--sparse-rows", type=_positive_int, metavar="T",
                    help="fhme: train only the T expert rows per adapter that the new domain uses most "
                         "above the base domain (tf-idf of expert choices; sparse memory fine-tuning)")
    ft.add_argument("--rows-per-step", action="store_true",
                    help="memory: choose the T rows anew at every step, the ones that step's batch reads "
                         "most above the base domain (Sparse Memory Finetuning); T rows learn per step")
    ft.add_argument("--rows-by-gain", action="store_true",
                    help="with --rows-per-step: choose the rows with the most new-domain gradient per "
                         "base read, and step each by its gradient over its base reads (use with "
                         "--set expert_optim=row_sgd)")
    ft.add_argument("--with-embeddings", action="store_true",
                    help="memory: the byte embeddings (tied to the output head) learn too; fhme: a change to "
                         "them learns, read on the input and the output side (each behind a gate of its own "
                         "with --domain-gate); at the dense lr, within the same trainable budget")
    ft.add_argument("--eval-bytes", type=_positive_int, metavar="N",
                    help="evaluate on the first N bytes of each validation split (default: whole splits)")
    ft.add_argument("--out", help="run directory to create")
    ft.add_argument("--max-steps", type=_positive_int, default=300)
    ft.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="training field (KEY or train.KEY; the model is the base's)")
    ft.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or auto")
    ft.add_argument("--json", action="store_true", help="print one JSON object")
    ft.add_argument("--quiet", action="store_true")
    ex = sub.add_parser("export-hf", help="write a transformers AutoModelForCausalLM directory")
    ex.add_argument("run", help="run directory")
    ex.add_argument("out", help="output directory")
    c = sub.add_parser("compare", help="train FHME and baselines at equal active FLOPs per token")
    c.add_argument("--data", help="text file or folder (default: bundled corpus)")
    c.add_argument("--models", type=_str_list, default=["fhme", "dense", "moe", "pkm", "peer"])
    c.add_argument("--config", help="TOML or YAML base config (model fields matched per FFN)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--max-steps", type=_positive_int, default=300)
    c.add_argument("--time-budget", type=_nonneg_float, help="minutes per run")
    c.add_argument("--seeds", type=_int_list, default=[1])
    c.add_argument("--sweep", help="KEY=V1,V2,...: train the first model once per value instead")
    c.add_argument("--out", default="runs/compare", help="results folder")
    c.add_argument("--json", action="store_true", help="one JSON line per model")
    ba = bsub.add_parser("adaptive", help="bpb and FHME time at each fixed depth and adaptive; "
                                           "with several runs, the fixed-depth frontier")
    ba.add_argument("--ckpt", required=True, action="append",
                    help="run directory of a trained FHME model (repeat: fixed-C and adaptive runs)")
    ba.add_argument("--plot", help="with several runs: write bpb vs blocks/token to this PNG")
    ba.add_argument("--data", help="corpus (default: the run's own)")
    ba.add_argument("--eval-bytes", type=_positive_int, metavar="N",
                    help="evaluate on the first N bytes of the validation split (default: all of it)")
    ba.add_argument("--passes", type=_positive_int, default=3, help="timed passes per mode (median)")
    ba.add_argument("--json", action="store_true", help="one JSON line per mode")
    ba.add_argument("--device", type=_device, default="cpu")
    _idle_arguments(ba)
    co = sub.add_parser("corpus", help="build a reproducible corpus that needs no download")
    co.add_argument("name", choices=["stdlib"], help="stdlib: this interpreter's standard-library sources")
    dest = co.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", help="folder to create with train.txt, val.txt and manifest.json")
    dest.add_argument("--write-manifest", metavar="PATH",
                      help="maintainers: regenerate the manifest from this interpreter into PATH")
    co.add_argument("--manifest", help="manifest to build from (default: the one shipped with fractalmoe)")
    return p


def _int_list(text: str) -> list[int]:
    return [_positive_int(t) for t in text.split(",") if t]


def _int_list_zero(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected layer indices >= 0, got {text!r}")
    return values


def _str_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _dtype_list(text: str) -> list[str]:
    dtypes = list(dict.fromkeys(_str_list(text)))
    if not dtypes or any(t not in EXPERT_DTYPES for t in dtypes):
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(EXPERT_DTYPES)}, got {text!r}")
    return dtypes


def _load_config(args: argparse.Namespace) -> RunConfig:
    if args.config:
        config = load_config_file(args.config)
    elif getattr(args, "resume", None):
        from .checkpoint import load_run_config

        config = load_run_config(args.resume)  # resume continues the run's own config
    else:
        config = default_run_config()
    overrides = list(args.set)
    for flag, key in (("max_steps", "max_steps"), ("time_budget", "time_budget"),
                      ("save_every", "save_every"), ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"train.{key}={value}")
    return config.with_overrides(overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import run

    config = _load_config(args)
    if args.data is not None:
        from .data import corpus_files

        corpus_files(args.data)  # fail early, before a run directory is made
    result = run(config, out=Path(args.out) if args.out else None,
                 resume=Path(args.resume) if args.resume else None, data_path=args.data,
                 device=args.device, progress=not args.quiet)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # every rank reports its own memory; the rest is rank 0's to say
        from .bench import peak_rss_gb

        print(f"rank {rank}/{world}: peak RSS {peak_rss_gb():.2f} GB", flush=True)
        if rank:
            return 0
    if result.val_loss is not None:
        print(f"step {result.step}: val_loss {result.val_loss:.4f} nats/byte, val_bpb "
              f"{result.val_bpb:.4f}, {result.elapsed_s / 60:.1f} min, {result.tok_s:.0f} tok/s")
    print(f"run directory: {result.run_dir}")
    if result.sample:
        print("--- sample ---")
        print(result.sample)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import load_model_from_run, load_run_data, read_run_state
    from .evaluate import evaluate

    if args.mix_lineage:
        return _eval_mixture(args)
    model, config, ckpt = load_model_from_run(args.ckpt, args.device, best=args.best)
    data = load_run_data(args.ckpt, config, args.data)
    model.set_depth(args.depth)
    result = evaluate(model, data, config.train.batch_size, device=args.device,
                      usage_choices=args.usage_choices)
    per_block = result.usage_per_block()
    if args.json:  # step: the checkpoint's
        print(json.dumps({"step": read_run_state(ckpt)["step"], **result.summary(), "usage_per_block": per_block}))
    else:
        print(f"val_loss {result.val_loss:.4f} nats/byte, val_bpb {result.val_bpb:.4f} "
              f"over {result.tokens} bytes")
        for i, layer in enumerate(per_block):
            print(f"layer {i}: " + ", ".join(f"{used:.1%} used, KL {kl:.2f}" for used, kl in layer))
    return 0


def _mixture(run: str, device: str) -> tuple[torch.nn.Module, list[Path]]:
    """``runs_mixture`` of a fine-tuning run's lineage, and that lineage; one-line errors otherwise."""
    from .finetune import lineage
    from .mixture import runs_mixture

    try:
        chain = lineage(run)
    except ValueError as e:
        raise UserError(str(e).replace("--base", "--ckpt")) from None
    if len(chain) < 2:
        raise UserError(f"--mix-lineage: {run} is not a fine-tuning run (it has no base)")
    return runs_mixture(chain, device), chain


def _eval_mixture(args: argparse.Namespace) -> int:
    from .checkpoint import latest_checkpoint, load_run_config, load_run_data, read_run_state
    from .evaluate import val_bpb

    if args.best or args.depth or args.usage_choices:
        raise UserError("--mix-lineage scores the latest checkpoints as they are: drop --best, --depth "
                        "and --usage-choices")
    mixture, chain = _mixture(args.ckpt, args.device)
    config = load_run_config(chain[-1])
    data = load_run_data(chain[-1], config, args.data)
    bpb = val_bpb(mixture, data, config.model.seq_len, config.train.batch_size, args.device)
    if args.json:  # step: the run's latest checkpoint's
        step = read_run_state(latest_checkpoint(chain[-1]))["step"]
        print(json.dumps({"step": step, "val_bpb": bpb, "mixture": [str(r) for r in chain]}))
    else:
        print(f"val_bpb {bpb:.4f} of the posterior mixture of {len(chain)} models ({chain[-1].name} and its "
              f"{len(chain) - 1} base{'s' if len(chain) > 2 else ''})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .checkpoint import load_model_from_run
    from .data import decode, encode

    model = _mixture(args.ckpt, args.device)[0] if args.mix_lineage else load_model_from_run(args.ckpt, args.device)[0]
    prompt = encode(args.prompt)
    if prompt.numel() == 0:
        raise UserError("--prompt must not be empty")
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    out = model.generate(prompt.unsqueeze(0).to(args.device), args.max_new_tokens,
                         args.temperature, args.top_k, generator=gen)
    sys.stdout.write(args.prompt + decode(out[0, prompt.numel():].cpu()) + "\n")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plots import plot_run

    if args.depth_map and args.text is None:
        raise UserError("--depth-map needs --text TEXT: the text to colour")
    for path in plot_run(Path(args.run), Path(args.out) if args.out else None,
                         depth_text=args.text if args.depth_map else None):
        print(path)
    return 0


def _bench_adaptive(args: argparse.Namespace) -> int:
    from .bench import adaptive_frontier, run_adaptive

    rows = []
    for run_dir in args.ckpt:
        per_run = run_adaptive(run_dir, args.data, args.device, args.eval_bytes, args.passes,
                               args.force, args.wait_idle)
        full = next(r for r in per_run if r["mode"] == f"depth{len(per_run[0]['depth_hist'][0])}")
        rows += [{"run": run_dir, **r, "blocks_share": r["blocks_per_token"] / full["blocks_per_token"],
                  "fhme_share": r["fhme_ms"] / full["fhme_ms"]} for r in per_run]
    if len(args.ckpt) > 1:
        rows = adaptive_frontier(rows)
    for row in rows:
        if args.json:
            print(json.dumps({k: v for k, v in row.items() if k != "depth_hist"}))
            continue
        line = (f"{row['run']}  {row['mode']:>9}  val_bpb {row['val_bpb']:.4f}  blocks/token "
                f"{row['blocks_per_token']:.2f} ({row['blocks_share']:.0%})  FHME {row['fhme_ms']:8.1f} ms "
                f"({row['fhme_share']:.0%})")
        if row.get("frontier_bpb") is not None:
            line += f"  fixed-depth frontier {row['frontier_bpb']:.4f} (margin {row['margin']:+.4f})"
        print(line)
    if args.plot:
        from .plots import plot_frontier

        print(plot_frontier(rows, Path(args.plot)), file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import check_device, spawn

    if args.bench == "adaptive":
        return _bench_adaptive(args)
    if args.bench == "layer":
        from .bench_layer import layer_command

        return layer_command(args.impl, args.experts, args.dim, args.heads, args.topk, args.key_dim,
                             args.tokens, args.steps, args.expert_dtype, args.repeats, args.json,
                             args.gather_table_mb, force=args.force, wait_idle_s=args.wait_idle,
                             key_parts=args.key_parts, device=args.device)
    # a bad file or field fails here, in one line, before any process starts
    (load_config_file(args.config) if args.config else default_run_config()).with_overrides(args.set)
    check_device(args.device)
    if not args.force:
        from .bench_hygiene import wait_until_idle

        reason = wait_until_idle(args.wait_idle)
        if reason is not None:
            raise UserError(reason)
    from .roofline import copy_gbps, matmul_gflops

    peak, gbps = matmul_gflops(device=args.device), copy_gbps(device=args.device)
    print(f"measured peak {peak:.1f} GFLOP/s (fp32 2048^2 matmul), bandwidth {gbps:.1f} GB/s (large-tensor "
          "copy); floor: FLOPs at the peak, expert rows read and dense AdamW traffic at the bandwidth",
          file=sys.stderr if args.json else sys.stdout, flush=True)
    for n in args.experts:
        row = spawn("model", dict(num_experts=n, config=args.config, batch_size=args.batch_size,
                                  steps=args.steps, overrides=list(args.set), device=args.device,
                                  peak_gflops=peak, copy_gbps=gbps))
        print(json.dumps(row) if args.json else _bench_row(row), flush=True)
    return 0


def _bench_row(row: dict) -> str:
    if "error" in row:
        return f"{row.get('impl', 'model')} N={row.get('num_experts')}: failed: {row['error']}"
    return (f"{row['impl']:>16} N={row['N']:>9,} train {row['train_tok_s']:>9.0f} tok/s  "
            f"infer {row['infer_tok_s']:>9.0f} tok/s  fwd {row['fwd_ms']:7.1f} ms  "
            f"bwd {row['bwd_ms']:7.1f} ms  opt {row['opt_ms']:7.1f} ms  "
            f"RSS {row['peak_rss_gb']:5.2f} GB  roofline {row['roofline_frac']:.2f}")


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import FinetuneRequest, finetune, print_report, sizing_line

    summary = finetune(FinetuneRequest(
        base=args.base, data=args.data, adapter=args.adapter, layers=args.layers, experts=args.experts,
        depth=args.depth, heads=args.heads, topk=args.topk, out=args.out, max_steps=args.max_steps,
        overrides=list(args.set),
        eval_bytes=args.eval_bytes, lora_rank=args.lora_rank, match_lora_rank=args.match_lora_rank,
        lora_targets=args.lora_targets, output_gate=args.output_gate, reroute=args.reroute,
        attention_experts=args.attention_experts, attention_lora=args.attention_lora,
        sparse_rows=args.sparse_rows,
        rows_per_step=args.rows_per_step, rows_by_gain=args.rows_by_gain,
        with_embeddings=args.with_embeddings, domain_gate=args.domain_gate,
        gate_prior=args.gate_prior, device=args.device,
        progress=not args.quiet))
    print_report(summary, sizing_line(summary), args.json)
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from .hf_export import export_hf

    print(export_hf(args.run, args.out))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import MODELS, compare

    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        raise UserError(f"unknown --models {unknown}; choose from {', '.join(MODELS)}")
    base = load_config_file(args.config) if args.config else default_run_config()
    overrides = list(args.set) + [f"train.max_steps={args.max_steps}"]
    if args.time_budget is not None:
        overrides.append(f"train.time_budget={args.time_budget}")
    base = base.with_overrides(overrides)
    sweep = None
    if args.sweep:
        key, sep, values = args.sweep.partition("=")
        if not sep or not values:
            raise UserError("--sweep expects KEY=V1,V2,...")
        sweep = (key, values.split(","))
        for v in sweep[1]:
            base.with_overrides([f"{key}={v}"])  # validate every value up front
    summary = compare(base, args.models, args.seeds, Path(args.out), args.data, sweep,
                      echo=(lambda s: None) if args.json else print)
    if args.json:  # the metrics' names (step, tok_s: training) and the comparison's own
        keys = ("model", "val_loss", "val_bpb", "val_bpb_spread", "params", "active_params_per_token",
                "flops_per_token", "peak_rss_gb", "expert_usage", "usage_kl", "dead_experts", "mean_depth",
                "blocks_per_token")
        for row in summary:
            print(json.dumps({k: row[k] for k in keys} | {"step": row["steps"], "tok_s": row["train_tok_s"]}))
    else:
        print((Path(args.out) / "table.md").read_text())
    return 0


def cmd_corpus(args: argparse.Namespace) -> int:
    from .corpus import build_stdlib, write_manifest

    if args.write_manifest:
        if args.manifest:
            raise UserError("--manifest is for --out; --write-manifest makes a new one")
        sizes = write_manifest(args.write_manifest)
        what = f"wrote {args.write_manifest}"
    else:
        sizes = build_stdlib(args.out, args.manifest)
        what = f"wrote {args.out}/train.txt, val.txt, manifest.json"
    print(f"{what}: train {sizes['train_bytes']:,} bytes in {sizes['train_files']} files, "
          f"val {sizes['val_bytes']:,} bytes in {sizes['val_files']} files")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "plot": cmd_plot,
            "bench": cmd_bench, "compare": cmd_compare,
            "finetune": cmd_finetune, "export-hf": cmd_export_hf, "corpus": cmd_corpus}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            PermissionError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except (TrainingStopped, ChildFailed) as exc:  # the run failed, not the command line
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``, job schedulers, ``kill``) into SystemExit, so that the
    interpreter unwinds: ``subprocess.run`` then kills the child it waits on (a compare or bench
    configuration) instead of leaving it running, and ``finally`` blocks run."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def console() -> None:
    """Console-script entry point."""
    exit_on_sigterm()
    keep_freed_memory()
    sys.exit(main())
