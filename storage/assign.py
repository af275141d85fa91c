"""Which rows each training rank reads in an epoch: row groups are the unit of order, rows the unit of split.

The epoch's global order is every row group of the cache, in (shard, group) order or, with
shuffle, permuted by (seed, epoch) — the same on every rank. That stream of rows is cut into
`world_size` contiguous ranges whose sizes differ by at most one row, so each rank reads whole
row groups except at most one at each end, and every rank takes the same number of batches of
`batch_size` (`steps`). Every row is read exactly once per epoch, except in one case:
when the epoch's last step would hold fewer rows than there are ranks, some rank would have one
batch fewer; then, as torch's DistributedSampler pads, the first `repeated` rows of the epoch's
order (fewer than `world_size`) are appended once more. Nothing is ever dropped.

All of it is a pure function of (the manifest's row groups, world_size, batch_size, seed, epoch,
shuffle): a resumed rank re-derives its ranges and skips the rows its checkpoint says it consumed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import CacheError
from .manifest import ShardInfo

# Recorded in training checkpoints: a checkpoint's per-rank positions mean something only under the
# assignment that wrote them (bump when the order or the split changes).
DATA_ORDER = "row-groups-1"


@dataclass(frozen=True)
class Group:
    """One Parquet row group of one shard."""

    shard: ShardInfo
    group: int
    rows: int


@dataclass(frozen=True)
class Span:
    """Rows [lo, hi) of one row group."""

    shard: ShardInfo
    group: int
    lo: int
    hi: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class Assignment:
    """One epoch's split: `spans[r]` is rank r's rows, in the order it reads them."""

    world_size: int
    batch_size: int
    rows: int  # the cache's rows
    row_groups: int
    shards: int
    repeated: int  # rows read twice this epoch (0 unless the last step had fewer rows than ranks)
    spans: tuple[tuple[Span, ...], ...]

    @property
    def rows_per_rank(self) -> list[int]:
        return [sum(s.rows for s in mine) for mine in self.spans]

    @property
    def steps(self) -> int:
        """Batches per rank per epoch (the same for every rank)."""
        return math.ceil(max(self.rows_per_rank) / self.batch_size)

    def summary(self) -> dict:
        rows = self.rows_per_rank
        return {"workers": self.world_size, "rows": self.rows, "row_groups": self.row_groups, "shards": self.shards,
                "rows_per_rank": rows, "batches_per_rank": [math.ceil(n / self.batch_size) for n in rows],
                "repeated_rows": self.repeated}


class AssignmentError(CacheError, ValueError):
    """The cache cannot be split over that many ranks."""


def epoch_order(groups: Sequence[Group], epoch: int, seed: int, shuffle: bool) -> list[Group]:
    ordered = sorted(groups, key=lambda g: (g.shard.index, g.group))
    if not shuffle:
        return ordered
    # No rank in the seed: every rank must derive the same global order.
    perm = np.random.default_rng([seed, epoch]).permutation(len(ordered))
    return [ordered[i] for i in perm]


def assign(groups: Sequence[Group], world_size: int, batch_size: int, *, epoch: int = 0, seed: int = 0,
           shuffle: bool = False) -> Assignment:
    """Split one epoch's rows over `world_size` ranks (see the module docstring for the rules)."""
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size and batch_size must be >= 1, got {world_size}, {batch_size}")
    groups = [g for g in groups if g.rows > 0]
    if len(groups) < world_size:
        shards = len({g.shard.index for g in groups})
        raise AssignmentError(f"the cache has {len(groups)} row group(s) in {shards} shard(s), fewer than the "
                              f"{world_size} workers asked for: every worker needs at least one row group; use "
                              f"at most {len(groups)} workers (a teacher pass with a smaller --batch-size writes "
                              "smaller, more numerous row groups)")
    order = epoch_order(groups, epoch, seed, shuffle)
    n = sum(g.rows for g in order)
    per_step = world_size * batch_size
    last_step = n - per_step * (math.ceil(n / per_step) - 1)
    repeated = world_size - last_step if last_step < world_size else 0
    total = n + repeated
    bounds = [r * (total // world_size) + min(r, total % world_size) for r in range(world_size + 1)]
    return Assignment(world_size=world_size, batch_size=batch_size, rows=n, row_groups=len(order),
                      shards=len({g.shard.index for g in order}), repeated=repeated,
                      spans=tuple(tuple(_cut(order, n, a, b)) for a, b in zip(bounds, bounds[1:])))


def _cut(order: list[Group], n: int, a: int, b: int) -> list[Span]:
    """Rows [a, b) of the epoch stream (order, then its first rows again past n) as spans."""
    out, offset = [], 0
    for g in (*order, *order):  # the second pass only ever serves the < world_size repeated rows
        if offset >= b:
            break
        lo, hi = max(a, offset), min(b, offset + g.rows)
        if lo < hi:
            out.append(Span(g.shard, g.group, lo - offset, hi - offset))
        offset += g.rows
    return out


def take(spans: Sequence[Span], start: int, stop: int | None = None) -> list[Span]:
    """Rows [start, stop) of a rank's span list (skipping on resume, cutting shuffle windows)."""
    out, offset = [], 0
    for s in spans:
        if stop is not None and offset >= stop:
            break
        lo = max(start - offset, 0)
        hi = s.rows if stop is None else min(stop - offset, s.rows)
        if lo < hi:
            out.append(Span(s.shard, s.group, s.lo + lo, s.lo + hi))
        offset += s.rows
    return out
