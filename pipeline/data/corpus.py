"""Stream documents out of a corpus: the first step of the teacher pass.

Contract: ``iter_documents(spec)`` yields ``Document``s one at a time, in a
deterministic order, never holding a whole file in memory (the one exception
is a plain ``.json`` file, which is parsed whole: JSON has no record
boundaries to stream on, and the assets shipped that way, such as the
Wikipedia-extracts file, are small).

Document ids (``Document.source``) are ``"<path>:<index>"``:

* ``<path>`` is the file as the user spelled it after glob expansion: a
  relative local path stays relative, a URL keeps its protocol
  (``memory://...``, ``s3://bucket/key``).
* ``<index>`` is the 0-based position of the record in that file: the
  physical line for ``.txt`` line mode and ``.jsonl`` (blank lines count, so
  the line number is ``index + 1``), the block ordinal for ``.txt`` block
  mode, the data row for ``.csv`` / ``.parquet`` / Hugging Face datasets, the
  element position for ``.json`` (array order, or key order of an object).
* A record longer than ``max_doc_chars`` is cut into pieces (at whitespace
  where possible, always on a UTF-8 character boundary); each piece is its
  own Document with ``part = 0, 1, ...`` and source ``"<path>:<index>#<part>"``.
  Concatenating the pieces' texts gives back the record. The packer treats
  ``part > 0`` as a continuation (no separator token is inserted), and
  ``split_documents`` keeps all pieces of a record in the same split.

Nothing here is random: the same spec over the same files always gives the
same documents, in the same order, with the same sources.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import fsspec
import xxhash

from kdcache.storage.fs import is_url, redact

logger = logging.getLogger(__name__)

__all__ = [
    "CorpusSpec",
    "CorpusStats",
    "Document",
    "expand_paths",
    "infer_format",
    "iter_documents",
    "select_split",
    "split_documents",
]

FORMATS = ("txt", "jsonl", "json", "csv", "parquet", "hf_disk")  # plus "hf:<builder>"


# ---------------------------------------------------------------------------
# Data types
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Document:
    """One document: its text, a deterministic id, and an optional class label.

    ``part`` is None for a whole record, or the piece number when a record
    longer than ``max_doc_chars`` was cut (see the module docstring).
    """

    text: str
    source: str
    label: int | None = None
    part: int | None = None

    @property
    def record_id(self) -> str:
        """The source without the ``#<part>`` suffix: the same for all pieces of a record."""
        return self.source if self.part is None else self.source.rpartition("#")[0]


@dataclass
class CorpusStats:
    """Counters filled in while streaming; pass one to ``iter_documents`` to read them."""

    files: int = 0
    documents: int = 0  # documents yielded (pieces counted one by one)
    split_records: int = 0  # records cut into pieces because of max_doc_chars
    skipped_empty: int = 0  # records whose text was empty or whitespace only
    skipped_encoding: int = 0  # records with invalid UTF-8 (encoding_errors="skip")
    skipped_label: int = 0  # records dropped by include_labels


