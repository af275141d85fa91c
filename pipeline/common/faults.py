"""Fault injection for the reliability tests (docs/reliability.md): one mechanism, two switches, both
inert unless set. A fault is one of `POINTS`, fired by `fire`, at most once per marker file when one
is given.

The teacher pass reads KDCACHE_FAULTS, a comma-separated list of `point@shard` items; `shard` is a
shard index or `*` (every shard). Each fires mid-shard, after the shard's first batch went to its
writer (so a temporary file is open and earlier shards are committed):

- `die`: the process exits at once (`os._exit(137)`): no cleanup, no exception, as on a node loss;
- `kill`: the process sends itself SIGKILL, as `kill -9` or the kernel's OOM killer would;
- `raise`: the shard's own code raises (an application error: never retried);
- `stall`: the shard pauses `KDCACHE_FAULTS_STALL_S` seconds (default 1), so that a test can kill
  the driver, fill the disk or take a permission away at a known point of the pass.

`KDCACHE_FAULTS_ONCE=DIR` makes each fault fire only once (a marker file per fault in DIR), so a
retried shard succeeds. The executors pass every `KDCACHE_FAULTS*` variable on to the teacher actors.

Training reads its config's `fail_at_step` and `fail_rank` (e.g. `fail_at_step=5:kill,8`): just before
step 5 rank `fail_rank` SIGKILLs itself, before step 8 it raises. Each fires once per run folder (a
marker file in --out), so the attempt that resumes past it does not fail again.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable

POINTS = ("stall", "kill", "die", "raise")
MID_SHARD_POINTS = POINTS  # the order a shard fires them in: a stall before a death, if both are asked for


def fire(point: str, message: str, once: str | os.PathLike | None = None) -> None:
    """Fire one fault; with `once`, only if the marker file `once` does not exist yet (it is created)."""
    if once is not None and not _first_time(once):
        return
    if point == "stall":
        time.sleep(float(os.environ.get("KDCACHE_FAULTS_STALL_S", "1")))
    elif point == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif point == "die":
        os._exit(137)  # no cleanup, no exception: what a SIGKILL or a lost node looks like
    elif point == "raise":
        raise RuntimeError(message)


def _first_time(marker: str | os.PathLike) -> bool:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


# -- the teacher pass: KDCACHE_FAULTS ------------------------------------------------------------


def _wanted(spec: str, point: str, shard: int) -> bool:
    items = {s.strip() for s in spec.split(",")}
    return f"{point}@{shard}" in items or f"{point}@*" in items


def maybe_fail(point: str, shard: int) -> None:
    spec = os.environ.get("KDCACHE_FAULTS")
    if not spec or not _wanted(spec, point, shard):
        return
    once_dir = os.environ.get("KDCACHE_FAULTS_ONCE")
    fire(point, f"injected failure in shard {shard} (KDCACHE_FAULTS={spec})",
         os.path.join(once_dir, f"fired-{point}-{shard}") if once_dir else None)


def mid_shard(shard: int) -> None:
    """Every mid-shard fault point, in a fixed order (a stall before a death, if both are asked for)."""
    for point in MID_SHARD_POINTS:
        maybe_fail(point, shard)


# -- training: fail_at_step / fail_rank ----------------------------------------------------------


def before_step(fail_at_step: Iterable | None, fail_rank: int, step: int, rank: int, out: str) -> None:
    """`fail_at_step` items are `N` (raise) or `N:kill` (SIGKILL) before step N on rank `fail_rank`."""
    wanted = dict(f"{s}:raise".split(":")[:2] for s in map(str, fail_at_step or []))
    kind = wanted.get(str(step))
    if rank != fail_rank or kind is None:
        return
    fire("kill" if kind == "kill" else "raise", f"injected failure before step {step} on rank {rank} (fail_at_step)",
         os.path.join(out, f".fail-at-step-{step}-rank-{rank}"))
