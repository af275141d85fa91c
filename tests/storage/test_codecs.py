"""Top-k codecs: exact ids, bounded log-prob errors, plain Parquet leaves, clear errors, device twins.

Synthetic data only (no model downloads); the real-teacher numbers come from
experiments/topk_codec.py.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kdcache.storage.codecs import (
    CODECS,
    DEFAULT_TOPK_CODEC,
    get_topk_codec,
    narrowest_uint,
    topk_kl_error,
)

K = 64


def lm_like_topk(n: int, vocab: int, k: int = K, seed: int = 0):
    """Top-k of LM-like next-token distributions: logits fall off like
    -s*log(rank) with a per-token sharpness s (some tokens peaked, some flat),
    ids biased to small values as in a frequency-ordered BPE vocabulary.
    Top-1 probability median ~0.48 and top-k entropy median ~2.1 nats, close to
    SmolLM2 on Wikipedia (0.42, 2.2), where the default codec measured 8.4e-5."""
    rng = np.random.default_rng(seed)
    cand = min(vocab, 4 * k)
    if vocab <= cand:
        ids = np.stack([rng.permutation(vocab) for _ in range(n)])
    else:
        # Log-uniform draws span the whole vocabulary but favour small ids.
        draws = (vocab ** rng.random((n, 3 * cand))).astype(np.int64) - 1
        ids = np.stack([rng.permutation(np.unique(d))[:cand] for d in draws])
    s = rng.uniform(0.8, 2.5, size=(n, 1))
    logits = -s * np.log1p(np.arange(cand))[None, :] + rng.normal(0, 0.3, size=(n, cand))
    # Mass outside the top-k: 2-30% of the total, as for a real teacher.
    logz = np.logaddexp.reduce(logits, axis=1, keepdims=True) + np.log1p(rng.uniform(0.02, 0.3, (n, 1)))
    top = np.argsort(-logits, axis=1)[:, :k]
    return np.take_along_axis(ids, top, 1), (np.take_along_axis(logits, top, 1) - logz).astype(np.float32)


# --------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("vocab", [100, 30_522, 49_152, 70_000])
@pytest.mark.parametrize("name", sorted(CODECS))
def test_ids_round_trip_exactly(name, vocab):
    ids, lp = lm_like_topk(200, vocab, seed=vocab)
    ids[0, :2] = [0, vocab - 1]  # both ends of the vocabulary
    codec = get_topk_codec(name)
    enc = codec.encode(ids, lp, vocab_size=vocab)
    types = codec.element_types(K, vocab)
    assert set(enc) == set(types) and codec.bss_leaves() <= set(types)
    for leaf, arr in enc.items():
        assert arr.shape == ((len(ids),) if leaf in codec.scalar_leaves() else (len(ids), K)), leaf
        assert pa.from_numpy_dtype(arr.dtype) == types[leaf], leaf
    ids2, lp2 = codec.decode(enc, K)
    assert ids2.dtype == np.int64 and lp2.dtype == np.float32 and lp2.shape == lp.shape
    if name == "exact":
        np.testing.assert_array_equal(ids2, ids)
        np.testing.assert_array_equal(lp2, lp)
    else:
        np.testing.assert_array_equal(np.sort(ids2, axis=1), np.sort(ids, axis=1))
        assert topk_kl_error(ids, lp, ids2, lp2) < 2e-4


def test_id_width_follows_the_vocabulary():
    assert get_topk_codec(DEFAULT_TOPK_CODEC).element_types(K, 65_536)["id_deltas"] == pa.uint16()
    assert get_topk_codec(DEFAULT_TOPK_CODEC).element_types(K, 65_537)["id_deltas"] == pa.uint32()
    assert get_topk_codec("exact").element_types(K, 70_000)["ids"] == pa.uint32()


def test_narrowest_uint_boundaries():
    assert narrowest_uint(0) == np.uint16
    assert narrowest_uint(65_535) == np.uint16
    assert narrowest_uint(65_536) == np.uint32
    assert narrowest_uint(65_537) == np.uint32
    assert narrowest_uint(2**32) == np.uint64
    with pytest.raises(ValueError, match="max_value"):
        narrowest_uint(-1)


def test_default_codec_kl_bound():
    ids, lp = lm_like_topk(2000, 49_152, seed=1)
    codec = get_topk_codec(DEFAULT_TOPK_CODEC)
    ids2, lp2 = codec.decode(codec.encode(ids, lp), K)
    assert topk_kl_error(ids, lp, ids2, lp2) <= 1e-4
    # The absolute level survives too: decoded mass matches the top-k mass.
    mass = np.exp(lp.astype(np.float64)).sum(1)
    np.testing.assert_allclose(np.exp(lp2.astype(np.float64)).sum(1), mass, rtol=2e-3)  # float16 log_mass


def test_default_codec_worst_case_is_a_flat_top_k():
    # All k entries equal is the documented worst case (~1.4e-4), whatever the
    # mass outside the top-k, because the codec renormalises first.
    rng = np.random.default_rng(2)
    ids = np.stack([rng.choice(49_152, K, replace=False) for _ in range(300)])
    for log_mass in (0.0, -5.0):
        lp = np.full((300, K), log_mass - np.log(K), np.float32) + rng.normal(0, 0.05, (300, K)).astype(np.float32)
        codec = get_topk_codec(DEFAULT_TOPK_CODEC)
        ids2, lp2 = codec.decode(codec.encode(ids, lp), K)
        assert topk_kl_error(ids, lp, ids2, lp2) <= 1.5e-4


def test_fitted_vocab_order_round_trips_and_rebuilds_from_params():
    calib, _ = lm_like_topk(300, 49_152, seed=3)
    ids, lp = lm_like_topk(200, 49_152, seed=4)  # includes ids never seen in calibration
    fitted = get_topk_codec(DEFAULT_TOPK_CODEC).fit(calib)
    rebuilt = get_topk_codec(fitted.name, fitted.params())  # as a reader would, from the manifest
    enc = fitted.encode(ids, lp)
    ids2, lp2 = rebuilt.decode(enc, K)
    np.testing.assert_array_equal(np.sort(ids2, axis=1), np.sort(ids, axis=1))
    assert topk_kl_error(ids, lp, ids2, lp2) <= 1e-4
    assert fitted.params()["vocab_order"][:5] and get_topk_codec(DEFAULT_TOPK_CODEC).params()["vocab_order"] is None


def test_leaves_are_plain_parquet_integers():
    """Written as the shard writer does, read back with nothing but pyarrow."""
    ids, lp = lm_like_topk(256, 49_152, seed=5)
    codec = get_topk_codec(DEFAULT_TOPK_CODEC)
    enc = codec.encode(ids, lp, vocab_size=49_152)
    types = codec.element_types(K, 49_152)
    offsets = pa.array(np.arange(0, 257, 64, dtype=np.int32))  # 4 sequences of 64 tokens
    cols, enc_by_leaf = {}, {}
    for leaf, arr in enc.items():
        values = pa.array(arr.reshape(-1), type=types[leaf])
        path = f"topk_{leaf}.list.element"
        if arr.ndim == 2:
            values, path = pa.FixedSizeListArray.from_arrays(values, K), path + ".list.element"
        cols[f"topk_{leaf}"] = pa.ListArray.from_arrays(offsets, values)
        enc_by_leaf[path] = "BYTE_STREAM_SPLIT"
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf, compression="zstd", use_dictionary=False, column_encoding=enc_by_leaf)
    table = pq.read_table(io.BytesIO(buf.getvalue()))
    meta = pq.read_metadata(io.BytesIO(buf.getvalue()))
    assert all("BYTE_STREAM_SPLIT" in meta.row_group(0).column(i).encodings for i in range(meta.num_columns))
    back = {}
    for leaf, arr in enc.items():
        flat = table.column(f"topk_{leaf}").combine_chunks().flatten()
        back[leaf] = flat.flatten().to_numpy().reshape(-1, K) if arr.ndim == 2 else flat.to_numpy()
    ids2, lp2 = codec.decode(back, K)
    np.testing.assert_array_equal(np.sort(ids2, axis=1), np.sort(ids, axis=1))


def topic_sets(n: int, seed: int, topics: int = 8, per_topic: int = 300, vocab: int = 5000):
    """Top-k sets drawn mostly from one of ``topics`` groups of ids scattered over
    the vocabulary (like digits or capitalised words), plus a few random ids."""
    groups = np.random.default_rng(0).permutation(vocab)[: topics * per_topic].reshape(topics, per_topic)
    rng = np.random.default_rng(seed)
    weights = 1 / np.arange(1, per_topic + 1)  # Zipf inside a group
    out = []
    for t in rng.integers(0, topics, n):
        own = rng.choice(groups[t], K - 8, replace=False, p=weights / weights.sum())
        rest = rng.choice(np.setdiff1d(np.arange(vocab), own), 8, replace=False)
        out.append(np.concatenate([own, rest]))
    return np.stack(out)


def test_clustered_fit_puts_co_occurring_ids_together():
    calib, held_out = topic_sets(400, seed=8), topic_sets(200, seed=9)
    codec = get_topk_codec(DEFAULT_TOPK_CODEC)

    def mean_log_delta(fitted):
        d = fitted.encode(held_out, np.full(held_out.shape, -np.log(K), np.float32))["id_deltas"]
        return np.log2(d.astype(np.float64) + 1).mean()

    by_count, clustered = codec.fit(calib, clusters=0), codec.fit(calib, clusters=8)
    assert clustered.params()["vocab_order"] != by_count.params()["vocab_order"]
    assert mean_log_delta(clustered) < mean_log_delta(by_count) - 1
    assert clustered.params() == codec.fit(calib, clusters=8).params()  # deterministic
    # Input ids as (N, 1) give unigram counts: ranked by count, no clustering.
    unigram = codec.fit(calib[:, :1])
    assert unigram.params()["vocab_order"][0] == np.bincount(calib[:, 0]).argmax()
    ids2, _ = get_topk_codec(DEFAULT_TOPK_CODEC, unigram.params()).decode(
        unigram.encode(held_out, np.full(held_out.shape, -5.0, np.float32)), K)
    np.testing.assert_array_equal(np.sort(ids2, axis=1), np.sort(held_out, axis=1))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_bad_input_names_the_field(name):
    codec = get_topk_codec(name)
    ids, lp = lm_like_topk(4, 1000)
    with pytest.raises(ValueError, match="logprobs"):
        codec.encode(ids, lp[:, :-1])  # shape mismatch
    with pytest.raises(ValueError, match="ids"):
        codec.encode(ids.astype(np.float32), lp)  # wrong dtype
    with pytest.raises(ValueError, match="ids"):
        codec.encode(ids[0], lp[0])  # 1-D
    with pytest.raises(ValueError, match="logprobs"):
        codec.encode(ids, lp.astype(np.int64))
    with pytest.raises(ValueError, match="logprobs"):
        codec.encode(ids, -lp)  # positive "log-probs"
    with pytest.raises(ValueError, match="ids"):
        codec.encode(ids, lp, vocab_size=int(ids.max()))
    enc = codec.encode(ids, lp)
    leaf = next(n for n, a in enc.items() if a.ndim == 2)
    with pytest.raises(ValueError, match=leaf):
        codec.decode(enc, K + 1)  # k mismatch
    with pytest.raises(ValueError, match=leaf):
        codec.decode({n: a for n, a in enc.items() if n != leaf}, K)  # leaf missing


def test_unknown_codec_and_kl_preconditions():
    with pytest.raises(ValueError, match="name"):
        get_topk_codec("zip")
    ids, lp = lm_like_topk(3, 1000)
    other = ids.copy()
    other[0, 0] = next(i for i in range(1000) if i not in ids[0])
    with pytest.raises(ValueError, match="ids2"):
        topk_kl_error(ids, lp, other, lp)
    assert topk_kl_error(ids, lp, ids[:, ::-1], lp[:, ::-1]) == pytest.approx(0, abs=1e-12)


# --------------------------------------------------------------------------- torch twins (device encoding)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [100, 30_522, 70_000])
@pytest.mark.parametrize("name", sorted(CODECS))
def test_encode_torch_gives_the_numpy_leaves(name, vocab, device):
    """The teacher runner encodes on its device: the leaves must be the host encoder's, bit for bit."""
    ids, lp = lm_like_topk(3000, vocab, seed=vocab + 1)
    ids[0, :2] = [0, vocab - 1]
    lp[1, :] = lp[1, 0]  # ties
    codecs = [get_topk_codec(name)]
    if name == DEFAULT_TOPK_CODEC:
        codecs.append(codecs[0].fit(ids[:500]))  # a vocabulary order: the rank table goes to the device
    for codec in codecs:
        for dtype in (np.float32, np.float64):  # float64 -> float16 must round once, as numpy does
            for vocab_size in (vocab, None):
                want = codec.encode(ids, lp.astype(dtype), vocab_size=vocab_size)
                got = codec.encode_torch(torch.from_numpy(ids).to(device),
                                         torch.from_numpy(lp.astype(dtype)).to(device), vocab_size=vocab_size)
                assert set(got) == set(want)
                for leaf, arr in want.items():
                    assert got[leaf].device.type == device
                    np.testing.assert_array_equal(got[leaf].cpu().numpy(), arr, err_msg=f"{name} {leaf} {dtype}")
                    assert got[leaf].cpu().numpy().dtype == arr.dtype, leaf


