"""What a corpus is made of and how to read it: ``Document`` (one text with a stable id),
``CorpusSpec`` (the paths and reading options), ``CorpusStats`` (counters filled while streaming).

Kept apart from the readers so that the format readers and ``corpus.iter_documents`` share the
types without importing each other."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

__all__ = ["FORMATS", "CorpusSpec", "CorpusStats", "Document"]

FORMATS = ("txt", "jsonl", "json", "csv", "parquet", "hf_disk")  # plus "hf:<builder>"


@dataclass(frozen=True, slots=True)
class Document:
    """One document: its text, a deterministic id, and an optional class label.

    ``part`` is None for a whole record, or the piece number when a record
    longer than ``max_doc_chars`` was cut (see ``kdcache.pipeline.data.corpus``).
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
        characters (see ``kdcache.pipeline.data.corpus``).
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
