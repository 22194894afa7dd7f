"""The command line end to end on a tiny model, and its one-line errors for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fractalmoe.cli import main
from fractalmoe.train import METRIC_KEYS

TINY = ["--set", "dim=32", "--set", "n_layers=1", "--set", "n_heads=2", "--set", "seq_len=32",
        "--set", "num_experts=256", "--set", "topk=4", "--set", "key_dim=16",
        "--set", "batch_size=4", "--set", "eval_every=3", "--set", "eval_batches=2",
        "--set", "log_every=2", "--set", "sample_bytes=24", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 120)
    return path


@pytest.fixture(scope="module")
def run_dir(corpus: Path, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    proc = subprocess.run([sys.executable, "-m", "fractalmoe", "train", "--data", str(corpus),
                           "--out", str(out), "--max-steps", "6", *TINY],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_train_writes_the_run_directory(run_dir: tuple[Path, str]) -> None:
    out, stdout = run_dir
    assert json.loads((out / "config.json").read_text())["model"]["dim"] == 32
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_000006"
    ckpt = out / "checkpoints" / latest
    for name in ("model.safetensors", "optim.safetensors", "state.json"):
        assert (ckpt / name).is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 3, 4, 6]
    assert all(set(METRIC_KEYS) <= set(m) for m in lines)
    final = lines[-1]
    assert final["val_loss"] > 0 and final["val_bpb"] == pytest.approx(final["val_loss"] / 0.6931, rel=1e-3)
    assert 0 < final["expert_usage"] <= 1 and final["mean_depth"] == 2.0
    assert "--- sample ---" in stdout and len((out / "sample.txt").read_bytes()) > 0


def test_eval_json_prints_one_object(run_dir: tuple[Path, str], capsys) -> None:
    assert main(["eval", "--ckpt", str(run_dir[0]), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    keys = {"val_loss", "val_bpb", "tokens", "expert_usage", "usage_kl", "mean_depth", "blocks_per_token"}
    assert keys <= set(result)
    saved = json.loads((run_dir[0] / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert result["tokens"] > 0 and result["step"] == saved  # the checkpoint evaluated


def test_eval_counts_usage_over_a_fixed_number_of_routing_choices(run_dir: tuple[Path, str],
                                                                   capsys) -> None:
    """Few choices can reach few experts: with 8 choices per block at most 8 experts are used."""
    usage = {}
    for choices in (None, 8):
        extra = ["--usage-choices", str(choices)] if choices else []
        assert main(["eval", "--ckpt", str(run_dir[0]), "--json", *extra]) == 0
        usage[choices] = json.loads(capsys.readouterr().out)
    experts = json.loads((run_dir[0] / "config.json").read_text())["model"]["num_experts"]
    few = [used for layer in usage[8]["usage_per_block"] for used, _ in layer]
    assert few and all(0 < used * experts <= 8 for used in few)
    assert usage[8]["val_loss"] == usage[None]["val_loss"]  # the loss is still the whole split's
    assert usage[None]["expert_usage"] > usage[8]["expert_usage"]


def test_generate_produces_text(run_dir: tuple[Path, str], capsys) -> None:
    assert main(["generate", "--ckpt", str(run_dir[0]), "--prompt", "To be", "--max-new-tokens",
                 "20", "--temperature", "0.8", "--top-k", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("To be") and len(text.encode()) >= 20


def test_plot_writes_pngs(run_dir: tuple[Path, str], tmp_path: Path, capsys) -> None:
    assert main(["plot", str(run_dir[0]), "--out", str(tmp_path), "--depth-map", "--text", "To be"]) == 0
    names = {p.name for p in tmp_path.glob("*.png")}
    assert {"loss.png", "expert_usage.png", "depth_map.png"} <= names


def _error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_user_mistakes_get_one_line_and_exit_2(tmp_path: Path, corpus: Path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "image.bin").write_bytes(b"\x00\x01\x02")
    assert "not found" in _error(["train", "--data", str(tmp_path / "missing.txt")], capsys)
    assert "empty" in _error(["train", "--data", str(empty), *TINY], capsys)
    assert "no text files" in _error(["train", "--data", str(folder)], capsys)
    err = _error(["train", "--data", str(corpus), "--set", "colour=blue"], capsys)
    assert "colour" in err and "valid keys" in err and "dim" in err
    assert "dim" in _error(["train", "--data", str(corpus), "--set", "dim=-3"], capsys)
    assert "num_experts" in _error(["train", "--set", "num_experts=1000"], capsys)
    assert "lr" in _error(["train", "--set", "lr=abc"], capsys)
    assert "positive integer" in _error(["train", "--max-steps", "0"], capsys)
    assert "not a FractalMoE run" in _error(["eval", "--ckpt", str(tmp_path)], capsys)
    assert "not a FractalMoE run" in _error(["generate", "--ckpt", str(tmp_path)], capsys)
    assert "metrics.jsonl" in _error(["plot", str(tmp_path)], capsys)
    _error(["frobnicate"], capsys)
    _error(["train", "--config", str(tmp_path / "none.toml")], capsys)


def test_depth_map_without_text_and_existing_files_as_outputs_are_one_line_errors(
        run_dir: tuple[Path, str], corpus: Path, tmp_path: Path, capsys) -> None:
    plots = tmp_path / "plots"
    assert "--text" in _error(["plot", str(run_dir[0]), "--out", str(plots), "--depth-map"], capsys)
    assert not plots.exists()
    taken = tmp_path / "taken.txt"
    taken.write_text("a file, not a folder")
    assert "File exists" in _error(["plot", str(run_dir[0]), "--out", str(taken)], capsys)
    assert "File exists" in _error(["export-hf", str(run_dir[0]), str(taken)], capsys)
    tiny = [a for a in TINY if a != "--quiet"]
    assert "File exists" in _error(["compare", "--data", str(corpus), "--models", "fhme", "--out", str(taken),
                                    *tiny], capsys)


def test_compare_checks_corpus_and_out_before_any_run(corpus: Path, tmp_path: Path, capsys) -> None:
    tiny = [a for a in TINY if a != "--quiet"]
    small = tmp_path / "small.txt"
    small.write_text("0123456789")
    out = tmp_path / "cmp"
    assert "corpus has 10 bytes" in _error(["compare", "--data", str(small), "--out", str(out), *tiny], capsys)
    assert not out.exists()
    out.mkdir()
    (out / "results.jsonl").write_text("")
    err = _error(["compare", "--data", str(corpus), "--out", str(out), *tiny], capsys)
    assert "already holds a comparison" in err and "--resume" not in err
    assert not (out / "runs").exists()


def test_compare_child_failure_is_one_line(corpus: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A run that fails in its child process ends the comparison with its one-line reason."""
    from fractalmoe import compare

    real = compare.run_child
    monkeypatch.setattr(compare, "run_child", lambda args: real([args[0], "{}"]))  # a child that fails
    tiny = [a for a in TINY if a != "--quiet"]
    code = main(["compare", "--data", str(corpus), "--models", "fhme", "--out", str(tmp_path / "cmp"), *tiny])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: fhme (seed 1) failed: TypeError")


