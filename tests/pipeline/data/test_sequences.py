"""kdcache.pipeline.data.sequences: packing and examples are exact, framed like the tokenizer
frames, deterministic, and independent of tokenisation batch sizes."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.pipeline.data.corpus import Document
from kdcache.pipeline.data.sequences import (
    Framing, Sequence, batch_sequences, collate, iter_sequences, plan_shards,
)


def make_docs(sample_docs, repeat: int = 4) -> list[Document]:
    """SAMPLE_DOCS a few times over, with distinct sources and labels."""
    return [Document(text, f"docs.jsonl:{i * len(sample_docs) + j}", label)
            for i in range(repeat) for j, (text, label) in enumerate(sample_docs)]


def token_stream(docs, tokenizer, separator: int) -> list[int]:
    """Reference packing: documents' tokens joined by the separator."""
    out: list[int] = []
    for d in docs:
        if out:
            out.append(separator)
        out.extend(tokenizer(d.text, add_special_tokens=False)["input_ids"])
    return out


def as_tuples(seqs):
    return [(s.sample_id, s.source, s.input_ids.tolist(), s.label) for s in seqs]


# ---------------------------------------------------------------------------
# Pack mode
# ---------------------------------------------------------------------------


def test_pack_bert_framing_and_exact_concatenation(bert_tokenizer, sample_docs):
    docs = make_docs(sample_docs)
    seqs = list(iter_sequences(docs, bert_tokenizer, mode="pack", max_length=16))
    cls, sep = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
    assert seqs and all(len(s.input_ids) == 16 and s.input_ids.dtype == np.int32 for s in seqs)
    assert all(s.input_ids[0] == cls and s.input_ids[-1] == sep for s in seqs)
    assert [s.sample_id for s in seqs] == list(range(len(seqs)))
    assert all(s.label is None for s in seqs)

    stream = token_stream(docs, bert_tokenizer, sep)
    body = 14
    bodies = np.concatenate([s.input_ids[1:-1] for s in seqs]).tolist()
    assert len(seqs) == len(stream) // body  # only the last partial window is dropped
    assert bodies == stream[: len(seqs) * body]


