"""Throughput benchmarks: one routed layer or a whole model vs the number of experts N.

Every configuration runs in its own process (so peak RSS is per configuration); ratios between
implementations come from the same invocation on the same machine. ``roofline_frac`` is
floor / measured step time with floor = FLOPs / peak + bytes / bandwidth, where peak is a measured
2048^2 fp32 matmul and bandwidth a measured large-tensor copy (bytes read + written per second).

Implementations (``--impl``):
  fractalmoe    FHME at depth 1: fused gather-mix, sparse row gradients, row-wise Adagrad
  peer-dense    the same forward with nn.Embedding tables, dense gradients, torch AdamW (foreach)
  peer-pytorch  PEER from the PEER-pytorch package (pip install fractalmoe[bench])
  pkm-pytorch   PKM from the product-key-memory package
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .experts import expert_mix_reference
from .fhme import FHME
from .optim import ModelOptimizer
from .routing import ProductKeyRouter, gate_scores

LAYER_IMPLS = ("fractalmoe", "peer-dense", "peer-pytorch", "pkm-pytorch")


@dataclass
class Hardware:
    gflops: float  # fp32 matmul
    gbps: float  # bytes read + written per second by a large copy

    @classmethod
    def measure(cls) -> Hardware:
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        flops = _best_time(lambda: a @ b, 5)
        src, dst = torch.randn(64 * 2**20), torch.empty(64 * 2**20)  # 256 MB each
        copy = _best_time(lambda: dst.copy_(src), 5)
        return cls(2 * 2048**3 / flops / 1e9, 2 * src.numel() * 4 / copy / 1e9)


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class DensePEER(nn.Module):
    """Reference dense design: nn.Embedding expert tables (dense gradients), same router."""

    def __init__(self, dim: int, num_experts: int, heads: int, topk: int, key_dim: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.router = ProductKeyRouter(dim, num_experts, heads, topk, key_dim)
        self.down = nn.Embedding(num_experts, dim)
        self.up = nn.Embedding(num_experts, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        scores, idx = self.router(h)
        gates = gate_scores(scores, "softmax").flatten(-2)
        return x + expert_mix_reference(h, idx.flatten(-2), gates, self.down.weight, self.up.weight)


@dataclass
class LayerSpec:
    impl: str
    num_experts: int
    dim: int = 256
    heads: int = 8
    topk: int = 16
    key_dim: int = 256  # both halves: 128 per sub-key, PEER-pytorch's default dim_key
    tokens: int = 2048
    steps: int = 5
    expert_dtype: str = "float32"


def _build_layer(spec: LayerSpec) -> tuple[nn.Module, Callable[[], None], Callable[[], None]]:
    """(module, optimizer step, zero_grad) for one implementation."""
    n, d, h, k, q = spec.num_experts, spec.dim, spec.heads, spec.topk, spec.key_dim
    if spec.impl == "fractalmoe":
        layer: nn.Module = FHME(d, n, depth=1, heads=h, topk=k, key_dim=q,
                                expert_dtype=spec.expert_dtype)
        opt = ModelOptimizer(layer, lr=1e-3, expert_lr=0.05, weight_decay=0.0)
        return layer, opt.step, opt.zero_grad
    if spec.impl == "peer-dense":
        layer = DensePEER(d, n, h, k, q)
    elif spec.impl == "peer-pytorch":
        from PEER_pytorch import PEER

        layer = PEER(d, heads=h, num_experts=n, num_experts_per_head=k, dim_key=q // 2,
                     pre_rmsnorm=True, non_competing_scores=False)
    elif spec.impl == "pkm-pytorch":
        from product_key_memory import PKM

        layer = PKM(d, heads=h, num_keys=int(n**0.5), topk=k, dim_head=q // 2)
    else:
        raise ValueError(f"unknown impl {spec.impl!r}; choose from {', '.join(LAYER_IMPLS)}")
    adamw = torch.optim.AdamW(layer.parameters(), lr=1e-3, foreach=True)
    return layer, adamw.step, lambda: adamw.zero_grad(set_to_none=True)


def _table_bytes(spec: LayerSpec) -> int:
    elem = 2 if spec.expert_dtype == "bfloat16" else 4
    tables = 1 if spec.impl == "pkm-pytorch" else 2
    return tables * spec.num_experts * spec.dim * elem


def _floor_bytes(spec: LayerSpec, unique_rows: float) -> float:
    """Bytes a step must move in the implementation's own design."""
    slots = spec.tokens * spec.heads * spec.topk
    elem = 2 if spec.expert_dtype == "bfloat16" else 4
    row = spec.dim * elem
    if spec.impl == "fractalmoe":
        gathers = 4 * slots * row  # u and v rows: forward dot + mix, backward dot + dx
        grads = 2 * unique_rows * spec.dim * 4  # sparse gradient rows written
        update = 2 * unique_rows * (spec.dim * 4 + 2 * row + 2 * 4)  # grad read, row r/w, state r/w
        return gathers + grads + update
    tables = _table_bytes(spec)
    # gathers, a dense gradient written, AdamW reading p, g, m, v and writing p, m, v
    return 4 * slots * row + tables + 7 * tables


