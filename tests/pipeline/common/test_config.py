"""Configs: YAML < flags < key=value, with errors that name the key and list the valid ones."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kdcache.pipeline.common.config import build_config


@dataclass
class Cfg:
    teacher: str
    layers: str = "none"
    k: int = 64
    lr: float = 1e-3
    flag: bool = False
    paths: list[str] = field(default_factory=list)
    name: str | None = None


def test_precedence_and_types(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("teacher: a\nk: 8\nlayers: '0,3'\npaths: [x, y]\n")
    cfg = build_config(Cfg, y, {"k": 16, "lr": None}, ["lr=0.5", "flag=true", "name=6:12", "paths=p,q"])
    assert (cfg.teacher, cfg.k, cfg.lr, cfg.flag, cfg.layers) == ("a", 16, 0.5, True, "0,3")
    assert cfg.name == "6:12"  # verbatim, not YAML's base-60 integer
    assert cfg.paths == ["p", "q"]


def test_errors_name_the_key_and_the_source(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("teacher: a\ntop_kk: 3\n")
    with pytest.raises(ValueError, match=r"unknown key 'top_kk' in .*c.yaml; valid keys: .*teacher"):
        build_config(Cfg, y)
    with pytest.raises(ValueError, match=r"overrides: k: expected int, got 'many'"):
        build_config(Cfg, None, {"teacher": "a"}, ["k=many"])
    with pytest.raises(ValueError, match="missing required setting.*teacher"):
        build_config(Cfg)
    with pytest.raises(ValueError, match="is not key=value"):
        build_config(Cfg, None, {"teacher": "a"}, ["oops"])


def test_given_values_holds_only_what_was_given(tmp_path):
    from kdcache.pipeline.common.config import given_values, make_config

    y = tmp_path / "c.yaml"
    y.write_text("teacher: a\nk: 64\n")
    given = given_values(Cfg, y, {"lr": None, "flag": False}, ["name=x"])
    assert given == {"teacher": "a", "k": 64, "flag": False, "name": "x"}  # k given, even at the default's value
    assert make_config(Cfg, given).lr == 1e-3