def test_encode_torch_checks_its_inputs():
    codec = get_topk_codec(DEFAULT_TOPK_CODEC)
    ids, lp = (torch.from_numpy(a) for a in lm_like_topk(4, 1000))
    with pytest.raises(ValueError, match="logprobs"):
        codec.encode_torch(ids, lp[:, :-1])
    with pytest.raises(ValueError, match="ids"):
        codec.encode_torch(ids.float(), lp)
    with pytest.raises(ValueError, match="ids"):
        codec.encode_torch(ids.numpy(), lp)


def test_pre_encoded_leaves_are_checked_and_stored_as_given():
    """The writer takes device-encoded leaves as they are (same bytes as encoding the raw columns
    itself) and refuses leaves of the wrong shape or dtype."""
    from kdcache.storage import CacheSpec
    from kdcache.storage.columns import to_record_batch
    from kdcache.storage.dense_forms import get_dense_form
    from kdcache.storage.errors import ColumnError
    from kdcache.storage.schema import build_schema
    from tests.support import synthetic_batch

    spec = CacheSpec(vocab_size=1000, max_length=16, targets="topk", k=8, topk_codec=DEFAULT_TOPK_CODEC,
                     hidden_layers=(0, 1), hidden_size=32, hidden_dtype="int8", attention_layers=(1,), num_heads=2,
                     attention_dtype="uint8")
    schema = build_schema(spec)
    rng = np.random.default_rng(11)
    for full in (False, True):
        raw = synthetic_batch(spec, np.arange(4), rng)
        if full:
            raw["lengths"][:] = spec.max_length
        B, T = raw["input_ids"].shape
        flat = spec.codec.encode(raw["topk_ids"].reshape(B * T, -1), raw["topk_logprobs"].reshape(B * T, -1),
                                 vocab_size=spec.vocab_size)
        pre = {k: v for k, v in raw.items() if k not in ("topk_ids", "topk_logprobs")}
        pre["topk_encoded"] = {leaf: a.reshape(B, T, *a.shape[1:]) for leaf, a in flat.items()}
        pre["topk_log_tail"] = raw["topk_log_tail"].astype(np.float16)
        for layer in spec.hidden_layers:
            codes, params = get_dense_form("int8").encode(raw[f"hidden_{layer}"])
            pre[f"hidden_{layer}"], pre[f"hidden_{layer}_scale"] = codes, params["scale"]
        pre["attention_1"] = get_dense_form("uint8").encode(raw["attention_1"])[0]
        assert to_record_batch(pre, spec, schema).equals(to_record_batch(raw, spec, schema))

        bad = dict(pre, topk_encoded={**pre["topk_encoded"], "codes": pre["topk_encoded"]["codes"][:, :, :-1]})
        with pytest.raises(ValueError, match="topk_codes.*shape"):
            to_record_batch(bad, spec, schema)
        wide = pre["topk_encoded"]["id_deltas"].astype(np.int32)
        bad = dict(pre, topk_encoded={**pre["topk_encoded"], "id_deltas": wide})
        with pytest.raises(ValueError, match="topk_id_deltas.*dtype"):
            to_record_batch(bad, spec, schema)
        bad = dict(pre, topk_encoded={k: v for k, v in pre["topk_encoded"].items() if k != "log_mass"})
        with pytest.raises(ColumnError, match="log_mass"):
            to_record_batch(bad, spec, schema)
        bad = {k: v for k, v in pre.items() if k != "hidden_1_scale"}
        with pytest.raises(ColumnError, match="hidden_1_scale"):
            to_record_batch(bad, spec, schema)
