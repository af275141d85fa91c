"""kdcache.pipeline.data.splits: the one key hash behind every fixed split, pinned to xxh64's
published values so that a split never moves between versions or machines."""
from __future__ import annotations

from kdcache.pipeline.data.splits import hash_bucket, key_hash


def test_key_hash_is_xxh64_of_the_utf8_bytes():
    assert key_hash("") == 0xEF46DB3751D8E999  # the reference XXH64 of empty input, seed 0
    assert key_hash("the film was great é") == 17033896556059996239
    assert key_hash("Article 7", seed=3) == 17466036884060519088


def test_hash_bucket_is_the_hash_modulo_the_buckets():
    keys = [f"snippet {i}" for i in range(500)]
    assert [hash_bucket(k, 100) for k in keys] == [key_hash(k) % 100 for k in keys]
    assert {hash_bucket(k, 20) for k in keys} == set(range(20))
