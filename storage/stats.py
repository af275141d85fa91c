"""Sizes of a cache per column, from Parquet footers only (no data pages read): `kdcache inspect`."""
from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from .reader import CacheReader
from .schema import per_token_columns


def column_bytes(reader: CacheReader) -> dict[str, int]:
    """Compressed bytes per top-level column, summed over every shard's row groups."""
    totals = {name: 0 for name in reader.columns}
    for info in reader.shards:
        with reader.loc.open(info.file) as f:
            meta = pq.ParquetFile(f).metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                totals[col.path_in_schema.split(".", 1)[0]] += col.total_compressed_size
    return totals


def describe(reader: CacheReader) -> dict[str, Any]:
    m, spec = reader.manifest, reader.spec
    per_col = column_bytes(reader)
    tokens = max(m.tokens, 1)
    token_cols = set(per_token_columns(reader.schema))
    columns = {}
    for name, nbytes in per_col.items():
        entry: dict[str, Any] = {"bytes": nbytes, "bytes_per_token": nbytes / tokens}
        if name not in token_cols:
            entry["bytes_per_row"] = nbytes / max(m.rows, 1)
        if name.startswith("topk_") and name != "topk_log_tail":
            entry["bytes_per_entry"] = nbytes / (tokens * spec.k)
        if name.startswith("hidden_") and not name.endswith("_scale"):
            entry["bytes_per_value"] = nbytes / (tokens * spec.hidden_size)
        columns[name] = entry
    out = {
        "url": reader.loc.url,
        "format_version": m.format_version,
        "kdcache_version": m.kdcache_version,
        "created": m.created,
        "fingerprint": m.header.fingerprint,
        "teacher": m.header.teacher,
        "tokenizer": m.header.tokenizer,
        "options": spec.to_json(),
        "generation": m.header.generation,
        "shards": len(m.shards),
        "rows": m.rows,
        "tokens": m.tokens,
        "bytes": m.bytes,
        "bytes_per_token": m.bytes / tokens,
        "columns": columns,
    }
    if spec.targets == "topk":
        topk_bytes = sum(per_col[c] for c in spec.topk_columns.values())
        out["topk_bytes_per_entry"] = topk_bytes / (tokens * spec.k)
    return out
