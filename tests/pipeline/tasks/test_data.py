"""Fixed task splits and augmentation (kdcache.pipeline.tasks.data)."""
from __future__ import annotations

import bz2
import csv

from kdcache.pipeline.tasks.data import SPLITS, augment, rotten_tomatoes_examples, split_of


def _csv(path, rows):
    with bz2.open(path, "wt", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["category", "text", "movie_name"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_reviews_only_duplicates_dropped_and_whitespace_normalised(tmp_path):
    path = _csv(tmp_path / "rt.csv.bz2", [
        {"category": "plot", "text": "A man robs a bank.", "movie_name": "a"},
        {"category": "fresh", "text": "A  joy\tto watch.", "movie_name": "b"},
        {"category": "rotten", "text": "Dull.", "movie_name": "c"},
        {"category": "fresh", "text": "A joy to watch.", "movie_name": "d"},  # duplicate once normalised
        {"category": "rotten", "text": "   ", "movie_name": "e"},
    ])
    assert list(rotten_tomatoes_examples(path)) == [{"text": "A joy to watch.", "label": 1},
                                                     {"text": "Dull.", "label": 0}]


def test_split_is_a_fixed_function_of_the_text_with_the_stated_shares():
    texts = [f"review number {i} of a film" for i in range(20000)]
    first = [split_of(t) for t in texts]
    assert first == [split_of(t) for t in texts]
    for name, (lo, hi) in SPLITS.items():
        share = first.count(name) / len(texts)
        assert abs(share - (hi - lo) / 100) < 0.01, (name, share)


def test_augment_keeps_originals_first_and_is_seeded():
    rows = [{"text": f"a truly great film number {i} with fine acting", "label": i % 2} for i in range(50)]
    out = augment(rows, copies=3, seed=1)
    assert len(out) == 4 * len(rows) and out[: len(rows)] == rows
    assert out == augment(rows, copies=3, seed=1) and out != augment(rows, copies=3, seed=2)
    pool = {w for r in rows for w in r["text"].split()}
    extra = out[len(rows):]
    assert all(r["text"] and set(r["text"].split()) <= pool for r in extra)
    assert sum(r["text"] not in {o["text"] for o in rows} for r in extra) > 0.8 * len(extra)
    assert [r["label"] for r in extra] == [r["label"] for r in rows] * 3
