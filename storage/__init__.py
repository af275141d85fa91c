"""The kdcache shard format: schema, writer, reader, manifest, checksums (spec: docs/format.md)."""
from .errors import CacheError, CacheExistsError, ColumnError, ManifestError, ShardError
from .manifest import Header, Manifest, ShardInfo, read_manifest
from .reader import CacheReader, assign_shards
from .schema import FORMAT_VERSION, CacheSpec, build_schema
from .writer import CacheWriter, ShardWriter, WriteOptions

__all__ = [
    "FORMAT_VERSION", "CacheError", "CacheExistsError", "CacheReader", "CacheSpec", "CacheWriter", "ColumnError",
    "Header", "Manifest", "ManifestError", "ShardError", "ShardInfo", "ShardWriter", "WriteOptions",
    "assign_shards", "build_schema", "read_manifest",
]