def test_pack_sources_point_at_the_starting_document_and_offset(bert_tokenizer, sample_docs):
    docs = make_docs(sample_docs)
    seqs = list(iter_sequences(docs, bert_tokenizer, max_length=16))
    # Recompute each window's owner from the reference stream.
    lengths = [len(bert_tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in docs]
    starts = np.cumsum([0] + [n + 1 for n in lengths[:-1]])  # +1: the separator belongs to the doc before
    for s in seqs:
        pos = s.sample_id * 14
        owner = int(np.searchsorted(starts, pos, side="right")) - 1
        assert s.source == f"{docs[owner].source}@{pos - starts[owner]}"
    assert seqs[0].source == "docs.jsonl:0@0"


def test_pack_is_deterministic_and_independent_of_batching(bert_tokenizer, sample_docs):
    docs = make_docs(sample_docs, repeat=6)
    reference = as_tuples(iter_sequences(docs, bert_tokenizer, max_length=12))
    assert as_tuples(iter_sequences(iter(docs), bert_tokenizer, max_length=12)) == reference
    for batch_docs, batch_chars in ((1, 10**9), (3, 10**9), (1000, 50)):
        got = iter_sequences(docs, bert_tokenizer, max_length=12, batch_docs=batch_docs, batch_chars=batch_chars)
        assert as_tuples(got) == reference, (batch_docs, batch_chars)


def test_pack_causal_lm_bos_framing_and_eos_separator(causal_tokenizer, sample_docs):
    docs = make_docs(sample_docs)
    seqs = list(iter_sequences(docs, causal_tokenizer, max_length=10))
    bos, eos = causal_tokenizer.bos_token_id, causal_tokenizer.eos_token_id
    assert all(len(s.input_ids) == 10 and s.input_ids[0] == bos for s in seqs)
    stream = token_stream(docs, causal_tokenizer, eos)
    assert np.concatenate([s.input_ids[1:] for s in seqs]).tolist() == stream[: len(seqs) * 9]


def test_pack_without_special_tokens_is_pure_body(bert_tokenizer, sample_docs):
    docs = make_docs(sample_docs)
    seqs = list(iter_sequences(docs, bert_tokenizer, max_length=8, add_special_tokens=False))
    stream = token_stream(docs, bert_tokenizer, bert_tokenizer.sep_token_id)
    assert np.concatenate([s.input_ids for s in seqs]).tolist() == stream[: len(seqs) * 8]


def test_pack_joins_pieces_of_a_cut_record_without_separator(bert_tokenizer):
    docs = [Document("the film was good", "a.txt:0"),
            Document("the story was ", "b.txt:0#0", part=0), Document("very long", "b.txt:0#1", part=1),
            Document("bad movie", "c.txt:0")]
    seqs = list(iter_sequences(docs, bert_tokenizer, max_length=4, add_special_tokens=False))
    ids = lambda t: bert_tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    sep = bert_tokenizer.sep_token_id
    expected = ids("the film was good") + [sep] + ids("the story was") + ids("very long") + [sep] + ids("bad movie")
    assert np.concatenate([s.input_ids for s in seqs]).tolist() == expected[: len(seqs) * 4]
    assert [s.source for s in seqs][:3] == ["a.txt:0@0", "a.txt:0@4", "b.txt:0#1@0"]


def test_pack_needs_a_separator():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "good": 1, "film": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    docs = [Document("good film", "a:0"), Document("film good good", "a:1")]
    with pytest.raises(ValueError, match="separator"):
        list(iter_sequences(docs, bare, max_length=2))
    seqs = list(iter_sequences(docs, bare, max_length=3, separator_id=0))
    assert [s.input_ids.tolist() for s in seqs] == [[1, 2, 0], [2, 1, 1]]


def test_framing_is_read_off_the_tokenizer(bert_tokenizer, causal_tokenizer):
    b = Framing.from_tokenizer(bert_tokenizer)
    assert (b.prefix, b.suffix, b.separator) == ((bert_tokenizer.cls_token_id,), (bert_tokenizer.sep_token_id,),
                                                 bert_tokenizer.sep_token_id)
    c = Framing.from_tokenizer(causal_tokenizer)
    assert (c.prefix, c.suffix, c.separator) == ((causal_tokenizer.bos_token_id,), (), causal_tokenizer.eos_token_id)
    with pytest.raises(ValueError, match="no room"):
        b.body_length(2)


# ---------------------------------------------------------------------------
# Examples mode
# ---------------------------------------------------------------------------


def test_examples_keep_labels_and_truncate(bert_tokenizer, sample_docs):
    docs = make_docs(sample_docs, repeat=1)
    seqs = list(iter_sequences(docs, bert_tokenizer, mode="examples", max_length=8))
    assert [(s.sample_id, s.source, s.label) for s in seqs] == [(i, d.source, d.label) for i, d in enumerate(docs)]
    cls, sep = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
    for s, d in zip(seqs, docs):
        ids = bert_tokenizer(d.text, add_special_tokens=False)["input_ids"]
        assert s.input_ids.tolist() == [cls] + ids[:6] + [sep]  # truncated, never padded
    assert max(len(s.input_ids) for s in seqs) == 8 and min(len(s.input_ids) for s in seqs) < 8


def test_examples_skip_continuation_pieces_and_empty_docs(bert_tokenizer):
    docs = [Document("good film", "a:0", 1), Document("the story was ", "a:1#0", 0, part=0),
            Document("long", "a:1#1", 0, part=1), Document("\u200b", "a:2", 1), Document("bad", "a:3", 0)]
    seqs = list(iter_sequences(docs, bert_tokenizer, mode="examples", max_length=32))
    assert [(s.sample_id, s.source, s.label) for s in seqs] == [(0, "a:0", 1), (1, "a:1#0", 0), (2, "a:3", 0)]


def test_unknown_mode(bert_tokenizer):
    with pytest.raises(ValueError, match="mode"):
        iter_sequences([], bert_tokenizer, mode="nope")


# ---------------------------------------------------------------------------
# Batches, shards, counts
# ---------------------------------------------------------------------------


def test_batch_sequences_pads_right_and_masks(bert_tokenizer, sample_docs):
    docs = make_docs(sample_docs, repeat=1)
    seqs = list(iter_sequences(docs, bert_tokenizer, mode="examples", max_length=12))
    batches = list(batch_sequences(seqs, batch_size=4, pad_id=bert_tokenizer.pad_token_id))
    assert [len(b["source"]) for b in batches] == [4, 4, 2]
    for b, chunk in zip(batches, [seqs[0:4], seqs[4:8], seqs[8:10]]):
        lengths = [len(s.input_ids) for s in chunk]
        assert b["input_ids"].shape == (len(chunk), max(lengths)) and b["input_ids"].dtype == np.int32
        assert b["lengths"].tolist() == lengths
        assert b["attention_mask"].sum(axis=1).tolist() == lengths
        for row, s, n in zip(b["input_ids"], chunk, lengths):
            assert row[:n].tolist() == s.input_ids.tolist() and (row[n:] == bert_tokenizer.pad_token_id).all()
        assert b["sample_id"].tolist() == [s.sample_id for s in chunk]
        assert b["label"].tolist() == [s.label for s in chunk]
    unlabelled = collate([Sequence(7, "x:0", np.array([2, 5, 3], np.int32))], pad_id=0)
    assert unlabelled["label"].tolist() == [-100] and unlabelled["source"] == ["x:0"]


def test_plan_shards_gives_stable_ids(bert_tokenizer, sample_docs):
    docs = make_docs(sample_docs, repeat=6)
    plan = lambda: [(k, [s.sample_id for s in shard]) for k, shard in  # noqa: E731
                    plan_shards(iter_sequences(docs, bert_tokenizer, max_length=8), 5)]
    first = plan()
    assert first == plan()
    assert [k for k, _ in first] == list(range(len(first)))
    assert all(ids == list(range(k * 5, k * 5 + len(ids))) for k, ids in first)
    assert all(len(ids) == 5 for _, ids in first[:-1]) and 1 <= len(first[-1][1]) <= 5
