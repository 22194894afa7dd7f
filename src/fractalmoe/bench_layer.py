"""``fractalmoe bench layer``: one routed layer's training step, implementation by implementation.

Every implementation runs the same shapes (default: width 256, 8 heads x top-16, 2048 tokens) and
is paired with an update rule, so that a design and an optimizer rule can be told apart:

  =============================  ================  ==============================================
  impl                           expert rule       what it is
  =============================  ================  ==============================================
  fractalmoe                     row-wise Adagrad  FHME at depth 1: fused gather-mix, sparse row
                                                   gradients
  fractalmoe-lazy-adam           lazy Adam         the same layer, SparseAdam semantics on
                                                   touched rows
  fractalmoe-deferred            row-wise Adagrad  fractalmoe with deferred table gradients
                                                   (formed in the step: one row buffer fewer)
  fractalmoe-lazy-adam-deferred  lazy Adam         fractalmoe-lazy-adam, deferred the same way
  fractalmoe-lazy-adam-fused     lazy Adam         fractalmoe-lazy-adam-deferred, each chunk's
                                                   row gather, update and write-back as one
                                                   compiled kernel (``fused_row_update``)
  fractalmoe-deferred-sr         row-wise Adagrad  fractalmoe-deferred on bfloat16 tables with
                                                   ``stochastic_rounding`` (bfloat16 only)
  peer-pytorch-sparse            lazy Adam         PEER-pytorch, expert embeddings with
                                                   ``sparse=True``, torch.optim.SparseAdam for
                                                   them, AdamW for the rest
  peer-pytorch                   dense AdamW       PEER-pytorch as published (dense gradients)
  peer-dense                     dense AdamW       our router with nn.Embedding tables (dense
                                                   gradients)
  pkm-pytorch                    dense AdamW       PKM from product-key-memory (one value table)
  =============================  ================  ==============================================

``--expert-dtype float32,bfloat16`` runs every fractalmoe impl with each table dtype, alternated
in the same run (the other impls keep fp32 tables).

Hygiene (``bench_hygiene``): the run refuses to start while another process has PyTorch loaded
or the 1-minute load average is above 0.5 (``--force`` skips the check). Every repeat of every
configuration is a fresh process (2 warm-up steps, then the timed steps), configurations alternate
round-robin (A B A B ... for ``repeats`` rounds) and the reported numbers are medians over the
repeats. Peak and bandwidth (see :mod:`fractalmoe.roofline`) are measured once at the start (the
random-row bandwidth once per table dtype: rows of that many bytes) and shared by all
configurations, so roofline fractions and ratios of one run are comparable.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .bench import check_device, device_peak_gb, peak_rss_gb, spawn
from .bench_hygiene import schedule, wait_until_idle
from .experts import deferred_grad, expert_mix_reference
from .product_keys import key_table_sizes
from .roofline import (RULE_NAMES, Hardware, Shape, best_time, bytes_per_expert, copy_gbps, floor_seconds,
                       gather_gbps, matmul_gflops, step_bytes, step_flops, synchronize)


@dataclass(frozen=True)
class ImplInfo:
    rule: str  # update rule of the expert tables (roofline.RULES)
    tables: int  # expert tables per layer: 2 (down, up) or 1 (PKM values)
    package: str | None  # module an optional dependency provides
    deferred: bool = False  # fractalmoe impls: deferred table gradients
    fused: bool = False  # fractalmoe impls: the one-kernel row update (fused_row_update)
    stochastic: bool = False  # fractalmoe impls: bfloat16 rows rounded stochastically (bfloat16 tables only)


IMPLS = {
    "fractalmoe": ImplInfo("rowwise_adagrad", 2, None),
    "fractalmoe-lazy-adam": ImplInfo("lazy_adam", 2, None),
    "fractalmoe-deferred": ImplInfo("rowwise_adagrad", 2, None, deferred=True),
    "fractalmoe-lazy-adam-deferred": ImplInfo("lazy_adam", 2, None, deferred=True),
    "fractalmoe-lazy-adam-fused": ImplInfo("lazy_adam", 2, None, deferred=True, fused=True),
    "fractalmoe-deferred-sr": ImplInfo("rowwise_adagrad", 2, None, deferred=True, stochastic=True),
    "peer-pytorch-sparse": ImplInfo("lazy_adam", 2, "PEER_pytorch"),
    "peer-pytorch": ImplInfo("dense_adamw", 2, "PEER_pytorch"),
    "peer-dense": ImplInfo("dense_adamw", 2, None),
    "pkm-pytorch": ImplInfo("dense_adamw", 1, "product_key_memory"),
}
LAYER_IMPLS = tuple(IMPLS)


def impl_name(impl: str, expert_dtype: str) -> str:
    """An impl as tables and ratios name it: with its table dtype where that is not float32."""
    return impl if expert_dtype == "float32" else f"{impl}, {expert_dtype} tables"


def impl_dtypes(impl: str, expert_dtypes: tuple[str, ...] | list[str]) -> list[str]:
    """The table dtypes an impl runs with: ours each one asked for (those that round stochastically:
    bfloat16 only), the others float32."""
    if not impl.startswith("fractalmoe"):
        return ["float32"]
    return [d for d in expert_dtypes if d == "bfloat16" or not IMPLS[impl].stochastic]


def impl_available(impl: str) -> bool:
    package = IMPLS[impl].package
    return package is None or importlib.util.find_spec(package) is not None


# --- the implementations ---------------------------------------------------------------------


class DensePEER(nn.Module):
    """Reference dense design: nn.Embedding expert tables (dense gradients), our router."""

    def __init__(self, dim: int, num_experts: int, heads: int, topk: int, key_dim: int) -> None:
        from .routing import ProductKeyRouter

        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.router = ProductKeyRouter(dim, num_experts, heads, topk, key_dim)
        self.down = nn.Embedding(num_experts, dim)
        self.up = nn.Embedding(num_experts, dim)

    def forward(self, x: Tensor) -> Tensor:
        from .routing import gate_scores

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
    expert_dtype: str = "float32"  # fractalmoe impls only; the others keep fp32 tables
    warmup: int = 2
    key_parts: int = 2  # fractalmoe impls only: product keys of P parts
    device: str = "cpu"

    @property
    def name(self) -> str:
        return impl_name(self.impl, self.shape().expert_dtype)

    def shape(self) -> Shape:
        dtype = self.expert_dtype if self.impl.startswith("fractalmoe") else "float32"
        return Shape(self.num_experts, self.dim, self.heads, self.topk, self.key_dim, self.tokens, dtype,
                     self.key_parts)


@dataclass
class Built:
    layer: nn.Module
    step: Callable[[], None]
    zero_grad: Callable[[], None]
    tables: list[Tensor]  # the expert tables (touched rows are counted on the first)


def _adamw(params: list[Tensor]) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=1e-3, foreach=True)


def build_impl(spec: LayerSpec) -> Built:
    """The layer, its optimizer step and zero_grad, for one implementation, on ``spec.device``."""
    if spec.impl not in IMPLS:
        raise ValueError(f"unknown impl {spec.impl!r}; choose from {', '.join(LAYER_IMPLS)}")
    with torch.device(spec.device):  # tables are made where they live: no host copy of 1M rows
        return _build(spec)


def _build(spec: LayerSpec) -> Built:
    n, d, h, k, q = spec.num_experts, spec.dim, spec.heads, spec.topk, spec.key_dim
    if spec.impl.startswith("fractalmoe"):
        from .fhme import FHME
        from .optim import ModelOptimizer

        layer: nn.Module = FHME(d, n, depth=1, heads=h, topk=k, key_dim=q, expert_dtype=spec.expert_dtype,
                                key_parts=spec.key_parts)
        info = IMPLS[spec.impl]
        lazy = info.rule == "lazy_adam"
        opt = ModelOptimizer(layer, lr=1e-3, expert_lr=1e-3 if lazy else 0.05, weight_decay=0.0,
                             expert_optim=info.rule, deferred_table_grads=info.deferred,
                             fused_row_update=info.fused, stochastic_rounding=info.stochastic)
        return Built(layer, opt.step, opt.zero_grad, opt.tables)
    if spec.impl.startswith("peer-pytorch"):
        from PEER_pytorch import PEER

        layer = PEER(d, heads=h, num_experts=n, num_experts_per_head=k, dim_key=q // 2,
                     pre_rmsnorm=True, non_competing_scores=False)
        embeds = [layer.weight_down_embed, layer.weight_up_embed]
        tables = [e.weight for e in embeds]
        if spec.impl == "peer-pytorch-sparse":
            for e in embeds:  # nn.Embedding.forward passes self.sparse to F.embedding
                e.sparse = True
            rest = [p for p in layer.parameters() if all(p is not t for t in tables)]
            adamw, sparse_adam = _adamw(rest), torch.optim.SparseAdam(tables, lr=1e-3)

            def step() -> None:
                adamw.step()
                sparse_adam.step()

            def zero_grad() -> None:
                adamw.zero_grad(set_to_none=True)
                sparse_adam.zero_grad(set_to_none=True)

            return Built(layer, step, zero_grad, tables)
    elif spec.impl == "peer-dense":
        layer = DensePEER(d, n, h, k, q)
        tables = [layer.down.weight, layer.up.weight]
    else:
        from product_key_memory import PKM

        layer = PKM(d, heads=h, num_keys=math.isqrt(n), topk=k, dim_head=q // 2)
        tables = [layer.values.weight]
    opt = _adamw(list(layer.parameters()))
    return Built(layer, opt.step, lambda: opt.zero_grad(set_to_none=True), tables)


def touched_rows(table: Tensor) -> int:
    """Rows of a table that a step's gradient touches (sparse or deferred: its distinct rows;
    dense: nonzero)."""
    deferred = deferred_grad(table)
    if deferred is not None:
        return deferred.touched_rows()
    grad = table.grad
    if grad is None:
        return 0
    if grad.is_sparse:
        return int(grad.coalesce()._nnz())
    return int(grad.ne(0).any(dim=1).sum())


def run_layer(spec: LayerSpec, hw: Hardware) -> dict[str, Any]:
    """Time forward, backward and optimizer of one layer (meant for a fresh process). On CUDA the
    device is synchronized at each phase boundary, so phases are timed without overlap."""
    torch.manual_seed(0)
    built = build_impl(spec)
    device = spec.device
    x = torch.randn(1, spec.tokens, spec.dim, device=device)
    phases: list[tuple[float, float, float]] = []
    touched = 0
    total = spec.warmup + spec.steps

    def clock() -> float:
        synchronize(device)
        return time.perf_counter()

    for i in range(total):
        t0 = clock()
        y = built.layer(x)
        loss = y.float().square().mean()
        t1 = clock()
        loss.backward()
        t2 = clock()
        built.step()
        t3 = clock()
        if i == total - 1:
            touched = touched_rows(built.tables[0])
        built.zero_grad()
        if i >= spec.warmup:
            phases.append((t1 - t0, t2 - t1, t3 - t2))
    fwd, bwd, opt = (sum(p[j] for p in phases) / len(phases) for j in range(3))
    built.layer.eval()
    with torch.no_grad():
        infer = best_time(lambda: built.layer(x), 3, device)
    info, shape = IMPLS[spec.impl], spec.shape()
    flops = step_flops(shape, info.tables)
    nbytes = step_bytes(shape, info.rule, touched, info.tables)
    step = fwd + bwd + opt
    floor, floor_copy = (floor_seconds(flops, nbytes.total, hw, streaming) for streaming in (False, True))
    return {"impl": spec.impl, "rule": info.rule, "N": spec.num_experts, "tokens": spec.tokens,
            "dim": spec.dim, "heads": spec.heads, "topk": spec.topk, "key_dim": spec.key_dim,
            "key_parts": spec.key_parts,
            "expert_dtype": shape.expert_dtype,
            "fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, "opt_ms": opt * 1e3, "step_ms": step * 1e3,
            "infer_ms": infer * 1e3, "train_tok_s": spec.tokens / step, "infer_tok_s": spec.tokens / infer,
            "peak_rss_gb": peak_rss_gb(), **device_peak_gb(device), "touched_rows": touched,
            "table_gb": info.tables * shape.num_experts * shape.dim * shape.elem / 1e9,
            "bytes_per_expert": bytes_per_expert(shape, info.rule, info.tables),
            "bytes_per_token": nbytes.forward_read / spec.tokens,
            "flops": flops, "bytes": nbytes.total, "floor_ms": floor * 1e3, "roofline_frac": floor / step,
            "floor_copy_ms": floor_copy * 1e3, "roofline_frac_copy": floor_copy / step,
            "peak_gflops": hw.gflops, "bandwidth_gbps": hw.gbps, "copy_gbps": hw.copy_gbps}


def child_main(payload: dict[str, Any]) -> dict[str, Any]:
    """Entry of ``python -m fractalmoe.bench layer JSON``: a LayerSpec plus ``hw``."""
    hw = Hardware(**payload.pop("hw"))
    return run_layer(LayerSpec(**payload), hw)


def spawn_layer(spec: LayerSpec, hw: Hardware, timeout: float = 1800) -> dict[str, Any]:
    """One repeat of one configuration in a fresh interpreter."""
    try:
        row = spawn("layer", {**asdict(spec), "hw": asdict(hw)}, timeout)
    except subprocess.TimeoutExpired:
        row = {"error": f"timed out after {timeout:.0f} s"}
    if "error" in row:
        return {"impl": spec.impl, "N": spec.num_experts, "expert_dtype": spec.shape().expert_dtype,
                "error": row["error"]}
    return row


_MEDIANS = ("fwd_ms", "bwd_ms", "opt_ms", "step_ms", "infer_ms", "peak_rss_gb", "peak_device_gb",
            "touched_rows", "bytes", "floor_ms", "floor_copy_ms")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats of one configuration; throughputs and roofline_frac from the
    median step time. A failed repeat makes the configuration an error row."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return {**{k: failed[0][k] for k in ("impl", "N", "expert_dtype", "error") if k in failed[0]},
                "repeats": len(runs)}
    row = {k: v for k, v in runs[0].items() if k not in _MEDIANS}
    for key in _MEDIANS:
        if key in runs[0]:  # peak_device_gb: CUDA runs only
            row[key] = statistics.median(r[key] for r in runs)
    row["train_tok_s"] = row["tokens"] / (row["step_ms"] / 1e3)
    row["infer_tok_s"] = row["tokens"] / (row["infer_ms"] / 1e3)
    row["roofline_frac"] = row["floor_ms"] / row["step_ms"]
    row["roofline_frac_copy"] = row["floor_copy_ms"] / row["step_ms"]
    row["repeats"] = len(runs)
    row["step_ms_runs"] = [r["step_ms"] for r in runs]
    return row


def run_layer_bench(specs: list[LayerSpec], repeats: int, hw: dict[str, Hardware],
                    runner: Callable[[LayerSpec, Hardware], dict[str, Any]] | None = None,
                    progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every spec ``repeats`` times, alternating; one median row per spec, in spec order.
    ``hw``: the machine measured with rows of each table dtype the specs use. ``runner`` runs one
    repeat (default: a fresh process each). A configuration that fails is not repeated."""
    runner = runner or spawn_layer
    runs: list[list[dict[str, Any]]] = [[] for _ in specs]
    order = schedule(len(specs), repeats)
    for n, (rep, c) in enumerate(order, start=1):
        spec = specs[c]
        if any("error" in r for r in runs[c]):
            continue
        row = runner(spec, hw[spec.shape().expert_dtype])
        runs[c].append(row)
        if progress is not None:
            what = f"failed: {row['error']}" if "error" in row else f"{row['step_ms']:.1f} ms/step"
            progress(f"[{n}/{len(order)}] {spec.name} N={spec.num_experts:,} repeat {rep + 1}/{repeats}: {what}")
    return [summarize(r) for r in runs]


