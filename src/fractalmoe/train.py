"""Training: a pure ``train_step`` and ``run``, which owns the loop, logging and checkpoints."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .autocast import autocast_region, training_autocast
from .checkpoint import (
    CheckpointError,
    config_mismatch,
    init_run_dir,
    latest_checkpoint,
    load_model_checkpoint,
    load_run_config,
    read_optim_state,
    read_run_state,
    restore_rng,
    run_extra,
    save_checkpoint,
)
from .config import RunConfig, TrainConfig
from .data import ByteDataset, decode, encode
from .distributed import (
    DistContext,
    broadcast_text,
    init_from_env,
    shard_experts,
    table_rows,
    table_shards,
    wrap_data_parallel,
)
from .evaluate import evaluate
from .experts import meta_expert_tables
from .model import FHMELanguageModel
from .optim import ModelOptimizer, defers_table_grads
from .stats import collect, fold_statistics

METRIC_KEYS = ("step", "train_loss", "val_loss", "val_bpb", "tok_s", "lr", "expert_usage",
               "usage_kl", "mean_depth", "blocks_per_token", "flops_per_token", "depth_hist")


class TrainingStopped(RuntimeError):
    """Training could not go on (e.g. too many non-finite steps); the message says why."""


SYNC_DEBUG_ENV = "FRACTALMOE_SYNC_DEBUG"  # "warn" or "error": CUDA sync debug mode of the step


@contextlib.contextmanager
def cuda_sync_debug(mode: str | int, device: str) -> Iterator[None]:
    """Run a block under ``torch.cuda.set_sync_debug_mode(mode)`` on a CUDA device (no-op on
    CPU or with mode "" / "default" / 0): every host sync inside warns or raises."""
    if not device.startswith("cuda") or mode in ("", "0", 0, "default"):
        yield
        return
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(int(mode) if str(mode).isdigit() else mode)  # type: ignore[arg-type]
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


@contextlib.contextmanager
def allowed_sync() -> Iterator[None]:
    """The step's one deliberate read-back (loss and finiteness), exempt from sync debugging."""
    if not torch.cuda.is_available() or torch.cuda.get_sync_debug_mode() == 0:
        yield
        return
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


def balance_scale(step: int, cfg: TrainConfig) -> float:
    """The routers' balance-loss factor: 1, or with ``balance_steps`` a linear fade to 0 at that
    step, so reads spread while routes form and fit is free afterwards."""
    if cfg.balance_steps == 0:
        return 1.0
    return max(0.0, 1.0 - step / cfg.balance_steps)


