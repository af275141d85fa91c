"""The kdcache shard format: schema, writer, reader, manifest, checksums (spec: docs/format.md)."""
from .errors import CacheError, CacheExistsError, ColumnError, ManifestError, ShardError
from .manifest import Header, Manifest, ShardInfo, read_manifest
from .assign import DATA_ORDER, Assignment, AssignmentError, Group, Span, assign
from .reader import CacheReader
from .schema import FORMAT_VERSION, CacheSpec, build_schema
from .writer import CacheWriter, ShardWriter, WriteOptions

__all__ = [
    "DATA_ORDER", "FORMAT_VERSION", "Assignment", "AssignmentError", "CacheError", "CacheExistsError",
    "CacheReader", "CacheSpec", "CacheWriter", "ColumnError", "Group", "Header", "Manifest", "ManifestError",
    "ShardError", "ShardInfo", "ShardWriter", "Span", "WriteOptions", "assign", "build_schema", "read_manifest",
]
