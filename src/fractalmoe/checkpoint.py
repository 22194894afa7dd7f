"""Run directories and crash-safe checkpoints (safetensors + JSON; no pickle anywhere).

    RUN/config.json                    model + training config
    RUN/metrics.jsonl                  one JSON object per log step
    RUN/checkpoints/step_000500/       model.safetensors  optim.safetensors  state.json
    RUN/checkpoints/latest             name of the newest complete checkpoint

A checkpoint is written into a temporary directory, fsynced, then renamed: it is complete or
invisible. ``latest`` is replaced the same way, after the directory it names exists.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import ModelConfig, RunConfig

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


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    _fsync_path(tmp)
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _trainable_names(model: nn.Module) -> set[str] | None:
    """With a frozen base (adapters), the names worth saving: trainable parameters and the
    persistent buffers of modules that own one. None when everything trains."""
    if all(p.requires_grad for p in model.parameters()):
        return None
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        if any(p.requires_grad for p in mod.parameters(recurse=False)):
            names |= {f"{mod_name}.{b}" for b in mod._buffers
                      if b not in mod._non_persistent_buffers_set}
    return names


def model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """State dict with tied parameters stored once (the head shares the embedding); only the
    trainable part when the rest is frozen."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    keep = _trainable_names(model)
    for name, t in model.state_dict().items():
        if keep is not None and name not in keep:
            continue
        if t.data_ptr() in seen and t.numel() > 0:
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().cpu().contiguous()
    return out


def load_model_tensors(model: nn.Module, tensors: dict[str, Tensor], source: str) -> None:
    """Copy tensors into the model, naming every missing, unexpected or mis-shaped entry."""
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:4]))
        if missing:
            parts.append(f"missing {missing[:4]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}")
        raise CheckpointError(f"{source} does not match this architecture: " + ", ".join(parts))
    model.load_state_dict(tensors, strict=False)


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated ({str(exc).splitlines()[0]})") from None


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None


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
        return RunConfig.from_dict({k: v for k, v in data.items() if k in ("model", "train")})
    except ValueError as exc:
        raise CheckpointError(f"{run_dir}/config.json: {exc}") from None


def run_extra(run_dir: str | Path) -> dict[str, Any]:
    """config.json entries beside model and train (e.g. the base run of an adapter)."""
    data = _load_json(Path(run_dir) / "config.json")
    return {k: v for k, v in data.items() if k not in ("model", "train")}


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpt_root = Path(run_dir) / CKPT_DIR
    latest = ckpt_root / "latest"
    if latest.is_file():
        path = ckpt_root / latest.read_text().strip()
        if path.is_dir():
            return path
    # `latest` lost or stale: fall back to the newest complete directory.
    done = sorted(p for p in ckpt_root.glob("step_*") if (p / "state.json").is_file())
    return done[-1] if done else None


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optim_state: dict[str, Any],
                    state: dict[str, Any], keep_last: int, rank: int = 0, world: int = 1,
                    table_rows: dict[str, tuple[int, int, int]] | None = None) -> Path:
    """Write step_XXXXXX atomically, point `latest` at it, prune all but the newest keep_last.

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
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, table_rows or {})
    _barrier(world)
    if rank == 0:
        if world > 1:
            index = {"world": world, "tables": {k: {"num_rows": rows[2], "shards": [g[k][:2] for g in gathered]}
                                               for k, rows in (table_rows or {}).items()}}
            (tmp / "index.json").write_text(json.dumps(index, indent=1))
        rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
        full_state = {"format": FORMAT, "step": step, "rng": rng, "optim": skeleton, "world": world,
                      **state}
        (tmp / "state.json").write_text(json.dumps(full_state))
        for f in tmp.iterdir():
            _fsync_path(f)
        _fsync_path(tmp)
        if final.exists():  # a rerun of the same step replaces the old copy
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(ckpt_root)
        latest_tmp = ckpt_root / "latest.tmp"
        latest_tmp.write_text(name)
        _fsync_path(latest_tmp)
        os.replace(latest_tmp, ckpt_root / "latest")
        _fsync_path(ckpt_root)
        for old in sorted(ckpt_root.glob("step_*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in ckpt_root.glob(".tmp-*"):  # left by a process killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
    _barrier(world)
    return final


def _read_sharded(ckpt: Path, prefix: str, world: int, row_sharded) -> dict[str, Tensor]:  # type: ignore[no-untyped-def]
    """Merge per-rank files: row-sharded tensors concatenated in rank order, the rest from rank 0."""
    parts = [_load_safetensors(ckpt / f"{prefix}-rank{r:02d}-of-{world:02d}.safetensors")
             for r in range(world)]
    merged = dict(parts[0])
    for key in parts[0]:
        if row_sharded(key, parts[0][key]):
            merged[key] = torch.cat([p[key] for p in parts])
    return merged


def read_model_tensors(ckpt: Path) -> dict[str, Tensor]:
    """Full (unsharded) model tensors of a checkpoint written at any number of ranks."""
    if not (ckpt / "index.json").is_file():
        return _load_safetensors(ckpt / "model.safetensors")
    index = _load_json(ckpt / "index.json")
    tables = index["tables"]
    return _read_sharded(ckpt, "model", index["world"], lambda k, t: k in tables)


def _sparse_state_tensor(key: str, t: Tensor) -> bool:
    """Row-sharded entries of the expert-table optimizer state (scalars like `step` are not)."""
    return key.startswith("sparse.state.") and t.dim() >= 1


def load_checkpoint_state(ckpt: Path) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """(full model tensors, full optimizer state, run state) of one checkpoint directory."""
    state = _load_json(ckpt / "state.json")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt}/state.json is not a {FORMAT} file")
    model = read_model_tensors(ckpt)
    world = state.get("world", 1)
    if world == 1:
        optim_tensors = _load_safetensors(ckpt / "optim.safetensors")
    else:
        optim_tensors = _read_sharded(ckpt, "optim", world, _sparse_state_tensor)
    optim = unflatten_state(state.pop("optim"), optim_tensors)
    return model, optim, state


def shard_optimizer_state(optim: dict[str, Any], rows_of_param: list[tuple[int, int]]) -> dict[str, Any]:
    """Slice the full expert-table optimizer state to this rank's rows (param i -> rows_of_param[i])."""
    sparse = optim.get("sparse")
    if sparse is None:
        return optim
    state = {i: {k: (v[rows_of_param[i][0]:rows_of_param[i][1]].clone() if v.dim() >= 1 else v)
                 for k, v in st.items()} for i, st in sparse["state"].items()}
    return {**optim, "sparse": {**sparse, "state": state}}


def restore_rng(state: dict[str, Any]) -> None:
    raw = base64.b64decode(state["rng"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def config_mismatch(saved: ModelConfig, wanted: ModelConfig) -> list[str]:
    """Fields whose values differ between two model configs, as 'name: saved -> wanted'."""
    a, b = saved.to_dict(), wanted.to_dict()
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]


def load_model_from_run(run_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, RunConfig, Path]:
    """Build the run's model from config.json and load its latest checkpoint's weights."""
    from .model import FHMELanguageModel

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint under {CKPT_DIR}/")
    extra = run_extra(run_dir)
    if "base" in extra:  # an adapter run: its base model plus the adapters it trained
        from .adapters import build_adapted_model

        model = build_adapted_model(extra["base"], extra["adapter"], device)
    else:
        model = FHMELanguageModel(config.model)
    load_model_tensors(model, read_model_tensors(ckpt), str(ckpt))
    return model.to(device).eval(), config, ckpt
