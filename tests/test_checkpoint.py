"""Reliability: exact resume, crash safety under SIGKILL/SIGTERM, NaN guards, bad files."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fractalmoe.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_model_checkpoint,
    load_model_from_run,
    read_model_tensors,
    read_run_state,
    save_checkpoint,
)
from fractalmoe.cli import main
from fractalmoe.config import RunConfig, TrainConfig, tiny_model_config
from fractalmoe.model import FHMELanguageModel
from fractalmoe import train
from fractalmoe.train import TrainingStopped, run

CORPUS = "Now is the winter of our discontent made glorious summer by this sun of York.\n" * 60


@pytest.fixture
def corpus(tmp_path: Path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return str(path)


def _config(model_extra: dict | None = None, **train) -> RunConfig:
    model = tiny_model_config(n_layers=1, dropout=0.1, value_dropout=0.1, drop_path_local=0.2, adaptive_depth=True,
                              depth_penalty=0.01, **(model_extra or {}))
    base = dict(batch_size=4, max_steps=8, eval_every=100, log_every=1, save_every=100,
                sample_bytes=0, warmup_steps=2)
    return RunConfig(model, TrainConfig(**(base | train)))


def _losses(run_dir: Path) -> list[float]:
    return [m["train_loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


BALANCED = dict(query_norm="whiten", unit_keys=True, balance_rate=0.05, balance_loss=0.01, balance_target_kl=0.5)


@pytest.mark.parametrize("expert_optim,model_extra,train_extra", [
    ("rowwise_adagrad", None, {}), ("lazy_adam", None, {}), ("rowwise_adagrad", BALANCED, {}),
    ("lazy_adam", dict(expert_dtype="bfloat16"), dict(stochastic_rounding=True)),
    ("lazy_adam", None, dict(grad_accum=2, autocast="bfloat16", activation_checkpointing=True))],
    ids=["rowwise_adagrad", "lazy_adam", "balanced-routing", "bf16-stochastic-rounding",
         "micro-batches-autocast-recompute"])
def test_resume_is_bit_exact(tmp_path: Path, corpus: str, expert_optim: str,
                             model_extra: dict | None, train_extra: dict) -> None:
    cfg = _config(model_extra, expert_optim=expert_optim, **train_extra)
    full = run(cfg, out=tmp_path / "full", data_path=corpus, progress=False, log=lambda s: None)
    run(cfg, out=tmp_path / "split", data_path=corpus, progress=False, stop_at_step=4, log=lambda s: None)
    resumed = run(cfg, resume=tmp_path / "split", progress=False, log=lambda s: None)
    assert full.step == resumed.step == 8
    assert _losses(tmp_path / "full") == _losses(tmp_path / "split")
    a = load_file(str(latest_checkpoint(tmp_path / "full") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "split") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa = load_file(str(latest_checkpoint(tmp_path / "full") / "optim.safetensors"))
    ob = load_file(str(latest_checkpoint(tmp_path / "split") / "optim.safetensors"))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)


def _best_step(run_dir: Path) -> str:
    evals = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if m.get("val_loss") is not None]
    return f"step_{min(evals, key=lambda m: m['val_loss'])['step']:06d}"


def test_keep_best_keeps_the_lowest_periodic_validation_loss_through_pruning_and_resume(
        tmp_path: Path, corpus: str, capsys) -> None:
    cfg = _config(max_steps=12, eval_every=2, keep_last=1, keep_best=True, lr=0.03)
    run(cfg, out=tmp_path / "full", data_path=corpus, progress=False, log=lambda s: None)
    run(cfg, out=tmp_path / "split", data_path=corpus, progress=False, stop_at_step=6, log=lambda s: None)
    run(cfg, resume=tmp_path / "split", progress=False, log=lambda s: None)
    for name in ("full", "split"):
        root = tmp_path / name / "checkpoints"
        assert (root / "best").read_text() == _best_step(tmp_path / name)
        assert latest_checkpoint(tmp_path / name).name == "step_000012"
        kept = sorted(p.name for p in root.glob("step_*"))
        assert kept == sorted({_best_step(tmp_path / name), "step_000012"})  # keep_last = 1 pruned the rest
    assert _best_step(tmp_path / "full") == _best_step(tmp_path / "split")
    model, _, ckpt = load_model_from_run(tmp_path / "full", best=True)
    saved = load_file(str(ckpt / "model.safetensors"))
    assert ckpt.name == _best_step(tmp_path / "full")
    assert all(torch.equal(t, saved[k]) for k, t in model.state_dict().items() if k in saved)
    assert main(["eval", "--ckpt", str(tmp_path / "full"), "--best", "--json"]) == 0
    capsys.readouterr()
    plain = tmp_path / "plain"
    run(_config(), out=plain, data_path=corpus, progress=False, log=lambda s: None)
    assert main(["eval", "--ckpt", str(plain), "--best"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "keep_best" in err and len(err.splitlines()) == 1


def test_resume_streams_tables_a_few_rows_at_a_time(tmp_path: Path, corpus: str, monkeypatch) -> None:
    """Expert tables load in row chunks (no table-sized copy beside the model): still bit-exact."""
    import fractalmoe.checkpoint as checkpoint

    reads: list[int] = []
    real = checkpoint.TensorFiles.read

    def spy(self, name, lo=None, hi=None):  # type: ignore[no-untyped-def]
        out = real(self, name, lo, hi)
        if name.endswith((".down", ".up", ".values")):
            reads.append(out.shape[0])
        return out

    monkeypatch.setattr(checkpoint, "_CHUNK_BYTES", 10 * 32 * 4)  # 10 rows of width 32
    monkeypatch.setattr(checkpoint.TensorFiles, "read", spy)
    cfg = _config()
    run(cfg, out=tmp_path / "full", data_path=corpus, progress=False, log=lambda s: None)
    run(cfg, out=tmp_path / "split", data_path=corpus, progress=False, stop_at_step=4, log=lambda s: None)
    run(cfg, resume=tmp_path / "split", progress=False, log=lambda s: None)
    tables = 2 if cfg.model.block == "neuron" else 1  # down and up, or values
    assert reads and max(reads) == 10 and sum(reads) == tables * 256 * cfg.model.n_layers
    assert _losses(tmp_path / "full") == _losses(tmp_path / "split")
    a = load_file(str(latest_checkpoint(tmp_path / "full") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "split") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_is_skipped_and_reported(tmp_path: Path, corpus: str) -> None:
    messages: list[str] = []
    hook = lambda step, loss: loss * float("nan") if step == 3 else loss  # noqa: E731
    result = run(_config(), out=tmp_path / "r", data_path=corpus, progress=False, loss_hook=hook,
                 log=messages.append)
    assert result.step == 8 and any("step 4: non-finite" in m for m in messages)
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for m in lines if m.get("skipped")) == 1


@pytest.mark.parametrize("ffn, rule, deferred", [("memplus", "lazy_adam", True), ("fhme", "lazy_adam", True),
                                                  ("pkm", "lazy_adam", False), ("memplus", "dense_adamw", False)])
def test_tables_read_more_than_once_a_step_get_deferred_gradients(tmp_path: Path, corpus: str, ffn: str,
                                                                  rule: str, deferred: bool, monkeypatch) -> None:
    """Summed in autograd one read at a time, the row gradients of a bank every layer reads cost
    2x the step, those of a fractal's bank (3 reads at C = 2) 1.1x; a table read once keeps .grad."""
    seen: list[bool] = []

    class Recording(train.ModelOptimizer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            seen.append(args[6])

    monkeypatch.setattr(train, "ModelOptimizer", Recording)
    config = RunConfig(tiny_model_config(n_layers=2, ffn=ffn), _config(max_steps=2, expert_optim=rule).train)
    run(config, out=tmp_path / "r", data_path=corpus, progress=False, log=lambda s: None)
    assert seen == [deferred]


def test_run_of_nans_stops_cleanly_and_keeps_last_good_checkpoint(tmp_path: Path, corpus: str) -> None:
    hook = lambda step, loss: loss * float("nan") if step >= 4 else loss  # noqa: E731
    with pytest.raises(TrainingStopped, match="non-finite steps in a row"):
        run(_config(save_every=2, max_bad_steps=3), out=tmp_path / "r", data_path=corpus,
            progress=False, loss_hook=hook, log=lambda s: None)
    ckpt = latest_checkpoint(tmp_path / "r")
    assert ckpt is not None and ckpt.name == "step_000004"
    tensors, state = read_model_tensors(ckpt), read_run_state(ckpt)
    assert state["step"] == 4 and all(torch.isfinite(t).all() for t in tensors.values())


def _train_cmd(out: Path, corpus: str, steps: int, save_every: int) -> list[str]:
    return [sys.executable, "-m", "fractalmoe", "train", "--data", corpus, "--out", str(out),
            "--max-steps", str(steps), "--save-every", str(save_every), "--quiet",
            "--set", "dim=32", "--set", "n_layers=1", "--set", "n_heads=2", "--set", "seq_len=32",
            "--set", "num_experts=256", "--set", "topk=4", "--set", "key_dim=16",
            "--set", "batch_size=4", "--set", "eval_every=1000", "--set", "sample_bytes=0",
            "--set", "log_every=1", "--set", "keep_last=2"]


def _wait_for_steps(out: Path, proc: subprocess.Popen, steps: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)


def _kill_and_resume(tmp_path: Path, corpus: str, trial: int) -> None:
    out = tmp_path / f"kill{trial}"
    proc = subprocess.Popen(_train_cmd(out, corpus, 10_000, 1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for_steps(out, proc, 1)
    time.sleep(random.Random(trial).uniform(0.0, 1.5))  # anywhere, checkpoint writes included
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = latest_checkpoint(out)
    assert ckpt is not None, "no complete checkpoint after SIGKILL"
    step = read_run_state(ckpt)["step"]
    cmd = _train_cmd(out, corpus, step + 2, 1)
    cmd[cmd.index("--out"):cmd.index("--out") + 2] = ["--resume", str(out)]
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert read_run_state(latest_checkpoint(out))["step"] == step + 2


@pytest.mark.parametrize("trial", range(3))
def test_sigkill_always_leaves_a_loadable_checkpoint(tmp_path: Path, corpus: str, trial: int) -> None:
    _kill_and_resume(tmp_path, corpus, trial)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3, 23))
def test_sigkill_always_leaves_a_loadable_checkpoint_many(tmp_path: Path, corpus: str, trial: int) -> None:
    _kill_and_resume(tmp_path, corpus, trial)


def test_sigterm_saves_the_current_step_and_exits_zero(tmp_path: Path, corpus: str) -> None:
    out = tmp_path / "term"
    proc = subprocess.Popen(_train_cmd(out, corpus, 10_000, 10_000), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_steps(out, proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    logged = len((out / "metrics.jsonl").read_text().splitlines())
    assert read_run_state(latest_checkpoint(out))["step"] == logged  # the step it was on, nothing lost


def _cli_error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def finished_run(tmp_path: Path, corpus: str) -> Path:
    out = tmp_path / "done"
    run(_config(max_steps=2), out=out, data_path=corpus, progress=False, log=lambda s: None)
    return out


def test_truncated_and_corrupt_files_fail_in_one_line(finished_run: Path, capsys) -> None:
    ckpt = latest_checkpoint(finished_run)
    model_file = ckpt / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])
    assert "corrupt or truncated" in _cli_error(["eval", "--ckpt", str(finished_run)], capsys)
    model_file.write_bytes(os.urandom(300))
    assert "corrupt or truncated" in _cli_error(["generate", "--ckpt", str(finished_run)], capsys)
    model_file.unlink()
    assert "missing checkpoint file" in _cli_error(["eval", "--ckpt", str(finished_run)], capsys)


def test_config_with_wrong_types_fails_in_one_line(finished_run: Path, capsys) -> None:
    cfg = json.loads((finished_run / "config.json").read_text())
    cfg["model"]["dim"] = "wide"
    (finished_run / "config.json").write_text(json.dumps(cfg))
    assert "dim must be int" in _cli_error(["eval", "--ckpt", str(finished_run)], capsys)
    (finished_run / "config.json").write_text("{not json")
    assert "not valid JSON" in _cli_error(["eval", "--ckpt", str(finished_run)], capsys)
    (finished_run / "config.json").write_text("[1, 2]")
    assert "JSON list, not an object" in _cli_error(["eval", "--ckpt", str(finished_run)], capsys)


def test_runs_saved_before_the_gate_and_convolution_load_without_them(tmp_path: Path, corpus: str,
                                                                      capsys) -> None:
    """Runs written before ``output_gate`` and ``ffn_conv`` existed lack them in config.json and were
    trained without them: they must load as they were, not with today's defaults."""
    out = tmp_path / "old"
    run(_config(dict(output_gate=False, ffn_conv=0), max_steps=2), out=out, data_path=corpus,
        progress=False, log=lambda s: None)
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out), "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["model"]["output_gate"], cfg["model"]["ffn_conv"]
    (out / "config.json").write_text(json.dumps(cfg))
    model, _, _ = load_model_from_run(out)
    assert model.cfg.output_gate is False and model.cfg.ffn_conv == 0
    assert main(["eval", "--ckpt", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] == before["val_loss"]


def test_runs_saved_before_the_steer_rate_keep_the_rate_they_steered_with() -> None:
    """Steered runs saved before ``balance_steer_rate`` existed moved their weights at 0.05."""
    saved = {"model": {"balance_loss": 0.003, "balance_target_kl": 0.6}, "train": {}}
    assert RunConfig.from_saved(saved).model.balance_steer_rate == 0.05
    assert RunConfig.from_dict(saved).model.balance_steer_rate == 0.005


def test_wrong_architecture_names_the_mismatch(finished_run: Path, capsys) -> None:
    other = FHMELanguageModel(tiny_model_config(n_layers=1, dim=48))
    with pytest.raises(CheckpointError, match=r"shape mismatch embed.weight"):
        load_model_checkpoint(other, latest_checkpoint(finished_run))
    err = _cli_error(["train", "--resume", str(finished_run), "--set", "dim=48"], capsys)
    assert "dim: 32 -> 48" in err


def test_resume_refuses_another_expert_optimizer(finished_run: Path, capsys) -> None:
    """The checkpoint's optimizer state belongs to its rule (lazy Adam: two moments a row)."""
    err = _cli_error(["train", "--resume", str(finished_run), "--set", "train.expert_optim=rowwise_adagrad"],
                     capsys)
    assert "expert_optim='rowwise_adagrad'" in err and "'lazy_adam'" in err


def test_the_run_records_its_corpus_by_absolute_path(tmp_path: Path, corpus: str, monkeypatch) -> None:
    """So eval, plot and resume find it from any working directory."""
    monkeypatch.chdir(Path(corpus).parent)
    run(_config(max_steps=1), out=tmp_path / "rel", data_path=Path(corpus).name, progress=False,
        log=lambda s: None)
    assert json.loads((tmp_path / "rel" / "config.json").read_text())["data"] == corpus


def test_the_last_step_is_saved_once(tmp_path: Path, corpus: str, monkeypatch) -> None:
    """A run whose last step is a periodic save does not write that checkpoint again."""
    saves: list[int] = []
    monkeypatch.setattr(train, "save_checkpoint", lambda run_dir, step, *a, **k: saves.append(step))
    run(_config(max_steps=4, save_every=2), out=tmp_path / "r", data_path=corpus, progress=False,
        log=lambda s: None)
    assert saves == [2, 4]


def test_pruning_keeps_the_newest_steps_by_number(finished_run: Path) -> None:
    """step_1000000 is newer than step_999999 although it sorts before it by name."""
    root = finished_run / "checkpoints"
    latest_checkpoint(finished_run).rename(root / "step_999999")
    model = FHMELanguageModel(_config().model)
    save_checkpoint(finished_run, 1_000_000, model, {}, {"step": 1_000_000}, keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_1000000", "step_999999"]
    (root / "latest").unlink()  # the fallback orders the same way
    assert latest_checkpoint(finished_run).name == "step_1000000"


def test_new_run_refuses_to_overwrite(finished_run: Path, capsys) -> None:
    assert "already holds a run" in _cli_error(["train", "--out", str(finished_run)], capsys)