def test_any_bytes_are_valid_text(tmp_path: Path) -> None:
    from fractalmoe.data import ByteDataset

    raw = bytes(range(256)) * 20
    data = ByteDataset.from_bytes(raw, 0.1, 16)
    x, y = data.train_batch(0, 2, 16, seed=0)
    assert x.max() <= 255 and torch_equal_shift(x, y)


def torch_equal_shift(x, y) -> bool:
    return bool((x[:, 1:] == y[:, :-1]).all())


def test_compare_on_any_corpus_matches_flops_and_writes_results(corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    tiny = [a for a in TINY if a != "--quiet"]
    assert main(["compare", "--data", str(corpus), "--models", "fhme,dense", "--max-steps", "2",
                 "--seeds", "1", "--out", str(out), "--json", *tiny]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert {r["model"] for r in rows} == {"fhme", "dense"}
    flops = [r["flops_per_token"] for r in rows]
    assert max(flops) / min(flops) < 1.10  # matched on active FLOPs per token
    assert {"step", "val_loss", "val_bpb", "tok_s", "params", "active_params_per_token", "peak_rss_gb",
            "expert_usage", "usage_kl", "mean_depth", "blocks_per_token"} <= set(rows[0])
    assert all(r["step"] == 2 and r["tok_s"] > 0 for r in rows)
    assert (out / "table.md").is_file() and (out / "bpb_vs_flops.png").is_file()


def test_sigterm_takes_the_configuration_child_down_too(tmp_path: Path) -> None:
    """compare and bench run each configuration in a child process: a SIGTERM to the command
    (timeout, a job scheduler) must not leave that child running."""
    import os
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    child_code = tmp_path / "child.py"
    child_code.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    parent_code = tmp_path / "parent.py"
    parent_code.write_text("import subprocess, sys\nfrom fractalmoe.cli import exit_on_sigterm\nexit_on_sigterm()\n"
                           f"subprocess.run([sys.executable, {str(child_code)!r}])\n")
    parent = subprocess.Popen([sys.executable, str(parent_code)])
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    for _ in range(100):  # reaped by subprocess.run on the way out
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the child outlived its parent")
