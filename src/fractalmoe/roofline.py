"""The physical limit of one training step of a product-key expert layer.

floor = FLOPs / peak + bytes / bandwidth (a sum: no overlap assumed); roofline_frac = floor /
measured step time.

* peak: measured fp32 matmul GFLOP/s (2048 x 2048).
* bandwidth: a measured random-row gather of rows as wide as the expert tables' rows
  (``index_select`` of random rows from a table far larger than any cache; the rows' bytes read +
  written per second). That is the access pattern of expert rows. A large-tensor copy is
  measured beside it (``copy_gbps``) and gives ``roofline_frac_copy``: the floor at streaming
  bandwidth, which random rows can approach only as far as the memory system serves them.
* FLOPs: query projection, sub-key scoring, the candidate sums (``product_keys.candidate_sums``), expert
  dots and mixes (multiply-add = 2); backward = 2x forward.
* bytes: the minimum an update rule must move, whatever a design happens to move (legend: S
  routed slots = tokens x heads x topk, R touched rows, N rows, D width, e bytes per table
  element; optimizer state is fp32), per expert table:

  ==================  ========  ==========  ============================================
  rule                gather    grad rows   update (grad read, rows and state r/w)
  ==================  ========  ==========  ============================================
  rowwise_adagrad     2 S De    R De        R De + 2 R De + 2 R 4           (4 B/row)
  lazy_adam           2 S De    R De        R De + 2 R De + 2 R (2 D 4)     (2x row)
  dense_adamw         2 S De    R De        R De + 2 N De + 2 N (2 D 4)     (every row)
  ==================  ========  ==========  ============================================

  The rows are gathered twice: by the forward, and again by the backward, whose gate and input
  gradients need them (v . dy; u for dx) once dy exists. Keeping the forward's copy instead
  moves as much (written, then read). Plus AdamW over the dense parameters every design has
  (query projection and sub-keys: gradient written and read, weights and two moments read and
  written: 8 x 4 B each). Activations other than the rows (a few MB) are left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .experts import TABLE_DTYPES
from .product_keys import candidate_sums, key_table_sizes

RULES = ("rowwise_adagrad", "lazy_adam", "dense_adamw")
# AdamW's least traffic per fp32 parameter: gradient written and read, weights and two moments
# read and written (8 x 4 B).
ADAMW_BYTES_PER_PARAM = 8 * 4
RULE_NAMES = {"rowwise_adagrad": "row-wise Adagrad", "lazy_adam": "lazy Adam",
              "dense_adamw": "dense AdamW"}


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work. CUDA kernels run asynchronously: a host clock read
    without this times the launches, not the work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], repeats: int, device: str = "cpu") -> float:
    """Fastest of ``repeats`` timed calls after one untimed call, in seconds."""
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


def matmul_gflops(n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Measured fp32 GFLOP/s of an n x n matmul (on CUDA: TF32 as PyTorch's matmul precision sets it)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b, out=out), repeats, device) / 1e9


def gather_gbps(dim: int = 256, dtype: str = "float32", table_mb: int = 1024,
                gather_mb: int = 64, repeats: int = 5, seed: int = 0, device: str = "cpu") -> float:
    """Measured GB/s (bytes read + written) of ``index_select`` of random (dim,) rows.

    The table is filled (not left as untouched zero pages) and much larger than the caches; the
    gathered rows total ``gather_mb``.
    """
    elem = TABLE_DTYPES[dtype].itemsize
    row = dim * elem
    rows = max(1, table_mb * 2**20 // row)
    count = max(1, min(rows, gather_mb * 2**20 // row))
    table = torch.full((rows, dim), 1.0, dtype=TABLE_DTYPES[dtype], device=device)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, rows, (count,), generator=gen).to(device)
    out = torch.empty(count, dim, dtype=table.dtype, device=device)
    seconds = best_time(lambda: torch.index_select(table, 0, idx, out=out), repeats, device)
    return 2 * count * row / seconds / 1e9


def copy_gbps(mb: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Measured GB/s (bytes read + written) of copying one large float32 tensor into another."""
    n = mb * 2**20 // 4
    src, dst = torch.ones(n, device=device), torch.zeros(n, device=device)
    return 2 * n * 4 / best_time(lambda: dst.copy_(src), repeats, device) / 1e9


