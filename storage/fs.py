"""Where caches live: local paths and any fsspec URL (file://, s3://, memory://, gs://, ...).

Everything in `storage` goes through `Location`, so the format code never branches on the protocol.
Atomicity: a file is written under a temporary name and moved into place only when complete. On a
local disk the move is `os.replace` (atomic). On object stores an object only becomes visible when
its upload completes, so the move (copy + delete) never exposes a partial object either.

Remote reads stream: a shard opened for reading is fetched range by range as the Parquet reader
asks for pages (never copied whole to local disk), and a transient error (connection reset, a cut
response body, a timeout, throttling) re-opens the object at the same offset and retries with
backoff, on top of whatever retries the protocol's own client does. Errors that say something
about the data or the request (not found, access denied) are never retried.
"""
from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

import fsspec

TMP_PREFIX = ".tmp-"

log = logging.getLogger("kdcache.storage")
T = TypeVar("T")

_CREDENTIALS_IN_URL = re.compile(r"(?P<scheme>[a-z0-9+.-]+://)(?P<cred>[^/@\s]+)@", re.IGNORECASE)
_SECRET_QUERY = re.compile(r"(?i)((?:secret|token|key|signature|password|credential)[^=&]*=)[^&]+")


def redact(url: str) -> str:
    """Drop user:secret@ and secret query parameters from a URL before it is logged or stored."""
    url = _CREDENTIALS_IN_URL.sub(r"\g<scheme>***@", url)
    return _SECRET_QUERY.sub(r"\1***", url)


# -- transient remote errors ----------------------------------------------------------------------

# Exception class names (anywhere in the type's MRO or the cause chain) that mean "the transport
# hiccupped, the same request may well succeed": aiohttp, botocore, urllib3, requests, http.client,
# google-auth. Matched by name so that no client library has to be importable here.
_TRANSIENT_TYPES = frozenset({
    "ClientPayloadError", "ServerDisconnectedError", "ClientOSError", "ClientConnectorError",
    "ServerTimeoutError", "IncompleteRead", "ProtocolError", "ReadTimeoutError", "ConnectTimeoutError",
    "EndpointConnectionError", "ConnectionClosedError", "ResponseStreamingError", "HTTPClientError",
    "ChunkedEncodingError", "RemoteDisconnected", "TransportError", "FSTimeoutError",
})
_TRANSIENT_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
                               errno.EPIPE, errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH})
