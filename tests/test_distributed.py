"""Scale-out on 2 CPU processes (gloo): same losses as 1 process, sharded memory, checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import fractalmoe.checkpoint as checkpoint
from fractalmoe.checkpoint import (
    latest_checkpoint,
    load_model_from_run,
    read_model_tensors,
    read_optim_state,
    read_run_state,
)
from fractalmoe.config import RunConfig, TrainConfig, tiny_model_config
from fractalmoe.distributed import (
    DistContext,
    ShardedExpertBank,
    backend_for,
    shard_experts,
    shard_range,
    wrap_data_parallel,
)
from fractalmoe.experts import expert_tables
from fractalmoe.model import FHMELanguageModel
from fractalmoe.optim import ModelOptimizer
from fractalmoe.stats import DEPTH_COUNTS, collect
from fractalmoe.train import run, train_step

NUM_EXPERTS, DIM = 4096, 32
CORPUS = "It is a tale told by an idiot, full of sound and fury, signifying nothing.\n" * 80


def _config(max_steps: int = 20, lr: float = 1e-3, deferred: bool = False, grad_accum: int = 1,
            **model_extra) -> RunConfig:
    model = tiny_model_config(**{"num_experts": NUM_EXPERTS, "dim": DIM, "n_layers": 1,  # no dropout
                                 **model_extra})
    return RunConfig(model, TrainConfig(batch_size=4, max_steps=max_steps, eval_every=100, lr=lr,
                                        log_every=1, save_every=100, sample_bytes=0,
                                        warmup_steps=2, deferred_table_grads=deferred,
                                        grad_accum=grad_accum))


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


class _SpySlice:
    def __init__(self, inner, name: str, reads: Counter) -> None:
        self.inner, self.name, self.reads = inner, name, reads

    def get_shape(self):
        return self.inner.get_shape()

    def get_dtype(self):
        return self.inner.get_dtype()

    def __getitem__(self, index):
        out = self.inner[index]
        self.reads[self.name] += out.numel()
        return out


class _SpyFile:
    """safe_open that counts the elements read per tensor name (whole tensors and slices)."""

    def __init__(self, path: str, framework: str, reads: Counter) -> None:
        self.inner, self.reads = _real_safe_open(path, framework), reads

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def metadata(self):
        return self.inner.metadata()

    def get_slice(self, name: str) -> _SpySlice:
        return _SpySlice(self.inner.get_slice(name), name, self.reads)

    def get_tensor(self, name: str) -> torch.Tensor:
        out = self.inner.get_tensor(name)
        self.reads[name] += out.numel()
        return out


_real_safe_open = checkpoint.safe_open


def _spying(reads: Counter):
    return lambda path, framework: _SpyFile(path, framework, reads)


def _worker(rank: int, world: int, port: int, job: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend_for("cpu"), rank=rank, world_size=world)
    torch.set_num_threads(1)
    ctx = DistContext(rank, world)
    resume = Path(job["resume"]) if job.get("resume") else None
    run_dir = resume or Path(job["out"])
    reads: Counter = Counter()
    checkpoint.safe_open = _spying(reads)  # what the resume reads, per tensor
    run(_config(job["max_steps"], job.get("lr", 1e-3), job.get("deferred", False), job.get("grad_accum", 1),
                **job.get("model", {})),
        out=None if resume else run_dir, resume=resume, data_path=job["data"], progress=False, ctx=ctx)
    if job.get("reads"):
        Path(job["reads"] + f".{rank}").write_text(json.dumps(reads))
    if job.get("logits"):
        reads.clear()
        model, _, _ = _sharded_model_from(run_dir, ctx)
        with torch.no_grad():
            logits = model(torch.arange(32).view(1, 32) * 7 % 256)
        if rank == 0:
            save_file({"logits": logits}, job["logits"])
        Path(job["logits"] + f".reads.{rank}").write_text(json.dumps(reads))
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
        table = next(iter(bank.tables().values()))
        report = {"largest": mode.largest, "shard_rows": table.shape[0],
                  "grad_rows": int(table.grad.coalesce()._nnz()) if table.grad is not None else 0}
        Path(job["measure"] + f".{rank}").write_text(json.dumps(report))
        del forward  # a DDP reducer must go before its process group
    dist.destroy_process_group()


def _sharded_model_from(run_dir: Path, ctx: DistContext):
    return load_model_from_run(run_dir, ctx=ctx)  # each rank builds and reads its own rows only


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
    _launch({"resume": str(half), "data": str(data), "max_steps": 20, "reads": str(root / "reads_p1")})
    # the 2-rank checkpoint resumed on 2 ranks and on 1 process: the same 2 further steps
    shutil.copytree(double, root / "double_p2")
    shutil.copytree(double, root / "double_p1")
    _launch({"resume": str(root / "double_p2"), "data": str(data), "max_steps": 22,
             "reads": str(root / "reads_p2")})
    run(_config(22), resume=root / "double_p1", progress=False, log=lambda s: None)
    return {"root": root, "single": single, "double": double, "half": half,
            "double_p2": root / "double_p2", "double_p1": root / "double_p1"}


def test_two_ranks_match_one_rank_losses(runs: dict[str, Path]) -> None:
    one, two = _losses(runs["single"]), _losses(runs["double"])
    assert len(one) == len(two) == 20
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * abs(a), (a, b)


def test_two_ranks_match_one_rank_at_the_default_learning_rate(tmp_path: Path) -> None:
    """At the default lr a top-k choice may flip on float reduction order: within 1e-3."""
    data = tmp_path / "corpus.txt"
    data.write_text(CORPUS)
    lr = TrainConfig().lr
    run(_config(lr=lr), out=tmp_path / "one", data_path=str(data), progress=False, log=lambda s: None)
    _launch({"out": str(tmp_path / "two"), "data": str(data), "max_steps": 20, "lr": lr})
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 20
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-3 * abs(a), (a, b)


def test_two_ranks_with_deferred_table_gradients_match_one_rank(runs: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    """Sharded tables, each rank forming its own rows' gradients in the step."""
    data = tmp_path / "corpus.txt"
    data.write_text(CORPUS)
    _launch({"out": str(tmp_path / "two"), "data": str(data), "max_steps": 20, "deferred": True})
    one, two = _losses(runs["single"]), _losses(tmp_path / "two")
    assert len(one) == len(two) == 20
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * abs(a), (a, b)


