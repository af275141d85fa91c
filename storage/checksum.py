"""Checksums of shard bytes: xxh3-128, computed while writing and re-checked when reading."""
from __future__ import annotations

from typing import BinaryIO

import xxhash

ALGORITHM = "xxh3_128"
_CHUNK = 8 << 20


def new_hasher():
    return xxhash.xxh3_128()


def format_digest(hasher) -> str:
    return f"{ALGORITHM}:{hasher.hexdigest()}"


def checksum_stream(f: BinaryIO) -> tuple[str, int]:
    """Digest and byte count of everything readable from `f` (streamed in 8 MiB chunks)."""
    hasher, size = new_hasher(), 0
    while chunk := f.read(_CHUNK):
        hasher.update(chunk)
        size += len(chunk)
    return format_digest(hasher), size


class HashingWriter:
    """A write-only file wrapper that hashes and counts bytes on their way to disk.

    The Parquet writer only appends, so the digest of what passed through equals the digest of the
    file: no second read of a freshly written shard is needed.
    """

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.hasher = new_hasher()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        self.hasher.update(view)
        self.size += view.nbytes
        self.raw.write(view)
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        # The owner closes `raw`: a failed write must not be able to commit a half file.
        self.closed = True

    @property
    def digest(self) -> str:
        return format_digest(self.hasher)
