"""Byte-level corpora: any file or folder of files is text (vocabulary = 256 byte values).

A folder whose text files are exactly ``train.txt`` and ``val.txt`` (a ``manifest.json`` beside
them is allowed, as ``fractalmoe corpus`` writes) is a pre-split corpus; anything else is
concatenated and its last ``val_fraction`` of bytes is validation.

Batches are a pure function of (seed, step), so the data position of a run is its step and
resuming needs no loader state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

BUNDLED_NAME = "tinyshakespeare.txt"
SPLIT_NAMES = ("train.txt", "val.txt")  # a folder holding these is a pre-split corpus
SPLIT_EXTRAS = ("manifest.json",)  # allowed beside them


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


def split_files(path: str | Path | None) -> tuple[Path, Path] | None:
    """(train.txt, val.txt) if path is a folder whose text files are exactly those two
    (plus an optional manifest.json); None otherwise."""
    if path is None or not Path(path).is_dir():
        return None
    path = Path(path)
    names = {f.relative_to(path).as_posix() for f in corpus_files(path)}
    if set(SPLIT_NAMES) <= names <= set(SPLIT_NAMES + SPLIT_EXTRAS):
        return path / SPLIT_NAMES[0], path / SPLIT_NAMES[1]
    return None


def read_corpus(path: str | Path | None = None) -> bytes:
    """All bytes of a corpus; None means the bundled Tiny Shakespeare."""
    files = corpus_files(bundled_corpus_path() if path is None else path)
    data = b"\n".join(f.read_bytes() for f in files)
    if not data:
        raise ValueError(f"data path {path} is empty")
    return data


@dataclass
class ByteDataset:
    """Train/validation bytes of a corpus.

    Training windows: epoch e lays a grid of non-overlapping windows of seq_len + 1 bytes at
    stride seq_len (neighbours share one byte, so each byte is a target at most once per
    epoch), shifted by a random offset < seq_len, and visits them in a random order; both are
    drawn from (seed, e). Global window i = step * batch_size + b is window i % num_windows of
    epoch i // num_windows, so a batch is a pure function of (seed, step). One permutation per
    epoch is cached on the dataset.
    """

    train: Tensor  # (N_train,) uint8
    val: Tensor  # (N_val,) uint8
    _epochs: dict[tuple[int, int, int], tuple[int, Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_bytes(cls, data: bytes, val_fraction: float, seq_len: int) -> ByteDataset:
        """Validation = the last val_fraction of the bytes."""
        arr = _as_tensor(data)
        n_val = int(len(arr) * val_fraction)
        if n_val < seq_len + 1 or len(arr) - n_val < seq_len + 1:
            need = int((seq_len + 1) / min(val_fraction, 1 - val_fraction)) + 1
            raise ValueError(f"corpus has {len(arr)} bytes; with seq_len={seq_len} and "
                             f"val_fraction={val_fraction} it needs at least {need}")
        return cls(arr[:-n_val], arr[-n_val:])

    @classmethod
    def from_splits(cls, train: bytes, val: bytes, seq_len: int) -> ByteDataset:
        """A corpus split in advance (e.g. whole files held out for validation)."""
        for name, part in (("train", train), ("val", val)):
            if len(part) < seq_len + 1:
                raise ValueError(f"the {name} split has {len(part)} bytes; seq_len={seq_len} "
                                 f"needs at least {seq_len + 1}")
        return cls(_as_tensor(train), _as_tensor(val))

    @classmethod
    def load(cls, path: str | Path | None, val_fraction: float, seq_len: int) -> ByteDataset:
        """A pre-split folder (train.txt + val.txt; val_fraction unused) or any text."""
        split = split_files(path)
        if split is not None:
            return cls.from_splits(split[0].read_bytes(), split[1].read_bytes(), seq_len)
        return cls.from_bytes(read_corpus(path), val_fraction, seq_len)

    def val_prefix(self, eval_bytes: int, seq_len: int) -> ByteDataset:
        """The same training split with only the first ``eval_bytes`` of validation: a fixed
        slice, for evaluations run many times over (every depth of every model)."""
        if eval_bytes < seq_len + 1:
            raise ValueError(f"--eval-bytes {eval_bytes} is shorter than one window (seq_len + 1 = "
                             f"{seq_len + 1})")
        return ByteDataset(self.train, self.val[:eval_bytes])

    def num_windows(self, seq_len: int) -> int:
        """Training windows per epoch."""
        return max(1, (len(self.train) - seq_len) // seq_len)

    def _epoch(self, epoch: int, seq_len: int, seed: int) -> tuple[int, Tensor]:
        """(grid offset, window order) of one epoch."""
        key = (seed, seq_len, epoch)
        if key not in self._epochs:
            n = self.num_windows(seq_len)
            slack = min(seq_len - 1, len(self.train) - 1 - n * seq_len)  # >= 0
            gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
            offset = int(torch.randint(0, slack + 1, (), generator=gen))
            if len(self._epochs) >= 2:  # a step spans at most two epochs when batch <= windows
                self._epochs.pop(next(iter(self._epochs)))
            self._epochs[key] = (offset, torch.randperm(n, generator=gen))
        return self._epochs[key]

    def train_starts(self, step: int, batch_size: int, seq_len: int, seed: int) -> Tensor:
        """(batch_size,) start offsets of one step's global batch of training windows."""
        n = self.num_windows(seq_len)
        first, end = step * batch_size, (step + 1) * batch_size
        index = torch.arange(first, end)
        epochs, slots = index // n, index % n
        starts = torch.empty_like(index)
        for e in range(first // n, (end - 1) // n + 1):
            offset, order = self._epoch(e, seq_len, seed)
            mask = epochs == e
            starts[mask] = offset + order[slots[mask]] * seq_len
        return starts

    def train_batch(self, step: int, batch_size: int, seq_len: int, seed: int,
                    rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor]:
        """(x, y) of one step, each (batch_size / world, seq_len); rank r of `world` takes its
        slice of the global batch."""
        starts = self.train_starts(step, batch_size, seq_len, seed).tensor_split(world)[rank]
        return _windows(self.train, starts, seq_len)

    def val_batches(self, batch_size: int, seq_len: int, max_windows: int | None = None):
        """Non-overlapping windows over the validation split; at most max_windows of them.

        With max_windows (the periodic estimate during training: eval_batches * batch_size
        windows) the windows are evenly spaced over the whole split, the same ones at every
        evaluation, so estimates are comparable along a run and cover every part of the split
        (e.g. 64 x 16 windows of 128 bytes = 128 KiB). Without it: the whole split in windows
        of seq_len targets, bar its last (len - 1) % seq_len bytes, which fill no whole window
        (fewer than seq_len: at most 127 of a 1 MB split at seq_len 128).
        """
        starts = torch.arange(0, len(self.val) - seq_len, seq_len)
        if max_windows is not None and max_windows < len(starts):
            starts = starts[torch.linspace(0, len(starts) - 1, max_windows).long()]
        for chunk in starts.split(batch_size):
            yield _windows(self.val, chunk, seq_len)


def _as_tensor(data: bytes) -> Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def _windows(data: Tensor, starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    offsets = starts.unsqueeze(1) + torch.arange(seq_len + 1)
    chunk = data[offsets].long()
    return chunk[:, :-1], chunk[:, 1:]


def encode(text: str) -> Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids: Tensor | list[int]) -> str:
    values = ids.tolist() if isinstance(ids, Tensor) else ids
    return bytes(values).decode("utf-8", errors="replace")