def run_layer(spec: LayerSpec) -> dict[str, Any]:
    """Time forward, backward and optimizer of one layer (call in a fresh process)."""
    torch.manual_seed(0)
    hw = Hardware.measure()
    layer, opt_step, zero_grad = _build_layer(spec)
    x = torch.randn(1, spec.tokens, spec.dim)
    fwd = bwd = opt_t = 0.0
    unique_rows = 0.0
    for i in range(spec.steps + 2):
        t0 = time.perf_counter()
        y = layer(x)
        loss = y.float().square().mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt_step()
        t3 = time.perf_counter()
        if spec.impl == "fractalmoe":
            unique_rows = float(layer.fractal.bank.down.grad.coalesce()._nnz())
        zero_grad()
        if i >= 2:  # two warm-up steps
            fwd, bwd, opt_t = fwd + t1 - t0, bwd + t2 - t1, opt_t + t3 - t2
    fwd, bwd, opt_t = (v / spec.steps for v in (fwd, bwd, opt_t))
    with torch.no_grad():
        layer.eval()
        infer = _best_time(lambda: layer(x), 3)
    step = fwd + bwd + opt_t
    flops = 3 * _layer_flops(spec) * spec.tokens
    floor = flops / (hw.gflops * 1e9) + _floor_bytes(spec, unique_rows) / (hw.gbps * 1e9)
    return {"impl": spec.impl, "N": spec.num_experts, "tokens": spec.tokens,
            "train_tok_s": spec.tokens / step, "infer_tok_s": spec.tokens / infer,
            "fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, "opt_ms": opt_t * 1e3,
            "peak_rss_gb": peak_rss_gb(), "roofline_frac": floor / step,
            "table_gb": _table_bytes(spec) / 1e9, "unique_rows": unique_rows or None,
            "peak_gflops": hw.gflops, "bandwidth_gbps": hw.gbps}


def _layer_flops(spec: LayerSpec) -> float:
    """Forward FLOPs per token: query projection, sub-key scoring, expert dots and mixes."""
    from .experts import meta_expert_tables

    with meta_expert_tables():
        return FHME(spec.dim, spec.num_experts, depth=1, heads=spec.heads, topk=spec.topk,
                    key_dim=spec.key_dim).flops_per_token()


@dataclass
class ModelSpec:
    num_experts: int
    config: str | None = None  # TOML file; default: the training default with these experts
    batch_size: int = 8
    steps: int = 5


