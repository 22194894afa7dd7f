"""Reproducible corpora that need no download: the standard library's own Python sources.

A committed manifest (``corpora/stdlib.json``, package data) lists, in a fixed order, every
file of the corpus with its sha256, size and split. ``build_stdlib`` reads those files from
this interpreter's standard library, refuses any difference, and writes ``train.txt`` and
``val.txt`` (files joined by a newline, in manifest order) plus a copy of the manifest.
``make_manifest`` regenerates the manifest from the selection rules below, so the committed
file can be reproduced (``fractalmoe corpus stdlib --write-manifest PATH``).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sysconfig
import tempfile
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

STDLIB_MANIFEST = "corpora/stdlib.json"  # inside the fractalmoe package
VAL_MAX_BYTES = 1_000_000  # the validation split never exceeds this
VAL_MIN_BYTES = 950_000  # files are added to it until it holds at least this much
SEPARATOR = b"\n"  # between files in train.txt / val.txt

# Folders skipped wherever they occur: installed packages, caches, tests, the fine-tuning
# domain (email) and folders that are mostly data.
EXCLUDED_DIRS = frozenset({"site-packages", "__pycache__", "test", "tests", "idle_test", "email",
                           "pydoc_data", "_bundled", "lib-dynload"})
SELECTION = ("*.py files under the stdlib folder, non-empty; skipped: any path through "
             + ", ".join(sorted(EXCLUDED_DIRS)) + ", config-*, files named test_*.py or *_test.py, "
             "and _sysconfigdata_*.py (build-specific). Order: sha256 of the relative path. "
             f"Validation: files taken in that order while they fit under {VAL_MAX_BYTES} bytes, "
             f"until it holds at least {VAL_MIN_BYTES}; the rest is train.")


def stdlib_dir() -> Path:
    """This interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def manifest_path() -> Path:
    """The manifest shipped with the package."""
    return Path(str(resources.files("fractalmoe").joinpath(STDLIB_MANIFEST)))


def is_selected(rel: PurePosixPath) -> bool:
    """Whether a path relative to the stdlib folder belongs to the corpus (size aside)."""
    name, folders = rel.name, rel.parts[:-1]
    return (rel.suffix == ".py" and not EXCLUDED_DIRS.intersection(folders)
            and not (folders and folders[0].startswith("config-"))
            and not name.startswith(("test_", "_sysconfigdata_")) and not name.endswith("_test.py"))


def _order_key(rel: str) -> str:
    return hashlib.sha256(rel.encode()).hexdigest()


def make_manifest(root: Path | None = None) -> dict[str, Any]:
    """Select, order and split the corpus files of ``root`` (default: this stdlib)."""
    root = stdlib_dir() if root is None else root
    files = []
    for p in root.rglob("*.py"):
        rel = PurePosixPath(p.relative_to(root).as_posix())
        if p.is_file() and is_selected(rel):
            data = p.read_bytes()
            if data:
                files.append({"path": str(rel), "sha256": hashlib.sha256(data).hexdigest(),
                              "bytes": len(data), "split": "train"})
    files.sort(key=lambda f: _order_key(f["path"]))
    val = 0
    for f in files:  # whole files, spread over the shuffled order
        if val >= VAL_MIN_BYTES:
            break
        if val + f["bytes"] <= VAL_MAX_BYTES:
            f["split"] = "val"
            val += f["bytes"]
    return {"name": "stdlib", "python": platform.python_version(), "selection": SELECTION,
            **split_sizes(files), "files": files}


def split_sizes(files: list[dict[str, Any]]) -> dict[str, int]:
    """Byte and file counts per split (the file bytes, without separators)."""
    out: dict[str, int] = {}
    for split in ("train", "val"):
        chosen = [f["bytes"] for f in files if f["split"] == split]
        out[f"{split}_bytes"], out[f"{split}_files"] = sum(chosen), len(chosen)
    return out


def manifest_text(manifest: dict[str, Any]) -> str:
    """JSON with one line per file, so that a change shows as a one-line diff."""
    head = {k: v for k, v in manifest.items() if k != "files"}
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    rows = ",\n".join("    " + json.dumps(f) for f in manifest["files"])
    return "{\n" + "\n".join(lines) + '\n  "files": [\n' + rows + "\n  ]\n}\n"


def write_manifest(path: str | Path, root: Path | None = None) -> dict[str, Any]:
    """Regenerate the manifest from ``root`` (default: this stdlib) and write it to ``path``."""
    manifest = make_manifest(root)
    Path(path).write_text(manifest_text(manifest))
    return manifest


def load_manifest(path: str | Path | None = None) -> dict[str, Any]:
    """A manifest (default: the packaged one), checked for shape."""
    path = manifest_path() if path is None else Path(path)
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        for f in files:
            if not (isinstance(f["path"], str) and isinstance(f["sha256"], str)
                    and isinstance(f["bytes"], int) and f["split"] in ("train", "val")):
                raise ValueError
        if not isinstance(manifest["python"], str):
            raise ValueError
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: not a corpus manifest (expected python and files with "
                         "path, sha256, bytes, split)") from None
    return manifest


def read_verified(manifest: dict[str, Any], root: Path | None = None) -> list[bytes]:
    """Every manifest file's bytes, in order; ValueError at the first missing or changed file."""
    root = stdlib_dir() if root is None else root
    here = platform.python_version()
    if manifest["python"] != here:
        raise ValueError(f"the manifest was made from Python {manifest['python']}'s standard library; "
                         f"this interpreter is {here}")
    out = []
    for f in manifest["files"]:
        path = root / f["path"]
        try:
            data = path.read_bytes()
        except OSError:
            raise ValueError(f"{path}: missing from this standard library") from None
        if len(data) != f["bytes"]:
            raise ValueError(f"{path}: {len(data)} bytes, the manifest says {f['bytes']}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != f["sha256"]:
            raise ValueError(f"{path}: sha256 {digest[:16]}... differs from the manifest's {f['sha256'][:16]}...")
        out.append(data)
    return out


def build_stdlib(out: str | Path, manifest: str | Path | None = None,
                 root: Path | None = None) -> dict[str, int]:
    """Write OUT/train.txt, OUT/val.txt and OUT/manifest.json; all of it or nothing.

    Every file is verified before anything is written; the output is assembled in a temporary
    folder beside OUT and renamed into place. OUT must not exist (or be an empty folder).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists; remove it or choose another --out")
    src = manifest_path() if manifest is None else Path(manifest)
    spec = load_manifest(src)
    contents = read_verified(spec, root)
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    for f, data in zip(spec["files"], contents):
        parts[f["split"]].append(data)
    if not parts["train"] or not parts["val"]:
        raise ValueError(f"{src}: both splits need at least one file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:  # named after OUT, not the temporary folder beside it
        raise ValueError(f"cannot write {out}: {exc.strerror}") from None
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        for split, chunks in parts.items():
            (tmp / f"{split}.txt").write_bytes(SEPARATOR.join(chunks))
        shutil.copyfile(src, tmp / "manifest.json")
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return split_sizes(spec["files"])
