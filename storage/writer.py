"""Writing a cache: one `ShardWriter` per shard, one `CacheWriter` per cache directory.

Commit protocol (docs/format.md, "Commit protocol"):
1. `CacheWriter` writes `intent.json` (the header this pass will produce) and removes stale temps.
2. Each shard is streamed to `shards/.tmp-<name>.<random>`, hashed on the way, renamed to its final
   name when complete, and only then gets its completion marker `shards/<name>.json`.
3. `manifest.json` is written last, from the markers. It is the commit: readers need it.
A crash at any point leaves committed shards intact and nothing partial under a final name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from .checksum import HashingWriter
from .columns import to_record_batch
from .dense_forms import get_dense_form
from .errors import CacheError, CacheExistsError, ManifestError
from .fs import TMP_PREFIX, Location
from .manifest import INTENT, LOG_DIR, MANIFEST, SHARD_DIR, Header, Manifest, ShardInfo, read_manifest, shard_name, write_manifest
from .schema import CacheSpec, build_schema


DAMAGED = Header.__new__(Header)  # sentinel: something is there but cannot be read


class CacheWriteError(CacheError, OSError):
    """The storage refused a write (disk or quota full, no permission, read-only...). The message names
    the file and says what to do; `errno` is the operating system's. Nothing partial is left under a final
    name (a temporary file that could not be removed is ignored by readers and removed by the next pass)."""


_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}  # EFBIG: over a file-size limit (ulimit -f)
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def write_error(exc: OSError, what: str) -> CacheWriteError:
    """A clear CacheWriteError for an OSError raised while writing `what` (a path for messages)."""
    code = exc.errno
    name = errno.errorcode.get(code, "") if code is not None else ""
    reason = f"{exc.strerror or exc} ({name})" if name else str(exc)
    if code in _FULL:
        hint = "the disk, your quota or the file-size limit is full: free space or choose another --out"
    elif code in _DENIED:
        hint = "this process may not write there: fix the permissions or choose another --out"
    else:
        hint = "check the storage and re-run"
    message = (f"cannot write {what}: {reason}; {hint}. Shards already committed are kept and stay valid; "
               "re-running the same command resumes from them")
    return CacheWriteError(code, message) if code is not None else CacheWriteError(message)


@contextlib.contextmanager
def writing(what: str):
    """Turn an OSError raised by the storage inside the block into a CacheWriteError naming `what`."""
    try:
        yield
    except CacheError:
        raise
    except OSError as exc:
        raise write_error(exc, what) from exc


@dataclass(frozen=True)
class WriteOptions:
    zstd_level: int = 3  # dense columns: level 9 barely shrinks them and halves write speed
    # Top-k leaves after BYTE_STREAM_SPLIT, SmolLM2 top-64 (fitted pow-q8): 1.643 B/entry at level 1,
    # 1.664 at 3, 1.637 at 9, which writes 2.6x slower (233k vs 603k tokens/s per core).
    topk_zstd_level: int = 1
    byte_stream_split: bool = True  # on numeric leaves (and codec leaves that ask for it)
    # float16 under BYTE_STREAM_SPLIT saves ~7% on hidden states (docs/performance.md) but duckdb 2.0
    # refuses to read it, so float16 leaves stay PLAIN unless a cache's readers are known to cope.
    float16_byte_stream_split: bool = False
    page_checksums: bool = True  # Parquet page CRCs, checked by readers on the pages they touch


def _leaf_type(t: pa.DataType) -> pa.DataType:
    """The value type under a column's list nesting (every cache column is lists of one primitive)."""
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        t = t.value_type
    return t


@lru_cache(maxsize=32)
def _leaf_paths(schema: pa.Schema) -> dict[str, list[str]]:
    """Column name -> its Parquet leaf paths (encodings must be set on leaves, not on list columns)."""
    buf = io.BytesIO()
    pq.ParquetWriter(buf, schema).close()
    meta = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata
    out: dict[str, list[str]] = {}
    for i in range(meta.num_columns):
        path = meta.schema.column(i).path
        out.setdefault(path.split(".", 1)[0], []).append(path)
    return out


