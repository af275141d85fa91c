"""JSON output shared by every command: the `--json` line and atomic JSONL files."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def print_json(obj) -> None:
    """The last line a `--json` command prints: one JSON object, nothing after it."""
    sys.stdout.flush()
    print(json.dumps(obj, sort_keys=True, default=str), flush=True)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    """One JSON object per line, written to a temporary name and renamed: a reader (or a cache
    fingerprint) never sees half a file. Returns the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return str(path)


def read_jsonl(path: Path | str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
