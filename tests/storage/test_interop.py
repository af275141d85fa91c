"""Other tools read a cache without kdcache: every column of every storage form, by every reader
docs/format.md names (pyarrow, HF datasets, duckdb, pandas via pyarrow, polars, Ray Data), values compared
with plain pyarrow's and with what kdcache decodes; and format.md §7's examples, run as written."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from kdcache.storage import CacheReader, WriteOptions
from tests.support import write_cache

# The storage forms a cache can take: (targets, hidden form, attention form).
FORMS = {"topk-float16": ("topk", "float16", "float16"), "sampled-bfloat16": ("sampled", "bfloat16", "bfloat16"),
         "topk-int8-uint8": ("topk", "int8", "uint8")}


@pytest.fixture(params=list(FORMS))
def cache(request, tmp_path, full_spec):
    targets, hidden, attention = FORMS[request.param]
    spec = dataclasses.replace(full_spec, targets=targets, num_samples=8 if targets == "sampled" else 0,
                               hidden_dtype=hidden, attention_dtype=attention)
    write_cache(tmp_path / "c", spec, shards=2)
    return CacheReader(str(tmp_path / "c"))


def _same(got, want, where: str) -> None:
    """Nested values equal (floats to float32 precision: readers widen float16 differently)."""
    if isinstance(want, (list, tuple, np.ndarray)):
        got, want = list(got), list(want)
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]")
    elif isinstance(want, (float, np.floating)):
        assert math.isclose(float(got), float(want), rel_tol=1e-6, abs_tol=1e-7), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _pyarrow_rows(reader: CacheReader) -> list[dict]:
    rows = [r for f in reader.files() for r in pq.read_table(f).to_pylist()]
    assert set(rows[0]) == {f.name for f in reader.schema}  # every column, nothing lost
    return sorted(rows, key=lambda r: r["sample_id"])


def test_pyarrow_values_are_what_kdcache_decodes(cache):
    rows = _pyarrow_rows(cache)
    decoded = {int(s): i for i, s in enumerate(np.concatenate([b["sample_id"] for b in cache.iter_numpy()]))}
    batch = {k: np.concatenate(v) for k, v in _stack(cache.iter_numpy(pad_to=cache.spec.max_length)).items()}
    row = rows[3]
    r, n = decoded[row["sample_id"]], row["length"]
    np.testing.assert_array_equal(np.asarray(row["input_ids"]), batch["input_ids"][r, :n])
    hidden = f"hidden_{cache.spec.hidden_layers[-1]}"
    if cache.spec.hidden_dtype == "float16":  # stored as it decodes
        np.testing.assert_array_equal(np.asarray(row[hidden], np.float32), batch[hidden][r, :n])


def _stack(batches):
    out: dict[str, list] = {}
    for b in batches:
        for k, v in b.items():
            out.setdefault(k, []).append(v)
    return out


def test_hf_datasets_reads_every_column(cache, tmp_path):
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=cache.files(), split="train", cache_dir=str(tmp_path / "hf"))
    got = sorted(ds.to_list(), key=lambda r: r["sample_id"])
    _same(got, _pyarrow_rows(cache), "datasets")


def test_duckdb_reads_every_column_with_values(cache):
    import duckdb

    glob = str(Path(cache.files()[0]).parent / "shard-*.parquet")
    rel = duckdb.sql(f"select * from read_parquet('{glob}') order by sample_id")
    got = [dict(zip(rel.columns, values)) for values in rel.fetchall()]
    _same(got, _pyarrow_rows(cache), "duckdb")
    # One value by index, as a user writes it (1-based lists), against the decoded cache.
    hidden = f"hidden_{cache.spec.hidden_layers[-1]}"
    ((value,),) = duckdb.sql(f"select {hidden}[2][3] from read_parquet('{glob}') order by sample_id limit 1").fetchall()
    assert value == pytest.approx(_pyarrow_rows(cache)[0][hidden][1][2], rel=1e-6)


def test_pandas_and_polars_read_every_column(cache):
    import polars as pl

    files = cache.files()
    want = _pyarrow_rows(cache)
    frame = pq.read_table(files).to_pandas().sort_values("sample_id")
    _same([{c: _tolist(v) for c, v in rec.items()} for rec in frame.to_dict("records")], want, "pandas")
    got = pl.read_parquet(files).sort("sample_id").to_dicts()
    _same(got, want, "polars")


def _tolist(v):
    return v.tolist() if isinstance(v, np.ndarray) and v.dtype != object else (
        [_tolist(x) for x in v] if isinstance(v, np.ndarray) else v)


def test_float16_byte_stream_split_stays_an_option(tmp_path, full_spec):
    import duckdb
    import polars as pl

    write_cache(tmp_path / "split", full_spec, shards=1, write_options=WriteOptions(float16_byte_stream_split=True))
    write_cache(tmp_path / "plain", full_spec, shards=1)
    split, plain = (CacheReader(str(tmp_path / n)).files()[0] for n in ("split", "plain"))

    def encodings(path: str, column: str) -> set[str]:
        meta = pq.ParquetFile(path).metadata.row_group(0)
        return {e for i in range(meta.num_columns) if meta.column(i).path_in_schema.startswith(column + ".")
                for e in meta.column(i).encodings}

    assert "BYTE_STREAM_SPLIT" in encodings(split, "hidden_2") and "BYTE_STREAM_SPLIT" not in encodings(plain, "hidden_2")
    assert "BYTE_STREAM_SPLIT" in encodings(plain, "input_ids")  # integer leaves keep the split either way
    np.testing.assert_array_equal(pl.read_parquet(split)["hidden_2"].to_list()[0],
                                  pl.read_parquet(plain)["hidden_2"].to_list()[0])
    duckdb.sql(f"select hidden_2[1][1] from read_parquet('{plain}')").fetchall()
    with pytest.raises(duckdb.Error, match="BYTE_STREAM_SPLIT"):  # why it is not the default (docs/format.md §6)
        duckdb.sql(f"select hidden_2[1][1] from read_parquet('{split}')").fetchall()


def _format_md_examples() -> tuple[list[str], list[str]]:
    text = (Path(__file__).parents[2] / "docs" / "format.md").read_text()
    section = text[text.index("## 7."):text.index("## 8.")]
    return re.findall(r"```python\n(.*?)```", section, re.S), re.findall(r"```sql\n(.*?)```", section, re.S)


def test_format_md_reading_examples_run_as_written(tmp_path, monkeypatch, full_spec):
    import duckdb

    spec = dataclasses.replace(full_spec, hidden_layers=(0, 6), attention_layers=(6,))
    write_cache(tmp_path / "CACHE", spec, shards=2)
    monkeypatch.chdir(tmp_path)
    python, sql = _format_md_examples()
    assert python and sql
    scope: dict = {}  # the blocks build on each other (`files`), as in a notebook
    for block in python:
        if "import ray" in block:
            continue  # Ray Data's example runs in test_ray_data_reads_every_column (a cluster start)
        exec(compile(block, "docs/format.md §7", "exec"), scope)
    assert scope["h"].shape == (scope["t"]["length"][0].as_py(), spec.hidden_size)
    assert len(scope["ds"]) == len(scope["df"]) == 16
    for statement in (s.strip() for s in sql[0].split(";")):
        if statement and not statement.startswith("--"):
            assert duckdb.sql(statement).fetchall()


@pytest.mark.ray
def test_ray_data_reads_every_column(tmp_path, full_spec, monkeypatch):
    import ray

    spec = dataclasses.replace(full_spec, hidden_layers=(0, 6), attention_layers=(6,))
    write_cache(tmp_path / "CACHE", spec, shards=2)
    reader = CacheReader(str(tmp_path / "CACHE"))
    monkeypatch.chdir(tmp_path)
    (ray_block,) = [b for b in _format_md_examples()[0] if "import ray" in b]
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        scope: dict = {"files": reader.files()}
        exec(compile(ray_block, "docs/format.md §7", "exec"), scope)  # projection, as the docs show it
        assert scope["ds"].count() == reader.manifest.rows
        rows = sorted(ray.data.read_parquet(reader.files()).take_all(), key=lambda r: r["sample_id"])
        _same([{k: _tolist(v) for k, v in r.items()} for r in rows], _pyarrow_rows(reader), "ray data")
    finally:
        ray.shutdown()
