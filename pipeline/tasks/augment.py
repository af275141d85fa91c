"""Tang et al. 2019's transfer set: the training texts plus `n_iter` perturbed copies of each.

Small students learn little from a few thousand labelled snippets; they learn much more by matching
the teacher's logits on many more inputs. The copies cost one teacher pass (`kdcache cache --mode
examples` over this file): augmented rows carry label −100 (no gold label, so they train on the
teacher's logits alone, and the corpus reader still gets an integer), with `orig_label` and
`origin` kept for analysis.

Per word, one draw u: u < p_mask → the mask token; u < p_mask + p_pos → another word of the same
part-of-speech tag; otherwise kept. Then, with probability p_ng, only a random n-gram (n uniform in
1..max_ngram) survives. Copies equal to their original or to any text already emitted are dropped
(global dedupe), so an example may get fewer than n_iter copies; no text is ever empty.

Same-tag replacement needs a tagger, and none installs offline from the package registries (nltk's
and spaCy's tagger models are separate downloads from their hubs). The fallback, `frequency-band`,
replaces a word by one drawn by frequency from the same band of the corpus's word-frequency ranking
(10 bands of equal token mass): function words trade with function words, rare content words with
rare content words — a crude stand-in for a tag, and the stats (and the demo's report) name the
replacer used. Draws are seeded per example (`seed`, row index), so one example's draws do not depend
on the others' (the bands and the dedupe do depend on the whole set).
"""
from __future__ import annotations

import bisect
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from kdcache.pipeline.data.sequences import IGNORE_INDEX

REPLACERS = ("auto", "frequency-band", "none")
BANDS = 10


class FrequencyBands:
    """Words ranked by corpus frequency, cut into bands of equal token mass; draws within a band."""

    def __init__(self, texts: list[str]):
        counts = Counter(w.lower() for t in texts for w in t.split())
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        total = sum(counts.values()) or 1
        self.band: dict[str, int] = {}
        members: list[list[tuple[str, int]]] = [[] for _ in range(BANDS)]
        seen = 0
        for word, n in ranked:
            b = min(BANDS - 1, seen * BANDS // total)
            self.band[word] = b
            members[b].append((word, n))
            seen += n
        self.words = [[w for w, _ in m] for m in members]
        self.cum = []
        for m in members:
            acc, c = 0, []
            for _, n in m:
                acc += n
                c.append(acc)
            self.cum.append(c)

    def replace(self, word: str, rng: random.Random) -> str:
        b = self.band.get(word.lower())
        if b is None or len(self.words[b]) < 2:
            return word
        for _ in range(4):  # a few tries to draw a different word; frequent words dominate the draws
            pick = self.words[b][bisect.bisect_right(self.cum[b], rng.random() * self.cum[b][-1])]
            if pick != word.lower():
                return pick
        return word


def _check(n_iter: int, p_mask: float, p_pos: float, p_ng: float, max_ngram: int, replacer: str) -> None:
    for name, p in (("p_mask", p_mask), ("p_pos", p_pos), ("p_ng", p_ng)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {p}")
    if p_mask + p_pos > 1.0:
        raise ValueError(f"p_mask + p_pos must be at most 1 (one draw per word), got {p_mask} + {p_pos}")
    if n_iter < 0 or max_ngram < 1:
        raise ValueError(f"n_iter must be ≥ 0 and max_ngram ≥ 1, got {n_iter} and {max_ngram}")
    if replacer not in REPLACERS:
        raise ValueError(f"replacer must be one of {', '.join(REPLACERS)}, got {replacer!r}")


def tang_augment(rows: list[dict], n_iter: int = 20, p_mask: float = 0.1, p_pos: float = 0.1, p_ng: float = 0.25,
                 max_ngram: int = 5, seed: int = 0, mask_token: str = "[MASK]", text_field: str = "text",
                 label_field: str = "label", replacer: str = "auto") -> tuple[list[dict], dict[str, Any]]:
    """(originals then their copies, stats). Originals keep every field (plus `origin`, `augmented: 0`)."""
    _check(n_iter, p_mask, p_pos, p_ng, max_ngram, replacer)
    for i, r in enumerate(rows):
        text = r.get(text_field)
        if not isinstance(text, str) or not text.split():
            raise ValueError(f"row {i}: field {text_field!r} must be a non-empty string, got {text!r}")
    texts = [r[text_field] for r in rows]
    used = "none" if replacer == "none" or p_pos == 0 else "frequency-band"
    bands = FrequencyBands(texts) if used != "none" else None
    out = [{**r, "origin": i, "augmented": 0} for i, r in enumerate(rows)]
    seen = set(texts)
    words_seen = masked = tried = replaced = candidates = cut = dropped = 0
    for i, r in enumerate(rows):
        rng = random.Random(f"{seed}:{i}")
        words, k = r[text_field].split(), 0
        for _ in range(n_iter):
            new = []
            for w in words:
                u = rng.random()
                if u < p_mask:
                    new.append(mask_token)
                    masked += 1
                elif u < p_mask + p_pos and bands is not None:
                    pick = bands.replace(w, rng)
                    tried += 1
                    replaced += pick != w
                    new.append(pick)
                else:
                    new.append(w)
            words_seen += len(words)
            candidates += 1
            if rng.random() < p_ng:
                n = min(len(new), rng.randint(1, max_ngram))
                start = rng.randrange(len(new) - n + 1)
                new = new[start:start + n]
                cut += 1
            text = " ".join(new)
            if text in seen:
                dropped += 1
                continue
            seen.add(text)
            k += 1
            out.append({**r, text_field: text, label_field: IGNORE_INDEX, "orig_label": r.get(label_field),
                        "origin": i, "augmented": k})
    stats = {"replacer": used, "originals": len(rows), "augmented": len(out) - len(rows),
             "duplicates_dropped": dropped, "n_iter": n_iter, "p_mask": p_mask, "p_pos": p_pos, "p_ng": p_ng,
             "max_ngram": max_ngram, "seed": seed,
             "mask_rate": masked / max(words_seen, 1), "pos_rate": tried / max(words_seen, 1),
             "replace_rate": replaced / max(words_seen, 1),
             "ngram_rate": cut / max(candidates, 1)}
    return out, stats


def write_transfer_set(rows: list[dict], path: Path, *, shuffle: bool = True, **options: Any) -> dict[str, Any]:
    """`tang_augment` written to `path` (JSONL, atomic) with its stats beside it (`<path stem>.stats.json`).

    `shuffle` (seeded by `options["seed"]`): the trainer's own shuffle permutes row groups and rows
    within a window of a few batches, so the file order is what mixes originals and copies across it."""
    from kdcache.pipeline.common.jsonout import write_jsonl

    out, stats = tang_augment(rows, **options)
    if shuffle:
        random.Random(options.get("seed", 0)).shuffle(out)
    write_jsonl(path, out)
    stats = {**stats, "shuffled": shuffle, "path": str(path)}
    path.with_suffix(".stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats
