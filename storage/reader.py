"""Reading a cache: streamed record batches, column projection, row groups and spans of them
(which rank reads which: `assign.py`).

Nothing here loads a whole shard list or shard into memory: batches are read row group by row
group, and only the projected columns' pages are fetched and decoded.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .assign import Group, Span
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


class CacheReader:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, verify: str = "full"):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.loc = Location.parse(url, storage_options)
        self.manifest: Manifest = read_manifest(self.loc)
        self.spec: CacheSpec = self.manifest.spec
        self.schema: pa.Schema = build_schema(self.spec)
        self.verify = verify
        self._groups: list[Group] | None = None

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
        if info.row_groups and _group_rows(pf.metadata) != info.row_groups:
            raise ShardError(f"{where}: its row groups hold {list(_group_rows(pf.metadata))[:8]}... rows but the "
                             f"manifest says {list(info.row_groups)[:8]}...; the file does not belong to this cache. "
                             "Run `kdcache verify` for details")
        return pf

    def row_groups(self) -> list[Group]:
        """Every row group of the cache, in (shard, group) order: from the manifest, or, for caches
        written before it recorded them, from each shard's footer (read once per reader)."""
        if self._groups is None:
            out = []
            for info in self.shards:
                sizes = info.row_groups
                if not sizes:
                    with self.loc.open(info.file) as f:
                        sizes = _group_rows(pq.ParquetFile(f).metadata)
                out += [Group(info, g, n) for g, n in enumerate(sizes)]
            self._groups = out
        return self._groups

    def _check_checksum(self, info: ShardInfo) -> None:
        with self.loc.open(info.file) as f:
            digest, _ = checksum_stream(f)
        if digest != info.checksum:
            raise ShardError(f"{self.loc.display(info.file)}: checksum {digest} != manifest {info.checksum} "
                             "(the file is corrupt); re-run `kdcache cache` with --overwrite, or restore the file "
                             "from a copy")

    # -- streaming --------------------------------------------------------------------------------
    def iter_batches(self, columns: Iterable[str] | None = None, *, batch_size: int = 256,
                     shards: Sequence[ShardInfo] | None = None, skip_rows: int = 0) -> Iterator[pa.RecordBatch]:
        """Record batches of the given shards (default: all), in order; `skip_rows` resumes mid-stream
        cheaply: whole shards and row groups before the resume point are skipped from metadata alone.
        (Training ranks read spans instead: `read_spans`.)"""
        cols = self.resolve_columns(columns)
        for info in self.shards if shards is None else list(shards):
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

    def read_spans(self, spans: Sequence[Span], columns: Iterable[str] | None = None, *,
                   batch_size: int = 256) -> Iterator[pa.RecordBatch]:
        """The rows of `spans`, in span order, as record batches of at most `batch_size` rows.

        Only the spans' row groups are read (ranged reads on object storage: no whole-shard
        download); runs of consecutive row groups of one shard are read in one call; a shard is
        opened (and, with verify="full", checksummed once per process) when first needed.
        """
        cols = self.resolve_columns(columns)
        open_files: dict[int, pq.ParquetFile] = {}
        try:
            for run in _runs(spans):
                info = run[0].shard
                pf = open_files.get(info.index)
                if pf is None:
                    if len(open_files) >= _OPEN_FILES:
                        open_files.pop(next(iter(open_files))).close()
                    pf = open_files[info.index] = self.open_shard(info)
                groups = [s.group for s in run]
                sizes = [pf.metadata.row_group(g).num_rows for g in groups]
                keep, offset = [], 0  # [lo, hi) of the run's row stream
                for s, n in zip(run, sizes):
                    keep.append((offset + s.lo, offset + s.hi))
                    offset += n
                yield from _slices(self._read_groups(pf, groups, cols, batch_size, info), keep)
        finally:
            for pf in open_files.values():
                pf.close()

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


# Shards a `read_spans` call keeps open at once (a shuffled epoch returns to a shard many times;
# reopening costs a footer read, which on object storage is a request).
_OPEN_FILES = 4


def _group_rows(meta) -> tuple[int, ...]:
    return tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))


def _runs(spans: Sequence[Span]) -> Iterator[list[Span]]:
    """Maximal runs of spans on consecutive row groups of one shard (one Parquet read each)."""
    run: list[Span] = []
    for s in spans:
        if run and (s.shard.index != run[-1].shard.index or s.group != run[-1].group + 1):
            yield run
            run = []
        run.append(s)
    if run:
        yield run


def _slices(batches: Iterator[pa.RecordBatch], keep: list[tuple[int, int]]) -> Iterator[pa.RecordBatch]:
    """The rows of `batches` (one stream) that fall in the sorted, disjoint ranges `keep`."""
    offset, i = 0, 0
    for rb in batches:
        end = offset + rb.num_rows
        while i < len(keep) and keep[i][0] < end:
            lo, hi = max(keep[i][0], offset), min(keep[i][1], end)
            if lo < hi:
                yield rb.slice(lo - offset, hi - lo)
            if keep[i][1] <= end:
                i += 1
            else:
                break
        offset = end
        if i == len(keep):
            return