@dataclass
class CorpusSpec:
    """Where the corpus is and how to read it.

    paths: local paths, globs (``**`` allowed), or fsspec URLs (``memory://``,
        ``file://``, ``s3://``...). Each pattern's matches are sorted; patterns
        keep the order given; a file matched twice is read once.
    text_field / label_field: record fields (jsonl, json, csv, parquet, HF
        datasets). ``.txt`` has no fields and no labels.
    label_map: maps raw label values (e.g. ``"fresh"``) to ints; raw ints (and
        integer strings, as CSV gives them) are taken as they are when not in
        the map. Any other label is an error naming the record.
    include_labels: keep only records whose raw label, or the int it maps to,
        is in this collection, e.g. ``["fresh", "rotten"]`` drops Rotten
        Tomatoes ``plot`` rows (counted in ``CorpusStats.skipped_label``).
    txt_mode: ``"line"`` (one document per line) or ``"block"`` (one per
        blank-line-separated block; lines joined with ``"\\n"``).
    encoding_errors: ``"strict"`` (invalid UTF-8 raises a ValueError naming
        the file and byte offset or line) or ``"skip"`` (the record is skipped
        and counted in ``CorpusStats.skipped_encoding``).
    format: one of ``txt, jsonl, json, csv, parquet, hf_disk`` or
        ``"hf:<builder>"`` (``datasets.load_dataset(builder, data_files=file,
        streaming=True)``, e.g. ``"hf:json"``); None infers it per file from
        the extension (a compression suffix .zst/.bz2/.gz/.xz is looked past)
        or, for a directory, from a ``save_to_disk`` layout.
    split: the split to read from a DatasetDict folder or an ``hf:`` builder
        (builders default to ``"train"``).
    max_doc_chars: longer records are cut into pieces of at most this many
        characters (see the module docstring).
    max_record_bytes: a ``.jsonl`` line must be parsed whole, so it is capped:
        a longer line raises instead of exhausting memory.
    """

    paths: list[str] | str
    text_field: str = "text"
    label_field: str | None = None
    label_map: Mapping[Any, int] | None = None
    include_labels: Iterable[Any] | None = None
    txt_mode: str = "line"
    encoding_errors: str = "strict"
    format: str | None = None
    split: str | None = None
    max_doc_chars: int = 1_000_000
    max_record_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        if isinstance(self.paths, (str, os.PathLike)):
            self.paths = [self.paths]
        self.paths = [os.fspath(p) for p in self.paths]
        if not self.paths:
            raise ValueError("CorpusSpec.paths is empty")
        if self.txt_mode not in ("line", "block"):
            raise ValueError(f"txt_mode must be 'line' or 'block', not {self.txt_mode!r}")
        if self.encoding_errors not in ("strict", "skip"):
            raise ValueError(f"encoding_errors must be 'strict' or 'skip', not {self.encoding_errors!r}")
        if self.format is not None and self.format not in FORMATS and not self.format.startswith("hf:"):
            raise ValueError(f"unknown format {self.format!r}; expected one of {FORMATS} or 'hf:<builder>'")
        if self.max_doc_chars < 16:
            raise ValueError("max_doc_chars must be at least 16")
        if self.include_labels is not None:
            self.include_labels = frozenset(self.include_labels)


class _Record(NamedTuple):
    """What a format reader yields: raw values, before labels are mapped."""

    index: int
    text: str | None
    label: Any = None
    part: int | None = None  # already cut by the reader (txt)


# ---------------------------------------------------------------------------
# Paths: glob expansion and format inference
# ---------------------------------------------------------------------------


def expand_paths(patterns: Iterable[str]) -> list[str]:
    """Expand globs into a deterministic file list (see ``CorpusSpec.paths``).

    A pattern matching nothing, or a plain path that does not exist, raises
    FileNotFoundError naming it.
    """
    out: list[str] = []
    for pattern in patterns:
        if is_url(pattern):
            fs, path = fsspec.core.url_to_fs(pattern)
            if glob.has_magic(path):
                matches = sorted(fs.unstrip_protocol(m) for m in fs.glob(path))
            else:
                matches = [pattern] if fs.exists(path) else []
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
        else:
            matches = [pattern] if os.path.exists(pattern) else []
        if not matches:
            what = "glob pattern matched no files" if glob.has_magic(pattern) else "no such file or directory"
            raise FileNotFoundError(f"corpus path {pattern!r}: {what}")
        out.extend(matches)
    return list(dict.fromkeys(out))  # de-duplicate, keeping first-seen order


_COMPRESSIONS = {".zst": "zstd", ".bz2": "bz2", ".gz": "gzip", ".xz": "xz"}
_EXTENSIONS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
               ".csv": "csv", ".parquet": "parquet"}
_HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _split_compression(path: str) -> tuple[str, str | None]:
    """``"a.jsonl.zst"`` -> (``"a.jsonl"``, ``"zstd"``)."""
    stem, ext = os.path.splitext(path)
    if ext.lower() in _COMPRESSIONS:
        return stem, _COMPRESSIONS[ext.lower()]
    return path, None