# Row-level scalars stay PLAIN (they are tiny and their statistics are useful); strings use dictionaries.
_PLAIN_COLUMNS = {"sample_id", "length", "label", "source"}


def _unsplit_columns(spec: CacheSpec) -> set[str]:
    """Columns whose leaves stay PLAIN: row-level scalars, and the codes of a dense form that
    measured smaller without the split (int8 hidden states: 0.97 vs 1.16 B/value on SmolLM2,
    docs/performance.md)."""
    out = set(_PLAIN_COLUMNS)
    if not get_dense_form(spec.hidden_dtype).byte_stream_split:
        out |= {spec.hidden_column(layer) for layer in spec.hidden_layers}
    if not get_dense_form(spec.attention_dtype).byte_stream_split:
        out |= {spec.attention_column(layer) for layer in spec.attention_layers}
    return out


def parquet_writer_kwargs(spec: CacheSpec, schema: pa.Schema, options: WriteOptions) -> dict[str, Any]:
    """The encodings of docs/format.md "Encodings".

    BYTE_STREAM_SPLIT on every numeric leaf: Parquet has no 8/16-bit physical types, so uint8/uint16
    leaves are stored as INT32, and without the split zstd has to skip three or two zero bytes between
    every payload byte; for float16 it separates the exponent bytes from the noisier mantissa bytes,
    but only under `float16_byte_stream_split` (off by default: duckdb cannot decode it).
    """
    leaves = _leaf_paths(schema)
    encodings: dict[str, str] = {}
    if options.byte_stream_split:
        unsplit = _unsplit_columns(spec)
        for field in schema:
            half = pa.types.is_float16(_leaf_type(field.type))
            if field.name not in unsplit and (options.float16_byte_stream_split or not half):
                for leaf in leaves[field.name]:
                    encodings[leaf] = "BYTE_STREAM_SPLIT"
    # Levels, like encodings, are keyed by leaf path: a list column's name matches none of its leaves,
    # and such a key is silently ignored (the leaf then gets zstd's default level).
    levels = {leaf: options.topk_zstd_level if field.name.startswith("topk_") else options.zstd_level
              for field in schema for leaf in leaves[field.name]}
    # Dictionary encoding silently wins over any column_encoding, so it is off for every column
    # except the short strings of `source` where it helps.
    return dict(
        compression="zstd",
        compression_level=levels,
        use_dictionary=["source"],
        column_encoding=encodings or None,
        write_statistics=["sample_id", "length"],
        write_page_checksum=options.page_checksums,
        data_page_size=1 << 20,
    )


