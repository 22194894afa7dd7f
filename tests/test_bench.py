"""``bench layer``: hygiene refusal, alternation and medians, roofline counts, every impl at a
tiny size."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fractalmoe import bench_hygiene, bench_layer
from fractalmoe.bench import peak_rss_gb
from fractalmoe.bench_hygiene import busy_reason, mode_summary, schedule, torch_processes
from fractalmoe.bench_layer import (IMPLS, LAYER_IMPLS, LayerSpec, build_impl, headline_ratios, impl_available,
                                    run_layer, run_layer_bench, spawn_layer, summarize, validate)
from fractalmoe.roofline import (Hardware, Shape, bytes_per_expert, copy_gbps, flops_per_token, gather_gbps,
                                 step_bytes, step_flops)

HW = Hardware(gflops=100.0, gbps=10.0, copy_gbps=40.0)
TINY = dict(num_experts=64, dim=16, heads=2, topk=4, key_dim=8, tokens=16, steps=1, warmup=1)


def _needs(impl: str) -> None:
    if not impl_available(impl):
        pytest.skip(f"{impl} needs {IMPLS[impl].package} (pip install 'fractalmoe[bench]')")


# --- hygiene -----------------------------------------------------------------------------------


def test_refuses_while_another_torch_process_runs(monkeypatch) -> None:
    monkeypatch.setattr(bench_hygiene, "torch_processes", lambda: [(4242, "python train.py"), (7, "x")])
    monkeypatch.setattr(bench_hygiene, "load_average", lambda: 0.0)
    reason = busy_reason()
    assert reason is not None and "pid 4242" in reason and "1 more" in reason and "--force" in reason
    assert "\n" not in reason


def test_refuses_above_the_load_limit_only(monkeypatch) -> None:
    monkeypatch.setattr(bench_hygiene, "torch_processes", lambda: [])
    monkeypatch.setattr(bench_hygiene, "load_average", lambda: 0.51)
    reason = busy_reason()
    assert reason is not None and "0.51" in reason and "--force" in reason
    monkeypatch.setattr(bench_hygiene, "load_average", lambda: 0.5)
    assert busy_reason() is None


def test_an_unknown_load_average_counts_as_busy(monkeypatch) -> None:
    monkeypatch.setattr(bench_hygiene, "torch_processes", lambda: [])
    monkeypatch.setattr(bench_hygiene, "load_average", lambda: None)
    reason = busy_reason()
    assert reason is not None and "cannot be read" in reason and "--force" in reason


def test_a_python_process_whose_map_cannot_be_read_counts_as_torch(tmp_path, monkeypatch) -> None:
    def fake(pid: int, comm: str, maps: str | None, state: str = "S") -> None:
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "stat").write_text(f"{pid} ({comm}) {state} 1 0 0")
        (d / "comm").write_text(comm + "\n")
        (d / "cmdline").write_bytes(f"/usr/bin/{comm}\0job.py\0".encode())
        if maps is None:
            (d / "maps").mkdir()  # reading it fails (OSError), as another user's map does
        else:
            (d / "maps").write_text(maps)

    fake(4001, "python3.12", None)  # unreadable Python: possibly PyTorch
    fake(4002, "bash", None)  # unreadable, not Python: not counted
    fake(4003, "python3", "7f00 r-xp /lib/libc.so\n")  # readable, no libtorch
    fake(4004, "python3", "7f00 r-xp /x/libtorch_cpu.so\n")
    fake(4005, "python3", None, state="T")  # stopped
    monkeypatch.setattr(bench_hygiene, "PROC", tmp_path)
    assert torch_processes() == [(4001, "/usr/bin/python3.12 job.py (maps unreadable)"),
                                 (4004, "/usr/bin/python3 job.py")]


def test_waiting_for_the_machine_to_become_idle(monkeypatch) -> None:
    states = iter(["busy", "busy", None])
    monkeypatch.setattr(bench_hygiene, "busy_reason", lambda: next(states))
    assert bench_hygiene.wait_until_idle(0.0, poll_s=0.001) == "busy"  # no wait: refuse at once
    assert bench_hygiene.wait_until_idle(5.0, poll_s=0.001) is None


def test_process_scan_finds_a_running_torch_process_but_not_itself_or_a_stopped_one() -> None:
    code = "import sys, torch; print('ready', flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        pids = [pid for pid, _ in torch_processes()]
        assert proc.pid in pids
        assert os.getpid() not in pids
        os.kill(proc.pid, signal.SIGSTOP)  # stopped: takes nothing from a benchmark
        for _ in range(100):
            if proc.pid not in [pid for pid, _ in torch_processes()]:
                break
            time.sleep(0.01)
        assert proc.pid not in [pid for pid, _ in torch_processes()]
        os.kill(proc.pid, signal.SIGCONT)
    finally:
        proc.kill()
        proc.wait()


def test_cli_refusal_is_one_line_and_exit_2(monkeypatch, capsys) -> None:
    from fractalmoe.cli import main

    monkeypatch.setattr(bench_hygiene, "busy_reason", lambda: "the 1-minute load average is 3.00 (> 0.5)")
    measured = []
    monkeypatch.setattr(bench_layer, "matmul_gflops", lambda **_: measured.append(1))
    assert main(["bench", "layer", "--experts", "256", "--impl", "fractalmoe"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the 1-minute load average") and not measured
    assert main(["bench", "model", "--experts", "64"]) == 2


def test_cli_user_mistakes_come_before_the_hygiene_check(monkeypatch, capsys) -> None:
    from fractalmoe.cli import main

    monkeypatch.setattr(bench_hygiene, "busy_reason", lambda: pytest.fail("checked the machine first"))
    for argv, words in ((["--impl", "nope"], "unknown --impl nope"), (["--experts", "60"], "perfect square"),
                        (["--repeats", "2"], "at least 3 repeats"),
                        (["--expert-dtype", "fp16"], "comma list of float32, bfloat16"),
                        (["--device", "meta"], "the benchmarks run on cpu or cuda"),
                        (["--device", "gpu0"], "is not a device")):
        assert main(["bench", "layer", *argv]) == 2
        assert words in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is missing")
def test_cli_refuses_cuda_without_a_device(capsys) -> None:
    from fractalmoe.cli import main

    for kind in ("layer", "model"):
        assert main(["bench", kind, "--device", "cuda", "--force"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "this PyTorch sees no CUDA device" in err


def test_model_benchmark_times_the_default_model(monkeypatch) -> None:
    from types import SimpleNamespace

    from fractalmoe import bench
    from fractalmoe.bench import ModelSpec, run_model

    readings = iter(range(0, 10_000, 10))  # every reading of the counters: 10 more faults, 10 ms
    monkeypatch.setattr(bench.resource, "getrusage",
                        lambda who: SimpleNamespace(ru_minflt=(f := next(readings)), ru_stime=f / 1e3))
    row = run_model(ModelSpec(4096, batch_size=2, steps=1, peak_gflops=100.0, copy_gbps=10.0))
    # counted over each timed step alone (two readings a step), not build, warm-up or inference
    assert row["page_faults_per_step"] == 10 and row["system_ms_per_step"] == pytest.approx(10.0)
    assert row["N"] == 4096 and row["tokens"] == 2 * 128 and "peak_device_gb" not in row
    assert row["step_ms"] == pytest.approx(row["fwd_ms"] + row["bwd_ms"] + row["opt_ms"])
    # the floor's bytes by hand: the default FHME (C = 2, value rows) reads 3 block calls x 2 heads
    # x top-22 rows of 128 float32 a token per layer, in the forward and again in the backward;
    # AdamW moves 32 B per dense parameter
    from fractalmoe.config import default_run_config
    from fractalmoe.experts import expert_tables
    from fractalmoe.model import FHMELanguageModel

    cfg = default_run_config().model.replace(num_experts=4096)
    model = FHMELanguageModel(cfg)
    dense = model.num_params() - sum(t.numel() for t in expert_tables(model))
    rows = cfg.n_layers * 3 * cfg.expert_heads * cfg.topk * cfg.dim * 4
    assert row["bytes"] == 2 * 256 * rows + 32 * dense
    floor_ms = 3 * model.flops_per_token() * 256 / 100e9 * 1e3 + row["bytes"] / 10e9 * 1e3
    assert row["roofline_frac"] == pytest.approx(floor_ms / row["step_ms"])


def test_model_benchmark_prints_peak_and_bandwidth_first_and_floors_at_that_peak(monkeypatch, capsys) -> None:
    from fractalmoe import bench, roofline
    from fractalmoe.cli import main

    monkeypatch.setattr(roofline, "matmul_gflops", lambda **_: 123.0)
    monkeypatch.setattr(roofline, "copy_gbps", lambda **_: 45.0)
    monkeypatch.setattr(bench, "spawn", lambda kind, spec: bench.run_model(bench.ModelSpec(**spec)))
    assert main(["bench", "model", "--experts", "4096", "--batch-size", "1", "--steps", "1", "--force"]) == 0
    first, row = capsys.readouterr().out.splitlines()[:2]
    assert first.startswith("measured peak 123.0 GFLOP/s") and "45.0 GB/s (large-tensor copy" in first
    assert "N=    4,096" in row
    assert main(["bench", "model", "--experts", "4096", "--batch-size", "1", "--steps", "1", "--force",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peak_gflops"] == 123.0 and out["copy_gbps"] == 45.0


def test_model_benchmark_runs_the_forward_as_train_would_under_autocast(monkeypatch) -> None:
    from fractalmoe.bench import ModelSpec, run_model
    from fractalmoe.model import FHMELanguageModel

    seen: list[bool] = []
    forward = FHMELanguageModel.forward

    def recording(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(FHMELanguageModel, "forward", recording)
    row = run_model(ModelSpec(4096, batch_size=2, steps=1, overrides=["autocast=bfloat16"]))
    assert row["autocast"] == "bfloat16" and seen and all(seen)


# --- alternation, medians, ratios ------------------------------------------------------------


def test_schedule_alternates_round_robin() -> None:
    assert schedule(2, 3) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def test_mode_summary_takes_medians_and_speedups_over_the_first_mode() -> None:
    rows = [{"mode": m, "step_ms": t, "faults": f, "repeat": r}
            for r, (a, b) in enumerate([(10.0, 5.0), (30.0, 4.0), (20.0, 6.0)])
            for m, t, f in (("old", a, 7), ("new", b, 1))]
    summary = mode_summary(rows, ("old", "new"))
    assert summary == {"summary": "median", "old_step_ms": 20.0, "old_faults": 7, "new_step_ms": 5.0,
                       "new_faults": 1, "speedup_new_step_ms": 4.0}


def test_mode_summary_takes_the_union_of_keys_over_rows() -> None:
    rows = [{"mode": "old", "step_ms": 10.0, "repeat": 0},  # an older revision: no faults, no sys_ms
            {"mode": "new", "step_ms": 5.0, "faults": 3, "sys_ms": 1.0, "repeat": 0},
            {"mode": "old", "step_ms": 12.0, "faults": 9, "repeat": 1}]
    summary = mode_summary(rows, ("old", "new"))
    assert summary == {"summary": "median", "old_step_ms": 11.0, "old_faults": 9, "new_step_ms": 5.0,
                       "new_faults": 3, "new_sys_ms": 1.0, "speedup_new_step_ms": 2.2}


def _fake_row(spec: LayerSpec, step_ms: float) -> dict:
    return {"impl": spec.impl, "rule": IMPLS[spec.impl].rule, "N": spec.num_experts, "tokens": spec.tokens,
            "fwd_ms": step_ms / 2, "bwd_ms": step_ms / 4, "opt_ms": step_ms / 4, "step_ms": step_ms,
            "infer_ms": step_ms / 3, "peak_rss_gb": 1.0, "touched_rows": 10, "bytes": 1e6, "floor_ms": 1.0,
            "floor_copy_ms": 0.5, "flops": 1e6}


def test_runs_alternate_and_report_medians() -> None:
    specs = [LayerSpec("fractalmoe", 64), LayerSpec("peer-dense", 64)]
    times = {"fractalmoe": iter([10.0, 30.0, 20.0]), "peer-dense": iter([50.0, 40.0, 45.0])}
    order = []

    def runner(spec: LayerSpec, hw: Hardware) -> dict:
        order.append(spec.impl)
        return _fake_row(spec, next(times[spec.impl]))

    rows = run_layer_bench(specs, 3, {"float32": HW}, runner)
    assert order == ["fractalmoe", "peer-dense"] * 3
    ours, dense = rows
    assert ours["step_ms"] == 20.0 and ours["step_ms_runs"] == [10.0, 30.0, 20.0] and ours["repeats"] == 3
    assert ours["train_tok_s"] == pytest.approx(ours["tokens"] / 0.020)
    assert ours["roofline_frac"] == pytest.approx(1.0 / 20.0)
    assert ours["roofline_frac_copy"] == pytest.approx(0.5 / 20.0)
    assert dense["step_ms"] == 45.0 and dense["fwd_ms"] == 22.5


def test_a_failed_configuration_is_not_repeated() -> None:
    specs = [LayerSpec("fractalmoe", 64), LayerSpec("peer-dense", 64)]
    calls = []

    def runner(spec: LayerSpec, hw: Hardware) -> dict:
        calls.append(spec.impl)
        if spec.impl == "peer-dense":
            return {"impl": spec.impl, "N": 64, "error": "out of memory"}
        return _fake_row(spec, 10.0)

    rows = run_layer_bench(specs, 3, {"float32": HW}, runner)
    assert calls.count("peer-dense") == 1 and calls.count("fractalmoe") == 3
    assert rows[1]["error"] == "out of memory" and headline_ratios(rows) == []


def test_headline_ratios_are_labelled_by_rule() -> None:
    def row(impl: str, n: int, ms: list[float]) -> dict:
        return summarize([_fake_row(LayerSpec(impl, n), t) for t in ms])

    rows = [row("fractalmoe", 16, [10, 10, 12]), row("fractalmoe-lazy-adam", 16, [20, 20, 20]),
            row("peer-pytorch-sparse", 16, [40, 50, 40]), row("peer-pytorch", 16, [100, 100, 100]),
            row("fractalmoe", 64, [20, 20, 20])]
    got = {r["label"]: r for r in headline_ratios(rows)}
    same = got["same rule (lazy Adam): fractalmoe-lazy-adam vs peer-pytorch-sparse, N=16"]
    assert same["ratio"] == 2.0 and same["round_min"] == 2.0 and same["round_max"] == 2.5
    assert same["floor_ratio"] == 40.0  # the ceiling: PEER's median step (40 ms) over our floor (1 ms)
    assert got["different rules (row-wise Adagrad vs lazy Adam): fractalmoe vs peer-pytorch-sparse, N=16"][
        "ratio"] == 4.0
    assert got["different rules (row-wise Adagrad vs dense AdamW): fractalmoe vs peer-pytorch, N=16"][
        "ratio"] == 10.0
    assert got["different rules (lazy Adam vs dense AdamW): fractalmoe-lazy-adam vs peer-pytorch, N=16"][
        "ratio"] == 5.0
    assert got["fractalmoe (row-wise Adagrad): N=64 vs N=16"]["ratio"] == 0.5
    assert len(got) == 5


def test_each_table_dtype_has_its_bandwidth_and_ratios() -> None:
    bf16 = Hardware(gflops=100.0, gbps=20.0, copy_gbps=40.0)
    specs = [LayerSpec("fractalmoe", 64), LayerSpec("fractalmoe", 64, expert_dtype="bfloat16"),
             LayerSpec("peer-pytorch-sparse", 64, expert_dtype="bfloat16")]  # PEER keeps fp32 tables
    seen = []
    times = {"fractalmoe": 20.0, "fractalmoe, bfloat16 tables": 10.0, "peer-pytorch-sparse": 40.0}

    def runner(spec: LayerSpec, hw: Hardware) -> dict:
        seen.append((spec.name, hw.gbps))
        return {**_fake_row(spec, times[spec.name]), "expert_dtype": spec.shape().expert_dtype}

    rows = run_layer_bench(specs, 3, {"float32": HW, "bfloat16": bf16}, runner)
    assert set(seen) == {("fractalmoe", 10.0), ("fractalmoe, bfloat16 tables", 20.0), ("peer-pytorch-sparse", 10.0)}
    got = {r["label"]: r["ratio"] for r in headline_ratios(rows)}
    assert got["fractalmoe: bfloat16 vs float32 tables, N=64"] == 2.0
    assert got["different rules (row-wise Adagrad vs lazy Adam): fractalmoe, bfloat16 tables vs "
               "peer-pytorch-sparse, N=64"] == 4.0
    assert got["different rules (row-wise Adagrad vs lazy Adam): fractalmoe vs peer-pytorch-sparse, N=64"] == 2.0
    assert len(got) == 3


def test_stochastic_rounding_impl_needs_bfloat16_and_is_compared_with_nearest() -> None:
    with pytest.raises(ValueError, match="add --expert-dtype bfloat16"):
        validate(["fractalmoe-deferred-sr"], [64], 4, 8, 3)
    validate(["fractalmoe-deferred-sr"], [64], 4, 8, 3, expert_dtypes=("float32", "bfloat16"))

    def row(impl: str, ms: float) -> dict:
        spec = LayerSpec(impl, 64, expert_dtype="bfloat16")
        return summarize([{**_fake_row(spec, ms), "expert_dtype": "bfloat16"}] * 3)

    got = {r["label"]: r["ratio"] for r in headline_ratios([row("fractalmoe-deferred", 10.0),
                                                            row("fractalmoe-deferred-sr", 12.5)])}
    assert got == {"fractalmoe-deferred-sr vs fractalmoe-deferred: stochastic vs nearest rounding, N=64": 0.8}


# --- roofline ----------------------------------------------------------------------------------


def test_step_bytes_match_a_hand_count() -> None:
    # N=64 rows of D=4 fp32 (16 B), S = 5 tokens x 2 heads x top-3 = 30 slots, R = 10 touched rows.
    # Per table: rows gathered by the forward and again by the backward 2*30*16 = 960, gradient
    # rows 10*16 = 160. Dense parameters: query 4*2*4 = 32
    # plus sub-keys 2 heads * 8 keys * 4 = 64 -> 96 params, AdamW 8 x 4 B each = 3072.
    shape = Shape(num_experts=64, dim=4, heads=2, topk=3, key_dim=4, tokens=5)
    # row-wise Adagrad update: grad read 160, rows r/w 320, 4-byte state r/w 80 = 560
    assert step_bytes(shape, "rowwise_adagrad", 10).total == 2 * (960 + 160 + 560) + 3072 == 6432
    # lazy Adam update: 160 + 320 + moments (2 x 16 B per row) read + written 2*10*32 = 640 -> 1120
    assert step_bytes(shape, "lazy_adam", 10).total == 2 * (960 + 160 + 1120) + 3072 == 7552
    # dense AdamW update: grad rows read 160, all 64 rows r/w 2048, both moments of all rows 4096
    assert step_bytes(shape, "dense_adamw", 10).total == 2 * (960 + 160 + 6304) + 3072 == 17920
    assert step_bytes(shape, "dense_adamw", 10, tables=1).total == 960 + 160 + 6304 + 3072
    # bf16 rows (8 B), fp32 optimizer state: 2 * (480 + 80 + (80 + 160 + 80)) + 3072
    bf16 = Shape(num_experts=64, dim=4, heads=2, topk=3, key_dim=4, tokens=5, expert_dtype="bfloat16")
    assert step_bytes(bf16, "rowwise_adagrad", 10).total == 4832
    with pytest.raises(ValueError, match="unknown update rule"):
        step_bytes(shape, "sgd", 10)


def test_flops_match_a_hand_count_and_the_layer_own_count() -> None:
    from fractalmoe.experts import meta_expert_tables
    from fractalmoe.fhme import FHME

    shape = Shape(num_experts=1024, dim=32, heads=4, topk=8, key_dim=16, tokens=7)
    # query 2*32*4*16 + sub-keys 2*4*32*16 + candidates 4*8*8 + slots 4*8 * (dot + mix) 4*32
    hand = 4096 + 4096 + 256 + 32 * 128
    assert flops_per_token(shape) == hand and step_flops(shape) == 3 * 7 * hand
    assert flops_per_token(shape, tables=1) == hand - 32 * 64
    with meta_expert_tables():
        layer = FHME(32, 1024, depth=1, heads=4, topk=8, key_dim=16)
    assert flops_per_token(shape) == layer.flops_per_token()


@pytest.mark.parametrize("parts", [3, 4])
def test_flops_of_multi_part_keys_match_the_layer_own_count(parts: int) -> None:
    """P parts: sum n_p sub-keys of width Q / P per head, and the candidate sums the router counts."""
    from fractalmoe.experts import meta_expert_tables
    from fractalmoe.fhme import FHME

    shape = Shape(num_experts=4096, dim=32, heads=4, topk=8, key_dim=24, tokens=7, key_parts=parts)
    with meta_expert_tables():
        layer = FHME(32, 4096, depth=1, heads=4, topk=8, key_dim=24, key_parts=parts)
    assert flops_per_token(shape) == layer.flops_per_token()
    assert shape.sub_keys == (16 + 16 + 16 if parts == 3 else 8 + 8 + 8 + 8)


def test_gather_and_copy_bandwidths_are_measured() -> None:
    for gbps in (gather_gbps(dim=16, table_mb=4, gather_mb=1, repeats=1), copy_gbps(mb=4, repeats=1)):
        assert math.isfinite(gbps) and gbps > 0


# --- the implementations -----------------------------------------------------------------------


@pytest.mark.parametrize("impl", LAYER_IMPLS)
def test_every_impl_runs_a_step(impl: str) -> None:
    _needs(impl)
    row = run_layer(LayerSpec(impl, **TINY), HW)
    assert row["impl"] == impl and row["rule"] == IMPLS[impl].rule
    assert 0 < row["touched_rows"] <= 64
    for key in ("fwd_ms", "bwd_ms", "opt_ms", "train_tok_s", "peak_rss_gb", "roofline_frac", "floor_ms"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    # the floor at streaming bandwidth (HW: 4x the random-row one) is lower, so is its fraction
    assert row["floor_copy_ms"] < row["floor_ms"] and row["roofline_frac_copy"] < row["roofline_frac"]
    shape = LayerSpec(impl, **TINY).shape()
    nbytes = step_bytes(shape, IMPLS[impl].rule, row["touched_rows"], IMPLS[impl].tables)
    assert row["bytes"] == nbytes.total and row["bytes_per_token"] == nbytes.gather / 2 / shape.tokens
    assert row["bytes_per_expert"] == bytes_per_expert(shape, IMPLS[impl].rule, IMPLS[impl].tables)


def test_bytes_per_expert_by_hand() -> None:
    shape = Shape(num_experts=64, dim=8, expert_dtype="bfloat16")
    assert bytes_per_expert(shape, "rowwise_adagrad", tables=2) == 2 * (8 * 2 + 4)
    assert bytes_per_expert(shape, "lazy_adam", tables=1) == 8 * 2 + 2 * 8 * 4


@pytest.mark.parametrize("impl", ["fractalmoe", "fractalmoe-lazy-adam", "peer-pytorch-sparse"])
def test_sparse_rules_update_only_touched_rows(impl: str) -> None:
    _needs(impl)
    built = build_impl(LayerSpec(impl, **TINY))
    before = [t.detach().clone() for t in built.tables]
    built.layer(torch.randn(1, 16, 16)).square().mean().backward()
    grads = [t.grad for t in built.tables]
    assert all(g is not None and g.is_sparse for g in grads)
    built.step()
    for t, b, g in zip(built.tables, before, grads):
        rows = g.coalesce().indices()[0]
        changed = (t.detach() != b).any(dim=1)
        assert changed[rows].any() and not changed[~torch.isin(torch.arange(64), rows)].any()


def test_peer_pytorch_sparse_matches_dense_forward() -> None:
    _needs("peer-pytorch-sparse")
    x = torch.randn(1, 16, 16)
    torch.manual_seed(0)
    sparse = build_impl(LayerSpec("peer-pytorch-sparse", **TINY))
    torch.manual_seed(0)
    dense = build_impl(LayerSpec("peer-pytorch", **TINY))
    torch.testing.assert_close(sparse.layer(x), dense.layer(x))


def test_validate_rejects_mistakes() -> None:
    validate(["fractalmoe"], [64, 256], topk=4, key_dim=8, repeats=3)
    with pytest.raises(ValueError, match="perfect square"):
        validate(["fractalmoe"], [63], topk=4, key_dim=8, repeats=3)
    with pytest.raises(ValueError, match="topk"):
        validate(["fractalmoe"], [9], topk=4, key_dim=8, repeats=3)
    with pytest.raises(ValueError, match="equal parts"):
        validate(["fractalmoe"], [64], topk=4, key_dim=7, repeats=3)
    validate(["fractalmoe"], [4096], topk=4, key_dim=9, repeats=3, key_parts=3)
    with pytest.raises(ValueError, match="two key halves"):
        validate(["peer-dense"], [4096], topk=4, key_dim=9, repeats=3, key_parts=3)
    with pytest.raises(ValueError, match="near-equal"):
        validate(["fractalmoe"], [4099], topk=4, key_dim=9, repeats=3, key_parts=3)


def test_a_multi_part_layer_runs_a_step() -> None:
    row = run_layer(LayerSpec("fractalmoe", **{**TINY, "key_dim": 12}, key_parts=3), HW)
    assert row["key_parts"] == 3 and row["train_tok_s"] > 0 and 0 < row["touched_rows"] <= 64


def test_one_repeat_runs_in_a_fresh_process() -> None:
    row = spawn_layer(LayerSpec("fractalmoe", **TINY), HW)
    assert "error" not in row, row.get("error")
    assert row["peak_gflops"] == HW.gflops and row["bandwidth_gbps"] == HW.gbps and row["step_ms"] > 0


def test_cli_layer_run_prints_table_and_ratios(monkeypatch, capsys) -> None:
    from fractalmoe.cli import main

    monkeypatch.setattr(bench_layer, "matmul_gflops", lambda **_: HW.gflops)
    monkeypatch.setattr(bench_layer, "gather_gbps", lambda dim, dtype, mb, **_: HW.gbps)
    monkeypatch.setattr(bench_layer, "copy_gbps", lambda **_: HW.copy_gbps)
    monkeypatch.setattr(bench_layer, "spawn_layer", run_layer)  # in-process repeats: fast
    argv = ["bench", "layer", "--experts", "16,64", "--impl", "fractalmoe,peer-dense", "--dim", "16",
            "--heads", "2", "--topk", "4", "--key-dim", "8", "--tokens", "16", "--steps", "1", "--force"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("measured peak 100.0 GFLOP/s") and "random-row gather of 64-byte rows" in out
    assert "40.0 GB/s (large-tensor copy)" in out
    assert "roofline_frac" in out and "fractalmoe (row-wise Adagrad): N=64 vs N=16" in out
    assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [(r["impl"], r["N"]) for r in rows] == [("fractalmoe", 16), ("peer-dense", 16),
                                                   ("fractalmoe", 64), ("peer-dense", 64)]
    assert all(r["repeats"] == 3 and len(r["step_ms_runs"]) == 3 for r in rows)
    assert "headline ratios" in captured.err
    assert main([*argv, "--experts", "16", "--expert-dtype", "float32,bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "random-row gather of 32-byte rows" in out and "fractalmoe, bfloat16 tables" in out
    assert "fractalmoe: bfloat16 vs float32 tables, N=16" in out


# --- bench adaptive ----------------------------------------------------------------------------


def test_bench_adaptive_reports_every_depth_and_the_router(tmp_path, capsys, monkeypatch) -> None:
    from fractalmoe import bench, evaluate
    from fractalmoe.bench import run_adaptive
    from fractalmoe.cli import main
    from fractalmoe.config import RunConfig, TrainConfig, tiny_model_config
    from fractalmoe.train import run

    monkeypatch.setattr(bench_hygiene, "wait_until_idle", lambda max_wait_s: None)  # this machine may be busy

    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    train = TrainConfig(batch_size=4, max_steps=2, eval_every=100, save_every=2, sample_bytes=0,
                        warmup_steps=1)
    for name, adaptive in (("r", True), ("fixed", False)):
        model = tiny_model_config(n_layers=1, fractal_depth=2, adaptive_depth=adaptive,
                                  depth_target=0.5 if adaptive else 0.0)
        run(RunConfig(model, train), out=tmp_path / name, data_path=str(text), progress=False,
            log=lambda s: None)
    rows = {r["mode"]: r for r in run_adaptive(str(tmp_path / "r"))}
    assert set(rows) == {"depth1", "depth2", "adaptive"}
    assert rows["depth1"]["blocks_per_token"] == 1 and rows["depth2"]["blocks_per_token"] == 3
    assert 1 <= rows["adaptive"]["blocks_per_token"] <= 3
    assert all(r["fhme_ms"] > 0 and math.isfinite(r["val_bpb"]) for r in rows.values())
    seq_len = tiny_model_config().seq_len
    calls, synced = [], []
    real_evaluate, real_sync = evaluate.evaluate, bench.synchronize
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: calls.append(1) or real_evaluate(*a, **k))
    monkeypatch.setattr(bench, "synchronize", lambda device: synced.append(device) or real_sync(device))
    short = {r["mode"]: r for r in run_adaptive(str(tmp_path / "r"), eval_bytes=2 * seq_len + 1, passes=1)}
    assert short["depth2"]["tokens"] == 2 * seq_len < rows["depth2"]["tokens"]
    assert len(calls) == 2 * 3  # an untimed warm-up pass, then the one timed pass, over the 3 modes
    assert synced and set(synced) == {"cpu"}  # the hooks wait for the device (a no-op on the CPU)
    monkeypatch.setattr(bench_hygiene, "wait_until_idle", lambda max_wait_s: "the machine is busy")
    with pytest.raises(ValueError, match="the machine is busy"):
        run_adaptive(str(tmp_path / "r"), passes=1)
    assert len(calls) == 6  # refused before any evaluation
    assert run_adaptive(str(tmp_path / "r"), eval_bytes=2 * seq_len + 1, passes=1, force=True)
    monkeypatch.setattr(bench_hygiene, "wait_until_idle", lambda max_wait_s: None)
    with pytest.raises(ValueError, match="shorter than one window"):
        run_adaptive(str(tmp_path / "r"), eval_bytes=seq_len, passes=1)
    monkeypatch.setattr(bench_hygiene, "wait_until_idle", lambda max_wait_s: "the machine is busy")
    capsys.readouterr()
    plot = tmp_path / "frontier.png"
    assert main(["bench", "adaptive", "--ckpt", str(tmp_path / "r"), "--ckpt", str(tmp_path / "fixed"),
                 "--plot", str(plot), "--json", "--force"]) == 0  # the command line can force it too
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # JSON lines only
    assert [(r["run"][-5:], r["mode"]) for r in out] == [
        (str(tmp_path / "r")[-5:], "depth1"), (str(tmp_path / "r")[-5:], "depth2"),
        (str(tmp_path / "r")[-5:], "adaptive"), ("fixed", "depth1"), ("fixed", "depth2")]
    adaptive = out[2]
    assert adaptive["margin"] == pytest.approx(adaptive["frontier_bpb"] - adaptive["val_bpb"])
    assert plot.stat().st_size > 0


def test_fixed_depth_frontier_is_the_lower_envelope_interpolated() -> None:
    from fractalmoe.bench import adaptive_frontier, fixed_frontier, frontier_at

    points = [(1.0, 2.6), (3.0, 2.5), (3.0, 2.55), (7.0, 2.52), (7.0, 2.4), (1.0, 4.5)]
    front = fixed_frontier(points)
    assert front == [(1.0, 2.6), (3.0, 2.5), (7.0, 2.4)]
    assert frontier_at(front, 2.0) == pytest.approx(2.55)
    assert frontier_at(front, 5.0) == pytest.approx(2.45)
    assert frontier_at(front, 0.5) is None and frontier_at(front, 9.0) == 2.4
    assert fixed_frontier([(1.0, 2.5), (3.0, 2.6)]) == [(1.0, 2.5)]  # more blocks, no better: off
    rows = [{"mode": "depth1", "blocks_per_token": 1.0, "val_bpb": 2.6},
            {"mode": "depth2", "blocks_per_token": 3.0, "val_bpb": 2.5},
            {"mode": "adaptive", "blocks_per_token": 2.0, "val_bpb": 2.53}]
    assert adaptive_frontier(rows)[2]["margin"] == pytest.approx(0.02)


def test_a_spawned_process_reports_its_own_peak_memory_not_its_parents() -> None:
    """The benchmark's fresh processes are started while the parent holds the bandwidth probe's
    table; an exec from a vfork'ed child carries the parent's peak into ru_maxrss."""
    held = torch.ones(600 * 2**20 // 4)  # 0.63 GB, touched
    code = "from fractalmoe.bench import peak_rss_gb; print(peak_rss_gb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    child = float(out.stdout.strip())
    assert 0.01 < child < peak_rss_gb() - 0.5, (child, peak_rss_gb())
    del held


def test_alternated_children_run_round_robin_in_fresh_processes(tmp_path, capsys) -> None:
    script = tmp_path / "child.py"
    script.write_text("import json, os, sys\n"
                      "print('noise')\n"
                      "print(json.dumps({'arg': sys.argv[2], 'pid': os.getpid(),"
                      " 'threads': os.environ['OMP_NUM_THREADS']}))\n")
    rows = bench_hygiene.alternated_children(str(script), [["a"], ["b"]], repeats=2, force=True)
    assert [(r["arg"], r["repeat"]) for r in rows] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert len({r["pid"] for r in rows}) == 4 and {r["threads"] for r in rows} == {"1"}


def test_alternated_children_keep_the_thread_setting_when_asked(tmp_path, monkeypatch, capsys) -> None:
    script = tmp_path / "child.py"
    script.write_text("import json, os\nprint(json.dumps({'threads': os.environ.get('OMP_NUM_THREADS')}))\n")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    rows = bench_hygiene.alternated_children(str(script), [["a"]], repeats=1, force=True, one_thread=False)
    assert rows[0]["threads"] is None


def test_alternated_children_refuse_a_busy_machine(monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench_hygiene, "wait_until_idle", lambda max_wait_s: "the machine is busy")
    with pytest.raises(SystemExit) as stop:
        bench_hygiene.alternated_children("unused.py", [["a"]], repeats=1, force=False)
    assert stop.value.code == 2 and capsys.readouterr().err == "error: the machine is busy\n"


def test_quality_reruns_unfinished_runs_and_exits_non_zero_on_a_failure(tmp_path, monkeypatch, capsys,
                                                                        load_benchmark) -> None:
    quality = load_benchmark("quality")
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "runs/quality/p"
    (root / "done").mkdir(parents=True)
    for f in ("results.jsonl", "table.md"):
        (root / "done" / f).write_text("{}\n")
    (root / "crashed").mkdir()
    (root / "crashed" / "results.jsonl").write_text("")  # opened before training, then the run died
    ran = []

    def fake_run(cmd, **kwargs):  # noqa: ANN001, ANN202
        out = Path(cmd[cmd.index("--out") + 1])
        ran.append(out.name)
        assert not out.exists()  # compare refuses a folder holding results.jsonl: cleared first
        out.mkdir()
        (out / "results.jsonl").write_text("{}\n")
        if out.name != "fails":
            (out / "table.md").write_text("|")
        return subprocess.CompletedProcess(cmd, 1 if out.name == "fails" else 0)

    monkeypatch.setattr(quality.subprocess, "run", fake_run)
    jobs = [(name, []) for name in ("done", "crashed", "new")]
    quality.run("p", jobs, [0], 0)  # every run finished: a normal return
    assert ran == ["crashed", "new"]
    ran.clear()
    quality.run("p", jobs, [0], 0)
    assert ran == []  # finished runs are never rerun
    with pytest.raises(SystemExit) as exc:
        quality.run("p", [*jobs, ("fails", []), ("after", [])], [0], 0)
    assert exc.value.code == 1 and ran == ["fails", "after"]  # a failure does not stop the others
    assert "p/fails failed (exit 1)" in capsys.readouterr().err


def test_quality_verdicts_need_the_same_seeds_on_both_sides(load_benchmark) -> None:
    tables = load_benchmark("quality_tables")
    two, other = [(2, 1.00), (3, 1.01)], [(2, 1.10), (3, 1.11)]
    assert tables._verdict(two, other) == "wins" and tables._verdict(other, two) == "loses"
    assert tables._verdict(two, [(2, 1.10)]) == "n/a: seeds differ (2, 3 against 2)"
    with pytest.raises(ValueError, match="seeds differ"):
        tables.wins(two, [(2, 1.10), (4, 1.11)])
    row = dict(ffn_flops_per_token=1.0, flops_per_token=2.0, params=1e6, train_tok_s=1.0)
    found = [dict(row, model="fhme", seed=2, val_bpb=1.0), dict(row, model="fhme", seed=3, val_bpb=1.01),
             dict(row, model="pkm", seed=2, val_bpb=1.1)]
    table = tables.comparison_table(found)
    assert "seeds fhme: 2, 3; pkm: 2" in table and "pkm: n/a: seeds differ" in table
    assert "seeds 2, 3)" in tables.comparison_table(found[:2])


def test_layer_table_labels_rules_and_bandwidths_and_keeps_dtypes_apart(tmp_path, monkeypatch, load_benchmark) -> None:
    tables = load_benchmark("make_tables")
    monkeypatch.setattr(tables, "R", tmp_path)
    common = dict(N=64, infer_tok_s=1.0, fwd_ms=1.0, bwd_ms=1.0, opt_ms=1.0, peak_rss_gb=1.0, roofline_frac=0.5,
                  peak_gflops=100.0, bandwidth_gbps=20.0, copy_gbps=40.0)
    rows = [dict(common, impl="fractalmoe", rule="rowwise_adagrad", expert_dtype="float32", train_tok_s=300.0),
            dict(common, impl="fractalmoe", rule="rowwise_adagrad", expert_dtype="bfloat16", train_tok_s=400.0),
            dict(common, impl="peer-dense", rule="dense_adamw", expert_dtype="float32", train_tok_s=100.0)]
    (tmp_path / "layer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = tables.layer_table()
    assert "vs peer-dense (dense AdamW)" in table
    assert "| fractalmoe | row-wise Adagrad | 64 | 300 | 3.0x |" in table
    assert "| fractalmoe, bfloat16 tables | row-wise Adagrad | 64 | 400 | 4.0x |" in table
    assert "20 GB/s (random-row gather of float32 rows) and 40 GB/s (large-tensor copy" in table
    old = [{k: v for k, v in r.items() if k not in ("rule", "expert_dtype", "copy_gbps")} for r in rows[::2]]
    (tmp_path / "layer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    table = tables.layer_table()  # rows from before those keys: the rule from the impl, the copy rate
    assert "| fractalmoe | row-wise Adagrad | 64 | 300 | 3.0x |" in table and "20 GB/s (copy, read + write)" in table


def test_balance_cost_refuses_a_busy_machine(monkeypatch, capsys, load_benchmark) -> None:
    cost = load_benchmark("balance_cost")
    monkeypatch.setattr(cost, "wait_until_idle", lambda max_wait_s: "the machine is busy")
    monkeypatch.setattr(cost, "FHME", lambda *a, **k: pytest.fail("built a layer on a busy machine"))
    monkeypatch.setattr(sys, "argv", ["balance_cost.py"])
    with pytest.raises(SystemExit) as exc:
        cost.main()
    assert exc.value.code == 2 and capsys.readouterr().err == "error: the machine is busy\n"


def test_row_exposure_finds_changed_rows_and_counts_the_reads_on_them(load_benchmark) -> None:
    """benchmarks/row_exposure.py: the rows a tuned copy changed, and the share of a model's row
    choices (and of its tokens) that land on them, against a count made choice by choice."""
    import copy

    from fractalmoe import FHMELanguageModel
    from fractalmoe.adapters import base_memories
    from fractalmoe.config import tiny_model_config
    from fractalmoe.stats import CHOICES, collect

    exposure = load_benchmark("row_exposure")
    torch.manual_seed(0)
    base = FHMELanguageModel(tiny_model_config(dim=64)).eval()
    tuned = copy.deepcopy(base)
    table = next(iter(base_memories(tuned)[0][1].fractal.bank.tables().values()))
    with torch.no_grad():
        table[[3, 7]] += 1.0
    changed = exposure.changed_rows(base, tuned)
    assert changed[0].nonzero().flatten().tolist() == [3, 7] and not any(c.any() for c in changed[1:])

    x = torch.randint(0, 256, (2, 16))
    marked = [torch.rand(c.numel()) < 0.3 for c in changed]
    got = exposure.exposure(base, marked, [x])
    with collect(base) as stats:
        base(x)
    for (_, memory), mask, layer in zip(base_memories(base), marked, got):
        per_token = [[] for _ in range(x.numel())]
        for block in memory.fractal.blocks:
            for idx in stats.values(block.memory.router, CHOICES):
                for t, rows in enumerate(idx.reshape(x.numel(), -1).tolist()):
                    per_token[t] += rows
        hits = sum(bool(mask[r]) for rows in per_token for r in rows)
        assert layer["choices_on_changed"] == round(hits / sum(map(len, per_token)), 4)
        assert layer["tokens_touched"] == round(sum(any(mask[r] for r in rows) for rows in per_token) / x.numel(), 4)


def test_embedding_sides_keep_each_part_of_a_change_and_revert_the_rest(load_benchmark) -> None:
    """benchmarks/embedding_sides.py: untying for the evaluation keeps the trained matrix on the
    side asked for and the base's on the other; reverting the tables leaves the embeddings alone."""
    import copy

    from fractalmoe import FHMELanguageModel
    from fractalmoe.adapters import base_memories
    from fractalmoe.config import tiny_model_config

    def table(m):
        return next(iter(base_memories(m)[0][1].fractal.bank.tables().values()))

    sides = load_benchmark("embedding_sides")
    torch.manual_seed(0)
    base = FHMELanguageModel(tiny_model_config(dim=64)).eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.embed.weight.add_(torch.randn_like(tuned.embed.weight))
        table(tuned)[5] += 1.0
    trained, x = tuned.embed.weight.detach().clone(), torch.randint(0, 256, (2, 16))
    expected = tuned(x)

    for tables, inp, head in [(True, True, True), (True, True, False), (True, False, True), (False, True, True)]:
        model = sides._with_sides(copy.deepcopy(tuned), base, tables, inp, head)
        assert torch.equal(model.embed.weight, trained if inp else base.embed.weight)
        assert torch.equal(model.head.weight, trained if head else base.embed.weight)
        assert torch.equal(table(model), table(tuned) if tables else table(base))
    assert torch.allclose(sides._with_sides(copy.deepcopy(tuned), base, True, True, True)(x), expected)


def test_pair_usage_separates_the_sub_keys_share_from_the_pairing(load_benchmark) -> None:
    """benchmarks/pair_usage.py: choices whose halves pair one to one (i, i) use every sub-key but
    only the diagonal's experts, where independent halves with the same sub-key shares would
    use nearly all; choices spread over every pair use what independence predicts."""
    pairs = load_benchmark("pair_usage")
    n, m = 16, 10_000
    diagonal = torch.zeros(n * n, dtype=torch.long)
    diagonal[torch.arange(n) * n + torch.arange(n)] = m // n
    got = pairs.pair_usage(diagonal, n)
    assert got["first_used"] == got["second_used"] == 1.0 and got["first_kl"] < 1e-9
    assert got["used"] == 1 / n and got["used_if_independent"] > 0.99
    everywhere = torch.full((n * n,), m // (n * n), dtype=torch.long)
    got = pairs.pair_usage(everywhere, n)
    assert got["used"] == 1.0 and abs(got["used_if_independent"] - 1.0) < 1e-6
