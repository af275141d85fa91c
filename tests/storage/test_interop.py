"""Other tools read a cache without kdcache: plain pyarrow, HF datasets, duckdb, Ray Data paths."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from kdcache.storage import CacheReader
from tests.support import write_cache


def test_plain_pyarrow_reads_shapes(tmp_path, full_spec):
    _, written = write_cache(tmp_path / "c", full_spec, shards=2)
    files = CacheReader(str(tmp_path / "c")).files()
    table = pq.read_table(files[0], columns=["sample_id", "length", "hidden_2", "attention_2"])
    row = table.slice(0, 1).to_pylist()[0]
    n = row["length"]
    hidden = np.array(row["hidden_2"], dtype=np.float32)
    assert hidden.shape == (n, full_spec.hidden_size)
    np.testing.assert_allclose(hidden, written[row["sample_id"]]["hidden_2"][:n], atol=1e-3)
    assert np.array(row["attention_2"], dtype=np.float32).shape == (full_spec.num_heads, n, n)


def test_hf_datasets_loads_the_shards(tmp_path, full_spec):
    from datasets import load_dataset

    write_cache(tmp_path / "c", full_spec, shards=2)
    files = CacheReader(str(tmp_path / "c")).files()
    ds = load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 16
    first = ds.with_format("numpy")[0]
    n = int(first["length"])
    assert np.asarray(first["hidden_0"]).shape == (n, full_spec.hidden_size)
    assert np.asarray(first["topk_codes"]).shape == (n, full_spec.k)


def test_duckdb_queries_the_cache(tmp_path, full_spec):
    import duckdb

    manifest, _ = write_cache(tmp_path / "c", full_spec, shards=3)
    glob = str(tmp_path / "c" / "shards" / "shard-*.parquet")
    ((rows, tokens, distinct),) = duckdb.sql(
        f"select count(*), sum(length), count(distinct sample_id) from read_parquet('{glob}')").fetchall()
    assert (rows, tokens, distinct) == (manifest.rows, manifest.tokens, manifest.rows)
    ((k,),) = duckdb.sql(f"select len(topk_codes[1]) from read_parquet('{glob}') limit 1").fetchall()
    assert k == full_spec.k


@pytest.mark.ray
def test_ray_data_reads_the_manifest_files(tmp_path, full_spec):
    import ray
    manifest, _ = write_cache(tmp_path / "c", full_spec, shards=2)
    reader = CacheReader(str(tmp_path / "c"))
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        ds = ray.data.read_parquet(reader.files(), filesystem=None, columns=["sample_id", "length", "hidden_0"])
        rows = ds.take_all()
        assert sorted(r["sample_id"] for r in rows) == list(range(manifest.rows))
        assert np.stack(rows[0]["hidden_0"]).shape == (rows[0]["length"], full_spec.hidden_size)
    finally:
        ray.shutdown()