def test_two_ranks_accumulating_micro_batches_match_one_rank(runs: dict[str, Path], tmp_path: Path) -> None:
    """Each rank's 2 sequences run as 2 micro-batches of 1, gradients all-reduced once a step."""
    data = tmp_path / "corpus.txt"
    data.write_text(CORPUS)
    _launch({"out": str(tmp_path / "two"), "data": str(data), "max_steps": 20, "grad_accum": 2})
    one, two = _losses(runs["single"]), _losses(tmp_path / "two")
    assert len(one) == len(two) == 20
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * abs(a), (a, b)


def test_no_rank_materialises_more_than_its_share(runs: dict[str, Path]) -> None:
    """No tensor grows with the whole table: at most a rank's rows, or the step's routed slots (a
    table's sync-free gradient has one row per slot of each of its C + 1 block calls)."""
    cfg = _config().model
    slots = 3 * 4 * cfg.seq_len * cfg.expert_heads * cfg.topk  # 3 block calls x global batch 4
    bound = max(NUM_EXPERTS / 2, slots) * DIM
    for rank in range(2):
        report = json.loads((runs["root"] / f"measure.{rank}").read_text())
        assert report["shard_rows"] == NUM_EXPERTS // 2
        assert report["largest"] <= 1.05 * bound, report  # no table-sized tensor, dense or grad
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


def _table_names(ckpt: Path) -> list[str]:
    return [k for k in read_model_tensors(ckpt) if k.endswith((".down", ".up", ".values"))]


