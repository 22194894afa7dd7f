"""Scale-out on 2 CPU processes (gloo): same losses as 1 process, sharded memory, checkpoints."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from fractalmoe.checkpoint import load_model_from_run
from fractalmoe.config import RunConfig, TrainConfig, tiny_model_config
from fractalmoe.distributed import DistContext, ShardedExpertBank, wrap_data_parallel
from fractalmoe.optim import ModelOptimizer
from fractalmoe.train import run, train_step

NUM_EXPERTS, DIM = 4096, 32
CORPUS = "It is a tale told by an idiot, full of sound and fury, signifying nothing.\n" * 80


def _config(max_steps: int = 20) -> RunConfig:
    model = tiny_model_config(num_experts=NUM_EXPERTS, dim=DIM, n_layers=1)  # dropout, drop-path off
    return RunConfig(model, TrainConfig(batch_size=4, max_steps=max_steps, eval_every=100, lr=1e-3,
                                        log_every=1, save_every=100, sample_bytes=0,
                                        warmup_steps=2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Largest(TorchDispatchMode):
    """Largest tensor any op produces (elements)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_sparse:
                self.largest = max(self.largest, t.numel())
        return out


def _worker(rank: int, world: int, port: int, job: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ctx = DistContext(rank, world)
    resume = Path(job["resume"]) if job.get("resume") else None
    run_dir = resume or Path(job["out"])
    run(_config(job["max_steps"]), out=None if resume else run_dir, resume=resume,
        data_path=job["data"], progress=False, ctx=ctx)
    if job.get("logits"):
        model, _, _ = _sharded_model_from(run_dir, ctx)
        with torch.no_grad():
            logits = model(torch.arange(32).view(1, 32) * 7 % 256)
        if rank == 0:
            save_file({"logits": logits}, job["logits"])
    if job.get("measure"):  # every op of two training steps: forward, backward, optimizer
        model, cfg, _ = _sharded_model_from(run_dir, ctx)
        model.train()
        opt = ModelOptimizer(model, 1e-3, 0.05, 0.0)
        forward = wrap_data_parallel(model)
        x = torch.randint(0, 256, (2, 32))
        with _Largest() as mode:
            for _ in range(2):
                train_step(model, opt, x, x, 1.0, forward=forward, ctx=ctx)
        bank = next(m for m in model.modules() if isinstance(m, ShardedExpertBank))
        report = {"largest": mode.largest, "shard_rows": bank.down.shape[0],
                  "grad_rows": int(bank.down.grad.coalesce()._nnz()) if bank.down.grad is not None else 0}
        Path(job["measure"] + f".{rank}").write_text(json.dumps(report))
        del forward  # a DDP reducer must go before its process group
    dist.destroy_process_group()


def _sharded_model_from(run_dir: Path, ctx: DistContext):
    from fractalmoe.distributed import shard_experts

    model, cfg, ckpt = load_model_from_run(run_dir)
    shard_experts(model, ctx)
    return model, cfg, ckpt


def _launch(job: dict) -> None:
    mp.spawn(_worker, args=(2, _free_port(), job), nprocs=2, join=True)


def _losses(run_dir: Path) -> list[float]:
    return [m["train_loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if m.get("train_loss") is not None]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    data = root / "corpus.txt"
    data.write_text(CORPUS)
    single = root / "single"
    run(_config(), out=single, data_path=str(data), progress=False, log=lambda s: None)
    double = root / "double"
    _launch({"out": str(double), "data": str(data), "max_steps": 20,
             "logits": str(root / "logits.safetensors"), "measure": str(root / "measure")})
    half = root / "half"
    run(_config(), out=half, data_path=str(data), progress=False, stop_at_step=10, log=lambda s: None)
    _launch({"resume": str(half), "data": str(data), "max_steps": 20})
    return {"root": root, "single": single, "double": double, "half": half}


def test_two_ranks_match_one_rank_losses(runs: dict[str, Path]) -> None:
    one, two = _losses(runs["single"]), _losses(runs["double"])
    assert len(one) == len(two) == 20
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * abs(a), (a, b)


def test_no_rank_materialises_more_than_its_share(runs: dict[str, Path]) -> None:
    share = NUM_EXPERTS / 2 * DIM
    for rank in range(2):
        report = json.loads((runs["root"] / f"measure.{rank}").read_text())
        assert report["shard_rows"] == NUM_EXPERTS // 2
        assert report["largest"] <= 1.05 * share, report  # no table-sized tensor, dense or grad
        assert report["grad_rows"] <= NUM_EXPERTS // 2


def test_two_rank_checkpoint_loads_in_one_process_with_identical_logits(runs: dict[str, Path]) -> None:
    model, _, ckpt = load_model_from_run(runs["double"])
    assert (ckpt / "index.json").is_file() and (ckpt / "model-rank01-of-02.safetensors").is_file()
    with torch.no_grad():
        logits = model(torch.arange(32).view(1, 32) * 7 % 256)
    torch.testing.assert_close(logits, load_file(str(runs["root"] / "logits.safetensors"))["logits"],
                               rtol=1e-5, atol=1e-5)


def test_one_rank_checkpoint_resumes_on_two_ranks(runs: dict[str, Path]) -> None:
    one, resumed = _losses(runs["single"]), _losses(runs["half"])
    assert len(resumed) == 20
    for a, b in zip(one, resumed):
        assert abs(a - b) <= 1e-4 * abs(a), (a, b)