def run_model(spec: ModelSpec) -> dict[str, Any]:
    """Train-step and inference throughput of a whole FHME language model."""
    from .config import default_run_config, load_config_file
    from .model import FHMELanguageModel

    torch.manual_seed(0)
    hw = Hardware.measure()
    run = load_config_file(spec.config) if spec.config else default_run_config()
    cfg = run.model.replace(num_experts=spec.num_experts)
    model = FHMELanguageModel(cfg)
    opt = ModelOptimizer(model, run.train.lr, run.train.expert_lr, run.train.weight_decay,
                         run.train.expert_optim)
    idx = torch.randint(0, cfg.vocab_size, (spec.batch_size, cfg.seq_len))
    tokens = idx.numel()
    fwd = bwd = opt_t = 0.0
    for i in range(spec.steps + 2):
        opt.zero_grad()
        t0 = time.perf_counter()
        _, loss = model(idx, idx)
        t1 = time.perf_counter()
        (loss + model.aux_loss()).backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i >= 2:
            fwd, bwd, opt_t = fwd + t1 - t0, bwd + t2 - t1, opt_t + t3 - t2
    fwd, bwd, opt_t = (v / spec.steps for v in (fwd, bwd, opt_t))
    model.eval()
    with torch.no_grad():
        infer = _best_time(lambda: model(idx), 3)
    step = fwd + bwd + opt_t
    floor = 3 * model.flops_per_token() * tokens / (hw.gflops * 1e9)
    return {"impl": "fractalmoe-model", "N": spec.num_experts, "tokens": tokens,
            "layers": cfg.n_layers, "params": model.num_params(),
            "train_tok_s": tokens / step, "infer_tok_s": tokens / infer,
            "fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, "opt_ms": opt_t * 1e3,
            "peak_rss_gb": peak_rss_gb(), "roofline_frac": floor / step,
            "peak_gflops": hw.gflops, "bandwidth_gbps": hw.gbps}


def spawn(kind: str, spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; returns its JSON line (or an error)."""
    # Transparent huge pages for large tensors: page faults on fresh multi-GB-per-step buffers
    # otherwise cost as much as the gathers themselves (read by torch at start-up only).
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "1")}
    proc = subprocess.run([sys.executable, "-m", "fractalmoe.bench", kind, json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**spec, "error": tail}
    return json.loads(lines[-1])


def _child(argv: list[str]) -> None:
    kind, payload = argv[0], json.loads(argv[1])
    result = run_layer(LayerSpec(**payload)) if kind == "layer" else run_model(ModelSpec(**payload))
    print(json.dumps(result))


if __name__ == "__main__":
    _child(sys.argv[1:])


def run_adaptive(run_dir: str, data_path: str | None = None, device: str = "cpu") -> list[dict[str, Any]]:
    """Validation bpb and measured FHME inference time at each fixed depth and with the router."""
    from .checkpoint import load_model_from_run, run_extra
    from .data import ByteDataset
    from .evaluate import evaluate

    model, config, _ = load_model_from_run(run_dir, device)
    layers = model.fhme_layers()
    if not layers:
        raise ValueError(f"{run_dir} has no FHME layers: nothing to compare across depths")
    data = ByteDataset.load(data_path if data_path is not None else run_extra(run_dir).get("data"),
                            config.train.val_fraction, config.model.seq_len)
    spent = [0.0]
    starts: dict[int, float] = {}

    def pre(mod: nn.Module, inp: object) -> None:
        starts[id(mod)] = time.perf_counter()

    def post(mod: nn.Module, inp: object, out: object) -> None:
        spent[0] += time.perf_counter() - starts[id(mod)]

    hooks = [h for layer in layers for h in (layer.register_forward_pre_hook(pre),
                                             layer.register_forward_hook(post))]
    depth = max(layer.depth for layer in layers)
    modes: list[tuple[str, int | None]] = [(f"depth{d}", d) for d in range(1, depth + 1)]
    if any(layer.depth_router is not None for layer in layers):
        modes.append(("adaptive", None))
    rows = []
    for mode, forced in modes:
        model.set_depth(forced)
        times = []
        for _ in range(2):  # the faster of two passes: these machines are noisy
            spent[0] = 0.0
            result = evaluate(model, data, config.train.batch_size, device=device)
            times.append(spent[0])
        rows.append({"mode": mode, "val_bpb": result.val_bpb, "val_loss": result.val_loss,
                     "blocks_per_token": result.blocks_per_token, "mean_depth": result.mean_depth,
                     "flops_per_token": result.flops_per_token, "fhme_ms": min(times) * 1e3,
                     "tokens": result.tokens, "depth_hist": result.depth_hist})
    for h in hooks:
        h.remove()
    model.set_depth(None)
    return rows
