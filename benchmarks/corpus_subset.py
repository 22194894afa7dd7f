"""A small pre-split corpus cut from a large one: the same validation split, and a training split of
``--bytes`` made of ``--pieces`` equal slices spread evenly over the large one's training text, so
that it samples the whole corpus rather than its first files.

Why: on Tiny Shakespeare (1 MB, prose) and the standard library (10 MB, code) two layers rank
differently at 2,400 steps. A 1 MB cut of the standard library, read about five times in those
steps as Tiny Shakespeare is, tells corpus size apart from kind of text.

    python benchmarks/corpus_subset.py data/stdlib data/stdlib-1mb   # 1,003,855 bytes, 16 pieces
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

# Tiny Shakespeare's training split: its first 90% (val_fraction 0.1) of 1,115,394 bytes.
SHAKESPEARE_TRAIN_BYTES = 1_003_855


def subset(train: bytes, size: int, pieces: int) -> bytes:
    """``pieces`` slices of ``size // pieces`` bytes (the last one takes the remainder), the i-th
    starting at i / pieces of the text."""
    if not 0 < size <= len(train) or pieces < 1:
        raise ValueError(f"cannot cut {size} bytes in {pieces} pieces from {len(train)}")
    step, piece = len(train) // pieces, size // pieces
    lengths = [piece] * (pieces - 1) + [size - piece * (pieces - 1)]
    return b"".join(train[i * step:i * step + n] for i, n in enumerate(lengths))


def write_subset(source: Path, out: Path, size: int, pieces: int) -> None:
    """out/train.txt: ``subset`` of source/train.txt; out/val.txt: source/val.txt."""
    small = subset((source / "train.txt").read_bytes(), size, pieces)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_bytes(small)
    shutil.copyfile(source / "val.txt", out / "val.txt")
    print(f"{out}: train {len(small):,} bytes in {pieces} pieces, val as {source}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="a pre-split corpus folder (train.txt, val.txt)")
    p.add_argument("out", type=Path)
    p.add_argument("--bytes", type=int, default=SHAKESPEARE_TRAIN_BYTES)
    p.add_argument("--pieces", type=int, default=16)
    args = p.parse_args()
    write_subset(args.source, args.out, args.bytes, args.pieces)


if __name__ == "__main__":
    main()
