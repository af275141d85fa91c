"""glibc malloc settings for a process that runs a teacher forward on the CPU.

A BERT-base forward of 16 x 128 tokens allocates ~250 MB of logits and dozens of 6-25 MB
activations. glibc serves every block above its mmap threshold with a fresh mmap and unmaps it on
free, and a thread's own arena (64 MB heaps) does the same for anything larger; so every batch
faults its whole working set in again: 1.1M minor faults and 2 s of system time per 6 batches,
measured on the 2-core machine. With one arena, large blocks kept in the heap and the heap never
trimmed, the next batch reuses the freed blocks: no faults, forwards 12-15% faster. The process
stays at its high-water mark, which a teacher reaches on its first batch anyway.

Only for CPU teachers: beside a GPU the host allocates little, and one arena would make a dozen
writer threads share one malloc lock. `KDCACHE_MALLOC_TUNING=0` turns it off.
"""
from __future__ import annotations

import os
import platform

_LARGEST = 2**31 - 1  # mallopt takes an int
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(_LARGEST), "MALLOC_TRIM_THRESHOLD_": str(_LARGEST)}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters
_tuned = False


def enabled() -> bool:
    return os.environ.get("KDCACHE_MALLOC_TUNING", "1") != "0" and platform.system() == "Linux" \
        and platform.libc_ver()[0] == "glibc"


def worker_env() -> dict[str, str]:
    """Environment for a process started to run a CPU teacher (glibc reads it at start-up, before
    any thread has its arena)."""
    return dict(MALLOC_ENV) if enabled() else {}


def tuned() -> bool:
    """Whether this process runs with the settings (from its environment or `tune_this_process`)."""
    return _tuned or os.environ.get("MALLOC_ARENA_MAX") == MALLOC_ENV["MALLOC_ARENA_MAX"]


def tune_this_process() -> bool:
    """The same settings for the running process; True if they are in force. Threads that already
    have an arena of their own keep it, so call this before starting the threads that run forwards."""
    global _tuned
    if _tuned or not enabled():
        return _tuned
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    _tuned = all(mallopt(param, value) == 1 for param, value in
                 ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, _LARGEST), (_M_TRIM_THRESHOLD, _LARGEST)))
    return _tuned
