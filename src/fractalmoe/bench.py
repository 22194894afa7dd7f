"""Throughput benchmarks: one routed layer or a whole model vs the number of experts N.

Every configuration runs in its own process (so peak RSS is per configuration); ratios between
implementations come from the same invocation on the same machine. The layer benchmark (its
implementations, hygiene, repeats and ratios) lives in :mod:`fractalmoe.bench_layer`, the roofline
(peak, bandwidth, FLOPs and bytes of a step) in :mod:`fractalmoe.roofline`.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .autocast import autocast_region, training_autocast
from .experts import expert_tables
from .host_memory import keep_freed_memory
from .optim import ModelOptimizer, defers_table_grads
from .roofline import ADAMW_BYTES_PER_PARAM, ROW_READS, best_time, copy_gbps, matmul_gflops, synchronize


def check_device(device: str) -> None:
    """A benchmark's --device: cpu, or cuda where this PyTorch sees one (ValueError, one line)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: the benchmarks run on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this PyTorch sees no CUDA device")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def device_peak_gb(device: str) -> dict[str, float]:
    """Peak memory the device's allocator handed out, in GB (CUDA only: on the CPU it is the RSS)."""
    if torch.device(device).type != "cuda":
        return {}
    return {"peak_device_gb": torch.cuda.max_memory_allocated(device) / 1e9}


def peak_rss_gb() -> float:
    """Peak resident set size of this process in GB (10**9 bytes, the unit of table sizes).

    Linux: VmHWM, the peak of this process's own memory map. ``ru_maxrss`` would also count the
    parent's peak, which an exec from a vfork'ed child (how subprocess starts the benchmark's
    fresh processes) carries over."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9  # kB (KiB)
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss: KiB on Linux


@dataclass
class ModelSpec:
    num_experts: int
    config: str | None = None  # TOML file; default: the training default with these experts
    batch_size: int = 8
    steps: int = 5
    overrides: list[str] = field(default_factory=list)  # key=value on top of the config, as --set
    device: str = "cpu"
    peak_gflops: float | None = None  # measured fp32 matmul peak (None: measured here)
    copy_gbps: float | None = None  # measured large-tensor copy bandwidth (None: measured here)


def run_model(spec: ModelSpec) -> dict[str, Any]:
    """Train-step and inference throughput of a whole FHME language model."""
    from .config import default_run_config, load_config_file
    from .model import FHMELanguageModel
    from .stats import collect, fold_statistics

    torch.manual_seed(0)
    device = spec.device
    gflops = spec.peak_gflops or matmul_gflops(device=device)
    run = (load_config_file(spec.config) if spec.config else default_run_config()).with_overrides(spec.overrides)
    cfg = run.model.replace(num_experts=spec.num_experts)
    with torch.device(device):
        model = FHMELanguageModel(cfg)
    opt = ModelOptimizer(model, run.train.lr, run.train.expert_lr, run.train.weight_decay,
                         run.train.expert_optim,
                         deferred_table_grads=defers_table_grads(model, run.train.deferred_table_grads,
                                                                 run.train.expert_optim),
                         fused_row_update=run.train.fused_row_update,
                         stochastic_rounding=run.train.stochastic_rounding)
    idx = torch.randint(0, cfg.vocab_size, (spec.batch_size, cfg.seq_len), device=device)
    tokens = idx.numel()
    fwd = bwd = opt_t = 0.0
    faults = system_s = 0.0  # host page faults and kernel time over the timed steps
    dtype = training_autocast(run.train.autocast)  # the forward as `train` runs it

    def clock() -> float:  # on CUDA, after the queued work: phases are timed without overlap
        synchronize(device)
        return time.perf_counter()

    for i in range(spec.steps + 2):
        opt.zero_grad()
        t0 = clock()
        before = resource.getrusage(resource.RUSAGE_SELF)
        with collect(model) as stats:
            with autocast_region(idx.device.type, dtype):
                _, loss = model(idx, idx)
            t1 = clock()
            (loss + stats.aux_loss()).backward()
        t2 = clock()
        opt.step()
        fold_statistics(model, stats)
        t3 = clock()
        after = resource.getrusage(resource.RUSAGE_SELF)
        if i >= 2:
            fwd, bwd, opt_t = fwd + t1 - t0, bwd + t2 - t1, opt_t + t3 - t2
            faults, system_s = faults + after.ru_minflt - before.ru_minflt, system_s + after.ru_stime - before.ru_stime
    fwd, bwd, opt_t = (v / spec.steps for v in (fwd, bwd, opt_t))
    model.eval()
    with torch.no_grad(), autocast_region(idx.device.type, dtype):
        infer = best_time(lambda: model(idx), 3, device)
    step = fwd + bwd + opt_t
    rss, device_gb = peak_rss_gb(), device_peak_gb(device)  # before a copy measured here adds its buffers
    gbps = spec.copy_gbps or copy_gbps(device=device)
    nbytes = model_step_bytes(model, tokens)
    floor = 3 * model.flops_per_token() * tokens / (gflops * 1e9) + nbytes / (gbps * 1e9)
    return {"impl": "fractalmoe-model", "N": spec.num_experts, "tokens": tokens,
            "layers": cfg.n_layers, "params": model.num_params(),
            "train_tok_s": tokens / step, "infer_tok_s": tokens / infer,
            "fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, "opt_ms": opt_t * 1e3, "step_ms": step * 1e3,
            "peak_rss_gb": rss, **device_gb, "bytes": nbytes,
            "page_faults_per_step": faults / spec.steps, "system_ms_per_step": system_s * 1e3 / spec.steps,
            "roofline_frac": floor / step, "peak_gflops": gflops, "copy_gbps": gbps, "autocast": run.train.autocast}


def model_step_bytes(model: nn.Module, tokens: int) -> float:
    """The least a training step of the model moves: the expert-table rows its forward reads
    (FHME layers at full depth), read again by the backward, and AdamW's traffic over the dense
    parameters. The expert tables'
    update is left out (its touched rows are not counted here: ``roofline.step_bytes`` counts
    them for one layer), so this is a looser floor than the layer's."""
    from .fhme import FHME

    tables = {id(t) for t in expert_tables(model)}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in tables)
    rows = sum(m.row_bytes_per_token() for m in model.modules() if isinstance(m, FHME))
    return ROW_READS * tokens * rows + ADAMW_BYTES_PER_PARAM * dense