def infer_format(path: str) -> str:
    """The reader for one path, from its extension or its folder layout."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    if fs.isdir(fs_path):
        if any(fs.exists(f"{fs_path.rstrip('/')}/{m}") for m in _HF_DISK_MARKERS):
            return "hf_disk"
        raise ValueError(f"{path}: is a directory but not a datasets save_to_disk folder; use a glob for its files")
    stem, _ = _split_compression(path)
    ext = os.path.splitext(stem)[1].lower()
    if ext not in _EXTENSIONS:
        raise ValueError(f"{path}: cannot infer the format from extension {ext!r}; set CorpusSpec.format")
    return _EXTENSIONS[ext]


# ---------------------------------------------------------------------------
# Opening files: fsspec for transport, our own zstd reader for truncation checks
# ---------------------------------------------------------------------------


class _ZstdFrameCheck:
    """Walks zstd frame and block headers as compressed bytes go by.

    ``zstandard``'s stream_reader returns a clean EOF on a truncated file, so we
    track the frame structure ourselves (headers only: block bodies are
    skipped by length) and know at EOF whether the last frame was complete.
    """

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
    """A read()-able wrapper that shows every compressed byte to a _ZstdFrameCheck."""

    def __init__(self, raw, check: _ZstdFrameCheck) -> None:
        self._raw, self._check = raw, check

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._check.feed(data)
        return data


class _ZstdReader(io.RawIOBase):
    """Streamed zstd decompression (bounded memory) that fails loudly on truncation."""

    def __init__(self, raw, path: str) -> None:
        import zstandard

        self._path, self._raw = path, raw
        self._check = _ZstdFrameCheck()
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


def _open_binary(path: str) -> io.BufferedIOBase:
    """A buffered binary stream of the decompressed file contents."""
    _, compression = _split_compression(path)
    if compression == "zstd":
        return io.BufferedReader(_ZstdReader(fsspec.open(path, "rb").open(), path), buffer_size=1 << 20)
    f = fsspec.open(path, "rb", compression=compression).open()
    # Remote fsspec files have a readline() without a size limit; the standard
    # buffered reader gives every stream the bounded readline(size) we rely on.
    return f if isinstance(f, io.BufferedIOBase) else io.BufferedReader(f, buffer_size=1 << 20)


# ---------------------------------------------------------------------------
# Bounded line reading (txt, jsonl)
# ---------------------------------------------------------------------------


def _cut_point(data: bytes) -> int:
    """Where to cut an over-long line: after the last space in its last quarter,
    else before a trailing (possibly incomplete) multi-byte UTF-8 character."""
    space = data.rfind(b" ", len(data) - len(data) // 4)
    if space >= 0:
        return space + 1
    j = len(data)
    while j > 0 and data[j - 1] & 0xC0 == 0x80:  # continuation bytes
        j -= 1
    if j > 0 and data[j - 1] >= 0xC0:  # the lead byte of the last character
        j -= 1
    return j if j > 0 else len(data)


def _iter_lines(f, limit: int) -> Iterator[tuple[int, int, bytes, int | None]]:
    """Yield ``(line_index, byte_offset, data, part)`` with at most ``limit`` bytes each.

    A line longer than ``limit`` comes out as pieces ``part = 0, 1, ...``
    (cut by ``_cut_point``); others have ``part = None``. The trailing newline
    is kept on the last piece of a line; a UTF-8 BOM at the start is dropped.
    """
    index, offset, part, carry = 0, 0, None, b""
    while True:
        want = limit - len(carry)
        chunk = f.readline(want)
        data = carry + chunk if carry else chunk
        if not data:
            return
        if offset == 0 and part is None and data.startswith(b"\xef\xbb\xbf"):
            data, offset = data[3:], 3
        if data.endswith(b"\n") or len(chunk) < want:  # end of line, or of file
            yield index, offset, data, (None if part is None else part + 1)
            index, offset, part, carry = index + 1, offset + len(data), None, b""
        else:
            cut = _cut_point(data)
            part = 0 if part is None else part + 1
            yield index, offset, data[:cut], part
            offset, carry = offset + cut, data[cut:]


def _decode(data: bytes, path: str, offset: int, line_index: int, spec: CorpusSpec) -> str | None:
    """Strict UTF-8 decode with a located error; None when ``encoding_errors="skip"``
    (the caller counts the skipped record)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if spec.encoding_errors == "skip":
            return None
        line = line_index + data.count(b"\n", 0, e.start)
        raise ValueError(
            f"{path}: invalid UTF-8 byte 0x{data[e.start]:02x} at byte offset {offset + e.start} "
            f"(line {line + 1}); set encoding_errors='skip' to drop such records"
        ) from None


