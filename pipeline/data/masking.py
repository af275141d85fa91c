"""Static MLM masking: decide once, at cache time, which tokens the teacher predicts.

Contract: ``mask_sequence`` is a pure function of (input ids, seed, sample id,
copy index). Its RNG is ``np.random.default_rng([seed, sample_id, copy_index])``,
so a sequence masks the same way whatever order, worker or batch it is
processed in, and a run can be resumed or re-sharded without changing a bit.

BERT recipe: ``round(probability * n)`` of the ``n`` maskable (non-special)
tokens are chosen, at least one when ``n > 0``; of those, ``mask_frac`` become
the mask token, ``random_frac`` a random non-special token, and the rest stay
as they are (each chosen position draws its fate independently).

``dupe_factor`` (``iter_masked``) makes several masked copies of every
sequence, as BERT's data generation does. Copy ``c`` of sequence ``s`` gets
``sample_id = s * dupe_factor + c``: ids stay unique and dense, and the
original id and copy are ``divmod(sample_id, dupe_factor)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

__all__ = ["MaskedSequence", "TokenizerInfo", "iter_masked", "mask_sequence"]


@dataclass(frozen=True)
class TokenizerInfo:
    """What masking needs to know about a tokenizer; small and picklable (Ray workers)."""

    mask_token_id: int | None
    vocab_size: int
    special_ids: tuple[int, ...]
    pad_token_id: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenizerInfo:
        # len() counts added tokens too: they are valid ids the model can emit.
        return cls(
            mask_token_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            special_ids=tuple(sorted(set(tokenizer.all_special_ids))),
            pad_token_id=tokenizer.pad_token_id,
        )


@dataclass(frozen=True, slots=True)
class MaskedSequence:
    """A ``Sequence`` after masking: the masked ids plus where and what to predict."""

    sample_id: int
    source: str
    input_ids: np.ndarray  # masked
    label: int | None
    positions: np.ndarray  # int32, sorted: indices into input_ids that are predicted
    mlm_labels: np.ndarray  # int32: the original ids at those positions
    copy_index: int = 0


def _random_regular_ids(rng: np.random.Generator, n: int, info: TokenizerInfo) -> np.ndarray:
    """``n`` ids drawn uniformly from the vocabulary minus the special tokens.

    Draw r in [0, V - S) and shift it past every special id <= the result:
    ``searchsorted`` on ``special - arange(S)`` does that without building the
    (vocabulary-sized) list of regular ids.
    """
    special = np.asarray([s for s in info.special_ids if 0 <= s < info.vocab_size], dtype=np.int64)
    r = rng.integers(0, info.vocab_size - len(special), size=n)
    return (r + np.searchsorted(special - np.arange(len(special)), r, side="right")).astype(np.int32)


def mask_sequence(
    input_ids: np.ndarray,
    tokenizer_info: TokenizerInfo,
    probability: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
    seed: int = 0,
    sample_id: int = 0,
    copy_index: int = 0,
    max_predictions: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask one sequence (see the module docstring).

    Returns ``(masked_ids, positions, labels)``: a new int32 array (the input is
    not modified), the sorted int32 positions chosen, and the int32 original
    ids at those positions. ``max_predictions`` caps how many are chosen.
    """
    if tokenizer_info.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token: MLM masking needs one")
    if not (0.0 <= probability <= 1.0 and mask_frac >= 0 and random_frac >= 0 and mask_frac + random_frac <= 1.0):
        raise ValueError("need 0 <= probability <= 1 and mask_frac + random_frac <= 1")
    ids = np.asarray(input_ids, dtype=np.int32)
    masked = ids.copy()
    candidates = np.flatnonzero(~np.isin(ids, tokenizer_info.special_ids))
    if len(candidates) == 0:
        return masked, np.empty(0, np.int32), np.empty(0, np.int32)

    rng = np.random.default_rng([seed, sample_id, copy_index])
    k = max(1, int(round(probability * len(candidates))))
    if max_predictions is not None:
        k = max(1, min(k, max_predictions))
    positions = np.sort(rng.choice(candidates, size=k, replace=False)).astype(np.int32)
    labels = ids[positions]

    fate = rng.random(k)  # < mask_frac: [MASK]; next random_frac: random token; rest: unchanged
    to_mask = fate < mask_frac
    to_random = (fate >= mask_frac) & (fate < mask_frac + random_frac)
    masked[positions[to_mask]] = tokenizer_info.mask_token_id
    masked[positions[to_random]] = _random_regular_ids(rng, int(to_random.sum()), tokenizer_info)
    return masked, positions, labels


def iter_masked(
    seqs: Iterable[Any],
    tokenizer_info: TokenizerInfo,
    dupe_factor: int = 1,
    seed: int = 0,
    **mask_kwargs: Any,
) -> Iterator[MaskedSequence]:
    """``dupe_factor`` masked copies of every sequence, in order, with ids
    ``sample_id * dupe_factor + copy`` (see the module docstring).
    ``mask_kwargs`` go to ``mask_sequence``."""
    if dupe_factor < 1:
        raise ValueError("dupe_factor must be at least 1")
    for seq in seqs:
        for copy in range(dupe_factor):
            masked, positions, labels = mask_sequence(
                seq.input_ids, tokenizer_info, seed=seed, sample_id=seq.sample_id, copy_index=copy, **mask_kwargs
            )
            yield MaskedSequence(seq.sample_id * dupe_factor + copy, seq.source, masked, seq.label,
                                 positions, labels, copy)