def lr_scale(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_frac at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def train_step(model: FHMELanguageModel, opt: ModelOptimizer, x: Tensor, y: Tensor,
               grad_clip: float, loss_hook: Callable[[Tensor], Tensor] | None = None,
               forward: nn.Module | None = None, ctx: DistContext = DistContext(),
               balance_scale: float = 1.0, autocast: torch.dtype | None = None,
               micro_batches: int = 1) -> tuple[float, bool]:
    """One optimisation step. Returns (loss, applied); a non-finite step changes nothing.

    The model's measurements are collected during forward (``stats.collect``), their aux losses
    join the loss, and they are folded after the optimizer step (``stats.fold_statistics``).
    The loss and the finiteness flag are read on the host together: the step's one host sync.
    ``forward`` is the module to call (the DDP wrapper when distributed); with several ranks the
    loss is averaged and a step is skipped everywhere if any rank saw a non-finite value.
    ``balance_scale`` multiplies the routers' balance losses (``balance_scale``'s schedule).
    ``autocast``: the forward and the loss run under ``torch.autocast`` in that dtype; backward
    runs outside it, as autocast asks. ``micro_batches``: the batch runs forward and backward in
    that many equal parts whose gradients add up (gradient accumulation: the mean loss is the
    whole batch's; balance losses are taken per part), gradients all-reduced after the last.
    """
    opt.zero_grad()
    forward = model if forward is None else forward
    parts, losses = [], []
    for i, (x_part, y_part) in enumerate(zip(x.chunk(micro_batches), y.chunk(micro_batches))):
        with _grads_held(forward, i < micro_batches - 1), collect(model, balance_scale) as stats:
            with autocast_region(x.device.type, autocast):
                _, loss = forward(x_part, y_part)
                if loss_hook is not None:
                    loss = loss_hook(loss)
                objective = loss + stats.aux_loss()
            (objective / micro_batches).backward()
        parts.append(stats)
        losses.append(loss.detach().float())
    loss = torch.stack(losses).mean() if micro_batches > 1 else losses[0]
    finite = torch.isfinite(loss) & opt.finite_flag().to(loss.device)
    flags = torch.stack([torch.where(finite, loss, 0.0), finite.float()])
    if ctx.active:  # summed over ranks on the loss's device
        dist.all_reduce(flags)
    with allowed_sync():
        total, finite_ranks, local = torch.cat([flags, loss.view(1)]).tolist()
    if finite_ranks != ctx.world:
        opt.zero_grad()
        return local, False
    opt.clip_dense(grad_clip)
    opt.step()
    fold_statistics(model, parts)
    return total / ctx.world, True


def _grads_held(forward: nn.Module, hold: bool) -> contextlib.AbstractContextManager[object]:
    """DDP's ``no_sync`` for a micro-batch whose gradients the next one adds to: one all-reduce
    per step, after the last."""
    return forward.no_sync() if hold and isinstance(forward, DistributedDataParallel) else contextlib.nullcontext()


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
    data_path = str(Path(data_path).resolve()) if data_path else None  # stored absolute: eval from anywhere
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
    if saved.train.expert_optim != config.train.expert_optim:  # its state would not fit the rule
        raise CheckpointError(f"--resume {resume}: expert_optim={config.train.expert_optim!r}, the "
                              f"checkpoint's optimizer state is {saved.train.expert_optim!r}; drop that override")
    saved_extra = run_extra(resume)
    data_path = data_path or saved_extra.get("data")
    if write:
        init_run_dir(resume, config, {**saved_extra, "data": data_path})  # training fields may change (max_steps)
    return config, resume, data_path


def _any_rank(ctx: DistContext, value: int) -> int:
    """Max of an int over ranks, so every rank stops (or saves) at the same step."""
    if not ctx.active:
        return value
    t = torch.tensor([value], device="cpu")  # gloo side of the group
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
    logs and writes metrics; with ``device="cuda"`` rank r runs on cuda:LOCAL_RANK, and a resume
    reads only the table rows each rank holds. ``model_factory`` builds another model (e.g. a
    frozen base with adapters); ``extra`` goes into config.json beside the configs. The
    environment variable FRACTALMOE_SYNC_DEBUG=warn|error runs each training step (not
    evaluation or checkpoints) under CUDA's sync debug mode.
    """
    ctx = ctx or init_from_env(device)
    device = ctx.device_for(device)
    tc, mc = config.train, config.model
    if ctx.active:
        if tc.batch_size % (ctx.world * tc.grad_accum):
            raise ValueError(f"batch_size={tc.batch_size} must be divisible by the {ctx.world} ranks "
                             f"times grad_accum={tc.grad_accum}")
        if mc.adaptive_depth and mc.balance_rate > 0:
            raise ValueError("balance_rate with adaptive_depth cannot train on several ranks: ranks "
                             "route different token counts past stage 1, and the selection biases "
                             "fold the same choices on every rank; use balance_loss instead")
        name = broadcast_text(str(out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")))
        out = Path(name) if resume is None else out  # one run directory for every rank
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
    if tc.activation_checkpointing:
        if not isinstance(model, FHMELanguageModel):
            raise ValueError("activation_checkpointing: only for FractalMoE language models")
        model.checkpoint_blocks = True
    step, elapsed_before, bad_total, best_val = 0, 0.0, 0, math.inf
    ckpt = latest_checkpoint(run_dir) if resume is not None else None
    rows = table_rows(model)  # this rank's rows of every sharded table (empty at P = 1)
    if ckpt is not None:  # only the rows this rank holds are read
        load_model_checkpoint(model, ckpt, rows)
        state = read_run_state(ckpt)
        step, elapsed_before, bad_total = state["step"], state["elapsed_s"], state["bad_steps"]
        best_val = math.inf if state.get("best_val") is None else state["best_val"]
    # Adapter runs keep what they asked for (sparse-row fine-tuning masks the sparse .grad).
    deferred = (defers_table_grads(model, tc.deferred_table_grads, tc.expert_optim) if model_factory is None
                else tc.deferred_table_grads)
    opt = ModelOptimizer(model, tc.lr, tc.expert_lr, tc.weight_decay, tc.expert_optim, tc.beta2,
                         deferred, tc.fused_row_update, tc.stochastic_rounding)
    if ckpt is not None:
        owned = {id(p): (b.lo, b.hi) for b in table_shards(model).values() for p in b.tables().values()}
        opt.load_state_dict(read_optim_state(ckpt, state, [owned.get(id(p)) for p in opt.tables]))
        restore_rng(state)
        log(f"resumed {run_dir} from {ckpt.name}")
    forward = wrap_data_parallel(model, device) if ctx.active else model
    sync_debug = os.environ.get(SYNC_DEBUG_ENV, "")

    saved_step = step if ckpt is not None else None  # the step the newest checkpoint holds

    def checkpoint(best: bool = False) -> None:
        nonlocal saved_step
        saved_step = step
        save_checkpoint(run_dir, step, model, opt.state_dict(),
                        {"elapsed_s": elapsed_before + time.perf_counter() - t0,
                         "bad_steps": bad_total, "data_position": step,
                         "best_val": best_val if math.isfinite(best_val) else None},
                        tc.keep_last, ctx.rank, ctx.world, rows, best)

    metrics = (run_dir / "metrics.jsonl").open("a") if ctx.is_main else open(os.devnull, "w")
    tokens_per_step = tc.batch_size * mc.seq_len  # global
    t0 = time.perf_counter()
    budget_s = tc.time_budget * 60 if tc.time_budget > 0 else math.inf
    autocast = training_autocast(tc.autocast)
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
            x, y = x.to(device), y.to(device)  # a blocking copy: outside the sync-debugged step
            hook = (lambda loss, s=step: loss_hook(s, loss)) if loss_hook else None
            with cuda_sync_debug(sync_debug, device):
                loss, ok = train_step(model, opt, x, y, tc.grad_clip, hook, forward, ctx,
                                      balance_scale(step, tc), autocast, tc.grad_accum)
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
            if tc.keep_best and is_eval and bad_run == 0 and last_val is not None and last_val.val_loss < best_val:
                best_val = last_val.val_loss
                checkpoint(best=True)
            elif step % tc.save_every == 0 and bad_run == 0:  # never save mid-way through a bad run
                checkpoint()
            reason = 1 if flag.signum is not None else 2 if time.perf_counter() - t0 >= budget_s else 0
            reason = _any_rank(ctx, reason)
            if reason or (stop_at_step is not None and step >= stop_at_step):
                stopped_by = {0: "stop_at_step", 1: "signal", 2: "time_budget"}[reason]
                break
        bar.close()
        if saved_step != step:  # not written again when the last step saved one already
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
