"""Fault injection for the reliability tests (docs/reliability.md). Inert unless KDCACHE_FAULTS is set.

KDCACHE_FAULTS is a comma-separated list of `point@shard` items, e.g. `die@2` (the actor process
exits abruptly, as on a node loss, while writing shard 2) or `raise@3` (shard 3's code raises).
`KDCACHE_FAULTS_ONCE=DIR` makes each fault fire only once (a marker file per fault in DIR), so a
retried shard succeeds.
"""
from __future__ import annotations

import os


def maybe_fail(point: str, shard: int) -> None:
    spec = os.environ.get("KDCACHE_FAULTS")
    if not spec:
        return
    wanted = f"{point}@{shard}"
    if wanted not in [s.strip() for s in spec.split(",")]:
        return
    once_dir = os.environ.get("KDCACHE_FAULTS_ONCE")
    if once_dir:
        marker = os.path.join(once_dir, f"fired-{point}-{shard}")
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
        except FileExistsError:
            return
    if point == "die":
        os._exit(137)  # no cleanup, no exception: what a SIGKILL or a lost node looks like
    if point == "raise":
        raise RuntimeError(f"injected failure in shard {shard} (KDCACHE_FAULTS={spec})")