class ShardWriter:
    """Streams padded batches into one shard; visible under its final name only after `close()`."""

    def __init__(self, loc: Location, index: int, spec: CacheSpec, options: WriteOptions | None = None):
        self.loc, self.index, self.spec = loc, index, spec
        self.options = options or WriteOptions()
        self.name = shard_name(index)
        self.display = loc.display(SHARD_DIR, self.name)
        self.schema = build_schema(spec)
        self._temp = loc.temp_name(self.name)
        with writing(self.display):
            loc.makedirs(SHARD_DIR)
            self._raw = loc.open(SHARD_DIR, self._temp, mode="wb")
        self._hashing = HashingWriter(self._raw)
        self._pq = pq.ParquetWriter(self._hashing, self.schema,
                                    **parquet_writer_kwargs(spec, self.schema, self.options))
        self.rows = self.tokens = 0
        self.row_groups: list[int] = []  # one per write_batch (a batch is one row group)
        self.first_id: int | None = None
        self.last_id: int | None = None
        self._done = False

    def encode(self, batch: Mapping[str, Any]) -> pa.RecordBatch:
        """Encode one padded batch. Pure and thread-safe: several batches may encode at once."""
        return to_record_batch(batch, self.spec, self.schema)

    def write_encoded(self, rb: pa.RecordBatch) -> None:
        """Append an encoded batch as one Parquet row group (calls must come in row order)."""
        if rb.num_rows == 0:
            return
        with writing(self.display):
            self._pq.write_batch(rb)
        ids = rb.column("sample_id").to_numpy()
        self.first_id = int(ids.min()) if self.first_id is None else min(self.first_id, int(ids.min()))
        self.last_id = int(ids.max()) if self.last_id is None else max(self.last_id, int(ids.max()))
        self.rows += rb.num_rows
        self.row_groups.append(rb.num_rows)
        self.tokens += int(rb.column("length").to_numpy().sum())

    def write(self, batch: Mapping[str, Any]) -> None:
        """Append one padded batch (one Parquet row group)."""
        self.write_encoded(self.encode(batch))

    def close(self) -> ShardInfo:
        """Finish the file, move it into place, then write its completion marker."""
        if self.rows == 0:
            self.abort()
            raise ValueError(f"shard {self.name}: no rows were written; an empty shard is never committed")
        try:
            with writing(self.display):
                self._pq.close()
                self._raw.close()
                self.loc.commit(self._temp, self.name, SHARD_DIR)
        except BaseException:
            self.abort()
            raise
        self._done = True
        info = ShardInfo(file=f"{SHARD_DIR}/{self.name}", index=self.index, rows=self.rows, tokens=self.tokens,
                         bytes=self._hashing.size, checksum=self._hashing.digest,
                         sample_id_first=self.first_id, sample_id_last=self.last_id, row_groups=tuple(self.row_groups))
        # Without its marker the shard is not committed: a re-run writes it again.
        with writing(self.loc.display(SHARD_DIR, marker_name(self.index))):
            self.loc.write_text_atomic(marker_name(self.index), json.dumps(asdict(info)) + "\n", SHARD_DIR)
        return info

    def abort(self) -> None:
        """Drop the temporary file; nothing under a final name is touched."""
        if self._done:
            return
        self._done = True
        for closer in (self._pq.close, self._raw.close):
            try:
                closer()
            except Exception:  # already failing: the original error is the one to report
                pass
        try:
            self.loc.remove(SHARD_DIR, self._temp)
        except OSError:  # e.g. the directory became read-only: the temp stays, ignored, and the next pass removes it
            pass

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def marker_name(index: int) -> str:
    return shard_name(index).replace(".parquet", ".json")


