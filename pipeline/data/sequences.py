"""Tokenise documents into model-ready sequences: the second step of the teacher pass.

Contract: ``iter_sequences(docs, tokenizer, ...)`` turns a stream of
``Document``s into a stream of ``Sequence``s whose ``sample_id`` is the
sequence's ordinal in the stream (0, 1, 2, ...). The same corpus with the same
options always gives the same sequences, the same ids and the same sources,
whatever the batch sizes used for tokenisation.

Two modes:

* ``"pack"`` (pretraining distillation): documents' tokens are concatenated,
  with the tokenizer's separator (``sep_token``, else ``eos_token``) between
  documents (not between the pieces of one over-long record), and cut into
  windows so that every sequence is exactly ``max_length`` tokens once framed
  by the special tokens the tokenizer itself adds to a single text: BERT-style
  ``[CLS] body [SEP]``, Llama-style ``<s> body``, GPT-2-style just ``body``.
  The last, partial window is dropped. ``source`` is
  ``"<document source>@<token offset>"``: the document in which the window
  starts and the offset of its first body token among that document's tokens
  (a window that starts on a separator is credited to the document before it,
  at offset = that document's length). Labels are None.
* ``"examples"`` (task distillation): one sequence per document, framed the
  same way and truncated to ``max_length`` (not padded: padding is the
  batcher's job), keeping the document's label and source. Continuation
  pieces of a cut record (``part > 0``) lie past the truncation point and are
  skipped.

Documents whose text tokenises to nothing are skipped in both modes.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from kdcache.pipeline.data.documents import Document

logger = logging.getLogger(__name__)

__all__ = [
    "Framing",
    "Sequence",
    "batch_sequences",
    "collate",
    "iter_sequences",
    "plan_shards",
]

MODES = ("pack", "examples")
IGNORE_INDEX = -100  # label value for "no label", as in PyTorch's cross-entropy
NO_POSITION = -1  # mlm_positions padding: the cache format's "no masked position here"


@dataclass(frozen=True, slots=True)
class Sequence:
    """One model input. ``input_ids`` is an int32 array (read-only in pack mode)."""

    sample_id: int
    source: str
    input_ids: np.ndarray
    label: int | None = None


# ---------------------------------------------------------------------------
# Framing: which special tokens the tokenizer puts around one text
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Framing:
    """Special tokens before/after a sequence body, and between packed documents."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    separator: int | None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, add_special_tokens: bool = True,
                       separator_id: int | None = None) -> Framing:
        """Read the framing off the tokenizer by encoding a probe with and without
        special tokens, so that we frame exactly as the teacher was trained."""
        prefix: tuple[int, ...] = ()
        suffix: tuple[int, ...] = ()
        if add_special_tokens:
            probe = "hello world"
            bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
            full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
            at = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), None)
            if not bare or at is None:
                raise ValueError(f"cannot work out the special-token framing of {type(tokenizer).__name__}")
            prefix, suffix = tuple(full[:at]), tuple(full[at + len(bare):])
        if separator_id is None:
            separator_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        return cls(prefix, suffix, separator_id)

    def body_length(self, max_length: int) -> int:
        body = max_length - len(self.prefix) - len(self.suffix)
        if body < 1:
            raise ValueError(f"max_length={max_length} leaves no room between {self.prefix} and {self.suffix}")
        return body


# ---------------------------------------------------------------------------
# Tokenisation in bounded batches of documents
# ---------------------------------------------------------------------------


def _doc_batches(docs: Iterable[Document], batch_docs: int, batch_chars: int) -> Iterator[list[Document]]:
    """Group documents for the fast tokenizer: at most batch_docs documents and
    (unless one document alone is bigger) about batch_chars characters."""
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        if batch and (len(batch) >= batch_docs or chars + len(doc.text) > batch_chars):
            yield batch
            batch, chars = [], 0
        batch.append(doc)
        chars += len(doc.text)
    if batch:
        yield batch


