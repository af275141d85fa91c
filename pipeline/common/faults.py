"""Fault injection for the reliability tests (docs/reliability.md). Inert unless KDCACHE_FAULTS is set.

KDCACHE_FAULTS is a comma-separated list of `point@shard` items; `shard` is a shard index or `*`
(every shard). Each fires mid-shard, after the shard's first batch went to its writer (so a
temporary file is open and earlier shards are committed):

- `die`: the process exits at once (`os._exit(137)`): no cleanup, no exception, as on a node loss;
- `kill`: the process sends itself SIGKILL, as `kill -9` or the kernel's OOM killer would;
- `raise`: the shard's own code raises (an application error: never retried);
- `stall`: the shard pauses `KDCACHE_FAULTS_STALL_S` seconds (default 1), so that a test can kill
  the driver, fill the disk or take a permission away at a known point of the pass.

`KDCACHE_FAULTS_ONCE=DIR` makes each fault fire only once (a marker file per fault in DIR), so a
retried shard succeeds. The executors pass every `KDCACHE_FAULTS*` variable on to the teacher actors.
"""
from __future__ import annotations

import os
import signal
import time

MID_SHARD_POINTS = ("stall", "kill", "die", "raise")


def _wanted(spec: str, point: str, shard: int) -> bool:
    items = {s.strip() for s in spec.split(",")}
    return f"{point}@{shard}" in items or f"{point}@*" in items


def maybe_fail(point: str, shard: int) -> None:
    spec = os.environ.get("KDCACHE_FAULTS")
    if not spec or not _wanted(spec, point, shard):
        return
    once_dir = os.environ.get("KDCACHE_FAULTS_ONCE")
    if once_dir:
        marker = os.path.join(once_dir, f"fired-{point}-{shard}")
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
        except FileExistsError:
            return
    if point == "stall":
        time.sleep(float(os.environ.get("KDCACHE_FAULTS_STALL_S", "1")))
    elif point == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif point == "die":
        os._exit(137)  # no cleanup, no exception: what a SIGKILL or a lost node looks like
    elif point == "raise":
        raise RuntimeError(f"injected failure in shard {shard} (KDCACHE_FAULTS={spec})")


def mid_shard(shard: int) -> None:
    """Every mid-shard fault point, in a fixed order (a stall before a death, if both are asked for)."""
    for point in MID_SHARD_POINTS:
        maybe_fail(point, shard)