# ---------------------------------------------------------------------------
# Format readers: each yields _Record(index, text, raw_label, part)
# ---------------------------------------------------------------------------


def _read_txt(path: str, spec: CorpusSpec, stats: CorpusStats) -> Iterator[_Record]:
    with _open_binary(path) as f:
        lines = _iter_lines(f, spec.max_doc_chars)
        if spec.txt_mode == "block":
            yield from _blocks(lines, path, spec, stats)
            return
        for index, offset, data, part in lines:
            text = _decode(data, path, offset, index, spec)
            if text is None:
                stats.skipped_encoding += 1
            else:  # only the newline goes: pieces concatenate back to the line
                yield _Record(index, text.rstrip("\r\n") if data.endswith(b"\n") else text, None, part)


def _blocks(lines, path: str, spec: CorpusSpec, stats: CorpusStats) -> Iterator[_Record]:
    """Group lines into blank-line-separated blocks, cut into pieces at max_doc_chars.

    Lines keep their newline inside the block (normalised to ``"\n"``); only
    the block's final newline is dropped, so pieces concatenate back to the block.
    """
    block: list[str] = []
    size, part, bad, ordinal = 0, None, False, 0
    for index, offset, data, line_part in lines:
        if line_part is None and not data.strip():  # a blank line ends the block
            if block or part is not None or bad:
                if bad:
                    stats.skipped_encoding += 1
                else:
                    last = None if part is None else part + 1
                    yield _Record(ordinal, "".join(block).rstrip("\n"), None, last)
                ordinal += 1
            block, size, part, bad = [], 0, None, False
            continue
        text = _decode(data, path, offset, index, spec)
        if text is None:
            bad = True  # the whole block is dropped when it ends
            continue
        if text.endswith("\n"):
            text = text.rstrip("\r\n") + "\n"
        if block and size + len(text) > spec.max_doc_chars:  # flush first: pieces stay <= the limit
            part = 0 if part is None else part + 1
            if not bad:
                yield _Record(ordinal, "".join(block), None, part)
            block, size = [], 0
        block.append(text)
        size += len(text)
    if block or part is not None or bad:
        if bad:
            stats.skipped_encoding += 1
        else:
            yield _Record(ordinal, "".join(block).rstrip("\n"), None, None if part is None else part + 1)


def _fields_error(path: str, where: str, field_name: str, obj: Any, role: str) -> ValueError:
    present = sorted(obj) if isinstance(obj, Mapping) else f"a {type(obj).__name__}, not an object"
    return ValueError(f"{path}: {where}: missing {role} field {field_name!r} (fields present: {present})")


def _from_mapping(obj: Any, path: str, where: str, index: int, spec: CorpusSpec) -> _Record:
    """Pick the text and label out of one JSON object / CSV row."""
    if not isinstance(obj, Mapping) or spec.text_field not in obj:
        raise _fields_error(path, where, spec.text_field, obj, "text")
    label = None
    if spec.label_field is not None:
        if spec.label_field not in obj:
            raise _fields_error(path, where, spec.label_field, obj, "label")
        label = obj[spec.label_field]
    text = obj[spec.text_field]
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{path}: {where}: field {spec.text_field!r} is a {type(text).__name__}, not a string")
    return _Record(index, text, label)


