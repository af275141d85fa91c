"""Fixtures for the input side of the teacher pass: tiny tokenizers built from a
vocab file (no hub access) and a small labelled corpus written in every format."""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
from pathlib import Path

import pytest

# Tokenizers are built locally; never let a test reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "the a of to and is in it that was for on with as his be at by this had not are but from or "
    "have an they which one you were her all she there would their we him been has when who will "
    "more no if out so said what up its about into than them can only other new some could time "
    "these two may then do first any my now such like our over man me even most made after also "
    "did many before must through back years where much your way well down should because each "
    "just those people how too little good very make world still own see men work long get here "
    "film movie plot story fresh rotten great bad"
).split()
SUBWORDS = ["##s", "##ing", "##ed", "##ly", ",", ".", "!", "?", "'"]

# A small labelled corpus (label 1 = positive, 0 = negative), words from the vocab.
SAMPLE_DOCS = [
    ("the film was very good", 1),
    ("a bad movie with a little plot", 0),
    ("she said it was the best film of the years", 1),
    ("they made many films and all were bad", 0),
    ("his story is like our world , but more people", 1),
    ("no one could see the man in the film", 0),
    ("we have been here for a long time", 1),
    ("it is not a great movie", 0),
    ("the people who made this should work more", 0),
    ("what a world ! good plot , great story", 1),
]


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory) -> Path:
    """A folder holding a ~170-entry WordPiece ``vocab.txt``."""
    folder = tmp_path_factory.mktemp("bert_vocab")
    (folder / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS + WORDS + SUBWORDS) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def bert_tokenizer(vocab_dir):
    """A BERT WordPiece tokenizer (fast backend): frames a text as ``[CLS] ... [SEP]``."""
    from transformers import BertTokenizer

    return BertTokenizer.from_pretrained(str(vocab_dir))


@pytest.fixture(scope="session")
def causal_tokenizer():
    """A word-level causal-LM tokenizer: ``<s>`` is prepended, ``</s>`` ends documents."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + WORDS + SUBWORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture
def sample_docs():
    return list(SAMPLE_DOCS)


def _rows():
    return [{"text": text, "label": label} for text, label in SAMPLE_DOCS]


def _jsonl_bytes() -> bytes:
    return "".join(json.dumps(r) + "\n" for r in _rows()).encode()


def _txt_bytes() -> bytes:
    return "".join(text + "\n" for text, _ in SAMPLE_DOCS).encode()


def _zst(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def _csv_bytes() -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["text", "label"])
    writer.writeheader()
    writer.writerows(_rows())
    return buf.getvalue().encode()


def _write_parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_rows()), path, row_group_size=3)  # several row groups


def _write_hf_disk(path: Path) -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_list(_rows()).save_to_disk(str(path))


@pytest.fixture
def corpus_files(tmp_path) -> dict[str, Path]:
    """SAMPLE_DOCS written once per format; keys name the format (``.txt`` has no labels)."""
    files = {
        "txt": ("docs.txt", _txt_bytes()),
        "txt.zst": ("docs.txt.zst", _zst(_txt_bytes())),
        "jsonl": ("docs.jsonl", _jsonl_bytes()),
        "jsonl.zst": ("docs.jsonl.zst", _zst(_jsonl_bytes())),
        "json": ("docs.json", json.dumps(_rows()).encode()),
        "csv": ("docs.csv", _csv_bytes()),
        "csv.bz2": ("docs.csv.bz2", bz2.compress(_csv_bytes())),
    }
    out = {}
    for key, (name, data) in files.items():
        (tmp_path / name).write_bytes(data)
        out[key] = tmp_path / name
    out["parquet"] = tmp_path / "docs.parquet"
    _write_parquet(out["parquet"])
    out["hf_disk"] = tmp_path / "hf_saved"
    _write_hf_disk(out["hf_disk"])
    return out
