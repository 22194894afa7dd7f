"""Per-rank peak anonymous memory of sharded training and resume: P = 1 vs P = 2 (gloo, CPU).

Model: 2 layers, width 128, 4,194,304 experts per layer (neuron blocks, fp32), row-wise Adagrad.
Configurations, each in fresh processes launched by torchrun:

  train        a few training steps from scratch (ends with a checkpoint and one evaluation)
  resume       one more step from that run's checkpoint (P ranks read their own rows)
  resume-p1    P = 2 only: one more step from the P = 1 run's latest (single-file) checkpoint

Every rank samples ``RssAnon`` of /proc/self/status every 20 ms in a background thread and
reports its peak (VmHWM, which also counts file-backed pages such as mmapped checkpoints, is
printed beside it). One JSON line per configuration, then the P=2 / P=1 ratios of the largest
per-rank peak (goal <= 0.6).

The run refuses to start while another PyTorch process runs or the load average is above 0.5
(``--force`` skips the check): both skew the numbers. It writes checkpoints of about
layers * 2 * N * D * 4 bytes per run directory (8 GiB at full size) under --workdir, removed at
the end unless --keep.

    benchmarks/sharded_rss.sh                      # full size (needs ~12 GB of RAM, ~20 GB disk)
    python benchmarks/sharded_rss.py --experts 65536 --steps 2 --force     # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

GOAL = 0.6


# --- worker (one rank) -------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakSampler(threading.Thread):
    """Peak of RssAnon (kB) sampled every ``period_s`` seconds until ``stop()``."""

    def __init__(self, period_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.period_s, self.peak_kb = period_s, _status_kb("RssAnon")
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.period_s):
            self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))
        return self.peak_kb


def _run_config(args: argparse.Namespace, max_steps: int):  # type: ignore[no-untyped-def]
    from fractalmoe.config import SAVED_BEFORE, ModelConfig, RunConfig, TrainConfig

    # As measured: top-40, and the output gate and convolution as they were before becoming defaults.
    model = ModelConfig(dim=args.dim, n_layers=args.layers, num_experts=args.experts, seq_len=args.seq_len,
                        expert_dtype="float32", block="neuron", topk=40, **SAVED_BEFORE)
    train = TrainConfig(batch_size=args.batch, max_steps=max_steps, expert_optim="rowwise_adagrad",
                        eval_every=10**9, eval_batches=1, log_every=1, save_every=10**9,
                        keep_last=1, sample_bytes=0, warmup_steps=1)
    return RunConfig(model, train)


def worker(args: argparse.Namespace) -> None:
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    from fractalmoe.checkpoint import latest_checkpoint, read_run_state
    from fractalmoe.train import run

    run_dir = Path(args.run_dir)
    if args.worker == "train":
        run(_run_config(args, args.steps), out=run_dir, progress=False, log=lambda s: None)
    else:
        step = read_run_state(latest_checkpoint(run_dir))["step"]  # type: ignore[arg-type]
        run(_run_config(args, step + 1), resume=run_dir, progress=False, log=lambda s: None)
    peak = sampler.stop()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    report = {"rank": rank, "world": world, "peak_rss_anon_mb": peak / 1024,
              "vm_hwm_mb": _status_kb("VmHWM") / 1024, "seconds": time.perf_counter() - t0}
    Path(f"{args.report}.{rank}").write_text(json.dumps(report))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# --- driver ------------------------------------------------------------------------------------
def _launch(args: argparse.Namespace, mode: str, world: int, run_dir: Path, report: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           __file__, "--worker", mode, "--run-dir", str(run_dir), "--report", str(report),
           "--experts", str(args.experts), "--dim", str(args.dim), "--layers", str(args.layers),
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{mode} at P={world} failed (exit {proc.returncode})")
    reports = [json.loads(Path(f"{report}.{r}").read_text()) for r in range(world)]
    for r in range(world):
        Path(f"{report}.{r}").unlink()
    return reports


def _line(args: argparse.Namespace, config: str, world: int, reports: list[dict]) -> dict:
    table_mb = args.layers * 2 * args.experts * args.dim * 4 / world / 2**20
    return {"config": config, "P": world, "experts": args.experts, "dim": args.dim,
            "layers": args.layers, "steps": args.steps, "expert_optim": "rowwise_adagrad",
            "tables_mb_per_rank": round(table_mb, 1),
            "peak_rss_anon_mb": round(max(r["peak_rss_anon_mb"] for r in reports), 1),
            "peak_rss_anon_mb_per_rank": [round(r["peak_rss_anon_mb"], 1) for r in reports],
            "vm_hwm_mb_per_rank": [round(r["vm_hwm_mb"], 1) for r in reports],
            "seconds": round(max(r["seconds"] for r in reports), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=4_194_304, help="experts per layer (a square)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="training steps before the checkpoint")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="OMP threads per rank")
    p.add_argument("--workdir", default="runs/sharded_rss")
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--force", action="store_true",
                   help="run even while another PyTorch process runs or the load average is > 0.5")
    p.add_argument("--worker", choices=["train", "resume"], help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if not args.force:
        from fractalmoe.bench_hygiene import busy_reason

        reason = busy_reason()
        if reason:
            print(f"sharded_rss: refusing to start: {reason}", file=sys.stderr)
            return 2
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    report = work / "report"
    lines: list[dict] = []
    runs = {1: work / "p1", 2: work / "p2"}
    for world, run_dir in runs.items():
        lines.append(_line(args, "train", world, _launch(args, "train", world, run_dir, report)))
    for world, run_dir in runs.items():
        lines.append(_line(args, "resume", world, _launch(args, "resume", world, run_dir, report)))
    lines.append(_line(args, "resume-p1", 2, _launch(args, "resume", 2, runs[1], report)))
    peaks = {(ln["config"], ln["P"]): ln["peak_rss_anon_mb"] for ln in lines}
    for config, base in (("train", "train"), ("resume", "resume"), ("resume-p1", "resume")):
        ratio = peaks[(config, 2)] / peaks[(base, 1)]
        lines.append({"config": config, "ratio_p2_over_p1": round(ratio, 3), "goal": GOAL,
                      "ok": ratio <= GOAL})
    out = open(args.out, "a") if args.out else None  # noqa: SIM115
    for ln in lines:
        print(json.dumps(ln), flush=True)
        if out:
            out.write(json.dumps(ln) + "\n")
    if out:
        out.close()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(ln.get("ok", True) for ln in lines) else 1


if __name__ == "__main__":
    raise SystemExit(main())
