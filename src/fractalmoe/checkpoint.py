"""Run directories and crash-safe checkpoints (safetensors + JSON; no pickle anywhere).

    RUN/config.json                    model + training config
    RUN/metrics.jsonl                  one JSON object per log step
    RUN/checkpoints/step_000500/       model.safetensors  optim.safetensors  state.json
    RUN/checkpoints/latest             name of the newest complete checkpoint

A checkpoint is written into a temporary directory, fsynced, then renamed: it is complete or
invisible. ``latest`` is replaced the same way, after the directory it names exists.

Sharded runs (P ranks) write ``model-rankRR-of-PP.safetensors`` and ``optim-rankRR-of-PP...`` plus
``index.json`` (which rows of which expert table each shard holds). Readers open files lazily
(``safe_open``) and read expert tables and their row-wise optimizer state by row ranges, so a
rank reads only the rows it owns, from one file or from several, whatever P wrote them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import ModelConfig, RunConfig
from .data import ByteDataset
from .experts import expert_tables

FORMAT = "fractalmoe-checkpoint-v1"
CKPT_DIR = "checkpoints"


class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot be used, with the reason."""


# --- nested state <-> flat tensors + JSON skeleton ------------------------------------------
def flatten_state(obj: Any, tensors: dict[str, Tensor], prefix: str = "") -> Any:
    """Move every tensor of a nested dict/list into `tensors`; return a JSON-able skeleton."""
    if isinstance(obj, Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), flatten_state(v, tensors, f"{prefix}.{k}" if prefix else str(k))]
                             for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    return obj


def _key(k: Any) -> Any:
    return {"int": k} if isinstance(k, int) else k


def unflatten_state(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {(k["int"] if isinstance(k, dict) else k): unflatten_state(v, tensors)
                for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, dict) and "__list__" in skeleton:
        items = [unflatten_state(v, tensors) for v in skeleton["__list__"]]
        return tuple(items) if skeleton.get("tuple") else items
    return skeleton


# --- file helpers ---------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Written beside, fsynced and renamed over path: a reader sees the old text or the new."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync_path(tmp)
    os.replace(tmp, path)
    _fsync_path(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def _trainable_names(model: nn.Module) -> set[str] | None:
    """With a frozen base (adapters), the names worth saving: trainable parameters, adapter
    parameters frozen at their fresh initialisation (``freeze_in_run``), and the persistent
    buffers of modules that own one of these. None when everything trains."""
    if all(p.requires_grad for p in model.parameters()):
        return None
    frozen = {id(p) for m in model.modules() if getattr(m, "frozen_in_run", False) for p in m.parameters()}

    def kept(p: Tensor) -> bool:
        return p.requires_grad or id(p) in frozen

    names = {n for n, p in model.named_parameters(remove_duplicate=False) if kept(p)}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        if getattr(mod, "frozen_in_run", False) or any(kept(p) for p in mod.parameters(recurse=False)):
            names |= {f"{mod_name}.{b}" for b in mod._buffers
                      if b not in mod._non_persistent_buffers_set}
    return names


def freeze_in_run(module: nn.Module) -> None:
    """Stop a new (not base) module's parameters from training while still saving them with
    the run: the base cannot rebuild their random initialisation. The mark is on the module, so
    it holds for whatever tensors the module's parameters are later replaced by."""
    module.requires_grad_(False)
    module.frozen_in_run = True


def _model_entries(model: nn.Module, keep_vars: bool = False) -> dict[str, Tensor]:
    """State-dict entries worth saving, tied ones once (the head shares the embedding); only the
    trainable part when the rest is frozen. The model's own tensors, not copies."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    keep = _trainable_names(model)
    for name, t in model.state_dict(keep_vars=keep_vars).items():
        if keep is not None and name not in keep:
            continue
        if t.data_ptr() in seen and t.numel() > 0:
            continue
        seen.add(t.data_ptr())
        out[name] = t
    return out


def model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """State dict with tied parameters stored once (the head shares the embedding); only the
    trainable part when the rest is frozen. CPU, contiguous."""
    return {k: v.detach().cpu().contiguous() for k, v in _model_entries(model).items()}


def _check_names_and_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                            source: str) -> None:
    """Raise a CheckpointError naming every missing, unexpected or mis-shaped entry."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: checkpoint {found[k]} vs model {v}"
              for k, v in expected.items() if k in found and tuple(found[k]) != tuple(v)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:4]))
        if missing:
            parts.append(f"missing {missing[:4]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}")
        raise CheckpointError(f"{source} does not match this architecture: " + ", ".join(parts))


# --- lazy, row-ranged reads -----------------------------------------------------------------
RowRanges = dict[str, tuple[int, int, int]]  # table name -> (lo, hi, num_rows) held by a rank
_CHUNK_BYTES = 32 << 20  # rows copied into a table per read: bounds the transient copy


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is corrupt or truncated ({str(exc).splitlines()[0]})")


