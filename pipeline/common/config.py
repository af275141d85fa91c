"""Configs as dataclasses: YAML file < command-line flags < `key=value` overrides (torchtune style).

One loader serves every command, so an unknown key fails the same way everywhere: naming the
key, where it came from, and the valid keys.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a YAML/CLI value into the field's type (layer lists accept "0,3,6", "all", "none")."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "~")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if annotation is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{key}: expected true/false, got {value!r}")
        return bool(value)
    if annotation in (int, float):
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected {annotation.__name__}, got {value!r}") from None
    if origin in (tuple, list) or annotation in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        return value if isinstance(value, (list, tuple)) else [value]
    return value


def _is_str(annotation: Any) -> bool:
    if annotation is str:
        return True
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and \
        [a for a in typing.get_args(annotation) if a is not type(None)] == [str]


def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def flag(help: str) -> dict[str, Any]:
    """Field metadata: this setting is also a command-line flag, `--name` (`--no-name` for a bool that
    defaults to true), with this help text. The CLI builds its flags from these fields."""
    return {"flag": True, "help": help}


def given_values(cls: type, yaml_path: str | Path | None = None, flags: dict[str, Any] | None = None,
                 overrides: list[str] | None = None) -> dict[str, Any]:
    """The settings given, YAML < flags (None = not given) < `key=value`, each coerced to its field's
    type. A setting left out is absent, so callers tell "not given" from "given the default's value"."""
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = _type_hints(cls)
    values: dict[str, Any] = {}

    def merge(source: dict[str, Any], where: str) -> None:
        for key, value in source.items():
            norm = key.replace("-", "_")
            if norm not in fields:
                raise ValueError(f"unknown key {key!r} in {where}; valid keys: {', '.join(sorted(fields))}")
            values[norm] = _coerce(value, hints[norm], f"{where}: {key}")

    if yaml_path:
        data = yaml.safe_load(Path(yaml_path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of key: value, got {type(data).__name__}")
        merge(data, str(yaml_path))
    if flags:
        merge({k: v for k, v in flags.items() if v is not None}, "command-line flags")
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        norm = key.replace("-", "_")
        # String settings stay verbatim: YAML 1.1 would read "6:12" as the base-60 number 372.
        raw = norm in hints and _is_str(hints[norm])
        merge({key: value if raw or value == "" else yaml.safe_load(value)}, "overrides")
    return values


def make_config(cls: type[T], values: dict[str, Any]) -> T:
    """The dataclass from `given_values`' result; the fields' defaults fill the rest."""
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing required setting(s): {', '.join(missing)} (give them as flags, in the YAML "
                         "config, or as key=value)")
    return cls(**values)


def build_config(cls: type[T], yaml_path: str | Path | None = None, flags: dict[str, Any] | None = None,
                 overrides: list[str] | None = None) -> T:
    return make_config(cls, given_values(cls, yaml_path, flags, overrides))
