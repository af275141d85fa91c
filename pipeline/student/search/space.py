"""The search space: a YAML file (`default_space.yaml` when none is given) read into a flat Ray Tune
space, and a trial's flat config turned back into a student architecture.

Flat on purpose: every parameter is drawn in every trial (those of the other families are unused), so
random search and Optuna's TPE see the same space without conditional-space support, and a trial's
config is one plain dict in trials.jsonl.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kdcache.pipeline.student.small import CELL_OPS, SMALL_STUDENTS

DEFAULT_SPACE = Path(__file__).with_name("default_space.yaml")
FAMILY_KEYS = {"cellcnn": {"channels", "cells", "nodes", "ops", "dropout"},
               "cnn": {"filters", "kernel_sizes", "dropout"}, "bilstm": {"hidden", "dense", "dropout"},
               "tinytransformer": {"layers", "width", "heads", "ffn", "dropout"}}
TOP_KEYS = {"families", "embedding_size", "loss", "train", *FAMILY_KEYS}
LOSS_KEYS, TRAIN_KEYS = {"alpha", "distill", "temperature"}, {"steps", "report_every", "batch_size", "lr"}


def load_space(path: str | Path | None = None) -> dict[str, Any]:
    """The space in `path` (or the default), checked: unknown keys, families and ops are named."""
    where = Path(path) if path else DEFAULT_SPACE
    try:
        space = yaml.safe_load(where.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--space {where}: {exc}") from None
    if not isinstance(space, dict):
        raise ValueError(f"--space {where}: expected a mapping of keys ({', '.join(sorted(TOP_KEYS))})")
    merged = yaml.safe_load(DEFAULT_SPACE.read_text())  # a fresh copy: the user's file is merged over it
    unknown = sorted(set(space) - TOP_KEYS)
    if unknown:
        raise ValueError(f"--space {where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(TOP_KEYS))})")
    for key, value in space.items():
        if isinstance(value, dict):
            allowed = FAMILY_KEYS.get(key) or {"loss": LOSS_KEYS, "train": TRAIN_KEYS}[key]
            bad = sorted(set(value) - allowed)
            if bad:
                raise ValueError(f"--space {where}: {key}.{bad[0]} is not a setting (known: {', '.join(sorted(allowed))})")
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    families = _choices(merged["families"])
    bad = [f for f in families if f not in FAMILY_KEYS]
    if bad:
        raise ValueError(f"--space {where}: family {bad[0]!r} is not one of {', '.join(FAMILY_KEYS)}")
    ops = _choices(merged["cellcnn"]["ops"])
    bad = [o for o in ops if o not in CELL_OPS]
    if bad:
        raise ValueError(f"--space {where}: cellcnn op {bad[0]!r} is not one of {', '.join(CELL_OPS)}")
    tt = merged["tinytransformer"]
    bad = [(w, h) for w in _choices(tt["width"]) for h in _choices(tt["heads"]) if int(w) % int(h)]
    if bad:  # the flat space draws width and heads independently: every pair must split
        raise ValueError(f"--space {where}: tinytransformer width {bad[0][0]} does not split into {bad[0][1]} heads; "
                         "pick widths that every heads choice divides")
    if int(merged["train"]["report_every"]) > int(merged["train"]["steps"]):
        raise ValueError(f"--space {where}: train.report_every is larger than train.steps")
    return merged


def _choices(value: Any) -> list:
    return list(value) if isinstance(value, list) else [value]


def _is_choice(value: Any) -> bool:
    # A list of lists is a choice between lists (kernel_sizes); a list of scalars a choice of scalars.
    return isinstance(value, list) and len(value) > 1


def tune_space(space: dict[str, Any]) -> dict[str, Any]:
    """The flat Ray Tune param space: `tune.choice` where the YAML lists options, constants elsewhere."""
    from ray import tune

    flat: dict[str, Any] = {"family": space["families"], "embedding_size": space["embedding_size"]}
    for fam, keys in FAMILY_KEYS.items():
        for k in sorted(keys - {"ops", "nodes"}):
            flat[f"{fam}.{k}"] = space[fam][k]
    ops = _choices(space["cellcnn"]["ops"])
    for i in range(int(space["cellcnn"]["nodes"])):
        for j in range(2):
            flat[f"cell.node{i}.op{j}"] = ops
            flat[f"cell.node{i}.in{j}"] = list(range(2 + i))  # the cell's two inputs, then earlier nodes
    for k in sorted(LOSS_KEYS):
        flat[f"loss.{k}"] = space["loss"][k]
    for k in ("lr", "batch_size"):
        flat[f"train.{k}"] = space["train"][k]
    out = {}
    for k, v in flat.items():
        if k.endswith("kernel_sizes") and isinstance(v, list) and v and not isinstance(v[0], list):
            out[k] = v  # one list of widths: fixed, not a choice between widths
            continue
        if isinstance(v, list) and len(v) == 1 and not isinstance(v[0], list):
            v = v[0]
        # tune.choice of lists: Optuna keeps only scalars, so lists are chosen by index
        if _is_choice(v) and any(isinstance(x, list) for x in v):
            out[k + "#"] = tune.choice(list(range(len(v))))
        elif _is_choice(v):
            out[k] = tune.choice(v)
        else:
            out[k] = v
    return out


def resolve(config: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    """A trial's flat config with list choices (`key#` = an index) replaced by their values."""
    out = {}
    for k, v in config.items():
        if k.endswith("#"):
            fam, _, name = k[:-1].partition(".")
            out[k[:-1]] = space[fam][name][int(v)]
        else:
            out[k] = v
    return out


def architecture(config: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    """The student's constructor arguments (`architecture` + shape) for a trial's flat config."""
    c = resolve(config, space)
    fam = c["family"]
    if fam not in SMALL_STUDENTS:
        raise ValueError(f"family {fam!r} is not a small student ({', '.join(SMALL_STUDENTS)})")
    arch: dict[str, Any] = {"architecture": fam, "embedding_size": int(c["embedding_size"])}
    for k in sorted(FAMILY_KEYS[fam] - {"ops", "nodes"}):
        arch[k] = c[f"{fam}.{k}"]
    if fam == "cellcnn":
        nodes = int(space["cellcnn"]["nodes"])
        arch["genotype"] = [[[c[f"cell.node{i}.op{j}"], int(c[f"cell.node{i}.in{j}"])] for j in range(2)]
                            for i in range(nodes)]
    return arch


def training(config: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    """The trial's loss and optimiser settings."""
    c = resolve(config, space)
    return {"alpha": float(c["loss.alpha"]), "distill": str(c["loss.distill"]),
            "temperature": float(c["loss.temperature"]), "lr": float(c["train.lr"]),
            "batch_size": int(c["train.batch_size"]), "steps": int(space["train"]["steps"]),
            "report_every": int(space["train"]["report_every"])}
