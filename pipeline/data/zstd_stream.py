"""Streamed zstd decompression that fails loudly on a truncated file.

``zstandard``'s stream reader returns a clean EOF when a file is cut short (an interrupted upload, a
full disk), which would silently drop the end of a corpus. ``ZstdReader`` watches the frame
structure go by and raises instead.
"""

from __future__ import annotations

import io

__all__ = ["ZstdReader"]


class _FrameCheck:
    """Walks zstd frame and block headers as compressed bytes go by (headers only: block bodies
    are skipped by length), so that at EOF we know whether the last frame was complete."""

    _MAGIC = 0xFD2FB528

    def __init__(self) -> None:
        self._need, self._state = 4, "magic"
        self._buf = bytearray()
        self._skip = 0
        self._checksum = False

    @property
    def complete(self) -> bool:
        return self._state == "magic" and not self._buf and not self._skip

    def feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n:
            if self._skip:  # inside a block body or skippable frame
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
                continue
            take = min(self._need - len(self._buf), n - pos)
            self._buf += data[pos:pos + take]
            pos += take
            if len(self._buf) == self._need:
                header, self._buf = bytes(self._buf), bytearray()
                self._advance(header)

    def _advance(self, h: bytes) -> None:
        if self._state == "magic":
            magic = int.from_bytes(h, "little")
            if magic == self._MAGIC:
                self._state, self._need = "descriptor", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame
                self._state, self._need = "skippable", 4
            else:
                raise ValueError("not a zstd stream (bad frame magic)")
        elif self._state == "skippable":
            self._skip = int.from_bytes(h, "little")
            self._state, self._need = "magic", 4
        elif self._state == "descriptor":
            d = h[0]
            single_segment = (d >> 5) & 1
            self._checksum = bool((d >> 2) & 1)
            rest = (0 if single_segment else 1) + (0, 1, 2, 4)[d & 3] + ((1 if single_segment else 0), 2, 4, 8)[d >> 6]
            self._state, self._need = ("header", rest) if rest else ("block", 3)
        elif self._state == "header":
            self._state, self._need = "block", 3
        elif self._state == "block":
            v = int.from_bytes(h, "little")
            last, kind, size = v & 1, (v >> 1) & 3, v >> 3
            if kind == 3:
                raise ValueError("corrupt zstd stream (reserved block type)")
            self._skip = 1 if kind == 1 else size  # an RLE block stores one byte
            if last:
                self._state, self._need = ("checksum", 4) if self._checksum else ("magic", 4)
        elif self._state == "checksum":
            self._state, self._need = "magic", 4


class _Tee:
    """A read()-able wrapper that shows every compressed byte to a _FrameCheck."""

    def __init__(self, raw, check: _FrameCheck) -> None:
        self._raw, self._check = raw, check

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._check.feed(data)
        return data


class ZstdReader(io.RawIOBase):
    """Streamed zstd decompression (bounded memory) that fails loudly on truncation."""

    def __init__(self, raw, path: str) -> None:
        import zstandard

        self._path, self._raw = path, raw
        self._check = _FrameCheck()
        self._error = zstandard.ZstdError
        self._reader = zstandard.ZstdDecompressor().stream_reader(_Tee(raw, self._check), read_across_frames=True)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            n = self._reader.readinto(b)
        except (self._error, ValueError) as e:
            raise ValueError(f"{self._path}: corrupt zstd data: {e}") from e
        if n == 0 and not self._check.complete:
            raise ValueError(f"{self._path}: truncated zstd file (the last frame is incomplete)")
        return n

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()
