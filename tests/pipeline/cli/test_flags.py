"""Flags made from the config dataclasses: every flag keeps its name and has help, and a flag left out
never overrides a recipe or YAML value (no guessing "given" from a value equal to the default)."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from kdcache.pipeline.cli.flags import flag_fields
from kdcache.pipeline.cli.main import _cache_config, build_parser
from kdcache.pipeline.cli.train import train_config_from_args
from kdcache.pipeline.student.config import TrainConfig
from kdcache.pipeline.teacher_pass.config import CacheConfig

# The flags scripts, docs and deploy manifests use: they must keep parsing.
CACHE_FLAGS = [
    "--teacher", "--corpus", "--out", "--mode", "--max-length", "--top-k", "--sample", "--hidden-layers",
    "--attention-layers", "--dtype", "--attention-dtype", "--mlm-probability", "--dupe-factor", "--seed",
    "--batch-size", "--actors", "--gpus-per-actor", "--cpus-per-actor", "--shard-tokens", "--text-field",
    "--label-field", "--txt-mode", "--encoding-errors", "--topk-codec", "--max-sequences", "--address",
    "--max-retries", "--executor", "--device", "--topk-calibration-sequences", "--shards-in-flight", "--config",
    "--overwrite", "--trust-remote-code", "--allow-pickle", "--no-progress",
]
TRAIN_FLAGS = [
    "--cache", "--student", "--out", "--steps", "--batch-size", "--lr", "--temperature", "--warmup-steps",
    "--weight-decay", "--seed", "--workers", "--storage-path", "--student-url", "--run-name", "--checkpoint-every",
    "--max-failures", "--address", "--recipe", "--config", "--use-gpu", "--no-ray", "--no-progress",
    "--trust-remote-code", "--validate", "--json",
]


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[name]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("command,flags", [("cache", CACHE_FLAGS + ["--json"]), ("plan", CACHE_FLAGS + ["--json"]),
                                           ("train", TRAIN_FLAGS)])
def test_every_flag_is_there_with_help(command, flags):
    options = _options(_subparser(command))
    assert set(flags) <= set(options), set(flags) - set(options)
    for name, action in options.items():
        assert name in ("-h", "--help") or (action.help or "").strip(), f"kdcache {command} {name} has no help"


@pytest.mark.parametrize("cls", [CacheConfig, TrainConfig])
def test_every_flag_field_has_help(cls):
    fields = flag_fields(cls)
    assert fields and all(f.metadata["help"].strip() for f in fields)


def test_help_shows_the_dataclass_defaults():
    text = _subparser("cache").format_help()
    assert "(default: 64)" in text and "(default: 128)" in text and "no progress bar" in text
    assert "(default: 0.0005)" in _subparser("train").format_help()
    # --embedding-init's default depends on --architecture, so its help spells both out
    init_help = " ".join(_subparser("init-student").format_help().split())
    assert "Default: random for a narrower transformer, teacher for bilstm/cnn" in init_help


def cache(argv):
    return _cache_config(build_parser().parse_args(["cache", "--teacher", "t", "--corpus", "a.jsonl,b.jsonl",
                                                    "--corpus", "c.jsonl", *map(str, argv)]))


def test_cache_flag_left_out_keeps_the_yaml_value(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("top_k: 32\nbatch_size: 8\nprogress: false\n")
    cfg = cache(["--config", y, "--seed", "3"])
    assert (cfg.top_k, cfg.batch_size, cfg.seed, cfg.progress) == (32, 8, 3, False)
    assert cfg.corpus == ["a.jsonl", "b.jsonl", "c.jsonl"]
    # Given explicitly, the default's own value still wins over the YAML; key=value wins over the flag.
    cfg = cache(["--config", y, "--top-k", "64", "--batch-size", "32", "batch_size=4"])
    assert (cfg.top_k, cfg.batch_size) == (64, 4)
    assert (cache([]).top_k, cache([]).progress, cache(["--no-progress"]).progress) == (64, True, False)


def test_top_k_and_sample_conflict_only_when_both_are_given(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("sample: 8\n")
    assert (cache(["--config", y]).sample, cache(["--top-k", "0", "--sample", "8"]).sample) == (8, 8)
    for argv in (["--config", y, "--top-k", "64"], ["--sample", "8", "top_k=64"]):
        with pytest.raises(ValueError, match="either --top-k or --sample"):
            cache(argv)


def train(argv):
    args = build_parser().parse_args(["train", "--cache", "c", "--student", "s", *map(str, argv)])
    return train_config_from_args(args)


def test_train_flag_left_out_keeps_the_recipe_and_yaml_values(tmp_path):
    cfg = train(["--recipe", "lm", "--lr", "0.1"])
    assert (cfg.recipe, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.no_ray) == ("lm", 16, 0.1, 0.1, False)
    assert train(["--recipe", "lm", "--batch-size", "32"]).batch_size == 32
    y = tmp_path / "t.yaml"
    y.write_text("batch_size: 8\nprogress: false\n")
    cfg = train(["--recipe", "lm", "--config", y, "--seed", "2", "--no-ray"])
    assert (cfg.batch_size, cfg.progress, cfg.seed, cfg.no_ray) == (8, False, 2, True)
    assert train(["--recipe", "lm", "--config", y, "--batch-size", "32"]).batch_size == 32


def test_building_the_parser_imports_neither_torch_nor_ray():
    code = ("import sys; from kdcache.pipeline.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