class TensorFiles:
    """The tensors of one checkpoint part ("model" or "optim"), read lazily and by rows.

    One file, or one per rank (``PREFIX-rankRR-of-PP.safetensors``): ``row_sharded(name, ndim)``
    says which tensors are split by rows across the rank files (their rank order is the row
    order); every other tensor is read from the first file holding it (rank 0).
    """

    def __init__(self, paths: list[Path], row_sharded: Callable[[str, int], bool]) -> None:
        self._stack = contextlib.ExitStack()
        self._paths = paths
        self._files: list[Any] = []
        self._parts: dict[str, list[tuple[int, int, int]]] = {}  # name -> (file, first row, rows)
        self.shapes: dict[str, tuple[int, ...]] = {}
        for i, path in enumerate(paths):
            if not path.is_file():
                self.close()
                raise CheckpointError(f"missing checkpoint file {path}")
            try:
                f = self._stack.enter_context(safe_open(str(path), "pt"))
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                self.close()
                raise _unreadable(path, exc) from None
            self._files.append(f)
            for name, shape in shapes.items():
                if len(paths) > 1 and len(shape) >= 1 and row_sharded(name, len(shape)):
                    parts = self._parts.setdefault(name, [])
                    start = sum(p[2] for p in parts)
                    parts.append((i, start, shape[0]))
                    self.shapes[name] = (start + shape[0], *shape[1:])
                elif name not in self._parts:
                    self._parts[name] = [(i, 0, shape[0] if shape else 0)]
                    self.shapes[name] = shape

    def __enter__(self) -> TensorFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def read(self, name: str, lo: int | None = None, hi: int | None = None) -> Tensor:
        """The whole tensor, or rows [lo, hi) of it, reading only those rows' bytes."""
        parts, shape = self._parts[name], self.shapes[name]
        if lo is None or hi is None or not shape:
            if len(parts) == 1:
                return self._get(parts[0][0], name, None, None)
            lo, hi = 0, shape[0]
        pieces = [self._get(i, name, max(lo, start) - start, min(hi, start + rows) - start)
                  for i, start, rows in parts if max(lo, start) < min(hi, start + rows)]
        if not pieces:  # an empty range
            return self._get(parts[0][0], name, 0, 0)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _get(self, i: int, name: str, lo: int | None, hi: int | None) -> Tensor:
        try:
            if lo is None or hi is None:
                return self._files[i].get_tensor(name)
            return self._files[i].get_slice(name)[lo:hi]
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise _unreadable(self._paths[i], exc) from None


def _part_paths(ckpt: Path, prefix: str, world: int) -> list[Path]:
    if world == 1:
        return [ckpt / f"{prefix}.safetensors"]
    return [ckpt / f"{prefix}-rank{r:02d}-of-{world:02d}.safetensors" for r in range(world)]


def open_model_files(ckpt: Path) -> TensorFiles:
    """The model tensors of a checkpoint written at any number of ranks."""
    if not (ckpt / "index.json").is_file():
        return TensorFiles(_part_paths(ckpt, "model", 1), lambda k, n: False)
    index = _load_json(ckpt / "index.json")
    tables = index["tables"]
    return TensorFiles(_part_paths(ckpt, "model", index["world"]), lambda k, n: k in tables)


def _sparse_state_tensor(key: str, ndim: int) -> bool:
    """Row-sharded entries of the expert-table optimizer state (scalars like `step` are not)."""
    return key.startswith("sparse.state.") and ndim >= 1


def read_model_tensors(ckpt: Path, rows: RowRanges | None = None) -> dict[str, Tensor]:
    """Model tensors of a checkpoint written at any number of ranks: whole, or for the tables in
    ``rows`` only the rows [lo, hi) a rank holds."""
    rows = rows or {}
    with open_model_files(ckpt) as files:
        return {k: files.read(k, *rows[k][:2]) if k in rows else files.read(k) for k in files.shapes}


