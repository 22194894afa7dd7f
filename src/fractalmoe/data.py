"""Byte-level corpora: any file or folder of files is text (vocabulary = 256 byte values).

Batches are a pure function of (seed, step), so the data position of a run is its step and
resuming needs no loader state.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

BUNDLED_NAME = "tinyshakespeare.txt"


def bundled_corpus_path() -> Path:
    """Path of the Tiny Shakespeare copy shipped inside the package."""
    return Path(str(resources.files("fractalmoe").joinpath(BUNDLED_NAME)))


def _looks_binary(path: Path) -> bool:
    with path.open("rb") as fh:
        return b"\x00" in fh.read(8192)


def corpus_files(path: str | Path) -> list[Path]:
    """The file itself, or every non-hidden, non-binary file under a folder (sorted)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data path not found: {path}")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                   and not _looks_binary(p))
    if not files:
        raise ValueError(f"folder {path} holds no text files (hidden and binary files are skipped)")
    return files


def read_corpus(path: str | Path | None = None) -> bytes:
    """All bytes of a corpus; None means the bundled Tiny Shakespeare."""
    files = corpus_files(bundled_corpus_path() if path is None else path)
    data = b"\n".join(f.read_bytes() for f in files)
    if not data:
        raise ValueError(f"data path {path} is empty")
    return data


@dataclass
class ByteDataset:
    """Train/validation split of a byte corpus (validation = the last fraction of bytes)."""

    train: Tensor  # uint8
    val: Tensor

    @classmethod
    def from_bytes(cls, data: bytes, val_fraction: float, seq_len: int) -> ByteDataset:
        arr = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
        n_val = int(len(arr) * val_fraction)
        if n_val < seq_len + 1 or len(arr) - n_val < seq_len + 1:
            need = int((seq_len + 1) / min(val_fraction, 1 - val_fraction)) + 1
            raise ValueError(f"corpus has {len(arr)} bytes; with seq_len={seq_len} and "
                             f"val_fraction={val_fraction} it needs at least {need}")
        return cls(arr[:-n_val], arr[-n_val:])

    @classmethod
    def load(cls, path: str | Path | None, val_fraction: float, seq_len: int) -> ByteDataset:
        return cls.from_bytes(read_corpus(path), val_fraction, seq_len)

    def train_batch(self, step: int, batch_size: int, seq_len: int, seed: int,
                    rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor]:
        """Random windows for one step; rank r of `world` takes its slice of the global batch."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.train) - seq_len - 1, (batch_size,), generator=gen)
        starts = starts.tensor_split(world)[rank]
        return _windows(self.train, starts, seq_len)

    def val_batches(self, batch_size: int, seq_len: int, max_windows: int | None = None):
        """Non-overlapping windows over the validation split; at most max_windows of them,
        evenly spaced, for a quick periodic estimate."""
        starts = torch.arange(0, len(self.val) - seq_len, seq_len)
        if max_windows is not None and max_windows < len(starts):
            starts = starts[torch.linspace(0, len(starts) - 1, max_windows).long()]
        for chunk in starts.split(batch_size):
            yield _windows(self.val, chunk, seq_len)


def _windows(data: Tensor, starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    offsets = starts.unsqueeze(1) + torch.arange(seq_len + 1)
    chunk = data[offsets].long()
    return chunk[:, :-1], chunk[:, 1:]


def encode(text: str) -> Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids: Tensor | list[int]) -> str:
    values = ids.tolist() if isinstance(ids, Tensor) else ids
    return bytes(values).decode("utf-8", errors="replace")
