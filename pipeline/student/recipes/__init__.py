"""Training recipes: YAML defaults for `kdcache train --recipe NAME` (NAME.yaml in this folder).

A recipe is only a config file: the loss preset it names lives in `kdcache.pipeline.student.presets`, the loop in
`kdcache.pipeline.student.trainer`. Precedence when training: recipe < `--config FILE.yaml` < flags < key=value.
"""
from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The YAML file of a recipe name (or a path to a YAML file, returned as is)."""
    if name.endswith((".yaml", ".yml")) and Path(name).exists():
        return Path(name)
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(available())} "
                         "(or pass --config FILE.yaml)")
    return path