class ChildFailed(RuntimeError):
    """A configuration's fresh process failed; the message is the last line it wrote on stderr."""


def run_child(args: list[str], timeout: float | None = None) -> dict[str, Any]:
    """``python -m *args`` in a fresh interpreter (peak RSS is then its own); returns the last
    JSON line it printed, or raises ``ChildFailed``."""
    # Transparent huge pages for large tensors: page faults on fresh multi-GB-per-step buffers
    # otherwise cost as much as the gathers themselves (read by torch at start-up only).
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "1")}
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise ChildFailed((proc.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(lines[-1])


def spawn(kind: str, spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run one benchmark configuration in a fresh interpreter; returns its JSON line (or an error
    row: one failed configuration does not end the benchmark)."""
    try:
        return run_child(["fractalmoe.bench", kind, json.dumps(spec)], timeout)
    except ChildFailed as exc:
        return {**spec, "error": str(exc)}


def fixed_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower envelope of fixed-depth (blocks/token, bpb) points: those no point with at most
    as many blocks beats, by blocks."""
    front: list[tuple[float, float]] = []
    for blocks, bpb in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or bpb < front[-1][1]:
            front.append((blocks, bpb))
    return front


def frontier_at(front: list[tuple[float, float]], blocks: float) -> float | None:
    """The envelope's bpb at ``blocks``, linear between its points; flat after the last (more
    blocks never hurt: the cheaper point is still available), None before the first."""
    if not front or blocks < front[0][0]:
        return None
    for (b0, y0), (b1, y1) in zip(front, front[1:]):
        if b0 <= blocks <= b1:
            return y0 + (y1 - y0) * (blocks - b0) / (b1 - b0)
    return front[-1][1]


def rows_frontier(rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """``fixed_frontier`` of the fixed-depth rows (every mode but "adaptive") of ``run_adaptive``."""
    return fixed_frontier([(r["blocks_per_token"], r["val_bpb"]) for r in rows if r["mode"] != "adaptive"])


def adaptive_frontier(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of ``run_adaptive`` over several runs (each with a "run" key): every depth mode of
    every run is a fixed-depth point; each run's "adaptive" row gains the envelope's bpb at its
    blocks/token and its margin below it (positive: the adaptive model beats fixed depth)."""
    front = rows_frontier(rows)
    out = []
    for r in rows:
        if r["mode"] == "adaptive":
            level = frontier_at(front, r["blocks_per_token"])
            r = {**r, "frontier_bpb": level, "margin": None if level is None else level - r["val_bpb"]}
        out.append(r)
    return out


def _child(argv: list[str]) -> None:
    kind, payload = argv[0], json.loads(argv[1])
    if kind == "layer":
        from .bench_layer import child_main

        result = child_main(payload)
    else:  # a training step as `train` runs it: freed memory kept (one layer's tables alone, above, leave it)
        keep_freed_memory()
        result = run_model(ModelSpec(**payload))
    print(json.dumps(result))


if __name__ == "__main__":
    _child(sys.argv[1:])


def run_adaptive(run_dir: str, data_path: str | None = None, device: str = "cpu",
                 eval_bytes: int | None = None, passes: int = 3, force: bool = False,
                 wait_idle_s: float = 0.0) -> list[dict[str, Any]]:
    """Validation bpb and measured FHME inference time at each fixed depth and with the router:
    after one untimed warm-up pass over every mode, modes alternated, the median of ``passes``
    timed passes each (these machines are noisy); over the whole validation split, or its first
    ``eval_bytes``. On a busy machine (after waiting up to ``wait_idle_s``) a one-line
    ValueError unless ``force``."""
    from .bench_hygiene import wait_until_idle
    from .checkpoint import load_model_from_run, load_run_data
    from .evaluate import evaluate

    model, config, _ = load_model_from_run(run_dir, device)
    layers = model.fhme_layers()
    if not layers:
        raise ValueError(f"{run_dir} has no FHME layers: nothing to compare across depths")
    data = load_run_data(run_dir, config, data_path)
    if eval_bytes is not None:
        data = data.val_prefix(eval_bytes, config.model.seq_len)
    reason = None if force else wait_until_idle(wait_idle_s)  # after the user's mistakes, before timing
    if reason is not None:
        raise ValueError(reason)
    spent = [0.0]
    starts: dict[int, float] = {}

    def pre(mod: nn.Module, inp: object) -> None:
        synchronize(device)  # on CUDA: the layer's own work, not the queue before it or its launches
        starts[id(mod)] = time.perf_counter()

    def post(mod: nn.Module, inp: object, out: object) -> None:
        synchronize(device)
        spent[0] += time.perf_counter() - starts[id(mod)]

    hooks = [h for layer in layers for h in (layer.register_forward_pre_hook(pre),
                                             layer.register_forward_hook(post))]
    depth = max(layer.depth for layer in layers)
    modes: list[tuple[str, int | None]] = [(f"depth{d}", d) for d in range(1, depth + 1)]
    if any(layer.depth_router is not None for layer in layers):
        modes.append(("adaptive", None))
    results: dict[str, Any] = {}
    times: dict[str, list[float]] = {mode: [] for mode, _ in modes}
    for i in range(passes + 1):  # pass 0 warms up (allocator, caches, lazy init): not timed
        for mode, forced in modes:
            model.set_depth(forced)
            spent[0] = 0.0
            results[mode] = evaluate(model, data, config.train.batch_size, device=device)
            if i > 0:
                times[mode].append(spent[0])
    rows = []
    for mode, _ in modes:
        result = results[mode]
        rows.append({"mode": mode, "val_bpb": result.val_bpb, "val_loss": result.val_loss,
                     "blocks_per_token": result.blocks_per_token, "mean_depth": result.mean_depth,
                     "flops_per_token": result.flops_per_token,
                     "fhme_ms": statistics.median(times[mode]) * 1e3,
                     "tokens": result.tokens, "depth_hist": result.depth_hist})
    for h in hooks:
        h.remove()
    model.set_depth(None)
    return rows
