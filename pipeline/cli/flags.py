"""Command-line flags made from a config dataclass: every field with `flag(help)` metadata
(`kdcache.pipeline.common.config.flag`) becomes `--name`, so names, types, defaults and help have one
source. A flag left out parses to None ("not given"), so it never overrides a recipe or YAML value;
the dataclass default applies only where no source gives the key."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


class HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default, unless its help already speaks of one or there is nothing to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        default = action.default
        if (action.option_strings and "default" not in help_ and default not in (None, "", argparse.SUPPRESS)
                and not isinstance(default, bool)):
            help_ += " (default: %(default)s)"
        return help_


def flag_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag")]


def _base_type(annotation: Any) -> Any:
    """`X | None` -> X; `list[str]` -> list."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


def _help(f: dataclasses.Field) -> str:
    help_ = f.metadata["help"].replace("%", "%%")
    if "default" not in help_ and f.default not in (dataclasses.MISSING, None, "") and not isinstance(f.default, bool):
        help_ += f" (default: {f.default})"
    return help_


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """A bool becomes `--name` (`--no-name` when it defaults to true), a list a repeatable flag whose
    values may also be comma-separated, anything else a flag taking one value of the field's type."""
    hints = typing.get_type_hints(cls)
    for f in flag_fields(cls):
        typ = _base_type(hints[f.name])
        name = f.name.replace("_", "-")
        if typ is bool:
            if f.default is True:
                parser.add_argument(f"--no-{name}", dest=f.name, action="store_false", default=None, help=_help(f))
            else:
                parser.add_argument(f"--{name}", action="store_true", default=None, help=_help(f))
        elif typ is list:
            parser.add_argument(f"--{name}", action="append", default=None, help=_help(f))
        elif typ in (str, int, float):
            parser.add_argument(f"--{name}", type=typ, default=None, help=_help(f))
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: a {typ} field cannot be a flag")


def flags_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """{field: value} of the flags made by `add_config_flags`; None where the flag was not given."""
    flags = {f.name: getattr(args, f.name) for f in flag_fields(cls)}
    hints = typing.get_type_hints(cls)
    for name, value in flags.items():
        if value is not None and _base_type(hints[name]) is list:
            flags[name] = [part for item in value for part in item.split(",") if part]
    return flags