@dataclass
class Hardware:
    gflops: float  # fp32 matmul
    gbps: float  # random-row gather, bytes read + written per second
    copy_gbps: float  # large-tensor copy, bytes read + written per second

    def describe(self, dim: int = 256, dtype: str = "float32") -> str:
        row = dim * TABLE_DTYPES[dtype].itemsize
        return (f"measured peak {self.gflops:.1f} GFLOP/s (fp32 2048^2 matmul), bandwidth "
                f"{self.gbps:.1f} GB/s (random-row gather of {row}-byte rows, read + written), "
                f"{self.copy_gbps:.1f} GB/s (large-tensor copy)")


@dataclass(frozen=True)
class Shape:
    """One routed layer: N experts of width D, H heads x top-K, Q query width (all P key parts)."""

    num_experts: int
    dim: int = 256
    heads: int = 8
    topk: int = 16
    key_dim: int = 256
    tokens: int = 2048
    expert_dtype: str = "float32"
    key_parts: int = 2

    @property
    def sub_keys(self) -> int:
        """Sub-keys a head scores, sum of n_p (2 sqrt(N) for two parts), each of width Q / P."""
        return sum(key_table_sizes(self.num_experts, self.key_parts))

    @property
    def slots(self) -> int:
        return self.tokens * self.heads * self.topk

    @property
    def elem(self) -> int:
        return TABLE_DTYPES[self.expert_dtype].itemsize

    @property
    def dense_params(self) -> int:
        """Query projection (D x H Q) and sub-keys (H x sum n_p x Q/P); norms are negligible."""
        return self.dim * self.heads * self.key_dim + self.heads * self.sub_keys * self.key_dim // self.key_parts


def flops_per_token(shape: Shape, tables: int = 2) -> int:
    """Forward FLOPs per token. ``tables`` = 2: PEER experts (down dot + up mix per slot);
    1: PKM values (mix only)."""
    h, k, d, q, p = shape.heads, shape.topk, shape.dim, shape.key_dim, shape.key_parts
    sums = candidate_sums(key_table_sizes(shape.num_experts, p), k)
    routing = 2 * d * h * q + 2 * h * shape.sub_keys * q // p + h * sums
    return routing + h * k * tables * 2 * d


def step_flops(shape: Shape, tables: int = 2) -> int:
    """Forward + backward (2x forward) FLOPs of one step over ``shape.tokens`` tokens."""
    return 3 * flops_per_token(shape, tables) * shape.tokens


ROW_READS = 2  # each routed row is read by the forward and again by the backward


@dataclass(frozen=True)
class StepBytes:
    gather: float  # expert rows read by the forward, and again by the backward
    grad: float  # gradient rows written
    update: float  # gradient read, rows and optimizer state read and written
    dense: float  # AdamW over the dense parameters

    @property
    def total(self) -> float:
        return self.gather + self.grad + self.update + self.dense

    @property
    def forward_read(self) -> float:
        """The expert rows one forward reads."""
        return self.gather / ROW_READS


def step_bytes(shape: Shape, rule: str, touched_rows: float, tables: int = 2) -> StepBytes:
    """Minimal bytes of one training step under ``rule`` (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"unknown update rule {rule!r}; choose from {', '.join(RULES)}")
    row = shape.dim * shape.elem
    r, n = touched_rows, shape.num_experts
    if rule == "rowwise_adagrad":
        update = r * row + 2 * r * row + 2 * r * 4
    elif rule == "lazy_adam":
        update = r * row + 2 * r * row + 2 * r * 2 * shape.dim * 4
    else:
        update = r * row + 2 * n * row + 2 * n * 2 * shape.dim * 4
    return StepBytes(gather=ROW_READS * tables * shape.slots * row, grad=tables * r * row,
                     update=tables * update, dense=ADAMW_BYTES_PER_PARAM * shape.dense_params)


def bytes_per_expert(shape: Shape, rule: str, tables: int = 2) -> int:
    """Memory one expert holds: its rows of every table and their optimizer state (fp32: one
    value per row for row-wise Adagrad, two moments per entry for the Adam rules)."""
    state = 4 if rule == "rowwise_adagrad" else 2 * shape.dim * 4
    return tables * (shape.dim * shape.elem + state)


def floor_seconds(flops: float, nbytes: float, hw: Hardware, streaming: bool = False) -> float:
    """FLOPs at the peak plus bytes at the random-row bandwidth (``streaming``: at the copy's)."""
    return flops / (hw.gflops * 1e9) + nbytes / ((hw.copy_gbps if streaming else hw.gbps) * 1e9)
