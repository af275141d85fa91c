"""Every column type survives a write and a read; projection and resuming a stream behave
(which rank reads which rows: test_assign.py)."""
from __future__ import annotations

import numpy as np
import pytest

from kdcache.storage import CacheReader, CacheSpec, ColumnError
from kdcache.storage.codecs import get_topk_codec
from tests.support import write_cache


def _rows_by_id(reader: CacheReader, columns=None, **kw):
    out = {}
    for batch in reader.iter_numpy(columns, **kw):
        for r, sid in enumerate(batch["sample_id"]):
            out[int(sid)] = {k: v[r] for k, v in batch.items()}
    return out


def test_every_column_round_trips(tmp_path, full_spec):
    manifest, written = write_cache(tmp_path / "c", full_spec)
    reader = CacheReader(str(tmp_path / "c"))
    read = _rows_by_id(reader)
    assert sorted(read) == sorted(written) == list(range(manifest.rows))
    codec = get_topk_codec(full_spec.topk_codec)
    for sid, w in written.items():
        r, n = read[sid], int(w["lengths"])
        assert int(r["length"]) == n and r["source"] == w["source"]
        np.testing.assert_array_equal(r["input_ids"][:n], w["input_ids"][:n])
        assert (r["input_ids"][n:] == 0).all() and r["attention_mask"][:n].all() and not r["attention_mask"][n:].any()
        # top-k: the stored set of ids is exact; log-probs within the codec's rounding
        for t in range(n):
            order_w, order_r = np.argsort(w["topk_ids"][t]), np.argsort(r["topk_ids"][t])
            np.testing.assert_array_equal(w["topk_ids"][t][order_w], r["topk_ids"][t][order_r])
            tol = 1e-6 if codec.name == "exact" else 0.5
            np.testing.assert_allclose(w["topk_logprobs"][t][order_w], r["topk_logprobs"][t][order_r], atol=tol)
        np.testing.assert_allclose(r["topk_log_tail"][:n], w["topk_log_tail"][:n], rtol=2e-3, atol=2e-3)
        for layer in full_spec.hidden_layers:
            col = f"hidden_{layer}"
            np.testing.assert_allclose(r[col][:n], w[col][:n], rtol=1e-3, atol=1e-3)
            assert (r[col][n:] == 0).all()
        a_w, a_r = w["attention_2"], r["attention_2"]
        np.testing.assert_allclose(a_r[:, :n, :n], a_w[:, :n, :n], atol=1e-3)
        assert (a_r[:, n:, :] == 0).all() and (a_r[:, :, n:] == 0).all()
        valid = w["mlm_positions"] >= 0
        np.testing.assert_array_equal(r["mlm_positions"][: valid.sum()], w["mlm_positions"][valid])
        np.testing.assert_array_equal(r["mlm_labels"][: valid.sum()], w["mlm_labels"][valid])
        np.testing.assert_allclose(r["task_logits"], w["task_logits"], rtol=1e-6)
        assert int(r["label"]) == int(w["label"])


@pytest.mark.parametrize("form,tol", [("bfloat16", 1e-2), ("int8", 3e-2)])
def test_hidden_forms(tmp_path, form, tol):
    spec = CacheSpec(vocab_size=50, max_length=6, targets="none", hidden_layers=(1,), hidden_size=8,
                     hidden_dtype=form)
    _, written = write_cache(tmp_path / "c", spec)
    read = _rows_by_id(CacheReader(str(tmp_path / "c")))
    for sid, w in written.items():
        n = int(w["lengths"])
        scale = np.abs(w["hidden_1"][:n]).max(axis=-1, keepdims=True)
        assert (np.abs(read[sid]["hidden_1"][:n] - w["hidden_1"][:n]) <= tol * scale).all()