def _read_jsonl(path: str, spec: CorpusSpec, stats: CorpusStats) -> Iterator[_Record]:
    with _open_binary(path) as f:
        for index, offset, data, part in _iter_lines(f, spec.max_record_bytes):
            if part is not None:
                raise ValueError(f"{path}: line {index + 1} is longer than max_record_bytes={spec.max_record_bytes}")
            text = _decode(data, path, offset, index, spec)
            if text is None:
                stats.skipped_encoding += 1
                continue
            if not text.strip():  # blank lines are not records
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {index + 1}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield _from_mapping(obj, path, f"line {index + 1}", index, spec)


def _read_json(path: str, spec: CorpusSpec, stats: CorpusStats) -> Iterator[_Record]:
    """A whole-file JSON array of objects, or object of objects (read whole: small assets only)."""
    with _open_binary(path) as f:
        raw = f.read()
    text = _decode(raw, path, 0, 0, spec)
    if text is None:
        stats.skipped_encoding += 1  # one bad byte spoils the whole file: there are no records
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if isinstance(data, Mapping):
        items = list(data.items())
    elif isinstance(data, list):
        items = [(i, v) for i, v in enumerate(data)]
    else:
        raise ValueError(f"{path}: expected a JSON array or an object of objects, got a {type(data).__name__}")
    for index, (key, obj) in enumerate(items):
        yield _from_mapping(obj, path, f"element {key!r}", index, spec)


def _check_columns(path: str, columns: Iterable[str] | None, spec: CorpusSpec) -> None:
    columns = list(columns or [])
    for name in (spec.text_field, spec.label_field):
        if name is not None and columns and name not in columns:
            raise ValueError(f"{path}: no column {name!r} (columns: {columns})")


_SURROGATES = re.compile("[\udc80-\udcff]")  # what surrogateescape turns invalid bytes into


def _read_csv(path: str, spec: CorpusSpec, stats: CorpusStats) -> Iterator[_Record]:
    # csv holds one row at a time; long fields must fit its (process-wide) limit.
    csv.field_size_limit(max(csv.field_size_limit(), 4 * spec.max_doc_chars))
    with _open_binary(path) as raw:
        # surrogateescape lets a bad byte reach us inside its row, so that we can
        # name the row (strict) or drop just that row (skip).
        f = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.DictReader(f)
        _check_columns(path, reader.fieldnames, spec)
        for index, row in enumerate(reader):
            values = (row[spec.text_field], row.get(spec.label_field) if spec.label_field else None)
            if any(isinstance(v, str) and _SURROGATES.search(v) for v in values):
                if spec.encoding_errors == "skip":
                    stats.skipped_encoding += 1
                    continue
                raise ValueError(f"{path}: invalid UTF-8 in row {index} (line {reader.line_num}); "
                                 "set encoding_errors='skip' to drop such records")
            yield _Record(index, values[0], values[1])


def _read_parquet(path: str, spec: CorpusSpec, stats: CorpusStats) -> Iterator[_Record]:
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb").open() as f:
        pf = pq.ParquetFile(f)
        _check_columns(path, pf.schema_arrow.names, spec)
        wanted = [c for c in (spec.text_field, spec.label_field) if c is not None]
        index = 0
        for batch in pf.iter_batches(batch_size=1024, columns=wanted):  # one record batch at a time
            texts = batch.column(0).to_pylist()
            labels = batch.column(1).to_pylist() if spec.label_field else [None] * len(texts)
            for text, label in zip(texts, labels):
                yield _Record(index, text, label)
                index += 1


def _iter_rows(dataset, spec: CorpusSpec) -> Iterator[_Record]:
    """Rows of a (possibly streaming) datasets object, in batches for speed."""
    wanted = [c for c in (spec.text_field, spec.label_field) if c is not None]
    index = 0
    for batch in dataset.select_columns(wanted).iter(batch_size=1000):
        labels = batch[spec.label_field] if spec.label_field else [None] * len(batch[spec.text_field])
        for text, label in zip(batch[spec.text_field], labels):
            yield _Record(index, text, label)
            index += 1


