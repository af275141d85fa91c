"""Which rows each training rank reads (kdcache.storage.assign) and reading them (CacheReader.read_spans)."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from kdcache.storage import AssignmentError, CacheReader, Group, ShardError, ShardInfo, assign
from kdcache.storage.assign import take
from tests.support import write_cache


def _groups(layout: list[list[int]]) -> list[Group]:
    """Row groups from per-shard sizes; sample ids run on across shards, as the teacher pass writes them."""
    out, sid = [], 0
    for index, sizes in enumerate(layout):
        info = ShardInfo(file=f"shards/{index}", index=index, rows=sum(sizes), tokens=0, bytes=0, checksum="",
                         sample_id_first=sid, sample_id_last=sid + sum(sizes) - 1, row_groups=tuple(sizes))
        out += [Group(info, g, n) for g, n in enumerate(sizes)]
        sid += sum(sizes)
    return out


def _ids(span) -> list[int]:
    start = span.shard.sample_id_first + sum(span.shard.row_groups[:span.group])
    return list(range(start + span.lo, start + span.hi))


LAYOUTS = {
    "1 shard": [[32] * 5 + [7]],
    "3 shards": [[32, 32, 5], [32, 11], [32, 32, 32, 1]],
    "7 shards": [[8, 8, 3] for _ in range(6)] + [[2]],
    "tiny groups": [[1, 1, 1], [2, 1]],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("batch", [1, 4, 32])
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_row_once_and_equal_batches(layout, world, batch, shuffle):
    groups = _groups(LAYOUTS[layout])
    if len(groups) < world:
        with pytest.raises(AssignmentError, match=f"{len(groups)} row group\\(s\\).*fewer than the {world} workers"):
            assign(groups, world, batch)
        return
    n = sum(g.rows for g in groups)
    for epoch in range(3):
        a = assign(groups, world, batch, epoch=epoch, seed=7, shuffle=shuffle)
        assert a == assign(groups, world, batch, epoch=epoch, seed=7, shuffle=shuffle)  # a pure function
        rows = a.rows_per_rank
        assert max(rows) - min(rows) <= 1 and sum(rows) == n + a.repeated
        assert {math.ceil(r / batch) for r in rows} == {a.steps}  # every rank: the same batches
        seen = Counter(i for mine in a.spans for s in mine for i in _ids(s))
        assert set(seen) == set(range(n))  # nothing dropped
        twice = [i for i, c in seen.items() if c == 2]
        assert len(twice) == a.repeated and max(seen.values()) <= 2
        last_step = n - world * batch * (a.steps - 1)
        assert a.repeated == (world - last_step if last_step < world else 0) and a.repeated < world
        # each rank reads whole row groups, except at most one at each end of its range
        for mine in a.spans:
            partial = [i for i, s in enumerate(mine) if s.rows != s.shard.row_groups[s.group]]
            assert set(partial) <= {0, len(mine) - 1}


def test_shuffle_permutes_row_groups_per_epoch_the_same_on_every_rank():
    groups = _groups(LAYOUTS["7 shards"])
    order = [[(s.shard.index, s.group) for s in assign(groups, 1, 4, epoch=e, seed=3, shuffle=True).spans[0]]
             for e in range(3)]
    plain = [(s.shard.index, s.group) for s in assign(groups, 1, 4).spans[0]]
    assert plain == sorted(plain) and order[0] != plain and order[0] != order[1] != order[2]
    assert sorted(order[0]) == plain
    # the global order is the ranks' ranges laid end to end (no rank in the seed)
    split = assign(groups, 3, 4, epoch=1, seed=3, shuffle=True)
    joined = [i for mine in split.spans for s in mine for i in _ids(s)]
    alone = [i for s in assign(groups, 1, 4, epoch=1, seed=3, shuffle=True).spans[0] for i in _ids(s)]
    assert joined == alone


def test_take_cuts_a_rank_stream():
    spans = assign(_groups(LAYOUTS["3 shards"]), 2, 4).spans[1]
    stream = [i for s in spans for i in _ids(s)]
    for start, stop in ((0, None), (5, None), (31, 70), (0, 1), (len(stream), None), (3, 3)):
        assert [i for s in take(spans, start, stop) for i in _ids(s)] == stream[start:stop]


def _read_ids(reader, spans, batch_size=5):
    return [int(i) for b in reader.read_spans(spans, ["sample_id"], batch_size=batch_size)
            for i in b.column("sample_id").to_numpy()]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_read_spans_reads_exactly_the_assigned_rows(tmp_path, full_spec, world):
    manifest, _ = write_cache(tmp_path / "c", full_spec, shards=3, rows_per_shard=12, batch_rows=4)
    assert [s.row_groups for s in manifest.shards] == [(4, 4, 4)] * 3  # recorded at write time
    reader = CacheReader(str(tmp_path / "c"))
    for shuffle in (False, True):
        a = assign(reader.row_groups(), world, 3, epoch=1, seed=0, shuffle=shuffle)
        for mine in a.spans:
            expected = [i for s in mine for i in _ids(s)]
            assert _read_ids(reader, mine) == expected
            assert all(b.num_rows <= 5 for b in reader.read_spans(mine, ["sample_id"], batch_size=5))


def test_caches_without_row_groups_in_the_manifest_read_the_footers(tmp_path, full_spec):
    manifest, _ = write_cache(tmp_path / "c", full_spec, shards=2, rows_per_shard=8, batch_rows=4)
    path = tmp_path / "c" / "manifest.json"
    data = json.loads(path.read_text())
    for s in data["shards"]:
        del s["row_groups"]  # what a cache written by an earlier kdcache holds
    path.write_text(json.dumps(data))
    reader = CacheReader(str(tmp_path / "c"))
    assert all(s.row_groups == () for s in reader.shards)
    assert [(g.shard.index, g.group, g.rows) for g in reader.row_groups()] == [(i, g, 4) for i in (0, 1) for g in (0, 1)]
    spans = assign(reader.row_groups(), 2, 3).spans[1]
    assert _read_ids(reader, spans) == list(range(8, 16))


def test_a_manifest_that_misstates_row_groups_is_refused(tmp_path, full_spec):
    write_cache(tmp_path / "c", full_spec, shards=1, rows_per_shard=8, batch_rows=4)
    path = tmp_path / "c" / "manifest.json"
    data = json.loads(path.read_text())
    data["shards"][0]["row_groups"] = [5, 3]
    path.write_text(json.dumps(data))
    reader = CacheReader(str(tmp_path / "c"))
    with pytest.raises(ShardError, match=r"shard-000000.parquet: its row groups hold \[4, 4\].*manifest says \[5, 3\]"):
        _read_ids(reader, assign(reader.row_groups(), 1, 4).spans[0])
