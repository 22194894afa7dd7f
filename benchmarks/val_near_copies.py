"""Score trained standard-library runs with and without the validation files that nearly copy
training files.

Twelve of the standard-library corpus's 76 validation files (182 KB of 985 KB) come from
``encodings/``: codec tables generated from one template (cp858 is 99% the same, line for line,
as cp850 in the training split). A model that memorises training text better scores better on
them without predicting unseen code any better. This splits the committed validation split into
its ``encodings/`` files and the rest, by the manifest (``data/stdlib/manifest.json``), and
evaluates each run on both with the project's evaluator.

    python benchmarks/val_near_copies.py RUN [RUN ...] > results.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fractalmoe.checkpoint import load_model_from_run, load_run_data
from fractalmoe.data import ByteDataset
from fractalmoe.evaluate import evaluate

CORPUS = Path("data/stdlib")
NEAR_COPIES = "encodings/"  # generated codec tables, one template


def validation_parts(corpus: Path = CORPUS) -> dict[str, bytes]:
    """The validation split's files, joined as the corpus joins them, in two groups."""
    manifest = json.loads((corpus / "manifest.json").read_text())
    val = (corpus / "val.txt").read_bytes()
    groups: dict[str, list[bytes]] = {"near_copies": [], "rest": []}
    pos = 0
    for entry in (f for f in manifest["files"] if f["split"] == "val"):
        text = val[pos:pos + entry["bytes"]]
        pos += entry["bytes"] + 1  # the newline between files
        groups["near_copies" if entry["path"].startswith(NEAR_COPIES) else "rest"].append(text)
    if pos - 1 != len(val):
        raise ValueError(f"{corpus}/val.txt does not match its manifest")
    return {name: b"\n".join(parts) for name, parts in groups.items()}


def main(runs: list[str]) -> None:
    parts = validation_parts()
    for run in runs:
        model, config, _ = load_model_from_run(run)
        data = load_run_data(run, config)
        row = {"run": run, "model": config.model.ffn, "seed": config.train.seed,
               "steps": config.train.max_steps, "dim": config.model.dim, "n_layers": config.model.n_layers}
        for name, val in parts.items():  # the whole split's score is the run's own
            split = ByteDataset(data.train, torch.frombuffer(bytearray(val), dtype=torch.uint8))
            ev = evaluate(model, split, config.train.batch_size, None, "cpu")
            row[f"val_bpb_{name}"], row[f"bytes_{name}"] = ev.val_bpb, ev.tokens
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
