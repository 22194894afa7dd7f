"""Training: a pure ``train_step`` and ``run``, which owns the loop, logging and checkpoints."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from .checkpoint import (
    CheckpointError,
    config_mismatch,
    init_run_dir,
    latest_checkpoint,
    load_checkpoint_state,
    load_model_tensors,
    load_run_config,
    restore_rng,
    run_extra,
    save_checkpoint,
    shard_optimizer_state,
)
from .config import RunConfig, TrainConfig
from .data import ByteDataset, decode, encode
from .distributed import (
    DistContext,
    init_from_env,
    shard_experts,
    shard_tensors,
    table_shards,
    wrap_data_parallel,
)
from .evaluate import evaluate
from .experts import meta_expert_tables
from .model import FHMELanguageModel
from .optim import ModelOptimizer

METRIC_KEYS = ("step", "train_loss", "val_loss", "val_bpb", "tok_s", "lr", "expert_usage",
               "usage_kl", "mean_depth", "blocks_per_token", "flops_per_token", "depth_hist")


class TrainingStopped(RuntimeError):
    """Training could not go on (e.g. too many non-finite steps); the message says why."""


def lr_scale(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_frac at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def train_step(model: FHMELanguageModel, opt: ModelOptimizer, x: Tensor, y: Tensor,
               grad_clip: float, loss_hook: Callable[[Tensor], Tensor] | None = None,
               forward: nn.Module | None = None, ctx: DistContext = DistContext()) -> tuple[float, bool]:
    """One optimisation step. Returns (loss, applied); a non-finite step changes nothing.

    ``forward`` is the module to call (the DDP wrapper when distributed); with several ranks the
    loss is averaged and a step is skipped everywhere if any rank saw a non-finite value.
    """
    opt.zero_grad()
    _, loss = (forward or model)(x, y)
    if loss_hook is not None:
        loss = loss_hook(loss)
    (loss + model.aux_loss().to(loss.device)).backward()
    value = float(loss.detach())
    finite = math.isfinite(value) and opt.grads_finite()
    if ctx.active:
        flags = torch.tensor([value if finite else 0.0, float(finite)])
        dist.all_reduce(flags)
        finite = int(flags[1]) == ctx.world
        value = float(flags[0]) / ctx.world if finite else value
    if not finite:
        opt.zero_grad()
        model.commit_statistics(keep=False)
        return value, False
    opt.clip_dense(grad_clip)
    opt.step()
    model.commit_statistics()
    return value, True


@dataclass
class RunResult:
    run_dir: Path
    step: int
    val_loss: float | None
    val_bpb: float | None
    elapsed_s: float
    tok_s: float
    sample: str
    stopped_by: str  # "max_steps" | "time_budget" | "signal" | "stop_at_step"


class _SignalFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the current step and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _metric_line(**values: Any) -> dict[str, Any]:
    line = {k: None for k in METRIC_KEYS}
    line.update(values)
    return line


def prepare_run(config: RunConfig, out: Path | None, resume: Path | None,
                data_path: str | None, write: bool = True,
                extra: dict[str, Any] | None = None) -> tuple[RunConfig, Path, str | None]:
    """Resolve the run directory and config of a new or resumed run (files written if write)."""
    if resume is None:
        run_dir = out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        if write and (run_dir / "config.json").exists():
            raise ValueError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
        if write:
            init_run_dir(run_dir, config, {"data": data_path, **(extra or {})})
        return config, run_dir, data_path
    saved = load_run_config(resume)
    diff = config_mismatch(saved.model, config.model)
    if diff:
        raise CheckpointError(f"--resume {resume}: the model differs from the checkpoint's "
                              f"({'; '.join(diff)}); drop those overrides")
    saved_extra = run_extra(resume)
    if data_path is None:
        data_path = saved_extra.get("data")
    if write:
        init_run_dir(resume, config, {**saved_extra, "data": data_path})  # training fields may change (max_steps)
    return config, resume, data_path


def _any_rank(ctx: DistContext, value: int) -> int:
    """Max of an int over ranks, so every rank stops (or saves) at the same step."""
    if not ctx.active:
        return value
    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def run(config: RunConfig, out: Path | None = None, resume: Path | None = None,
        data_path: str | None = None, device: str = "cpu", progress: bool = True,
        loss_hook: Callable[[int, Tensor], Tensor] | None = None,
        stop_at_step: int | None = None, log: Callable[[str], None] = print,
        ctx: DistContext | None = None, model_factory: Callable[[], nn.Module] | None = None,
        extra: dict[str, Any] | None = None) -> RunResult:
    """Train (or resume) a model, evaluating, logging and checkpointing as configured.

    Under torchrun (WORLD_SIZE > 1) expert tables are sharded by rows across ranks, dense
    parameters are data-parallel, the configured batch is the global batch, and only rank 0
    logs and writes metrics. ``model_factory`` builds another model (e.g. a frozen base with
    adapters); ``extra`` goes into config.json beside the configs.
    """
    ctx = ctx or init_from_env(device)
    tc, mc = config.train, config.model
    if ctx.active:
        if tc.batch_size % ctx.world:
            raise ValueError(f"batch_size={tc.batch_size} must be divisible by the {ctx.world} ranks")
        names = [str(out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))]
        dist.broadcast_object_list(names)  # one run directory for every rank
        out = Path(names[0]) if resume is None else out
    config, run_dir, data_path = prepare_run(config, out, resume, data_path, ctx.is_main, extra)
    if ctx.active:
        dist.barrier()
    log = log if ctx.is_main else (lambda s: None)
    saved = run_extra(run_dir)
    if model_factory is None and "base" in saved:  # resuming an adapter run
        from .adapters import build_adapted_model

        model_factory = lambda: build_adapted_model(saved["base"], saved["adapter"], device)  # noqa: E731
    data = ByteDataset.load(data_path, tc.val_fraction, mc.seq_len)
    torch.manual_seed(tc.seed)
    with meta_expert_tables(ctx.active and model_factory is None):  # shards only, never whole tables
        model = model_factory() if model_factory else FHMELanguageModel(mc)
    if ctx.active:
        shard_experts(model, ctx)
    model = model.to(device)
    step, elapsed_before, bad_total = 0, 0.0, 0
    ckpt = latest_checkpoint(run_dir) if resume is not None else None
    optim_state: dict | None = None
    if ckpt is not None:
        tensors, optim_state, state = load_checkpoint_state(ckpt)
        load_model_tensors(model, shard_tensors(tensors, model), str(ckpt))
        step, elapsed_before, bad_total = state["step"], state["elapsed_s"], state["bad_steps"]
    opt = ModelOptimizer(model, tc.lr, tc.expert_lr, tc.weight_decay, tc.expert_optim)
    shards = table_shards(model)
    if optim_state is not None:
        rows = {id(p): (b.lo, b.hi) for b in shards.values() for p in (b.down, b.up)}
        opt.load_state_dict(shard_optimizer_state(optim_state, [rows[id(p)] for p in opt.tables])
                            if shards else optim_state)
        restore_rng(state)
        log(f"resumed {run_dir} from {ckpt.name}")  # type: ignore[union-attr]
    forward = wrap_data_parallel(model) if ctx.active else model
    table_rows = {f"{name}.{t}": (b.lo, b.hi, b.num_experts) for name, b in shards.items()
                  for t in ("down", "up")}

    def checkpoint() -> None:
        save_checkpoint(run_dir, step, model, opt.state_dict(),
                        {"elapsed_s": elapsed_before + time.perf_counter() - t0,
                         "bad_steps": bad_total, "data_position": step}, tc.keep_last,
                        ctx.rank, ctx.world, table_rows)

    metrics = (run_dir / "metrics.jsonl").open("a") if ctx.is_main else open(os.devnull, "w")
    tokens_per_step = tc.batch_size * mc.seq_len  # global
    t0 = time.perf_counter()
    budget_s = tc.time_budget * 60 if tc.time_budget > 0 else math.inf
    bar = tqdm(total=tc.max_steps, initial=step, disable=not (progress and ctx.is_main),
               unit="step", dynamic_ncols=True, file=sys.stderr)
    losses: list[float] = []
    bad_run, last_val = 0, None
    stopped_by = "max_steps"
    t_log = time.perf_counter()
    steps_since_log = 0
    model.train()
    with _SignalFlag() as flag:
        while step < tc.max_steps:
            scale = lr_scale(step, tc)
            opt.set_lr_scale(scale)
            x, y = data.train_batch(step, tc.batch_size, mc.seq_len, tc.seed, ctx.rank, ctx.world)
            hook = (lambda loss, s=step: loss_hook(s, loss)) if loss_hook else None
            loss, ok = train_step(model, opt, x.to(device), y.to(device), tc.grad_clip, hook,
                                  forward, ctx)
            step += 1
            steps_since_log += 1
            if ok:
                bad_run = 0
                losses.append(loss)
            else:
                bad_run += 1
                bad_total += 1
                log(f"step {step}: non-finite loss or gradient ({loss}); step skipped "
                    f"({bad_run} in a row, {bad_total} in total)")
                metrics.write(json.dumps(_metric_line(step=step, train_loss=None, skipped=True)) + "\n")
                metrics.flush()
                if bad_run >= tc.max_bad_steps:
                    bar.close()
                    metrics.close()
                    raise TrainingStopped(
                        f"stopped at step {step}: {bad_run} non-finite steps in a row "
                        f"(max_bad_steps={tc.max_bad_steps}); the last good checkpoint is intact; "
                        f"lower lr or raise grad_clip, then --resume {run_dir}")
            bar.update(1)
            is_eval = step % tc.eval_every == 0 or step == tc.max_steps
            if step % tc.log_every == 0 or is_eval:
                now = time.perf_counter()
                tok_s = steps_since_log * tokens_per_step / max(now - t_log, 1e-9)
                line = _metric_line(step=step, tok_s=tok_s, lr=tc.lr * scale,
                                    elapsed_s=elapsed_before + now - t0,
                                    train_loss=sum(losses) / len(losses) if losses else None)
                if is_eval:
                    ev = evaluate(model, data, tc.batch_size, tc.eval_batches * tc.batch_size, device)
                    last_val = ev
                    line.update({k: v for k, v in ev.summary().items() if k in METRIC_KEYS})
                    line["depth_hist"] = ev.depth_hist or None  # per FHME layer
                    if ctx.is_main:
                        bar.write(f"step {step}: val_loss {ev.val_loss:.4f} nats/byte, "
                                  f"val_bpb {ev.val_bpb:.4f}")
                metrics.write(json.dumps(line) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{line['train_loss'] or float('nan'):.3f}", tok_s=f"{tok_s:.0f}")
                losses, steps_since_log, t_log = [], 0, time.perf_counter()
            if step % tc.save_every == 0 and bad_run == 0:  # never save mid-way through a bad run
                checkpoint()
            reason = 1 if flag.signum is not None else 2 if time.perf_counter() - t0 >= budget_s else 0
            reason = _any_rank(ctx, reason)
            if reason or (stop_at_step is not None and step >= stop_at_step):
                stopped_by = {0: "stop_at_step", 1: "signal", 2: "time_budget"}[reason]
                break
        bar.close()
        checkpoint()
    metrics.close()
    elapsed = elapsed_before + time.perf_counter() - t0
    if stopped_by == "signal":
        log(f"signal {flag.signum}: saved checkpoint at step {step} in {run_dir}")
    if stopped_by == "time_budget" and (last_val is None or step % tc.eval_every):
        last_val = evaluate(model, data, tc.batch_size, tc.eval_batches * tc.batch_size, device)
    sample = ""
    if stopped_by in ("max_steps", "time_budget") and tc.sample_bytes > 0:
        sample = generate_sample(model, tc.sample_bytes, device)
        if ctx.is_main:
            (run_dir / "sample.txt").write_text(sample)
    return RunResult(run_dir, step, last_val.val_loss if last_val else None,
                     last_val.val_bpb if last_val else None, elapsed,
                     step * tokens_per_step / max(elapsed, 1e-9), sample, stopped_by)


def generate_sample(model: FHMELanguageModel, num_bytes: int, device: str = "cpu",
                    prompt: str = "\n", temperature: float = 0.8, top_k: int = 40) -> str:
    model.eval()
    idx = encode(prompt).unsqueeze(0).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    out = model.generate(idx, num_bytes, temperature=temperature, top_k=top_k, generator=gen)
    return decode(out[0, idx.shape[1]:].cpu())
