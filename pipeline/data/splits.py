"""Deterministic splits by a stable hash of a key (a text, an article title).

A split that is a pure function of the key needs no RNG state and no look-ahead: any subset of the
data, in any order, on any machine, lands in the same split. xxh64 of the key's UTF-8 bytes is fast,
stable across platforms and Python versions (unlike ``hash()``), and spreads evenly.
"""
from __future__ import annotations

import xxhash

__all__ = ["hash_bucket", "key_hash"]


def key_hash(key: str, seed: int = 0) -> int:
    """The 64-bit xxh64 of the key's UTF-8 bytes: the one hash every split here is cut from."""
    return xxhash.xxh64_intdigest(key.encode("utf-8"), seed=seed)


def hash_bucket(key: str, buckets: int, seed: int = 0) -> int:
    """Which of ``buckets`` equal buckets the key falls in (``key_hash % buckets``)."""
    return key_hash(key, seed) % buckets
