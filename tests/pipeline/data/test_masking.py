"""kdcache.pipeline.data.masking: BERT 80/10/10 masking, reproducible per (seed, sample_id, copy)."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.pipeline.data.masking import TokenizerInfo, iter_masked, mask_sequence
from kdcache.pipeline.data.sequences import Sequence, batch_sequences

# A synthetic vocabulary big enough for statistics: ids 0..4 are special, 5..999 regular.
INFO = TokenizerInfo(mask_token_id=4, vocab_size=1000, special_ids=(0, 1, 2, 3, 4), pad_token_id=0)
CLS, SEP, PAD = 2, 3, 0


def random_sequences(n: int, length: int = 128, seed: int = 0) -> list[Sequence]:
    """[CLS] regular tokens [SEP], with a few [PAD]/[UNK] inside to prove they are never picked."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = rng.integers(5, INFO.vocab_size, size=length).astype(np.int32)
        ids[0], ids[-1] = CLS, SEP
        ids[rng.integers(1, length - 1, size=3)] = rng.choice([PAD, 1], size=3)
        out.append(Sequence(i, f"c.txt:0@{i * length}", ids))
    return out


def test_reproducible_per_seed_sample_and_copy():
    seq = random_sequences(1)[0].input_ids
    a = mask_sequence(seq, INFO, seed=3, sample_id=41)
    b = mask_sequence(seq, INFO, seed=3, sample_id=41)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for other in (dict(seed=4, sample_id=41), dict(seed=3, sample_id=42), dict(seed=3, sample_id=41, copy_index=1)):
        assert not np.array_equal(mask_sequence(seq, INFO, **other)[1], a[1]), other


def test_independent_of_processing_order():
    seqs = random_sequences(50)
    forward = {m.sample_id: m for m in iter_masked(seqs, INFO, seed=9)}
    backward = {m.sample_id: m for m in iter_masked(reversed(seqs), INFO, seed=9)}
    assert forward.keys() == backward.keys()
    assert all(np.array_equal(forward[k].input_ids, backward[k].input_ids) for k in forward)


def test_rate_split_and_labels_over_many_tokens():
    seqs = random_sequences(400)
    n_tokens = n_chosen = n_mask = n_random = n_kept = 0
    for s in seqs:
        ids = s.input_ids
        masked, positions, labels = mask_sequence(ids, INFO, seed=1, sample_id=s.sample_id)
        assert masked is not ids and masked.dtype == np.int32
        assert positions.dtype == np.int32 and labels.dtype == np.int32
        assert np.all(np.diff(positions) > 0)  # sorted, distinct
        assert np.array_equal(labels, ids[positions])  # labels are the original ids
        special = np.isin(ids, INFO.special_ids)
        assert not special[positions].any()  # special tokens never chosen
        assert np.array_equal(masked[special], ids[special])  # ... nor altered
        untouched = np.ones(len(ids), bool)
        untouched[positions] = False
        assert np.array_equal(masked[untouched], ids[untouched])  # only chosen positions change
        new = masked[positions]
        assert not np.isin(new[new != INFO.mask_token_id], [0, 1, 2, 3]).any()  # random ids are regular
        n_tokens += int((~special).sum())
        n_chosen += len(positions)
        n_mask += int((new == INFO.mask_token_id).sum())
        n_kept += int((new == labels).sum())
        n_random += int(((new != INFO.mask_token_id) & (new != labels)).sum())
    # 400 x ~123 maskable tokens; k = round(0.15 n) per sequence, so the rate is tight.
    assert abs(n_chosen / n_tokens - 0.15) < 0.005
    # ~7,400 chosen positions: binomial sd of each share is < 0.005; allow 4 sd.
    assert abs(n_mask / n_chosen - 0.8) < 0.02
    assert abs(n_random / n_chosen - 0.1) < 0.015  # a random draw equal to the original counts as kept (~0.1%)
    assert abs(n_kept / n_chosen - 0.1) < 0.015


def test_at_least_one_masked_and_nothing_when_nothing_maskable():
    masked, positions, labels = mask_sequence(np.array([CLS, 77, SEP], np.int32), INFO, probability=0.01)
    assert positions.tolist() == [1] and labels.tolist() == [77]
    masked, positions, labels = mask_sequence(np.array([CLS, SEP, PAD], np.int32), INFO)
    assert masked.tolist() == [CLS, SEP, PAD] and len(positions) == len(labels) == 0


def test_max_predictions_caps_the_count():
    seq = random_sequences(1)[0].input_ids
    assert len(mask_sequence(seq, INFO, max_predictions=5)[1]) == 5


def test_dupe_factor_ids_and_distinct_copies():
    seqs = random_sequences(4)
    out = list(iter_masked(seqs, INFO, dupe_factor=3, seed=5))
    assert [m.sample_id for m in out] == list(range(12))
    assert [divmod(m.sample_id, 3) for m in out] == [(s.sample_id, c) for s in seqs for c in range(3)]
    assert [m.copy_index for m in out] == [0, 1, 2] * 4 and out[4].source == seqs[1].source
    assert not np.array_equal(out[0].positions, out[1].positions)
    with pytest.raises(ValueError):
        list(iter_masked(seqs, INFO, dupe_factor=0))


def test_masked_batches_carry_positions_and_labels():
    out = list(iter_masked(random_sequences(3, length=20), INFO, probability=0.3))
    batch = next(batch_sequences(out, batch_size=3, pad_id=PAD))
    counts = [len(m.positions) for m in out]
    assert batch["mlm_positions"].shape == (3, max(counts))
    for row_p, row_l, m in zip(batch["mlm_positions"], batch["mlm_labels"], out):
        n = len(m.positions)
        assert row_p[:n].tolist() == m.positions.tolist() and row_l[:n].tolist() == m.mlm_labels.tolist()
        assert (row_l[n:] == -100).all() and (row_p[n:] == -1).all()  # the cache's own padding


def test_tokenizer_info_from_a_real_tokenizer(bert_tokenizer, causal_tokenizer):
    info = TokenizerInfo.from_tokenizer(bert_tokenizer)
    assert info.mask_token_id == bert_tokenizer.mask_token_id and info.vocab_size == len(bert_tokenizer)
    assert set(info.special_ids) == {bert_tokenizer.convert_tokens_to_ids(t)
                                     for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    ids = np.array(bert_tokenizer("the film was very good and the plot was great")["input_ids"], np.int32)
    masked, positions, _ = mask_sequence(ids, info, probability=0.5, seed=0, sample_id=0)
    assert 0 not in positions and len(ids) - 1 not in positions  # [CLS] and [SEP]
    with pytest.raises(ValueError, match="mask token"):
        mask_sequence(ids, TokenizerInfo.from_tokenizer(causal_tokenizer))