def _read_hf_disk(path: str, spec: CorpusSpec, stats: CorpusStats) -> Iterator[_Record]:
    """A ``Dataset.save_to_disk`` folder: memory-mapped Arrow, read in batches."""
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if spec.split is None:
            raise ValueError(f"{path}: is a DatasetDict with splits {list(ds)}; set CorpusSpec.split")
        ds = ds[spec.split]
    _check_columns(path, ds.column_names, spec)
    yield from _iter_rows(ds, spec)


def _read_hf_builder(path: str, spec: CorpusSpec, stats: CorpusStats, builder: str) -> Iterator[_Record]:
    """``datasets.load_dataset(builder, data_files=path, streaming=True)``, one file at a time
    so that every record can still be named ``path:index``."""
    import datasets

    ds = datasets.load_dataset(builder, data_files=[path], split=spec.split or "train", streaming=True)
    _check_columns(path, ds.column_names, spec)
    yield from _iter_rows(ds, spec)


_READERS: dict[str, Callable[[str, CorpusSpec, CorpusStats], Iterator[_Record]]] = {
    "txt": _read_txt,
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "parquet": _read_parquet,
    "hf_disk": _read_hf_disk,
}


def _reader_for(fmt: str) -> Callable[[str, CorpusSpec, CorpusStats], Iterator[_Record]]:
    if fmt.startswith("hf:"):
        builder = fmt[3:]
        return lambda path, spec, stats: _read_hf_builder(path, spec, stats, builder)
    return _READERS[fmt]


# ---------------------------------------------------------------------------
# Records -> Documents: labels, filters, empties, over-long texts
# ---------------------------------------------------------------------------


_INT = re.compile(r"[+-]?\d+")


def _map_label(raw: Any, source: str, spec: CorpusSpec) -> int:
    if spec.label_map is not None and raw in spec.label_map:
        return int(spec.label_map[raw])
    if isinstance(raw, (int,)) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str) and _INT.fullmatch(raw.strip()):  # CSV has no types: "1" is 1
        return int(raw)
    known = sorted(map(str, spec.label_map)) if spec.label_map else None
    hint = f"label_map has {known}" if known else "give CorpusSpec.label_map to map label names to ints"
    raise ValueError(f"{source}: label {raw!r} in field {spec.label_field!r} is not an int ({hint})")


def _included(raw: Any, spec: CorpusSpec) -> bool:
    """include_labels may name the raw label or the int it maps to."""
    if raw in spec.include_labels:
        return True
    try:
        return _map_label(raw, "", spec) in spec.include_labels
    except ValueError:  # a label with no int (e.g. "plot"): not included
        return False


