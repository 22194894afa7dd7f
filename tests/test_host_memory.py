"""Kept host memory: freed blocks stay with the process for reuse (glibc only)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

_CHILD = """
import json, torch
from fractalmoe.host_memory import keep_freed_memory
applied = keep_freed_memory()
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
def step():  # a step's worth of 16 MB blocks, held together, then all freed
    blocks = [torch.empty(4 << 20).fill_(1.0) for _ in range(4)]
    return rss_mb()
held = [step() for _ in range(3)]
print(json.dumps({"applied": applied, "held": held[-1], "after": rss_mb()}))
"""


def _kept_rss() -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_memory_stays_with_the_process_after_a_step() -> None:
    """Steps that hold four 16 MB blocks, then free them: with glibc's defaults the 64 MB often go
    back to the OS (mapped anew, or trimmed off the heap, and faulted in again page by page next
    step; how often depends on the heap's history); kept, they always stay for the next step."""
    kept = _kept_rss()
    assert kept["applied"]
    assert kept["held"] - kept["after"] < 4
