"""Errors of the cache format. Every message names the file and says what to do next."""


class CacheError(Exception):
    """Base class: something about a cache directory is wrong."""


class ManifestError(CacheError):
    """manifest.json is missing, unreadable, or from a format this version cannot read."""


class ShardError(CacheError):
    """A shard file disagrees with the manifest (checksum, size, schema, rows)."""


class CacheExistsError(CacheError):
    """The target directory already holds a different cache."""


class ColumnError(CacheError, KeyError):
    """A column was asked for that the cache does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])