def _split_text(text: str, max_chars: int) -> Iterator[str]:
    """Cut a long text into pieces of at most max_chars, at whitespace where possible."""
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        space = text.rfind(" ", end - max_chars // 4, end)
        end = space + 1 if space >= 0 else end
        yield text[start:end]
        start = end
    yield text[start:]


def _documents(path: str, records: Iterable[_Record], spec: CorpusSpec, stats: CorpusStats) -> Iterator[Document]:
    for rec in records:
        source = f"{path}:{rec.index}"
        if spec.include_labels is not None and not _included(rec.label, spec):
            stats.skipped_label += 1
            continue
        label = None
        if spec.label_field is not None:
            if rec.label is None:
                raise ValueError(f"{source}: label field {spec.label_field!r} is empty")
            label = _map_label(rec.label, source, spec)
        if rec.text is None or not rec.text.strip():
            stats.skipped_empty += 1
            continue
        if rec.part is not None:  # already cut by the reader
            pieces: Iterable[tuple[int, str]] = [(rec.part, rec.text)]
        elif len(rec.text) > spec.max_doc_chars:
            pieces = enumerate(_split_text(rec.text, spec.max_doc_chars))
        else:
            stats.documents += 1
            yield Document(rec.text, source, label)
            continue
        for part, piece in pieces:
            stats.split_records += part == 0
            if piece.strip():
                stats.documents += 1
                yield Document(piece, f"{source}#{part}", label, part)


@contextlib.contextmanager
def _redacted_errors() -> Iterator[None]:
    """Error messages name the file; a URL's credentials (user:secret@, ?token=...) must not travel with them
    into logs. The original exception (which holds them) is dropped from the chain."""
    try:
        yield
    except (ValueError, OSError) as e:
        clean = redact(str(e))
        if clean == str(e):
            raise
        try:
            replacement = type(e)(clean)
        except Exception:  # noqa: BLE001 - an exception type that needs other arguments
            replacement = ValueError(clean)
        raise replacement from None


def iter_documents(spec: CorpusSpec, stats: CorpusStats | None = None) -> Iterator[Document]:
    """Stream every document of the corpus, file after file (see the module docstring).

    Raises FileNotFoundError for a path or glob that matches nothing, and
    ValueError when the whole corpus yields no document at all. Sources and
    error messages carry each path with any credentials in its URL redacted.
    """
    with _redacted_errors():
        yield from _iter_documents(spec, stats if stats is not None else CorpusStats())


def _iter_documents(spec: CorpusSpec, stats: CorpusStats) -> Iterator[Document]:
    files = expand_paths(spec.paths)
    yielded = 0
    for path in files:
        fmt = spec.format or infer_format(path)
        if fmt == "txt" and spec.label_field is not None:
            raise ValueError(f"{path}: .txt files have no fields, so label_field cannot be used")
        stats.files += 1
        records = _reader_for(fmt)(path, spec, stats)
        try:
            # Sources are stored in the cache: never with the credentials of a URL.
            for doc in _documents(redact(path), records, spec, stats):
                yielded += 1
                yield doc
        except (EOFError, OSError) as e:  # truncated bz2/gz/xz, unreadable file...
            raise ValueError(f"{path}: cannot read: {e}") from e
    if yielded == 0:
        raise ValueError(
            f"empty corpus: no documents in {len(files)} file(s) from {spec.paths} "
            f"(skipped: {stats.skipped_empty} empty, {stats.skipped_encoding} bad encoding, "
            f"{stats.skipped_label} by include_labels)"
        )
    if stats.skipped_encoding:
        logger.warning("skipped %d record(s) with invalid UTF-8", stats.skipped_encoding)


# ---------------------------------------------------------------------------
# Train/dev/test splits by a stable hash
# ---------------------------------------------------------------------------

DEFAULT_SPLITS = {"train": 0.8, "dev": 0.1, "test": 0.1}


def _split_bounds(splits: Mapping[str, float]) -> list[tuple[str, float]]:
    if not splits or any(v < 0 for v in splits.values()):
        raise ValueError(f"splits must be non-empty with non-negative fractions, got {dict(splits)}")
    total = sum(splits.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {total} for {dict(splits)}")
    bounds, acc = [], 0.0
    for name, frac in splits.items():
        acc += frac
        bounds.append((name, acc))
    bounds[-1] = (bounds[-1][0], 1.0)  # no record falls past the end through rounding
    return bounds


def split_documents(
    docs: Iterable[Document], splits: Mapping[str, float] | None = None, seed: int = 0
) -> Iterator[tuple[str, Document]]:
    """Yield ``(split_name, doc)``: the split is a pure function of (seed, record id).

    No RNG state and no look-ahead: any subset of the corpus, in any order or
    on any worker, gets the same assignment. All pieces of a cut record share
    its ``record_id`` and so its split.
    """
    bounds = _split_bounds(splits or DEFAULT_SPLITS)
    for doc in docs:
        u = xxhash.xxh64_intdigest(doc.record_id.encode(), seed=seed) / 2.0**64
        for name, upper in bounds:
            if u < upper:
                yield name, doc
                break


def select_split(
    docs: Iterable[Document], name: str, splits: Mapping[str, float] | None = None, seed: int = 0
) -> Iterator[Document]:
    """Only the documents of one split (see ``split_documents``)."""
    if name not in (splits or DEFAULT_SPLITS):
        raise ValueError(f"unknown split {name!r}; splits are {list(splits or DEFAULT_SPLITS)}")
    return (doc for split, doc in split_documents(docs, splits, seed) if split == name)