def _encode(tokenizer: Any, docs: list[Document]) -> list[list[int]]:
    # verbose=False: documents are routinely longer than model_max_length here,
    # we cut them ourselves.
    return tokenizer([d.text for d in docs], add_special_tokens=False, return_attention_mask=False,
                     return_token_type_ids=False, verbose=False)["input_ids"]


# ---------------------------------------------------------------------------
# Pack mode
# ---------------------------------------------------------------------------


def _frame(bodies: np.ndarray, framing: Framing) -> np.ndarray:
    """[n, body] -> [n, prefix + body + suffix], one vectorised fill."""
    n, body = bodies.shape
    p = len(framing.prefix)
    out = np.empty((n, p + body + len(framing.suffix)), dtype=np.int32)
    out[:, :p] = framing.prefix
    out[:, p:p + body] = bodies
    out[:, p + body:] = framing.suffix
    return out


def _pack(docs: Iterable[Document], tokenizer: Any, framing: Framing, body: int,
          batch_docs: int, batch_chars: int) -> Iterator[Sequence]:
    separator = np.array([framing.separator], dtype=np.int32)
    # Carried from batch to batch: tokens not yet in a sequence, and where each
    # document starts among them (the first start may be negative: a document
    # that began in an earlier batch).
    pending = np.empty(0, dtype=np.int32)
    starts = np.empty(0, dtype=np.int64)
    sources: list[str] = []
    sample_id = 0
    for batch in _doc_batches(docs, batch_docs, batch_chars):
        chunks, new_starts, pos = [pending], [], len(pending)
        for doc, ids in zip(batch, _encode(tokenizer, batch)):
            if not ids:
                continue
            if sources and not (doc.part or 0) > 0:  # between documents, not between pieces
                chunks.append(separator)
                pos += 1
            new_starts.append(pos)
            sources.append(doc.source)
            chunks.append(np.asarray(ids, dtype=np.int32))
            pos += len(ids)
        tokens = np.concatenate(chunks)
        starts = np.concatenate([starts, np.asarray(new_starts, dtype=np.int64)])

        n = len(tokens) // body
        if n:
            windows = np.arange(n, dtype=np.int64) * body
            owner = np.searchsorted(starts, windows, side="right") - 1
            offsets = windows - starts[owner]
            seqs = _frame(tokens[: n * body].reshape(n, body), framing)
            seqs.flags.writeable = False  # rows are shared views: keep them immutable
            for i in range(n):
                yield Sequence(sample_id + i, f"{sources[owner[i]]}@{offsets[i]}", seqs[i])
            sample_id += n

        # Keep the tail and the documents that still own part of it.
        cut = n * body
        if sources:
            keep = int(np.searchsorted(starts, cut, side="right")) - 1
            starts, sources = starts[keep:] - cut, sources[keep:]
        pending = tokens[cut:]
    if len(pending):
        logger.debug("pack: dropped the last partial sequence (%d tokens)", len(pending))


# ---------------------------------------------------------------------------
# Examples mode
# ---------------------------------------------------------------------------


def _examples(docs: Iterable[Document], tokenizer: Any, framing: Framing, body: int,
               batch_docs: int, batch_chars: int) -> Iterator[Sequence]:
    prefix, suffix = list(framing.prefix), list(framing.suffix)
    # Continuation pieces are past the truncation point: drop them before tokenising.
    heads = (d for d in docs if not (d.part or 0) > 0)
    sample_id = 0
    for batch in _doc_batches(heads, batch_docs, batch_chars):
        for doc, ids in zip(batch, _encode(tokenizer, batch)):
            if not ids:
                continue
            input_ids = np.array(prefix + ids[:body] + suffix, dtype=np.int32)
            yield Sequence(sample_id, doc.source, input_ids, doc.label)
            sample_id += 1


