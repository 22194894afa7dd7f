"""Keep freed host memory for reuse instead of handing it back to the OS after every step.

A CPU training step allocates and frees the same tens of MB each time (row-sparse table
gradients and their sums, gathered rows, scores). glibc serves blocks above its mmap threshold
(128 KB at start, adapting upward as such blocks are freed) with fresh ``mmap`` calls, and it
returns heap space above its trim threshold to the OS; the memory then comes back through page
faults, each zeroing a page: in the default 4-layer FHME about 23,000 more faults and 60 ms more
system time a step than with the memory kept, which makes the step 1.09x faster
(`benchmarks/host_memory.py`). Fixing both thresholds
(mmap only past 32 MB, glibc's ceiling; no trimming below 1 GB) lets freed blocks be reused. Peak
memory is unchanged: it is set by what a step holds at once, not by what it has freed.

Process-wide, so the command line turns it on (``cli.console``, and the processes ``compare`` and
``bench model`` train in); a library user's loop can call ``keep_freed_memory()`` itself.
Elsewhere than glibc (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: 4 MiB * sizeof(long)
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds (see the module docstring). True if it was applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
