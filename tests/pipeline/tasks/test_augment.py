"""Tang et al.'s transfer-set augmentation (kdcache.pipeline.tasks.augment)."""
from __future__ import annotations

import random

import pytest

from kdcache.pipeline.tasks.augment import tang_augment

VOCAB = [f"w{i}" for i in range(40)] + ["the", "a", "of", "and"] * 5


def _rows(n: int = 300, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(VOCAB) for _ in range(rng.randint(10, 20))), "label": i % 2, "id": i}
            for i in range(n)]


def test_deterministic_for_a_seed_and_different_for_another():
    rows = _rows(50)
    a, _ = tang_augment(rows, n_iter=4, seed=1)
    b, _ = tang_augment(rows, n_iter=4, seed=1)
    c, _ = tang_augment(rows, n_iter=4, seed=2)
    assert a == b and [r["text"] for r in a] != [r["text"] for r in c]
    # one example's draws do not depend on the other rows' (the frequency bands and the dedupe do)
    whole, _ = tang_augment(rows, n_iter=4, seed=1, replacer="none")
    alone, _ = tang_augment(rows[:1], n_iter=4, seed=1, replacer="none")
    assert [r["text"] for r in alone] == [r["text"] for r in whole if r["origin"] == 0]


def test_rates_follow_the_probabilities():
    rows = _rows()
    out, stats = tang_augment(rows, n_iter=5, p_mask=0.1, p_pos=0.2, p_ng=0.3, seed=0)
    assert stats["replacer"] == "frequency-band"
    assert stats["mask_rate"] == pytest.approx(0.1, abs=0.01)
    assert stats["pos_rate"] == pytest.approx(0.2, abs=0.01)
    assert stats["ngram_rate"] == pytest.approx(0.3, abs=0.03)
    assert 0.1 < stats["replace_rate"] <= stats["pos_rate"]  # a few draws land on the word itself
    # recount from the texts: copies kept whole keep their length, masks about p_mask of their words
    whole = [r for r in out if r["augmented"] and len(r["text"].split()) == len(rows[r["origin"]]["text"].split())]
    words = [w for r in whole for w in r["text"].split()]
    assert len(whole) > 0.5 * len(out) - len(rows)
    assert words.count("[MASK]") / len(words) == pytest.approx(0.1, abs=0.015)
    assert stats["augmented"] + stats["duplicates_dropped"] == len(rows) * 5


def test_never_empty_labels_carried_and_no_duplicates():
    rows = _rows(40) + [{"text": "single", "label": 1}, {"text": "two words", "label": 0}]
    out, stats = tang_augment(rows, n_iter=20, p_mask=0.3, p_pos=0.3, p_ng=1.0, seed=3)
    assert all(r["text"].strip() for r in out)
    texts = [r["text"] for r in out]
    assert len(texts) == len(set(texts))
    for r in out:
        original = rows[r["origin"]]
        if r["augmented"]:
            assert r["label"] == -100 and r["orig_label"] == original["label"]
            assert r.get("id") == original.get("id")  # other fields travel with the copy
        else:
            assert r["label"] == original["label"] and r["text"] == original["text"]
    assert out[: len(rows)] == [{**r, "origin": i, "augmented": 0} for i, r in enumerate(rows)]
    # the one-word text has at most two distinct copies ([MASK], a band-mate): dedupe, not a loop
    assert sum(1 for r in out if r["origin"] == 40 and r["augmented"]) <= len(VOCAB)
    assert stats["duplicates_dropped"] > 0


def test_n_iter_zero_and_bad_input():
    rows = _rows(5)
    out, stats = tang_augment(rows, n_iter=0)
    assert [r["text"] for r in out] == [r["text"] for r in rows] and stats["augmented"] == 0
    with pytest.raises(ValueError, match="p_ng must lie in"):
        tang_augment(rows, p_ng=1.5)
    with pytest.raises(ValueError, match="p_mask \\+ p_pos"):
        tang_augment(rows, p_mask=0.6, p_pos=0.6)
    with pytest.raises(ValueError, match="row 1: field 'text'"):
        tang_augment([{"text": "ok"}, {"text": "  "}])
    out, stats = tang_augment(rows, n_iter=3, p_pos=0.5, replacer="none")
    assert stats["replacer"] == "none" and stats["replace_rate"] == 0


def test_cli_writes_a_shuffled_transfer_set_with_stats(tmp_path, capsys):
    import json

    from kdcache.pipeline.cli.main import main

    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows(20)))
    out = tmp_path / "transfer.jsonl"
    assert main(["augment", "--input", str(src), "--out", str(out), "--n-iter", "3", "--mask-token", "<mask>",
                 "--json"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == stats["originals"] + stats["augmented"] == 20 + stats["augmented"]
    assert [r["augmented"] for r in rows] != sorted(r["augmented"] for r in rows)  # shuffled
    assert any("<mask>" in r["text"] for r in rows)
    assert json.loads((tmp_path / "transfer.stats.json").read_text())["augmented"] == stats["augmented"]
