"""Bad caches fail loudly and name the file; a writer never leaves anything partial behind."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kdcache.storage import CacheExistsError, CacheReader, CacheSpec, CacheWriter, Header, ManifestError, ShardError
from kdcache.storage.manifest import MANIFEST
from kdcache.storage.verify import verify_cache
from tests.support import synthetic_batch, write_cache


@pytest.fixture
def cache(tmp_path, full_spec):
    write_cache(tmp_path / "c", full_spec, shards=3)
    return tmp_path / "c"


def _first_shard(cache):
    return sorted((cache / "shards").glob("shard-*.parquet"))[0]


def _read_all(cache):
    return sum(b.num_rows for b in CacheReader(str(cache)).iter_batches())


def test_intact_cache_verifies(cache):
    problems, totals = verify_cache(str(cache))
    assert problems == [] and totals["shards"] == 3 and totals["rows"] == 24


def test_missing_manifest(cache):
    (cache / MANIFEST).unlink()
    with pytest.raises(ManifestError, match="no manifest.json.*re-run the same `kdcache cache`"):
        CacheReader(str(cache))


@pytest.mark.parametrize("content,match", [("", "is empty"), ("{not json", "not valid JSON"),
                                           ('{"format": "other"}', "not a kdcache manifest")])
def test_empty_or_corrupt_manifest(cache, content, match):
    (cache / MANIFEST).write_text(content)
    with pytest.raises(ManifestError, match=match):
        CacheReader(str(cache))
    problems, _ = verify_cache(str(cache))
    assert len(problems) == 1 and "manifest.json" in problems[0].file


def test_newer_format_version(cache):
    data = json.loads((cache / MANIFEST).read_text())
    data["format_version"] = 99
    (cache / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="format_version 99.*upgrade kdcache"):
        CacheReader(str(cache))


def test_flipped_byte_is_caught_and_named(cache):
    shard = _first_shard(cache)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{shard.name}: checksum"):
        _read_all(cache)
    problems, _ = verify_cache(str(cache))
    assert [p.file.rsplit("/", 1)[-1] for p in problems] == [shard.name] and "checksum" in problems[0].message


def test_page_checksums_catch_corruption_even_without_file_checksum(cache):
    shard = _first_shard(cache)
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF  # inside the first data page
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=shard.name):
        for _ in CacheReader(str(cache), verify="size").iter_batches():
            pass


@pytest.fixture
def hash_passes(monkeypatch):
    """Counts whole-file checksum passes of the reader."""
    from kdcache.storage import reader

    passes = []
    real = reader.checksum_stream

    def counting(f):
        passes.append(1)
        return real(f)

    monkeypatch.setattr(reader, "checksum_stream", counting)
    return passes


def test_whole_file_checksum_once_per_shard_per_process(cache, hash_passes):
    for _epoch in range(2):  # the trainer opens every shard again each epoch, here through a new reader
        assert _read_all(cache) == 24
    assert len(hash_passes) == 3
    assert verify_cache(str(cache))[0] == [] and len(hash_passes) == 6  # `kdcache verify` always hashes


def test_shard_changed_after_its_first_open_is_checked_again(cache, hash_passes):
    _read_all(cache)
    shard = _first_shard(cache)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40  # same size, new modification time
    shard.write_bytes(bytes(data))
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a coarse clock cannot hide it
    with pytest.raises(ShardError, match=f"{shard.name}: checksum"):
        _read_all(cache)
    shard.write_bytes(bytes(data) + b"\0")  # another size
    with pytest.raises(ShardError, match=f"{shard.name} is .* bytes but the manifest says"):
        _read_all(cache)
    assert len(hash_passes) == 3 + 1


def test_truncated_shard(cache):
    shard = _first_shard(cache)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ShardError, match=f"{shard.name} is .* bytes but the manifest says"):
        _read_all(cache)
    assert any("bytes but the manifest" in p.message for p in verify_cache(str(cache))[0])


def test_deleted_and_empty_shard(cache):
    shards = sorted((cache / "shards").glob("shard-*.parquet"))
    shards[0].unlink()
    shards[1].write_bytes(b"")
    problems, _ = verify_cache(str(cache))
    named = {p.file.rsplit("/", 1)[-1]: p.message for p in problems}
    assert "missing" in named[shards[0].name] and "bytes" in named[shards[1].name]
    with pytest.raises(ShardError, match=shards[0].name):
        _read_all(cache)


def test_schema_that_disagrees_with_manifest(cache, tmp_path, full_spec):
    # A shard from a cache with other options, renamed into place with a matching size/checksum entry.
    other = CacheSpec(**{**full_spec.to_json(), "hidden_layers": [0], "codec_params": {}})
    write_cache(tmp_path / "other", other, shards=1)
    target = _first_shard(cache)
    target.write_bytes(_first_shard(tmp_path / "other").read_bytes())
    data = json.loads((cache / MANIFEST).read_text())
    from kdcache.storage.checksum import checksum_stream

    with open(target, "rb") as f:
        digest, size = checksum_stream(f)
    data["shards"][0].update(bytes=size, checksum=digest)
    (cache / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ShardError, match=f"{target.name}: its schema differs"):
        _read_all(cache)


def test_duplicate_and_missing_sample_ids_are_reported(cache):
    data = json.loads((cache / MANIFEST).read_text())
    data["shards"] = data["shards"][:1] + data["shards"][2:]  # drop the middle shard from the manifest
    (cache / MANIFEST).write_text(json.dumps(data))
    problems, _ = verify_cache(str(cache))
    messages = " | ".join(p.message for p in problems)
    assert "are missing between" in messages and "not listed in the manifest" in messages


def test_used_directory_refused_without_overwrite(cache, full_spec):
    other = Header(spec=full_spec, teacher={"name_or_path": "another-teacher"})
    with pytest.raises(CacheExistsError, match="different options.*--overwrite"):
        CacheWriter(str(cache), other)
    CacheWriter(str(cache), other, overwrite=True)
    assert not (cache / MANIFEST).exists() and not list((cache / "shards").glob("*.parquet"))


def test_same_options_is_a_no_op(cache, full_spec):
    before = {p.name: p.stat().st_mtime_ns for p in (cache / "shards").iterdir()}
    header = Header.from_json(json.loads((cache / MANIFEST).read_text()))
    writer = CacheWriter(str(cache), header)
    assert writer.complete is not None and len(writer.committed()) == 3
    assert before == {p.name: p.stat().st_mtime_ns for p in (cache / "shards").iterdir()}


def test_foreign_directory_refused(tmp_path, full_spec):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheExistsError, match="not empty"):
        CacheWriter(str(tmp_path), Header(spec=full_spec))


def test_failed_shard_leaves_nothing_and_stale_temps_are_ignored_then_cleaned(tmp_path, full_spec):
    url = str(tmp_path / "c")
    header = Header(spec=full_spec, generation={"num_shards": 2})
    writer = CacheWriter(url, header)
    rng = np.random.default_rng(0)
    with writer.shard_writer(0) as w:
        w.write(synthetic_batch(full_spec, np.arange(4), rng))
    with pytest.raises(RuntimeError):
        with writer.shard_writer(1) as w:
            w.write(synthetic_batch(full_spec, np.arange(4, 8), rng))
            raise RuntimeError("teacher crashed mid-shard")
    names = os.listdir(tmp_path / "c" / "shards")
    assert sorted(names) == ["shard-000000.json", "shard-000000.parquet"]
    # A writer killed before its rename leaves a temp file (simulated): readers ignore it ...
    (tmp_path / "c" / "shards" / ".tmp-shard-000001.parquet.dead").write_bytes(b"PAR1 partial")
    assert set(writer.committed()) == {0}
    with pytest.raises(ManifestError, match=r"shards \[1\] of 2"):
        writer.commit(expected_shards=2)
    # ... and the next pass removes it.
    writer2 = CacheWriter(url, header)
    assert not any(n.startswith(".tmp-") for n in os.listdir(tmp_path / "c" / "shards"))
    with writer2.shard_writer(1) as w:
        w.write(synthetic_batch(full_spec, np.arange(4, 8), rng))
    writer2.commit(expected_shards=2)
    assert verify_cache(url)[0] == []


def test_bad_batches_are_rejected_before_anything_is_written(tmp_path, full_spec):
    writer = CacheWriter(str(tmp_path / "c"), Header(spec=full_spec))
    rng = np.random.default_rng(0)
    batch = synthetic_batch(full_spec, np.arange(2), rng)
    batch["input_ids"][0, 0] = full_spec.vocab_size
    with pytest.raises(ValueError, match="input_ids outside the vocabulary"):
        with writer.shard_writer(0) as w:
            w.write(batch)
    batch = synthetic_batch(full_spec, np.arange(2), rng)
    del batch["hidden_2"]
    with pytest.raises(KeyError, match="hidden_2"):
        with writer.shard_writer(0) as w:
            w.write(batch)
    assert os.listdir(tmp_path / "c" / "shards") == []


def test_invalid_spec_names_the_option():
    with pytest.raises(ValueError, match="top-k k=500 must be between 1 and the vocabulary size 100"):
        CacheSpec(vocab_size=100, max_length=8, k=500)
    with pytest.raises(ValueError, match="attention_dtype"):
        CacheSpec(vocab_size=100, max_length=8, attention_dtype="int4")
