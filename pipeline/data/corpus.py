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
  Concatenating the pieces' texts gives back the record, and the packer treats
  ``part > 0`` as a continuation (no separator token is inserted).

Nothing here is random: the same spec over the same files always gives the
same documents, in the same order, with the same sources. The types live in
``documents``, the per-format readers in ``readers`` (zstd in ``zstd_stream``);
this module turns their records into documents.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
from typing import Any, Iterable, Iterator

import fsspec

from kdcache.pipeline.data.documents import CorpusSpec, CorpusStats, Document
from kdcache.pipeline.data.readers import Record, infer_format, reader_for
from kdcache.storage.fs import is_url, redact

logger = logging.getLogger(__name__)

__all__ = [
    "CorpusSpec",
    "CorpusStats",
    "Document",
    "expand_paths",
    "infer_format",
    "iter_documents",
]


# ---------------------------------------------------------------------------
# Paths: glob expansion
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


def _documents(path: str, records: Iterable[Record], spec: CorpusSpec, stats: CorpusStats) -> Iterator[Document]:
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
        records = reader_for(fmt)(path, spec, stats)
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
