"""Where caches live: local paths and any fsspec URL (file://, s3://, memory://, gs://, ...).

Everything in `storage` goes through `Location`, so the format code never branches on the protocol.
Atomicity: a file is written under a temporary name and moved into place only when complete. On a
local disk the move is `os.replace` (atomic). On object stores an object only becomes visible when
its upload completes, so the move (copy + delete) never exposes a partial object either.
"""
from __future__ import annotations

import contextlib
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec

TMP_PREFIX = ".tmp-"

_CREDENTIALS_IN_URL = re.compile(r"(?P<scheme>[a-z0-9+.-]+://)(?P<cred>[^/@\s]+)@", re.IGNORECASE)
_SECRET_QUERY = re.compile(r"(?i)((?:secret|token|key|signature|password|credential)[^=&]*=)[^&]+")


def redact(url: str) -> str:
    """Drop user:secret@ and secret query parameters from a URL before it is logged or stored."""
    url = _CREDENTIALS_IN_URL.sub(r"\g<scheme>***@", url)
    return _SECRET_QUERY.sub(r"\1***", url)


@dataclass
class Location:
    """A directory on some filesystem, addressed by URL or local path."""

    fs: fsspec.AbstractFileSystem
    root: str  # path inside fs, no trailing slash
    url: str  # as the user gave it (may carry a protocol), redacted for messages

    @classmethod
    def parse(cls, url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> "Location":
        url = os.fspath(url)
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        if fs.protocol in ("file", ("file", "local")) or "file" in _protocols(fs):
            root = os.path.abspath(root)
        return cls(fs=fs, root=root.rstrip("/") or "/", url=redact(url))

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def display(self, *parts: str) -> str:
        """A path for messages: the user's URL form, credentials removed."""
        return "/".join([self.url.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def size(self, *parts: str) -> int:
        return int(self.fs.size(self.path(*parts)))

    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def listdir(self, *parts: str) -> list[str]:
        """Base names in a directory; [] if it does not exist."""
        target = self.path(*parts)
        try:
            entries = self.fs.ls(target, detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def open(self, *parts: str, mode: str = "rb", **kwargs):
        return self.fs.open(self.path(*parts), mode, **kwargs)

    def remove(self, *parts: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(*parts))

    def read_text(self, *parts: str) -> str:
        with self.open(*parts, mode="rb") as f:
            return f.read().decode("utf-8")

    def temp_name(self, final_name: str) -> str:
        # Unique per writer so two writers racing on the same shard never share a temp file.
        return f"{TMP_PREFIX}{final_name}.{uuid.uuid4().hex[:12]}"

    def commit(self, temp: str, final: str, subdir: str = "") -> None:
        """Move a completed temporary file to its final name (atomic on local disks)."""
        src = self.path(subdir, temp) if subdir else self.path(temp)
        dst = self.path(subdir, final) if subdir else self.path(final)
        if self.is_local:
            os.replace(src, dst)
        else:
            self.fs.mv(src, dst)

    @contextlib.contextmanager
    def atomic_write(self, name: str, subdir: str = "") -> Iterator[Any]:
        """Open `name` for binary writing; it appears under its final name only if the block succeeds."""
        parts = [subdir] if subdir else []
        temp = self.temp_name(name)
        try:
            with self.open(*parts, temp, mode="wb") as f:
                yield f
            self.commit(temp, name, subdir)
        except BaseException:
            self.remove(*parts, temp)
            raise

    def write_text_atomic(self, name: str, text: str, subdir: str = "") -> None:
        with self.atomic_write(name, subdir) as f:
            f.write(text.encode("utf-8"))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