def load_model_checkpoint(model: nn.Module, ckpt: Path, rows: RowRanges | None = None) -> None:
    """Load a checkpoint's weights into the model, reading for each table in ``rows`` only the
    rows [lo, hi) that this rank's shard holds. Tables are copied a few MB of rows at a time, so
    nothing table-sized is materialised beside the model's own tensors."""
    rows = rows or {}
    entries = _model_entries(model, keep_vars=True)
    table_ids = {id(t) for t in expert_tables(model)}
    expected = {k: ((rows[k][2], *v.shape[1:]) if k in rows else tuple(v.shape))
                for k, v in entries.items()}
    with open_model_files(ckpt) as files:
        _check_names_and_shapes(expected, files.shapes, str(ckpt))
        rest: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, dst in entries.items():
                if id(dst) not in table_ids:
                    rest[name] = files.read(name)
                    continue
                lo, hi = rows[name][:2] if name in rows else (0, dst.shape[0])
                step = max(1, _CHUNK_BYTES // max(1, dst[:1].numel() * dst.element_size()))
                for a in range(lo, hi, step):
                    b = min(hi, a + step)
                    dst[a - lo:b - lo].copy_(files.read(name, a, b))
        model.load_state_dict(rest, strict=False)


def _load_json(path: Path) -> dict[str, Any]:
    """The JSON object in path (every file of a run holds one)."""
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


# --- run directory --------------------------------------------------------------------------
def init_run_dir(run_dir: Path, config: RunConfig, extra: dict[str, Any] | None = None) -> None:
    (run_dir / CKPT_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", {**config.to_dict(), **(extra or {})})


def load_run_config(run_dir: str | Path) -> RunConfig:
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} is not a FractalMoE run directory (no config.json)")
    data = _load_json(run_dir / "config.json")
    try:
        return RunConfig.from_saved({k: v for k, v in data.items() if k in ("model", "train")})
    except ValueError as exc:
        raise CheckpointError(f"{run_dir}/config.json: {exc}") from None


def run_extra(run_dir: str | Path) -> dict[str, Any]:
    """config.json entries beside model and train (e.g. the base run of an adapter)."""
    data = _load_json(Path(run_dir) / "config.json")
    return {k: v for k, v in data.items() if k not in ("model", "train")}


def load_run_data(run_dir: str | Path, config: RunConfig, path: str | None = None) -> ByteDataset:
    """The corpus the run trained on (or ``path``), split into train and validation as it was."""
    return ByteDataset.load(path if path is not None else run_extra(run_dir).get("data"),
                            config.train.val_fraction, config.model.seq_len)


def _write_pointer(ckpt_root: Path, pointer: str, name: str) -> None:
    """Atomically make the file ``pointer`` (``latest``, ``best``) name the checkpoint ``name``."""
    write_text_atomic(ckpt_root / pointer, name)


def _checkpoint_dirs(ckpt_root: Path) -> list[Path]:
    """The step_* directories, oldest step first (by number: step_1000000 follows step_999999)."""
    return sorted(ckpt_root.glob("step_*"), key=lambda p: int(p.name.removeprefix("step_")))


def _read_pointer(ckpt_root: Path, pointer: str) -> Path | None:
    """The checkpoint directory the file ``pointer`` names, if the file exists."""
    path = ckpt_root / pointer
    return ckpt_root / path.read_text().strip() if path.is_file() else None


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint last saved as the best (training with ``keep_best``), if any."""
    path = _read_pointer(Path(run_dir) / CKPT_DIR, "best")
    return path if path is not None and (path / "state.json").is_file() else None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpt_root = Path(run_dir) / CKPT_DIR
    path = _read_pointer(ckpt_root, "latest")
    if path is not None and path.is_dir():
        return path
    # `latest` lost or stale: fall back to the newest complete directory.
    done = [p for p in _checkpoint_dirs(ckpt_root) if (p / "state.json").is_file()]
    return done[-1] if done else None


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optim_state: dict[str, Any],
                    state: dict[str, Any], keep_last: int, rank: int = 0, world: int = 1,
                    table_rows: dict[str, tuple[int, int, int]] | None = None, best: bool = False) -> Path:
    """Write step_XXXXXX atomically, point `latest` (and, if ``best``, `best`: pruning keeps it,
    ``--best`` loads it) at it, prune all but the newest keep_last and the best.

    With world > 1 every rank writes its own shard files (rank 0 adds the dense tensors) and
    rank 0 writes index.json, state.json and renames: ``table_rows`` maps each sharded table to
    (lo, hi, num_rows) of this rank.
    """
    ckpt_root = run_dir / CKPT_DIR
    name = f"step_{step:06d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(world)
    tensors = model_tensors(model)
    optim_tensors: dict[str, Tensor] = {}
    skeleton = flatten_state(optim_state, optim_tensors)
    if world == 1:
        files = {"model.safetensors": tensors, "optim.safetensors": optim_tensors}
    else:
        tables = table_rows or {}
        own = {k: v for k, v in tensors.items() if rank == 0 or k in tables}
        suffix = f"rank{rank:02d}-of-{world:02d}.safetensors"
        files = {f"model-{suffix}": own, f"optim-{suffix}": optim_tensors}
    for fname, content in files.items():
        save_file(content, str(tmp / fname))
        _fsync_path(tmp / fname)
    if world > 1:  # every rank says which rows it holds
        from .distributed import gather_row_ranges

        gathered = gather_row_ranges(table_rows) if table_rows else []
    _barrier(world)
    if rank == 0:
        if world > 1:
            index = {"world": world, "tables": {k: {"num_rows": rows[2], "shards": [g[i] for g in gathered]}
                                               for i, (k, rows) in enumerate((table_rows or {}).items())}}
            (tmp / "index.json").write_text(json.dumps(index, indent=1))
        full_state = {"format": FORMAT, "step": step, "rng": _b64(torch.get_rng_state()),
                      "optim": skeleton, "world": world, **state}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout, drop-path on GPU
            full_state["cuda_rng"] = _b64(torch.cuda.get_rng_state())
        (tmp / "state.json").write_text(json.dumps(full_state))
        for f in tmp.iterdir():
            _fsync_path(f)
        _fsync_path(tmp)
        if final.exists():  # a rerun of the same step replaces the old copy
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(ckpt_root)
        _write_pointer(ckpt_root, "latest", name)
        if best:
            _write_pointer(ckpt_root, "best", name)
        kept = best_checkpoint(run_dir)
        for old in _checkpoint_dirs(ckpt_root)[:-keep_last]:
            if old != kept:
                shutil.rmtree(old, ignore_errors=True)
        for stale in ckpt_root.glob(".tmp-*"):  # left by a process killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
    _barrier(world)
    return final


def read_run_state(ckpt: Path) -> dict[str, Any]:
    """state.json of a checkpoint (step, RNG, data position, optimizer skeleton, world)."""
    state = _load_json(ckpt / "state.json")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt}/state.json is not a {FORMAT} file")
    return state


def read_optim_state(ckpt: Path, state: dict[str, Any],
                     rows_of_param: list[tuple[int, int] | None] | None = None) -> dict[str, Any]:
    """The optimizer state of a checkpoint; with ``rows_of_param`` (expert table i -> the rows
    [lo, hi) this rank holds, or None for all) only those rows of the row-wise table state."""
    paths = _part_paths(ckpt, "optim", state.get("world", 1))
    tensors: dict[str, Tensor] = {}
    with TensorFiles(paths, _sparse_state_tensor) as files:
        for key, shape in files.shapes.items():
            param = int(key.split(".")[2]) if key.startswith("sparse.state.") else None
            span = rows_of_param[param] if rows_of_param is not None and param is not None else None
            tensors[key] = files.read(key, *span) if span is not None and shape else files.read(key)
    return unflatten_state(state["optim"], tensors)


def _b64(rng_state: Tensor) -> str:
    return base64.b64encode(rng_state.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def restore_rng(state: dict[str, Any]) -> None:
    """CPU generator, and the current CUDA device's when the checkpoint has one and CUDA is used."""
    torch.set_rng_state(_unb64(state["rng"]))
    if "cuda_rng" in state and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(_unb64(state["cuda_rng"]))


def config_mismatch(saved: ModelConfig, wanted: ModelConfig) -> list[str]:
    """Fields whose values differ between two model configs, as 'name: saved -> wanted'."""
    a, b = saved.to_dict(), wanted.to_dict()
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]