def test_uint8_attention_and_sampled_targets(tmp_path):
    spec = CacheSpec(vocab_size=70_000, max_length=7, targets="sampled", num_samples=6, attention_layers=(1, 3),
                     num_heads=3, attention_dtype="uint8")
    _, written = write_cache(tmp_path / "c", spec)
    reader = CacheReader(str(tmp_path / "c"))
    assert str(reader.schema.field("sample_ids").type.value_type.value_type) == "uint32"  # vocab > 65,536
    read = _rows_by_id(reader)
    for sid, w in written.items():
        n = int(w["lengths"])
        for t in range(n):
            keep = w["sample_weights"][t] > 0
            m = int(keep.sum())
            np.testing.assert_array_equal(read[sid]["sample_ids"][t][:m], w["sample_ids"][t][keep])
            np.testing.assert_allclose(read[sid]["sample_weights"][t][:m], w["sample_weights"][t][keep], rtol=1e-3)
            assert (read[sid]["sample_weights"][t][m:] == 0).all()
        for layer in (1, 3):
            got, want = read[sid][f"attention_{layer}"][:, :n, :n], w[f"attention_{layer}"][:, :n, :n]
            assert np.abs(got - want).max() <= 1 / 255 + 1e-6


def test_projection_reads_only_what_is_asked(tmp_path, full_spec):
    write_cache(tmp_path / "c", full_spec)
    reader = CacheReader(str(tmp_path / "c"))
    batches = list(reader.iter_batches(["topk"]))
    assert set(batches[0].schema.names) == {"sample_id", "length", "topk_log_tail", *full_spec.topk_columns.values()}
    numpy_batch = next(reader.iter_numpy(["hidden_2"]))
    assert "hidden_2" in numpy_batch and "hidden_0" not in numpy_batch and "topk_ids" not in numpy_batch
    with pytest.raises(ColumnError, match="'hidden_5' is not in the cache"):
        reader.resolve_columns(["hidden_5"])
    with pytest.raises(ColumnError, match="'sampled' is not in the cache"):
        reader.resolve_columns(["sampled"])  # a top-k cache holds no RS-KD columns


def test_skip_rows_resumes_exactly(tmp_path, full_spec):
    write_cache(tmp_path / "c", full_spec, shards=3, rows_per_shard=8, batch_rows=4)
    reader = CacheReader(str(tmp_path / "c"))
    everything = [int(i) for b in reader.iter_batches(["sample_id"], batch_size=3) for i in b.column("sample_id").to_numpy()]
    for skip in (0, 1, 4, 7, 8, 13, 24):
        rest = [int(i) for b in reader.iter_batches(["sample_id"], batch_size=3, skip_rows=skip)
                for i in b.column("sample_id").to_numpy()]
        assert rest == everything[skip:]


def test_torch_batches(tmp_path, full_spec):
    """The trainer's path: Arrow record batches -> padded numpy -> CPU tensors."""
    import torch

    from kdcache.storage.columns import to_numpy
    from kdcache.storage.reader import numpy_to_torch

    write_cache(tmp_path / "c", full_spec)
    reader = CacheReader(str(tmp_path / "c"))
    rb = next(reader.iter_batches(["topk", "hidden_0"], batch_size=4))
    batch = numpy_to_torch(to_numpy(rb, reader.spec))
    assert batch["topk_ids"].dtype == torch.int64 and batch["topk_ids"].shape[-1] == full_spec.k
    assert batch["hidden_0"].shape[0] == 4 and batch["hidden_0"].shape[-1] == full_spec.hidden_size
    assert batch["attention_mask"].shape == batch["topk_log_tail"].shape


def test_fsspec_memory_url_round_trips(full_spec):
    import fsspec

    url = "memory://kdcache-test/cache"
    try:
        manifest, written = write_cache(url, full_spec, shards=2)
        reader = CacheReader(url)
        assert reader.files()[0].startswith("/kdcache-test/cache/shards/")
        read = _rows_by_id(reader, ["input_ids"])
        assert sorted(read) == sorted(written)
        from kdcache.storage.verify import verify_cache

        assert verify_cache(url)[0] == []
        fs = fsspec.filesystem("memory")
        assert not [p for p in fs.find("/kdcache-test") if "/.tmp-" in p]
    finally:
        fsspec.filesystem("memory").rm("/kdcache-test", recursive=True)