@pytest.mark.parametrize("source", ["half", "double"], ids=["one-file", "two-shards"])
def test_two_rank_resume_reads_only_owned_rows(runs: dict[str, Path], source: str) -> None:
    """Model tables and their row-wise optimizer state: each rank reads exactly its rows, from
    the one file of a 1-process checkpoint or from the shards of a 2-rank one."""
    prefix = "reads_p1" if source == "half" else "reads_p2"
    tables = _table_names(latest_checkpoint(runs["single"]))
    assert tables
    for rank in range(2):
        reads = json.loads((runs["root"] / f"{prefix}.{rank}").read_text())
        lo, hi = shard_range(NUM_EXPERTS, rank, 2)
        for name in tables:
            assert reads[name] == (hi - lo) * DIM, (name, reads[name])
        # the default rule (lazy Adam) keeps two (rows, D) moments per table, and a step count
        state = [k for k in reads if k.startswith("sparse.state.") and not k.endswith(".step")]
        assert len(state) == 2 * len(tables) and all(k.endswith((".exp_avg", ".exp_avg_sq")) for k in state)
        assert all(reads[k] == (hi - lo) * DIM for k in state), {k: reads[k] for k in state}


def test_sharded_eval_reads_only_owned_rows(runs: dict[str, Path]) -> None:
    tables = _table_names(latest_checkpoint(runs["double"]))
    for rank in range(2):
        reads = json.loads((runs["root"] / f"logits.safetensors.reads.{rank}").read_text())
        lo, hi = shard_range(NUM_EXPERTS, rank, 2)
        assert all(reads[name] == (hi - lo) * DIM for name in tables)
        assert not any(k.startswith("sparse.") for k in reads)  # eval reads no optimizer state


def test_two_rank_checkpoint_resumes_on_two_ranks_and_on_one(runs: dict[str, Path]) -> None:
    two, one = _losses(runs["double_p2"]), _losses(runs["double_p1"])
    assert len(two) == len(one) == 22
    for a, b in zip(two[20:], one[20:]):
        assert abs(a - b) <= 1e-4 * abs(a), (a, b)


def test_row_ranges_read_from_one_file_and_from_shards(runs: dict[str, Path]) -> None:
    """Any row range of a table and of its optimizer state, whatever P wrote the checkpoint."""
    for run_name in ("single", "double"):
        ckpt = latest_checkpoint(runs[run_name])
        assert (ckpt / "index.json").is_file() == (run_name == "double")
        full = read_model_tensors(ckpt)
        name = _table_names(ckpt)[0]
        for lo, hi in [(0, NUM_EXPERTS), (100, 2100), (2047, 2049), (NUM_EXPERTS - 5, NUM_EXPERTS), (7, 7)]:
            part = read_model_tensors(ckpt, {name: (lo, hi, NUM_EXPERTS)})
            assert torch.equal(part[name], full[name][lo:hi]), (run_name, lo, hi)
        state = read_run_state(ckpt)
        optim = read_optim_state(ckpt, state)
        sliced = read_optim_state(ckpt, state, [(1000, 3000)] * len(optim["sparse"]["state"]))
        for i, st in optim["sparse"]["state"].items():
            rows = {k: v for k, v in st.items() if v.ndim >= 1}  # the per-row moments
            assert rows and all(v.shape[0] == NUM_EXPERTS for v in rows.values())
            for k, v in rows.items():
                assert torch.equal(sliced["sparse"]["state"][i][k], v[1000:3000]), k


def test_a_value_bank_shared_by_layers_shards_too(tmp_path: Path) -> None:
    """Memory+ (one gated value bank for every layer): 2 ranks match 1 process, and the shared
    bank stays one table (one shard per rank, one entry in the index)."""
    data = tmp_path / "corpus.txt"
    data.write_text(CORPUS)
    model = {"ffn": "memplus", "n_layers": 2}
    run(_config(6, **model), out=tmp_path / "one", data_path=str(data), progress=False, log=lambda s: None)
    _launch({"out": str(tmp_path / "two"), "data": str(data), "max_steps": 6, "model": model})
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * abs(a), (a, b)
    index = json.loads((latest_checkpoint(tmp_path / "two") / "index.json").read_text())
    tables = sorted(index["tables"])
    assert tables == ["shared_bank.values"], tables



def _adaptive_model() -> FHMELanguageModel:
    """Adaptive depth with routers that spread tokens over every depth."""
    torch.manual_seed(0)
    model = FHMELanguageModel(tiny_model_config(num_experts=NUM_EXPERTS, dim=DIM, fractal_depth=3,
                                                adaptive_depth=True, depth_rule="threshold",
                                                depth_target=0.45)).eval()
    for layer in model.fhme_layers():
        torch.nn.init.normal_(layer.depth_router.weight, std=2.0)
    return model