def iter_sequences(
    docs: Iterable[Document],
    tokenizer: Any,
    mode: str = "pack",
    max_length: int = 128,
    add_special_tokens: bool = True,
    *,
    separator_id: int | None = None,
    batch_docs: int = 256,
    batch_chars: int = 2_000_000,
) -> Iterator[Sequence]:
    """Stream ``Sequence``s out of documents (see the module docstring).

    ``tokenizer`` is a Hugging Face tokenizer (fast backend recommended);
    documents are tokenised ``batch_docs`` at a time (and about ``batch_chars``
    characters at most), never the whole corpus at once. ``separator_id``
    overrides the token put between packed documents.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    # Options are checked here, at call time, not when the first sequence is pulled.
    framing = Framing.from_tokenizer(tokenizer, add_special_tokens, separator_id)
    body = framing.body_length(max_length)
    if mode == "pack" and framing.separator is None:
        raise ValueError("pack mode needs a separator between documents: the tokenizer has no "
                         "sep_token or eos_token; pass separator_id")
    step = _pack if mode == "pack" else _examples
    return step(docs, tokenizer, framing, body, batch_docs, batch_chars)


# ---------------------------------------------------------------------------
# Batches and shards
# ---------------------------------------------------------------------------


def collate(seqs: list[Any], pad_id: int) -> dict[str, Any]:
    """Right-pad a list of sequences to the longest one.

    Returns ``input_ids`` [B,T] int32, ``attention_mask`` [B,T] int32,
    ``lengths`` [B] int64, ``sample_id`` [B] int64, ``source`` list[str],
    ``label`` [B] int64 (-100 where None). Masked sequences (``kdcache.pipeline.data.masking``)
    also give ``mlm_positions`` [B,P] int32 (padded with -1, as the cache stores them) and
    ``mlm_labels`` [B,P] int32 (padded with -100).
    """
    if not seqs:
        raise ValueError("cannot collate an empty batch")
    lengths = np.fromiter((len(s.input_ids) for s in seqs), dtype=np.int64, count=len(seqs))
    mask = np.arange(lengths.max()) < lengths[:, None]
    input_ids = np.full(mask.shape, pad_id, dtype=np.int32)
    input_ids[mask] = np.concatenate([s.input_ids for s in seqs])  # row-major fill = right padding
    batch = {
        "input_ids": input_ids,
        "attention_mask": mask.astype(np.int32),
        "lengths": lengths,
        "sample_id": np.fromiter((s.sample_id for s in seqs), dtype=np.int64, count=len(seqs)),
        "source": [s.source for s in seqs],
        "label": np.fromiter((IGNORE_INDEX if s.label is None else s.label for s in seqs),
                             dtype=np.int64, count=len(seqs)),
    }
    if hasattr(seqs[0], "positions"):
        counts = np.fromiter((len(s.positions) for s in seqs), dtype=np.int64, count=len(seqs))
        slots = np.arange(max(int(counts.max()), 1)) < counts[:, None]
        positions = np.full(slots.shape, NO_POSITION, dtype=np.int32)
        labels = np.full(slots.shape, IGNORE_INDEX, dtype=np.int32)
        positions[slots] = np.concatenate([s.positions for s in seqs])
        labels[slots] = np.concatenate([s.mlm_labels for s in seqs])
        batch["mlm_positions"], batch["mlm_labels"] = positions, labels
    return batch


def batch_sequences(seqs: Iterable[Any], batch_size: int, pad_id: int) -> Iterator[dict[str, Any]]:
    """Stream of ``collate``d batches of ``batch_size`` (the last one may be smaller)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    it = iter(seqs)
    while chunk := list(itertools.islice(it, batch_size)):
        yield collate(chunk, pad_id)


def plan_shards(seqs: Iterable[Sequence], sequences_per_shard: int) -> Iterator[tuple[int, list[Sequence]]]:
    """Cut the sequence stream into shards ``(shard_id, sequences)``, ids 0, 1, 2, ...

    Shard ``k`` holds sample ids ``[k * n, (k + 1) * n)`` (n = sequences_per_shard),
    so the same corpus and options always give the same shards.
    """
    if sequences_per_shard < 1:
        raise ValueError("sequences_per_shard must be at least 1")
    it = iter(seqs)
    for shard_id in itertools.count():
        shard = list(itertools.islice(it, sequences_per_shard))
        if not shard:
            return
        yield shard_id, shard