def _ratio(label: str, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Train-throughput ratio a / b (= b's step time / a's), its range over the rounds, and the
    most it could be on this machine: b's step time over a's roofline floor (a at roofline_frac 1).
    A goal above that ceiling asks a to move fewer bytes than its update rule must."""
    rounds = [tb / ta for ta, tb in zip(a["step_ms_runs"], b["step_ms_runs"])]
    return {"label": label, "ratio": b["step_ms"] / a["step_ms"],
            "round_min": min(rounds), "round_max": max(rounds), "floor_ratio": b["step_ms"] / a["floor_ms"]}


def headline_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Same-run ratios of train tok/s: our layer vs PEER-pytorch under the same rule and under
    different rules, our layer at the largest N vs the smallest, and bfloat16 vs float32 tables."""
    ok = {(r["impl"], r.get("expert_dtype", "float32"), r["N"]): r for r in rows if "error" not in r}
    sizes = sorted({n for _, _, n in ok})
    dtypes = sorted({dt for _, dt, _ in ok}, reverse=True)  # float32 first
    ours = [(i, dt) for i in LAYER_IMPLS if i.startswith("fractalmoe") for dt in dtypes]
    out = []
    for (a, dt), b in itertools.product(ours, ("peer-pytorch-sparse", "peer-pytorch")):
        ra, rb = RULE_NAMES[IMPLS[a].rule], RULE_NAMES[IMPLS[b].rule]
        kind = f"same rule ({ra})" if ra == rb else f"different rules ({ra} vs {rb})"
        for n in sizes:
            if (a, dt, n) in ok and (b, "float32", n) in ok:
                out.append(_ratio(f"{kind}: {impl_name(a, dt)} vs {b}, N={n:,}", ok[(a, dt, n)],
                                  ok[(b, "float32", n)]))
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        for impl, dt in ours:
            if (impl, dt, lo) in ok and (impl, dt, hi) in ok:
                out.append(_ratio(f"{impl_name(impl, dt)} ({RULE_NAMES[IMPLS[impl].rule]}): N={hi:,} vs N={lo:,}",
                                  ok[(impl, dt, hi)], ok[(impl, dt, lo)]))
    for (impl, dt), n in itertools.product(ours, sizes):
        if dt != "float32" and (impl, dt, n) in ok and (impl, "float32", n) in ok:
            out.append(_ratio(f"{impl}: {dt} vs float32 tables, N={n:,}", ok[(impl, dt, n)],
                              ok[(impl, "float32", n)]))
        nearest = impl.removesuffix("-sr")  # the same impl rounding to nearest
        if IMPLS[impl].stochastic and (impl, dt, n) in ok and (nearest, dt, n) in ok:
            out.append(_ratio(f"{impl} vs {nearest}: stochastic vs nearest rounding, N={n:,}",
                              ok[(impl, dt, n)], ok[(nearest, dt, n)]))
    return out


# --- command line ------------------------------------------------------------------------------

_HEADER = (f"{'impl':>20} {'N':>10} {'fwd ms':>8} {'bwd ms':>8} {'opt ms':>8} {'train tok/s':>11} "
           f"{'infer tok/s':>11} {'peak GB':>11} {'roofline_frac':>13} {'(copy bw)':>9}  step ms over repeats")


def format_row(row: dict[str, Any]) -> str:
    name = impl_name(row["impl"], row.get("expert_dtype", "float32"))
    if "error" in row:
        return f"{name:>20} {row['N']:>10,} failed: {row['error']}"
    runs = row["step_ms_runs"]
    return (f"{name:>20} {row['N']:>10,} {row['fwd_ms']:8.1f} {row['bwd_ms']:8.1f} "
            f"{row['opt_ms']:8.1f} {row['train_tok_s']:11.0f} {row['infer_tok_s']:11.0f} "
            f"{row.get('peak_device_gb', row['peak_rss_gb']):11.2f} {row['roofline_frac']:13.3f} "
            f"{row['roofline_frac_copy']:9.3f}  {min(runs):.1f}-{max(runs):.1f} (n={row['repeats']})")


def format_ratio(r: dict[str, Any]) -> str:
    return (f"  {r['label']}: {r['ratio']:.2f}x train tok/s "
            f"(per round {r['round_min']:.2f}-{r['round_max']:.2f}x; at most {r['floor_ratio']:.2f}x "
            "at the first's roofline floor)")


def validate(impls: list[str], experts: list[int], topk: int, key_dim: int, repeats: int,
             key_parts: int = 2, expert_dtypes: tuple[str, ...] = ("float32",), device: str = "cpu") -> None:
    """User mistakes, reported before anything is measured (ValueError, one line)."""
    check_device(device)
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise ValueError(f"unknown --impl {', '.join(unknown)}; choose from {', '.join(LAYER_IMPLS)}")
    rounding = [i for i in impls if not impl_dtypes(i, expert_dtypes)]
    if rounding:
        raise ValueError(f"--impl {', '.join(rounding)} rounds bfloat16 tables: add --expert-dtype bfloat16")
    missing = [i for i in impls if not impl_available(i)]
    if missing:
        raise ValueError(f"--impl {', '.join(missing)} needs a package that is not installed: "
                         "pip install 'fractalmoe[bench]'")
    if repeats < 3:
        raise ValueError(f"--repeats {repeats}: medians need at least 3 repeats")
    if key_parts != 2:
        other = [i for i in impls if not i.startswith("fractalmoe")]
        if other:
            raise ValueError(f"--key-parts {key_parts}: {', '.join(other)} route with two key halves only")
        if key_parts < 2:
            raise ValueError(f"--key-parts {key_parts} must be >= 2")
    if key_dim % key_parts:
        raise ValueError(f"--key-dim {key_dim} must split into --key-parts {key_parts} equal parts")
    for n in experts:
        if key_parts == 2:
            root = math.isqrt(n)
            if root * root != n or topk > root:
                raise ValueError(f"--experts {n} must be a perfect square n_keys**2 with --topk {topk} <= n_keys")
        else:
            key_table_sizes(n, key_parts)  # raises its own one-line ValueError


def layer_command(impls: list[str] | None, experts: list[int], dim: int, heads: int, topk: int,
                  key_dim: int, tokens: int, steps: int, expert_dtypes: list[str], repeats: int,
                  as_json: bool, gather_table_mb: int = 1024, force: bool = False,
                  wait_idle_s: float = 0.0, key_parts: int = 2, device: str = "cpu") -> int:
    """The whole ``bench layer`` run: hygiene check, hardware, alternated repeats, the table of
    medians, headline ratios. User mistakes and a busy machine raise ValueError (one line)."""
    skipped: list[str] = []
    if impls is None:  # every implementation whose package is installed (rounding ones: with bfloat16)
        wanted = [i for i in LAYER_IMPLS if impl_dtypes(i, expert_dtypes)]
        impls = [i for i in wanted if impl_available(i)]
        skipped = [i for i in wanted if i not in impls]
    validate(impls, experts, topk, key_dim, repeats, key_parts, tuple(expert_dtypes), device)
    if skipped:  # after validation: a user mistake is the only line printed
        print(f"skipping {', '.join(skipped)} (pip install 'fractalmoe[bench]')", file=sys.stderr)
    reason = None if force else wait_until_idle(wait_idle_s)
    if reason is not None:
        raise ValueError(reason)
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if as_json else (lambda s: print(s, flush=True))
    specs = [LayerSpec(impl, n, dim, heads, topk, key_dim, tokens, steps, dtype, key_parts=key_parts,
                       device=device)
             for n in experts for impl in impls for dtype in impl_dtypes(impl, expert_dtypes)]
    peak, copy, hw = matmul_gflops(device=device), copy_gbps(device=device), {}
    for dtype in sorted({spec.shape().expert_dtype for spec in specs}, reverse=True):  # float32 first
        hw[dtype] = Hardware(peak, gather_gbps(dim, dtype, gather_table_mb, device=device), copy)
        say(hw[dtype].describe(dim, dtype))
    rows = run_layer_bench(specs, repeats, hw, progress=lambda s: print(s, file=sys.stderr, flush=True))
    if as_json:
        for row in rows:
            print(json.dumps(row), flush=True)
    else:
        say(f"medians of {repeats} alternated repeats on {device}, {tokens} tokens, width {dim}, "
            f"{heads} heads x top-{topk}, {key_parts}-part keys, {steps} timed steps each; peak GB: "
            + ("CUDA memory allocated" if device.startswith("cuda") else "resident set size"))
        say(_HEADER)
        for row in rows:
            say(format_row(row))
    ratios = headline_ratios(rows)
    if ratios:
        say("headline ratios (same run, medians; > 1 means the first is faster):")
        for r in ratios:
            say(format_ratio(r))
    return 0 if any("error" not in r for r in rows) else 1