def _adaptive_batch(world: int = 1, rank: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1)).tensor_split(world)[rank]


def _adaptive_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _adaptive_model()
    shard_experts(model, DistContext(rank, world))
    assert all(layer.compact for layer in model.fhme_layers())
    with torch.no_grad():
        save_file({"logits": model(_adaptive_batch(world, rank))}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_sharded_adaptive_layers_still_compact_with_uneven_stages(tmp_path: Path) -> None:
    """Each rank runs a stage only for its tokens that reach it, so the ranks bring different
    token counts to each sharded bank: the logits still equal one process's."""
    model = _adaptive_model()
    reach = []
    for rank in range(2):
        with collect(model) as stats, torch.no_grad():
            model(_adaptive_batch(2, rank))
        reach.append([stats.total(layer, DEPTH_COUNTS).tolist() for layer in model.fhme_layers()])
    assert reach[0] != reach[1]  # the ranks' stages do differ in size
    with torch.no_grad():
        expected = model(_adaptive_batch())
    mp.spawn(_adaptive_worker, args=(2, _free_port(), str(tmp_path / "logits")), nprocs=2, join=True)
    got = torch.cat([load_file(str(tmp_path / f"logits.{rank}"))["logits"] for rank in range(2)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    losses = _fsdp_losses(DistContext(rank, world), fsdp=True)
    if rank == 0:
        Path(out).write_text(json.dumps(losses))
    dist.destroy_process_group()


def _fsdp_losses(ctx: DistContext, fsdp: bool) -> list[float]:
    """Five steps of the same global batches, each rank training on its slice. ``fsdp``: FSDP2
    (``fully_shard``) over each block's dense weights and the rest, expert tables row-sharded by
    ``shard_experts`` and left to their own optimizer (``ignored_params``)."""
    torch.manual_seed(0)
    model = FHMELanguageModel(tiny_model_config(num_experts=NUM_EXPERTS, dim=DIM, n_layers=2)).train()
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        shard_experts(model, ctx)
        tables, mesh = set(expert_tables(model)), init_device_mesh("cpu", (ctx.world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh, ignored_params=tables)
        fully_shard(model, mesh=mesh, ignored_params=tables)
    opt = ModelOptimizer(model, 1e-3, 0.03, 0.0, "lazy_adam")
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(5):
        x = torch.randint(0, 256, (4, 32), generator=gen).tensor_split(ctx.world)[ctx.rank]
        loss, ok = train_step(model, opt, x, x.roll(-1, 1), 1.0, ctx=ctx)
        assert ok
        losses.append(loss)
    return losses


def test_two_ranks_under_fsdp2_match_one_process(tmp_path: Path) -> None:
    """What a torchtitan-style loop does: ``fully_shard`` on the blocks (dense weights sharded,
    gradients reduce-scattered), expert tables row-sharded and kept out of FSDP."""
    if not hasattr(pytest.importorskip("torch.distributed.fsdp"), "fully_shard"):
        pytest.skip("this PyTorch has no public FSDP2 (torch.distributed.fsdp.fully_shard)")
    one = _fsdp_losses(DistContext(), fsdp=False)
    out = tmp_path / "losses.json"
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    two = json.loads(out.read_text())
    assert len(two) == 5
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * abs(a), (one, two)


def test_several_ranks_refuse_selection_biases_with_adaptive_depth(tmp_path: Path) -> None:
    """Past stage 1 each rank routes its own token count, so the biases' fold (the same choices
    gathered on every rank) cannot run; refused before any rank writes anything."""
    model = tiny_model_config(adaptive_depth=True, fractal_depth=3, depth_penalty=0.01, balance_rate=0.05)
    config = RunConfig(model, TrainConfig(batch_size=4, max_steps=2))
    with pytest.raises(ValueError, match="balance_rate with adaptive_depth"):
        run(config, out=tmp_path / "r", data_path="unused", progress=False, ctx=DistContext(0, 2))
    assert not (tmp_path / "r").exists()
