"""The `kdcache` command line as a user meets it: real subprocesses, exit codes, --json last lines."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import make_teacher, tiny_corpus

KDCACHE = [sys.executable, "-m", "kdcache.pipeline.cli.main"]
ROOT = Path(__file__).resolve().parents[3]


def kd(*args, check=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*KDCACHE, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"kdcache {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def last_json(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("t") / "teacher", "masked-lm")


def test_help_and_version():
    out = kd("--help").stdout
    for sub in ("plan", "cache", "inspect", "verify", "bench"):
        assert sub in out
    assert kd("--version").stdout.startswith("kdcache ")


def test_cache_from_yaml_with_overrides_then_inspect_and_verify(tmp_path, teacher):
    corpus = tiny_corpus(tmp_path / "c.jsonl")
    config = tmp_path / "cache.yaml"
    config.write_text(f"teacher: {teacher}\ncorpus: [{corpus}]\nmax_length: 16\nbatch_size: 4\n"
                      "shard_tokens: 64\nexecutor: local\ntop_k: 4\n")
    out = tmp_path / "cache"
    summary = last_json(kd("cache", "--config", config, "--out", out, "--no-progress", "--json", "hidden_layers=0,2"))
    assert summary["shards_written"] == summary["shards_total"] > 1
    info = last_json(kd("inspect", out, "--json"))
    assert info["options"]["hidden_layers"] == [0, 2] and info["options"]["k"] == 4
    assert info["columns"]["hidden_2"]["bytes_per_token"] > 0 and info["topk_bytes_per_entry"] > 0
    assert "ok:" in kd("verify", out).stdout
    # The same command again: no inference, and it says so.
    again = kd("cache", "--config", config, "--out", out, "--no-progress", "--json", "hidden_layers=0,2")
    assert "no new inference" in again.stdout and last_json(again)["forward_calls"] == 0
    # Damage one shard: verify names it and exits 1.
    shard = sorted((out / "shards").glob("*.parquet"))[1]
    shard.write_bytes(shard.read_bytes()[:-7])
    bad = kd("verify", out, check=False)
    assert bad.returncode == 1 and shard.name in bad.stdout


def test_unknown_config_key_lists_the_valid_ones(tmp_path, teacher):
    proc = kd("cache", "--teacher", teacher, "--corpus", "x.jsonl", "--out", tmp_path / "o", "top_kk=3", check=False)
    assert proc.returncode != 0 and "unknown key 'top_kk'" in proc.stderr and "top_k" in proc.stderr


def test_different_options_into_a_used_directory_are_refused(tmp_path, teacher):
    corpus = tiny_corpus(tmp_path / "c.jsonl")
    common = ["--teacher", teacher, "--corpus", corpus, "--out", tmp_path / "o", "--executor", "local",
              "--max-length", "16", "--no-progress"]
    kd("cache", *common, "--top-k", "4")
    proc = kd("cache", *common, "--top-k", "8", check=False)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr
    kd("cache", *common, "--top-k", "8", "--overwrite")


def test_plan_prints_sizes_before_running(tmp_path, teacher):
    corpus = tiny_corpus(tmp_path / "c.jsonl")
    plan = last_json(kd("plan", "--teacher", teacher, "--corpus", corpus, "--max-length", "16",
                        "--hidden-layers", "all", "--tokens-per-s", "1000", "--json"))
    assert plan["tokens"] > 0 and plan["sequences"] > 0 and set(plan["columns"]) >= {"input_ids", "topk", "hidden"}
    assert plan["teacher_seconds"] == pytest.approx(plan["tokens"] / 1000)
    # BERT-base, 13 hidden layers, 3.3B tokens: the warning example (~66 TB raw fp16).
    big = last_json(kd("plan", "--teacher", teacher, "--corpus", corpus, "--hidden-layers", "all",
                       "--corpus-tokens", "3300000000", "--json"))
    assert big["tokens"] == 3_300_000_000 and big["total_bytes"] > 1e11


def test_plan_predicts_the_training_split_the_cache_gets(tmp_path, teacher):
    from kdcache.storage import CacheReader, assign

    corpus = tiny_corpus(tmp_path / "c.jsonl")
    common = ["--teacher", teacher, "--corpus", corpus, "--max-length", "16", "--batch-size", "4",
              "--shard-tokens", str(16 * 10)]
    plan = last_json(kd("plan", *common, "--train-workers", "3", "--train-batch-size", "4", "--json"))
    kd("cache", *common, "--out", tmp_path / "o", "--executor", "local", "--no-progress")
    reader = CacheReader(str(tmp_path / "o"))
    groups = reader.row_groups()
    assert plan["shards"] == len(reader.shards) > 1 and plan["row_groups"] == len(groups)
    assert plan["training"] == assign(groups, 3, 4).summary()
    assert "error" in last_json(kd("plan", *common, "--train-workers", str(len(groups) + 1), "--json"))["training"]