# Server answers that object stores document as "retry later" (S3 503 SlowDown, 500 InternalError, ...).
_TRANSIENT_TEXT = re.compile(r"(?i)slow ?down|service unavailable|internal ?error|request ?timeout|"
                             r"reduce your request rate|throttl|connection (reset|aborted|closed)|timed out")
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
              ValueError, TypeError)


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry of the same request may cure; False for answers about the request itself."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _PERMANENT):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if any(t.__name__ in _TRANSIENT_TYPES for t in type(exc).__mro__):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        if isinstance(exc, OSError) and _TRANSIENT_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts and exponential backoff (with jitter) for transient errors of remote filesystems.

    `KDCACHE_IO_RETRIES` (attempts after the first, default 6) and `KDCACHE_IO_BACKOFF` (first delay
    in seconds, default 0.5; doubled per attempt, capped at 20 s) tune it: about a minute of outage
    is ridden out by default.
    """

    retries: int = 6
    backoff: float = 0.5
    max_delay: float = 20.0

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        return cls(retries=int(os.environ.get("KDCACHE_IO_RETRIES", cls.retries)),
                   backoff=float(os.environ.get("KDCACHE_IO_BACKOFF", cls.backoff)))

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)

    def call(self, fn: Callable[[], T], what: str, on_retry: Callable[[], None] | None = None) -> T:
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below; anything else re-raises as is
                if attempt == self.retries or not is_transient(exc):
                    if attempt and is_transient(exc):
                        raise OSError(f"{what}: still failing after {attempt + 1} attempts ({type(exc).__name__}: "
                                      f"{exc}); the storage endpoint is unreachable or overloaded. Re-run when it "
                                      "is back (the cache pass and training resume), or raise KDCACHE_IO_RETRIES"
                                      ) from exc
                    raise
                wait = self.delay(attempt)
                log.warning("%s: transient error (%s: %s); retry %d/%d in %.1f s", what, type(exc).__name__,
                            str(exc).splitlines()[0][:200] if str(exc) else "", attempt + 1, self.retries, wait)
                if on_retry is not None:
                    on_retry()
                time.sleep(wait)
        raise AssertionError("unreachable")


class RetryingReader(io.RawIOBase):
    """A seekable binary stream over a remote object that survives transient errors.

    Reads go to the filesystem's own file object (which fetches byte ranges on demand, so nothing is
    copied whole); when a read fails transiently, that file object is dropped, a new one is opened
    and the read is repeated from the same offset. Seeking is free until the next read.
    """

    def __init__(self, opener: Callable[[], Any], what: str, policy: RetryPolicy, size: int | None = None):
        super().__init__()
        self._opener, self._what, self._policy = opener, what, policy
        self._file: Any = None
        self._pos = 0
        self._size = size

    def _drop(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()

    def _with_file(self, fn: Callable[[Any], T]) -> T:
        def attempt() -> T:
            if self._file is None:
                self._file = self._opener()
            return fn(self._file)

        return self._policy.call(attempt, self._what, on_retry=self._drop)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def _end(self) -> int:
        if self._size is None:
            self._size = int(self._with_file(lambda f: f.size if isinstance(f.size, int) else f.seek(0, 2)))
        return self._size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos}.get(whence)
        self._pos = max(0, (self._end() if base is None else base) + offset)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        if self.closed:
            raise ValueError(f"{self._what}: read of a closed file")
        if size is None or size < 0:
            size = max(0, self._end() - self._pos)
        if size == 0:
            return b""

        def read(f) -> bytes:
            f.seek(self._pos)
            return f.read(size)

        data = self._with_file(read)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._drop()
        super().close()


# What fsspec backends report that changes whenever a file is rewritten: local mtime, ctime and
# inode; S3 ETag and LastModified; GCS generation; a memory file's creation time.
_CHANGE_KEYS = ("mtime", "created", "ino", "ETag", "LastModified", "generation")


@dataclass
class Location:
    """A directory on some filesystem, addressed by URL or local path."""

    fs: fsspec.AbstractFileSystem
    root: str  # path inside fs, no trailing slash
    url: str  # as the user gave it (may carry a protocol), redacted for messages
    retry: RetryPolicy = field(default_factory=RetryPolicy.from_env)
    # Bytes fetched per remote request when reading: a projected read of a few columns fetches their
    # pages plus at most this much around them, not the whole shard (s3fs's own default is 50 MB).
    read_block_size: int = 8 << 20

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

    def _call(self, fn: Callable[[], T], *parts: str) -> T:
        """`fn()`, retried on transient errors when the filesystem is remote (a local disk's errors are not)."""
        return fn() if self.is_local else self.retry.call(fn, self.display(*parts))

    def exists(self, *parts: str) -> bool:
        return self._call(lambda: self.fs.exists(self.path(*parts)), *parts)

    def size(self, *parts: str) -> int:
        return int(self._call(lambda: self.fs.size(self.path(*parts)), *parts))

    def stat(self, *parts: str) -> tuple[int, tuple[str, ...] | None]:
        """(size, change stamp) of a file; the stamp is None where the filesystem reports none."""
        info = self._call(lambda: self.fs.info(self.path(*parts)), *parts)
        stamp = tuple(f"{k}={info[k]}" for k in _CHANGE_KEYS if info.get(k) is not None)
        return int(info["size"]), stamp or None

    def full_url(self, *parts: str) -> str:
        """The file's URL with its protocol (no credentials): its identity within a process."""
        return self.fs.unstrip_protocol(self.path(*parts))

    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def listdir(self, *parts: str) -> list[str]:
        """Base names in a directory; [] if it does not exist."""
        target = self.path(*parts)
        try:
            entries = self._call(lambda: self.fs.ls(target, detail=False), *parts)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def open(self, *parts: str, mode: str = "rb", **kwargs):
        """A file object; remote files opened for reading stream and retry (`RetryingReader`)."""
        if self.is_local or mode != "rb":
            return self.fs.open(self.path(*parts), mode, **kwargs)
        path = self.path(*parts)
        kwargs.setdefault("block_size", self.read_block_size)
        # Opening checks existence now, so a missing object fails here with FileNotFoundError.
        size = self.size(*parts)
        return RetryingReader(lambda: self.fs.open(path, "rb", **kwargs), self.display(*parts), self.retry, size)

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
            return

        def move() -> None:
            # A retried move whose copy landed before the error: the source is gone, the target is there.
            if not self.fs.exists(src) and self.fs.exists(dst):
                return
            self.fs.mv(src, dst)

        self.retry.call(move, self.display(subdir, final) if subdir else self.display(final))

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


def upload_folder(local: str | os.PathLike, url: str, storage_options: dict[str, Any] | None = None,
                  last: str | None = None) -> str:
    """Copy a local folder's files to a folder or URL (retrying transient errors); returns the redacted URL.

    `last` (a file name) is copied after everything else, so a reader that finds it knows the rest is
    there (object stores have no atomic directory rename).
    """
    from pathlib import Path

    src = Path(local)
    loc = Location.parse(url, storage_options)
    files = sorted((p for p in src.rglob("*") if p.is_file()), key=lambda p: (p.name == last, str(p)))
    for p in files:
        rel = p.relative_to(src).as_posix()
        if loc.is_local:
            loc.makedirs(*rel.split("/")[:-1])
        loc._call(lambda p=p, rel=rel: loc.fs.put_file(str(p), loc.path(rel)), rel)
    return loc.url


def is_url(path: str) -> bool:
    """A URL (s3://, gs://, file://, ...) rather than a local path: the one test every module uses."""
    return "://" in str(path)
