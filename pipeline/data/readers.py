"""Format readers: each turns one file (txt, jsonl, json, csv, parquet, a datasets folder or an
``hf:<builder>``) into ``Record``s, streaming with bounded memory. Mapping labels, dropping empties
and cutting long texts is left to ``corpus``, so every format gets the same rules."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import fsspec

from kdcache.pipeline.data.documents import CorpusSpec, CorpusStats
from kdcache.pipeline.data.zstd_stream import ZstdReader

__all__ = ["Record", "infer_format", "reader_for"]


class Record(NamedTuple):
    """What a format reader yields: raw values, before labels are mapped."""

    index: int
    text: str | None
    label: Any = None
    part: int | None = None  # already cut by the reader (txt)


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


def _open_binary(path: str) -> io.BufferedIOBase:
    """A buffered binary stream of the decompressed file contents."""
    _, compression = _split_compression(path)
    if compression == "zstd":
        return io.BufferedReader(ZstdReader(fsspec.open(path, "rb").open(), path), buffer_size=1 << 20)
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
# Format readers: each yields Record(index, text, raw_label, part)
# ---------------------------------------------------------------------------


def _read_txt(path: str, spec: CorpusSpec, stats: CorpusStats) -> Iterator[Record]:
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
                yield Record(index, text.rstrip("\r\n") if data.endswith(b"\n") else text, None, part)


def _blocks(lines, path: str, spec: CorpusSpec, stats: CorpusStats) -> Iterator[Record]:
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
                    yield Record(ordinal, "".join(block).rstrip("\n"), None, last)
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
                yield Record(ordinal, "".join(block), None, part)
            block, size = [], 0
        block.append(text)
        size += len(text)
    if block or part is not None or bad:
        if bad:
            stats.skipped_encoding += 1
        else:
            yield Record(ordinal, "".join(block).rstrip("\n"), None, None if part is None else part + 1)


def _fields_error(path: str, where: str, field_name: str, obj: Any, role: str) -> ValueError:
    present = sorted(obj) if isinstance(obj, Mapping) else f"a {type(obj).__name__}, not an object"
    return ValueError(f"{path}: {where}: missing {role} field {field_name!r} (fields present: {present})")


def _from_mapping(obj: Any, path: str, where: str, index: int, spec: CorpusSpec) -> Record:
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
    return Record(index, text, label)


def _read_jsonl(path: str, spec: CorpusSpec, stats: CorpusStats) -> Iterator[Record]:
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


def _read_json(path: str, spec: CorpusSpec, stats: CorpusStats) -> Iterator[Record]:
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


def _read_csv(path: str, spec: CorpusSpec, stats: CorpusStats) -> Iterator[Record]:
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
            yield Record(index, values[0], values[1])


def _read_parquet(path: str, spec: CorpusSpec, stats: CorpusStats) -> Iterator[Record]:
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
                yield Record(index, text, label)
                index += 1


def _iter_rows(dataset, spec: CorpusSpec) -> Iterator[Record]:
    """Rows of a (possibly streaming) datasets object, in batches for speed."""
    wanted = [c for c in (spec.text_field, spec.label_field) if c is not None]
    index = 0
    for batch in dataset.select_columns(wanted).iter(batch_size=1000):
        labels = batch[spec.label_field] if spec.label_field else [None] * len(batch[spec.text_field])
        for text, label in zip(batch[spec.text_field], labels):
            yield Record(index, text, label)
            index += 1


def _read_hf_disk(path: str, spec: CorpusSpec, stats: CorpusStats) -> Iterator[Record]:
    """A ``Dataset.save_to_disk`` folder: memory-mapped Arrow, read in batches."""
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if spec.split is None:
            raise ValueError(f"{path}: is a DatasetDict with splits {list(ds)}; set CorpusSpec.split")
        ds = ds[spec.split]
    _check_columns(path, ds.column_names, spec)
    yield from _iter_rows(ds, spec)


def _read_hf_builder(path: str, spec: CorpusSpec, stats: CorpusStats, builder: str) -> Iterator[Record]:
    """``datasets.load_dataset(builder, data_files=path, streaming=True)``, one file at a time
    so that every record can still be named ``path:index``."""
    import datasets

    ds = datasets.load_dataset(builder, data_files=[path], split=spec.split or "train", streaming=True)
    _check_columns(path, ds.column_names, spec)
    yield from _iter_rows(ds, spec)


_READERS: dict[str, Callable[[str, CorpusSpec, CorpusStats], Iterator[Record]]] = {
    "txt": _read_txt,
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "parquet": _read_parquet,
    "hf_disk": _read_hf_disk,
}


def reader_for(fmt: str) -> Callable[[str, CorpusSpec, CorpusStats], Iterator[Record]]:
    if fmt.startswith("hf:"):
        builder = fmt[3:]
        return lambda path, spec, stats: _read_hf_builder(path, spec, stats, builder)
    return _READERS[fmt]
