"""Benchmark hygiene shared by every timing in the project: refuse a busy machine, run each
measurement in a fresh process, alternate the configurations round-robin, report medians.

A timing taken while another PyTorch process runs (two share 2 cores by OpenMP and slow each
other 10-100x) or while the load average is high says nothing; same-run ratios of alternated,
fresh processes are what compare across machines.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

MAX_LOAD = 0.5  # the 1-minute load average above which a benchmark refuses to start
PROC = Path("/proc")  # where processes are listed (a test points it elsewhere)


def _parent(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _is_python(entry: Path) -> bool:
    """Whether the process's executable name says Python (its comm, else its argv[0])."""
    names = []
    for name in ("comm", "cmdline"):
        try:
            names.append((entry / name).read_bytes().split(b"\0")[0].rsplit(b"/", 1)[-1])
        except OSError:
            pass
    return any(n.startswith(b"python") for n in names)


def torch_processes() -> list[tuple[int, str]]:
    """(pid, command line) of other running processes with libtorch mapped, and of Python
    processes whose memory map cannot be read (another user's: they may run PyTorch, so they
    count as busy, marked "maps unreadable"); this process and its ancestors are not "other", nor
    are stopped processes (``kill -STOP``: they take no CPU or memory bandwidth until continued).
    Empty where /proc does not exist."""
    proc = PROC
    if not proc.is_dir():
        return []
    skip: set[int] = {os.getpid()}
    pid: int | None = os.getpid()
    while pid is not None and pid > 1:  # our ancestors wait for us: they are not competition
        skip.add(pid)
        pid = _parent(pid)
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):  # gone, or not a process we can see at all
            continue
        if state in ("Z", "X", "T", "t"):
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = ""
        try:
            if b"libtorch" not in (entry / "maps").read_bytes():
                continue
        except OSError:  # not ours to read: a Python process may be running PyTorch
            if not _is_python(entry):
                continue
            cmd = f"{cmd or '?'} (maps unreadable)"
        found.append((int(entry.name), cmd))
    return sorted(found)


def load_average() -> float | None:
    """The 1-minute load average; None where this platform does not report it."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not available on this platform
        return None


def busy_reason(max_load: float = MAX_LOAD) -> str | None:
    """Why the machine is not fit for a benchmark now (one line), or None."""
    procs = torch_processes()
    if procs:
        pid, cmd = procs[0]
        more = f" and {len(procs) - 1} more" if len(procs) > 1 else ""
        cmd = cmd if len(cmd) <= 60 else cmd[:57] + "..."
        return (f"another PyTorch process is running (pid {pid}: {cmd}){more}; timings would be "
                "skewed: wait for it to finish or pass --force")
    load = load_average()
    if load is None:
        return "the load average cannot be read: the machine may be busy; pass --force to run anyway"
    if load > max_load:
        return (f"the 1-minute load average is {load:.2f} (> {max_load}): the machine is busy; "
                "wait or pass --force")
    return None


def wait_until_idle(max_wait_s: float = 0.0, poll_s: float = 5.0) -> str | None:
    """``busy_reason()``, polled for up to ``max_wait_s`` seconds until the machine is idle (a
    script's previous step leaves the load average high for a minute or two)."""
    deadline = time.monotonic() + max_wait_s
    reason = busy_reason()
    while reason is not None and time.monotonic() + poll_s <= deadline:
        time.sleep(poll_s)
        reason = busy_reason()
    return reason


# --- repeats, medians, ratios ------------------------------------------------------------------


def schedule(configs: int, repeats: int) -> list[tuple[int, int]]:
    """(repeat, config) in run order: round-robin, every configuration once per round."""
    return [(r, c) for r in range(repeats) for c in range(configs)]


def alternated_children(script: str, children: list[list[str]], repeats: int, force: bool,
                        one_thread: bool = True) -> list[dict]:
    """A benchmark script's measurements: ``script --child ARGS`` for every ARGS of ``children``,
    each in a fresh process (single-threaded unless not ``one_thread``: then as a plain process
    starts), round-robin over ``repeats`` rounds; each child prints one JSON object last. On a
    busy machine (after waiting up to 3 minutes) it exits with a one-line error (status 2)
    unless ``force``."""
    reason = None if force else wait_until_idle(max_wait_s=180)
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        raise SystemExit(2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if one_thread else dict(os.environ)
    rows: list[dict] = []
    for repeat, c in schedule(len(children), repeats):
        proc = subprocess.run([sys.executable, script, "--child", *children[c]], capture_output=True,
                              text=True, env=env, check=True)
        rows.append({**json.loads(proc.stdout.splitlines()[-1]), "repeat": repeat})
        print(json.dumps(rows[-1]))
    return rows


def report(out: str, rows: list[dict], summary: dict) -> None:
    """Print a benchmark script's summary and write its rows and the summary to ``out`` (JSON lines)."""
    print(json.dumps(summary))
    with open(out, "w") as f:
        for r in [*rows, summary]:
            f.write(json.dumps(r) + "\n")


def mode_summary(rows: list[dict], modes: tuple[str, ...]) -> dict:
    """Medians over repeats of every numeric measurement per mode, and each later mode's speed-up
    over the first on every time (``*_ms``). The keys are the union over all rows (rows of
    different revisions may differ): a mode's median of a key is over its rows that have it, and
    a mode none of whose rows has it gets neither that median nor that speed-up."""
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items()  # first-seen order
                              if isinstance(v, (int, float)) and k != "repeat"))
    med = {m: {k: statistics.median(vals) for k in keys
               if (vals := [r[k] for r in rows if r["mode"] == m and isinstance(r.get(k), (int, float))])}
           for m in modes}
    return {"summary": "median", **{f"{m}_{k}": v for m in modes for k, v in med[m].items()},
            **{f"speedup_{m}_{k}": med[modes[0]][k] / med[m][k] for m in modes[1:] for k in keys
               if k.endswith("_ms") and k in med[modes[0]] and k in med[m]}}


def mode_benchmark(script: str, doc: str, modes: tuple[str, ...], measure: Callable[[str], dict],
                   out: str, one_thread: bool = True) -> None:
    """A benchmark script's command line: ``--child MODE`` prints ``measure(MODE)`` (one fresh
    process); otherwise every mode alternated over ``--repeats`` rounds (``alternated_children``),
    rows and ``mode_summary`` written to ``--out``. Each row carries its ``mode``."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=out)
    p.add_argument("--force", action="store_true", help="run even on a busy machine")
    p.add_argument("--child", choices=modes, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    rows = alternated_children(script, [[m] for m in modes], args.repeats, args.force, one_thread)
    report(args.out, rows, mode_summary(rows, modes))
