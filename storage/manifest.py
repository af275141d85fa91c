"""manifest.json: written last, it is the commit of a cache.

A cache without a manifest is unfinished (a teacher pass still running or interrupted); readers
refuse it. Per-shard completion markers (`shards/<name>.json`) let an interrupted pass resume: the
manifest is assembled from them once every planned shard has one.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ManifestError
from .fs import Location
from .schema import FORMAT_VERSION, CacheSpec, build_schema, schema_to_json

MANIFEST = "manifest.json"
INTENT = "intent.json"  # what a pass set out to write; lets a resumed pass prove it has the same options
SHARD_DIR = "shards"
# Run logs of the passes that wrote this cache (`kdcache cache` writes kdcache.log here): not data;
# readers, `verify` and a resumed pass ignore it.
LOG_DIR = "logs"


def _sha256(obj: Any) -> str:
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def shard_name(index: int) -> str:
    # Zero-padded so lexical order is shard order; 6 digits = a million shards.
    return f"shard-{index:06d}.parquet"


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the cache root
    index: int
    rows: int
    tokens: int
    bytes: int
    checksum: str
    sample_id_first: int
    sample_id_last: int
    # Rows of each Parquet row group, in file order: lets every training worker split the cache by row
    # group from the manifest alone. Absent (empty) in caches written before it; readers then read footers.
    row_groups: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "row_groups", tuple(int(n) for n in self.row_groups))  # JSON gives a list

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "ShardInfo":
        try:
            # Fields with a default (added after the format's first version) may be absent; the others may not.
            return cls(**{k: data[k] for k, f in cls.__dataclass_fields__.items()
                          if k in data or f.default is dataclasses.MISSING})
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{where}: shard entry {data!r} lacks a field or holds a bad one ({exc}); the cache "
                                "is damaged: re-run `kdcache cache` with --overwrite") from None


@dataclass
class Header:
    """Everything that defines a cache's content except its shards; equal headers = same cache."""

    spec: CacheSpec
    teacher: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.to_json(), "teacher": self.teacher, "tokenizer": self.tokenizer,
                "generation": self.generation}

    @property
    def fingerprint(self) -> str:
        """Hash of everything, fitted codec parameters included (the manifest's integrity check)."""
        return _sha256(self.to_json())

    @property
    def identity(self) -> str:
        """Hash of what the user chose: the same corpus, teacher and options give the same identity,
        whatever a calibration step fitted (a resumed pass adopts the fitted parameters it finds)."""
        data = self.to_json()
        data["spec"] = {k: v for k, v in data["spec"].items() if k != "codec_params"}
        return _sha256(data)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Header":
        return cls(spec=CacheSpec.from_json(data["spec"]), teacher=data.get("teacher", {}),
                   tokenizer=data.get("tokenizer", {}), generation=data.get("generation", {}))


@dataclass
class Manifest:
    header: Header
    shards: list[ShardInfo]
    format_version: int = FORMAT_VERSION
    created: str = ""
    kdcache_version: str = ""

    @property
    def spec(self) -> CacheSpec:
        return self.header.spec

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "kdcache",
            "format_version": self.format_version,
            "kdcache_version": self.kdcache_version,
            "created": self.created,
            "fingerprint": self.header.fingerprint,
            **self.header.to_json(),
            "schema": schema_to_json(build_schema(self.spec)),
            "totals": {"shards": len(self.shards), "rows": self.rows, "tokens": self.tokens, "bytes": self.bytes},
            "shards": [asdict(s) for s in self.shards],
        }


def kdcache_version() -> str:
    """The installed distribution's version (what manifests record and `kdcache --version` prints)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdcache")
    except PackageNotFoundError:
        return "unknown"


def write_manifest(loc: Location, header: Header, shards: list[ShardInfo]) -> Manifest:
    manifest = Manifest(header=header, shards=sorted(shards, key=lambda s: s.index),
                        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        kdcache_version=kdcache_version())
    loc.write_text_atomic(MANIFEST, json.dumps(manifest.to_json(), indent=1) + "\n")
    return manifest


def parse_manifest(text: str, where: str) -> Manifest:
    if not text.strip():
        raise ManifestError(f"{where} is empty; the cache was not committed: re-run the same `kdcache cache` "
                            "command to finish it (committed shards are kept)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where} is not valid JSON ({exc}); re-run the same `kdcache cache` command to "
                            "rebuild it from the shard markers") from None
    if not isinstance(data, dict) or data.get("format") != "kdcache":
        raise ManifestError(f"{where} is not a kdcache manifest (no \"format\": \"kdcache\")")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ManifestError(f"{where} has format_version {version!r}, but this kdcache reads up to "
                            f"{FORMAT_VERSION}: upgrade kdcache (pip install -U kdcache)")
    try:
        header = Header.from_json(data)
    except (KeyError, ValueError, TypeError) as exc:
        raise ManifestError(f"{where}: invalid header ({exc}); re-run `kdcache cache` with --overwrite") from None
    shards = [ShardInfo.from_json(s, where) for s in data.get("shards", [])]
    manifest = Manifest(header=header, shards=shards, format_version=version, created=data.get("created", ""),
                        kdcache_version=data.get("kdcache_version", ""))
    recorded = data.get("fingerprint")
    if recorded and recorded != header.fingerprint:
        raise ManifestError(f"{where}: fingerprint {recorded} does not match its own header "
                            f"({header.fingerprint}); the manifest was edited or damaged")
    return manifest


def read_manifest(loc: Location) -> Manifest:
    where = loc.display(MANIFEST)
    if not loc.exists(MANIFEST):
        hint = ("a teacher pass started here but was not committed: re-run the same `kdcache cache` command "
                "to finish it" if loc.exists(INTENT) else "is this the right path? a cache is made by `kdcache cache`")
        raise ManifestError(f"no manifest.json at {loc.display()}: {hint}")
    return parse_manifest(loc.read_text(MANIFEST), where)
