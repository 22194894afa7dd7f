"""The standard-library corpus (manifest, builder, CLI errors) and the epoch-based sampler."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path, PurePosixPath

import pytest
import torch

from fractalmoe.cli import main
from fractalmoe.corpus import (SEPARATOR, VAL_MAX_BYTES, is_selected, load_manifest, make_manifest,
                               manifest_path, manifest_text, read_verified)
from fractalmoe.data import ByteDataset

EXCLUDED_PARTS = {"site-packages", "__pycache__", "test", "tests", "idle_test", "email", "pydoc_data",
                  "_bundled"}


@pytest.fixture(scope="module")
def manifest() -> dict:
    return load_manifest()


def _require_same_stdlib(manifest: dict) -> None:
    if platform.python_version() != manifest["python"]:
        pytest.skip(f"manifest is for Python {manifest['python']}, this is {platform.python_version()}")
    try:
        read_verified(manifest)
    except ValueError as exc:
        pytest.skip(f"this interpreter's standard library differs from the manifest: {exc}")


def test_manifest_size_selection_and_split(manifest: dict) -> None:
    files = manifest["files"]
    total = sum(f["bytes"] for f in files)
    assert total >= 10 * 2**20
    paths = [f["path"] for f in files]
    assert len(set(paths)) == len(paths)
    for p in paths:
        rel = PurePosixPath(p)
        assert rel.suffix == ".py" and not EXCLUDED_PARTS.intersection(rel.parts[:-1]), p
        assert not rel.name.startswith(("test_", "_sysconfigdata_")) and not rel.parts[0].startswith("config-")
        assert is_selected(rel)
    # fixed shuffle: ordered by sha256 of the path, so packages are spread over the corpus
    keys = [hashlib.sha256(p.encode()).hexdigest() for p in paths]
    assert keys == sorted(keys)
    val = [f for f in files if f["split"] == "val"]
    val_bytes = sum(f["bytes"] for f in val)
    assert 900_000 <= val_bytes <= VAL_MAX_BYTES
    assert {f["split"] for f in files} == {"train", "val"}
    assert manifest["val_bytes"] == val_bytes and manifest["train_bytes"] == total - val_bytes
    assert manifest["val_files"] == len(val) and manifest["train_files"] == len(files) - len(val)


def test_committed_manifest_is_reproducible(manifest: dict) -> None:
    _require_same_stdlib(manifest)
    assert manifest_text(make_manifest()) == manifest_path().read_text()


def test_build_reproduces_every_file(manifest: dict, tmp_path: Path, capsys) -> None:
    _require_same_stdlib(manifest)
    out = tmp_path / "stdlib"
    assert main(["corpus", "stdlib", "--out", str(out)]) == 0
    assert "train" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.txt", "val.txt"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for split in ("train", "val"):
        blob, pos = (out / f"{split}.txt").read_bytes(), 0
        entries = [f for f in manifest["files"] if f["split"] == split]
        for f in entries:  # files in manifest order, one separator between neighbours
            chunk = blob[pos:pos + f["bytes"]]
            assert hashlib.sha256(chunk).hexdigest() == f["sha256"], f["path"]
            pos += f["bytes"] + len(SEPARATOR)
        assert pos - len(SEPARATOR) == len(blob)
    data = ByteDataset.load(out, 0.5, 128)  # pre-split: val_fraction is not used
    assert len(data.val) == manifest["val_bytes"] + manifest["val_files"] - 1 <= VAL_MAX_BYTES
    assert len(data.train) == manifest["train_bytes"] + manifest["train_files"] - 1


@pytest.mark.parametrize("tamper", ["sha256", "bytes", "path"])
def test_tampered_manifest_exits_2_and_writes_nothing(manifest: dict, tmp_path: Path, capsys,
                                                      tamper: str) -> None:
    bad = json.loads(json.dumps(manifest))
    entry = bad["files"][3]
    if tamper == "sha256":
        entry["sha256"] = "0" * 64
    elif tamper == "bytes":
        entry["bytes"] += 1
    else:
        entry["path"] = "no_such_module.py"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    out = tmp_path / "built"
    assert main(["corpus", "stdlib", "--out", str(out), "--manifest", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_corpus_cli_mistakes(tmp_path: Path, capsys) -> None:
    existing = tmp_path / "full"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    for argv in (["corpus", "stdlib", "--out", str(existing)],
                 ["corpus", "stdlib"],
                 ["corpus", "nope", "--out", str(tmp_path / "o")],
                 ["corpus", "stdlib", "--out", str(tmp_path / "o"), "--manifest", str(existing / "keep.txt")]):
        assert main(argv) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert (existing / "keep.txt").read_text() == "x" and not (tmp_path / "o").exists()


def test_an_unwritable_out_is_named_in_one_line(manifest: dict, tmp_path: Path, capsys) -> None:
    _require_same_stdlib(manifest)  # the files are verified before anything is written
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "o"  # under a file
    assert main(["corpus", "stdlib", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {out}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_pre_split_folder_loads_as_train_and_val(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_bytes(b"a" * 500)
    (tmp_path / "val.txt").write_bytes(b"b" * 100)
    (tmp_path / "manifest.json").write_text("{}")
    data = ByteDataset.load(tmp_path, 0.1, 16)
    assert bytes(data.train.tolist()) == b"a" * 500 and bytes(data.val.tolist()) == b"b" * 100
    (tmp_path / "other.txt").write_bytes(b"c" * 100)  # any other file: a plain folder again
    data = ByteDataset.load(tmp_path, 0.1, 16)
    assert len(data.train) + len(data.val) == 2 + 500 + 100 + 100 + 3  # all four, joined by newlines
    (tmp_path / "other.txt").unlink()
    (tmp_path / "val.txt").write_bytes(b"b" * 10)
    with pytest.raises(ValueError, match="val split"):
        ByteDataset.load(tmp_path, 0.1, 16)


def _starts(data: ByteDataset, steps: range, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    return torch.cat([data.train_starts(s, batch, seq_len, seed) for s in steps])


def test_sampler_visits_each_window_once_per_epoch() -> None:
    seq_len, batch = 16, 6
    data = ByteDataset.from_bytes(bytes(range(256)) * 40, 0.1, seq_len)
    n = data.num_windows(seq_len)
    steps = (3 * n) // batch + 2  # three epochs and a bit, with batches straddling epochs
    starts = _starts(data, range(steps), batch, seq_len, seed=7)
    for e in range(3):
        epoch = starts[e * n:(e + 1) * n]
        assert len(set(epoch.tolist())) == n  # no window twice
        offset = int(epoch.min())
        assert offset < seq_len and bool(((epoch - offset) % seq_len == 0).all())  # one grid: no overlap
        assert int(epoch.max()) + seq_len + 1 <= len(data.train)
    assert not torch.equal(starts[:n], starts[n:2 * n])  # reshuffled per epoch
    x, y = data.train_batch(0, batch, seq_len, seed=7)
    assert x.shape == (batch, seq_len) and torch.equal(x[:, 1:], y[:, :-1])


def test_sampler_is_a_pure_function_of_seed_and_step() -> None:
    raw = bytes(range(256)) * 40
    seq_len, batch = 16, 4
    a = ByteDataset.from_bytes(raw, 0.1, seq_len)
    n = a.num_windows(seq_len)
    late = n // batch * 3 + 1  # in the fourth epoch
    steps = (0, 5, late)
    want = {s: a.train_batch(s, batch, seq_len, seed=3) for s in steps}
    fresh = ByteDataset.from_bytes(raw, 0.1, seq_len)  # a resumed run: no loader state
    for s in reversed(steps):  # any order of calls gives the same batches
        x, y = fresh.train_batch(s, batch, seq_len, seed=3)
        assert torch.equal(x, want[s][0]) and torch.equal(y, want[s][1])
    assert not torch.equal(a.train_batch(0, batch, seq_len, seed=4)[0], want[0][0])
    # ranks take their slice of the same global batch
    parts = [a.train_batch(5, batch, seq_len, seed=3, rank=r, world=2)[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), want[5][0])