def load_model_from_run(run_dir: str | Path, device: str = "cpu", ctx: Any = None,
                        best: bool = False) -> tuple[nn.Module, RunConfig, Path]:
    """Build the run's model from config.json and load its latest checkpoint's weights (``best``:
    those of its lowest periodic validation loss, kept by training with ``keep_best``).

    With an active ``ctx`` (a ``DistContext`` of P ranks) the expert tables are row-sharded
    across ranks (``shard_experts``) and each rank builds and reads only its own rows; "cuda"
    then means this rank's cuda:LOCAL_RANK.
    """
    from .distributed import shard_experts, table_rows
    from .experts import meta_expert_tables
    from .model import FHMELanguageModel

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    ckpt = best_checkpoint(run_dir) if best else latest_checkpoint(run_dir)
    if ckpt is None:
        kind = "best checkpoint (train with keep_best = true)" if best else "complete checkpoint"
        raise CheckpointError(f"{run_dir} has no {kind} under {CKPT_DIR}/")
    extra = run_extra(run_dir)
    sharded = ctx is not None and ctx.active
    device = ctx.device_for(device) if sharded else device
    if "base" in extra:  # an adapter run: its base model plus the adapters it trained
        from .adapters import build_adapted_model

        model = build_adapted_model(extra["base"], extra["adapter"], device)
    else:
        with meta_expert_tables(sharded):  # the shards are built below, never whole tables
            model = FHMELanguageModel(config.model)
    if sharded:
        shard_experts(model, ctx)
    model = model.to(device)
    load_model_checkpoint(model, ckpt, table_rows(model))
    if extra.get("adapter", {}).get("domain_gate"):  # fitted after training, kept in a file of their own
        from .sparse_rows import attach_saved_gates

        attach_saved_gates(model, extra["adapter"])
    return model.eval(), config, ckpt
