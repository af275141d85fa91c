"""Reading a cache: streamed record batches, column projection, (rank, world_size) shard assignment.

Nothing here loads a whole shard list or shard into memory: batches are read row group by row
group, and only the projected columns' pages are fetched and decoded.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .checksum import checksum_stream
from .columns import to_numpy
from .errors import ColumnError, ShardError
from .fs import Location
from .manifest import Manifest, ShardInfo, read_manifest
from .schema import CacheSpec, build_schema

VERIFY_MODES = ("full", "size", "off")

# Group names a caller may project instead of listing every column of a kind.
_ALWAYS = ("sample_id", "length")

# Shards whose whole-file checksum this process has matched, as (file URL, size, change stamp,
# checksum). The trainer opens every shard again each epoch, often through a new reader; one hash
# per process is enough because page CRCs still guard every page read, and a file whose size or
# stamp changed since is a new key, hashed again.
_verified: set[tuple] = set()


def assign_shards(shards: Sequence[ShardInfo], rank: int, world_size: int) -> list[ShardInfo]:
    """Deterministic, disjoint, complete: shard i goes to rank i % world_size (in shard-index order)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
    ordered = sorted(shards, key=lambda s: s.index)
    return [s for i, s in enumerate(ordered) if i % world_size == rank]


class CacheReader:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, verify: str = "full"):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.loc = Location.parse(url, storage_options)
        self.manifest: Manifest = read_manifest(self.loc)
        self.spec: CacheSpec = self.manifest.spec
        self.schema: pa.Schema = build_schema(self.spec)
        self.verify = verify

    # -- what is there ----------------------------------------------------------------------------
    @property
    def columns(self) -> list[str]:
        return self.schema.names

    @property
    def shards(self) -> list[ShardInfo]:
        return sorted(self.manifest.shards, key=lambda s: s.index)

    def resolve_columns(self, columns: Iterable[str] | None) -> list[str]:
        """Validate a projection; group names `topk`, `sampled`, `hidden`, `attention`, `mlm` expand."""
        if columns is None:
            return list(self.columns)
        groups = {
            "topk": [*self.spec.topk_columns.values(), "topk_log_tail"] if self.spec.targets == "topk" else [],
            "sampled": ["sample_ids", "sample_weights"] if self.spec.targets == "sampled" else [],
            "hidden": [c for c in self.columns if c.startswith("hidden_")],
            "attention": [c for c in self.columns if c.startswith("attention_")],
            "mlm": ["mlm_positions", "mlm_labels"] if self.spec.mlm else [],
        }
        wanted: list[str] = []
        for col in columns:
            expanded = groups.get(col, [col])
            if not expanded or any(c not in self.columns for c in expanded):
                bad = col if not expanded else next(c for c in expanded if c not in self.columns)
                raise ColumnError(f"column {bad!r} is not in the cache at {self.loc.display()}; it holds "
                                  f"{self.columns}. Re-run the teacher pass with the options that store it "
                                  "(e.g. --hidden-layers / --attention-layers / --top-k) into a new --out")
            wanted += expanded
        for col in _ALWAYS:  # cheap, and every consumer needs row identity and lengths
            if col not in wanted:
                wanted.append(col)
        return [c for c in self.columns if c in set(wanted)]

    def files(self, shards: Sequence[ShardInfo] | None = None) -> list[str]:
        """Shard paths for other readers (`ray.data.read_parquet(paths, filesystem=reader.loc.fs)`)."""
        return [self.loc.path(s.file) for s in (self.shards if shards is None else shards)]

    # -- one shard --------------------------------------------------------------------------------
    def open_shard(self, info: ShardInfo, rehash: bool = False) -> pq.ParquetFile:
        """Open a shard after checking it against the manifest (size, checksum, schema, rows).

        With `verify="full"` the whole-file checksum is computed once per process and file version
        (see `_verified`); `rehash` computes it again regardless (`kdcache verify`).
        """
        where = self.loc.display(info.file)
        if not self.loc.exists(info.file):
            raise ShardError(f"{where} is listed in the manifest but missing; restore it or re-run "
                             "`kdcache cache` with --overwrite")
        if self.verify in ("full", "size"):
            size, stamp = self.loc.stat(info.file)
            if size != info.bytes:
                raise ShardError(f"{where} is {size} bytes but the manifest says {info.bytes} (truncated or "
                                 "replaced); re-run `kdcache cache` with --overwrite to rebuild it")
        if self.verify == "full":
            key = (self.loc.full_url(info.file), size, stamp, info.checksum)
            # Without a change stamp a rewritten file of the same size would look verified: hash it.
            if rehash or stamp is None or key not in _verified:
                self._check_checksum(info)
                if stamp is not None:
                    _verified.add(key)
        try:
            pf = pq.ParquetFile(self.loc.open(info.file), page_checksum_verification=self.verify != "off")
        except (pa.ArrowException, OSError) as exc:
            raise ShardError(f"{where} is not a readable Parquet file ({exc}); re-run `kdcache cache` "
                             "with --overwrite") from None
        if not pf.schema_arrow.remove_metadata().equals(self.schema.remove_metadata()):
            raise ShardError(f"{where}: its schema differs from the manifest's; the file does not belong to this "
                             "cache. Run `kdcache verify` for details")
        if pf.metadata.num_rows != info.rows:
            raise ShardError(f"{where} holds {pf.metadata.num_rows} rows but the manifest says {info.rows}")
        return pf

    def _check_checksum(self, info: ShardInfo) -> None:
        with self.loc.open(info.file) as f:
            digest, _ = checksum_stream(f)
        if digest != info.checksum:
            raise ShardError(f"{self.loc.display(info.file)}: checksum {digest} != manifest {info.checksum} "
                             "(the file is corrupt); re-run `kdcache cache` with --overwrite, or restore the file "
                             "from a copy")

    # -- streaming --------------------------------------------------------------------------------
    def iter_batches(self, columns: Iterable[str] | None = None, *, batch_size: int = 256, rank: int = 0,
                     world_size: int = 1, shards: Sequence[ShardInfo] | None = None,
                     skip_rows: int = 0) -> Iterator[pa.RecordBatch]:
        """Record batches of this rank's shards, in order; `skip_rows` resumes mid-stream cheaply.

        Whole shards and row groups before the resume point are skipped from metadata alone.
        """
        cols = self.resolve_columns(columns)
        todo = assign_shards(self.shards, rank, world_size) if shards is None else list(shards)
        for info in todo:
            if skip_rows >= info.rows:
                skip_rows -= info.rows
                continue
            pf = self.open_shard(info)
            try:
                groups, offset = [], 0
                for g in range(pf.num_row_groups):
                    n = pf.metadata.row_group(g).num_rows
                    if offset + n > skip_rows:
                        groups.append(g)
                    else:
                        skip_rows -= n
                    offset += n
                for rb in self._read_groups(pf, groups, cols, batch_size, info):
                    if skip_rows:
                        cut = min(skip_rows, rb.num_rows)
                        rb, skip_rows = rb.slice(cut), skip_rows - cut
                        if rb.num_rows == 0:
                            continue
                    yield rb
            finally:
                pf.close()
            skip_rows = 0

    def _read_groups(self, pf: pq.ParquetFile, groups: list[int], cols: list[str], batch_size: int,
                     info: ShardInfo) -> Iterator[pa.RecordBatch]:
        try:
            yield from pf.iter_batches(batch_size=batch_size, row_groups=groups, columns=cols,
                                       use_threads=True)
        except (pa.ArrowException, OSError) as exc:
            raise ShardError(f"{self.loc.display(info.file)}: read failed ({exc}); the file is damaged — run "
                             "`kdcache verify` and rebuild with `kdcache cache --overwrite`") from None

    def iter_numpy(self, columns: Iterable[str] | None = None, *, pad_to: int | None = None,
                   **kwargs) -> Iterator[dict[str, np.ndarray]]:
        for rb in self.iter_batches(columns, **kwargs):
            yield to_numpy(rb, self.spec, pad_to=pad_to)


def numpy_to_torch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """A decoded batch as CPU tensors; object arrays (`source`) stay numpy."""
    import torch

    # Zero-copy Arrow buffers are read-only; torch wants writable memory, so only those are copied.
    return {k: (v if v.dtype == object else torch.from_numpy(v if v.flags.writeable else v.copy()))
            for k, v in batch.items()}