class CacheWriter:
    """Owns one cache directory for one teacher pass: refuses foreign caches, resumes its own."""

    def __init__(self, url: str, header: Header, *, overwrite: bool = False,
                 storage_options: dict[str, Any] | None = None, options: WriteOptions | None = None):
        self.loc = Location.parse(url, storage_options)
        self.header = header
        self.options = options or WriteOptions()
        self.complete: Manifest | None = None  # set when the same cache is already committed
        self._claim(overwrite)

    # -- directory state --------------------------------------------------------------------------
    def _existing_header(self) -> tuple[Header | None, str]:
        """(header of what is there, what it is), without trusting a damaged manifest or intent."""
        if self.loc.exists(MANIFEST):
            try:
                return read_manifest(self.loc).header, "a committed cache"
            except ManifestError as exc:
                return DAMAGED, f"a cache with a damaged manifest ({exc})"
        if self.loc.exists(INTENT):
            try:
                return Header.from_json(json.loads(self.loc.read_text(INTENT))), "an unfinished teacher pass"
            except (ValueError, KeyError, TypeError):
                return DAMAGED, "an unfinished pass with a damaged intent.json"
        return None, "nothing"

    def _claim(self, overwrite: bool) -> None:
        found, what = self._existing_header()
        if found is None:
            foreign = [n for n in self.loc.listdir() if n not in (SHARD_DIR, LOG_DIR) and not n.startswith(TMP_PREFIX)]
            if foreign:
                raise CacheExistsError(f"{self.loc.display()} is not empty and holds no kdcache cache "
                                       f"({', '.join(foreign[:5])}...); choose an empty or new --out directory")
        elif found is DAMAGED or found.identity != self.header.identity:
            if not overwrite:
                theirs = "unreadable" if found is DAMAGED else found.identity
                raise CacheExistsError(
                    f"{self.loc.display()} already holds {what} written with different options "
                    f"(teacher/tokenizer/options identity {theirs} != {self.header.identity}); pass --overwrite "
                    "to replace it, or choose another --out directory")
            self.wipe()
        else:
            self.header = found  # same choices: keep the codec parameters that were fitted then
            if self.loc.exists(MANIFEST):
                self.complete = read_manifest(self.loc)
                return
        with writing(self.loc.display(INTENT)):
            self.loc.makedirs()
            self.loc.makedirs(SHARD_DIR)
            self._write_intent()
        self.clean_temps()

    def _write_intent(self) -> None:
        self.loc.write_text_atomic(INTENT, json.dumps(self.header.to_json(), indent=1, sort_keys=True) + "\n")

    def set_codec_params(self, params: dict[str, Any]) -> None:
        """Record fitted top-k codec parameters before the first shard is written."""
        if self.committed():
            raise ValueError("codec parameters cannot change once shards are committed")
        self.header = dataclasses.replace(self.header, spec=dataclasses.replace(self.header.spec, codec_params=params))
        self._write_intent()

    def wipe(self) -> None:
        """Remove a previous cache (manifest first, so a crash mid-wipe never looks committed)."""
        self.loc.remove(MANIFEST)
        self.loc.remove(INTENT)
        for name in self.loc.listdir(SHARD_DIR):
            self.loc.remove(SHARD_DIR, name)

    def clean_temps(self) -> list[str]:
        removed = []
        for sub in ("", SHARD_DIR):
            for name in (self.loc.listdir(sub) if sub else self.loc.listdir()):
                if name.startswith(TMP_PREFIX):
                    self.loc.remove(*([sub] if sub else []), name)
                    removed.append(name)
        return removed

    # -- shards -----------------------------------------------------------------------------------
    def committed(self) -> dict[int, ShardInfo]:
        """Shards whose file and completion marker both exist and agree on the size."""
        if self.complete is not None:
            return {s.index: s for s in self.complete.shards}
        names = set(self.loc.listdir(SHARD_DIR))
        out = {}
        for name in names:
            if not (name.startswith("shard-") and name.endswith(".json")):
                continue
            try:
                info = ShardInfo.from_json(json.loads(self.loc.read_text(SHARD_DIR, name)), name)
            except (ValueError, ManifestError):
                continue  # a damaged marker means the shard is redone, never trusted
            shard_file = info.file.split("/", 1)[-1]
            if shard_file in names and self.loc.size(SHARD_DIR, shard_file) == info.bytes:
                out[info.index] = info
        return out

    def shard_writer(self, index: int) -> ShardWriter:
        return ShardWriter(self.loc, index, self.header.spec, self.options)

    def commit(self, expected_shards: int | None = None) -> Manifest:
        """Write manifest.json from the completion markers: the cache becomes readable."""
        shards = self.committed()
        if expected_shards is not None:
            missing = sorted(set(range(expected_shards)) - set(shards))
            if missing:
                raise ManifestError(f"cannot commit {self.loc.display()}: shards {missing[:10]} of {expected_shards} "
                                    "are not written yet; re-run the pass to finish them")
        with writing(self.loc.display(MANIFEST)):
            manifest = write_manifest(self.loc, self.header, list(shards.values()))
        self.complete = manifest
        return manifest
