"""Full integrity check of a cache: what `kdcache verify` runs.

Each problem is reported on its own, naming the file, so one bad shard never hides another.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .errors import CacheError
from .fs import TMP_PREFIX, Location
from .manifest import SHARD_DIR
from .reader import CacheReader


@dataclass(frozen=True)
class Problem:
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


def verify_cache(url: str, storage_options: dict[str, Any] | None = None) -> tuple[list[Problem], dict[str, int]]:
    """Check every checksum, size, schema, row/token count and sample-id uniqueness.

    Returns (problems, totals); an empty problem list means the cache is intact.
    """
    loc = Location.parse(url, storage_options)
    try:
        reader = CacheReader(url, storage_options, verify="full")
    except CacheError as exc:
        return [Problem(loc.display("manifest.json"), str(exc))], {}
    problems: list[Problem] = []
    ranges: list[tuple[int, int, str]] = []
    for info in reader.shards:
        where = loc.display(info.file)
        # The manifest's range counts even for a shard that fails below: its own problem is reported
        # once, not again as "ids missing" next to its neighbours.
        ranges.append((info.sample_id_first, info.sample_id_last, where))
        try:
            pf = reader.open_shard(info, rehash=True)  # size, checksum, footer, schema, rows
        except CacheError as exc:
            problems.append(Problem(where, str(exc).replace(where + ": ", "").replace(where + " ", "")))
            continue
        try:
            ids_and_lengths = pf.read(columns=["sample_id", "length"])
        except Exception as exc:  # noqa: BLE001 - any decode failure is a problem to report
            problems.append(Problem(where, f"data pages unreadable ({exc})"))
            continue
        finally:
            pf.close()
        ids = ids_and_lengths.column("sample_id").to_numpy()
        tokens = int(ids_and_lengths.column("length").to_numpy().sum())
        if tokens != info.tokens:
            problems.append(Problem(where, f"holds {tokens} tokens but the manifest says {info.tokens}"))
        if len(ids) and (ids.min() != info.sample_id_first or ids.max() != info.sample_id_last):
            problems.append(Problem(where, f"sample ids {ids.min()}..{ids.max()} differ from the manifest's "
                                           f"{info.sample_id_first}..{info.sample_id_last}"))
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            problems.append(Problem(where, f"sample ids repeated within the shard: {uniq[counts > 1][:5].tolist()}"))
    problems += list(_range_problems(ranges))
    problems += list(_stray_files(loc, {s.file.split('/', 1)[-1] for s in reader.shards}))
    expected = reader.manifest.header.generation.get("num_shards")
    if expected is not None and expected != len(reader.shards):
        problems.append(Problem(loc.display("manifest.json"),
                                f"lists {len(reader.shards)} shards but the pass planned {expected}"))
    totals = {"shards": len(reader.shards), "rows": reader.manifest.rows, "tokens": reader.manifest.tokens,
              "bytes": reader.manifest.bytes}
    return problems, totals


def _range_problems(ranges: list[tuple[int, int, str]]) -> Iterator[Problem]:
    """Shard id ranges must not overlap (no id twice) and must leave no gap (no id missing)."""
    ranges.sort()
    for (lo_a, hi_a, a), (lo_b, hi_b, b) in zip(ranges, ranges[1:]):
        if lo_b <= hi_a:
            yield Problem(b, f"sample ids {lo_b}..{min(hi_a, hi_b)} also appear in {a}")
        elif lo_b > hi_a + 1:
            yield Problem(b, f"sample ids {hi_a + 1}..{lo_b - 1} are missing between {a} and this shard")
    if ranges and ranges[0][0] != 0:
        yield Problem(ranges[0][2], f"sample ids 0..{ranges[0][0] - 1} are missing before this shard")


def _stray_files(loc: Location, listed: set[str]) -> Iterator[Problem]:
    for name in loc.listdir(SHARD_DIR):
        if name.endswith(".parquet") and not name.startswith(TMP_PREFIX) and name not in listed:
            yield Problem(loc.display(SHARD_DIR, name), "shard file not listed in the manifest (left by an "
                                                         "interrupted pass?); readers ignore it")
