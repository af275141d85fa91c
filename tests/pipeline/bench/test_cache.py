"""`kdcache bench cache` and the runner profile on a tiny teacher: the JSON keys scripts read, and
figures that agree with each other."""
from __future__ import annotations

import json

import pytest

from kdcache.pipeline.common import allocator
from kdcache.pipeline.cli.main import main


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_bench_cache_prints_rates_and_their_ratio(capsys):
    assert main(["bench", "cache", "--teacher", "bert-tiny", "--tokens", "2048", "--batch-size", "4",
                 "--executor", "local", "--repeats", "1", "--json"]) == 0
    r = _last_json(capsys)
    assert {"bare_tokens_per_s", "cache_tokens_per_s", "ratio", "teacher", "runner_tokens_per_s"} <= set(r)
    assert r["bare_tokens_per_s"] > 0 and r["cache_tokens_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["cache_tokens_per_s"] / r["bare_tokens_per_s"])
    assert r["tokens"] == 2048 and r["executor"] == "local"
    # On a CPU the bare loop runs with the allocator settings of the pass, and once without them first.
    assert r["malloc_tuned"] == allocator.enabled()
    if r["malloc_tuned"]:
        assert r["ratio_vs_default_malloc"] == pytest.approx(r["cache_tokens_per_s"] / r["bare_default_malloc_tokens_per_s"])


def test_runner_profile_splits_a_batch(capsys):
    from kdcache.pipeline.bench.runner_profile import main as profile

    assert profile(["--teacher", "bert-tiny", "--batch-size", "4", "--batches", "2", "--hidden-layers", "2",
                    "--json"]) == 0
    r = _last_json(capsys)
    assert set(r["seconds"]) == {"forward", "topk_logprobs", "topk_columns", "dense_columns", "copy_to_host"}
    assert all(t >= 0 for t in r["seconds"].values()) and r["seconds"]["forward"] > 0
    fwd = r["seconds"]["forward"]
    assert r["expected_runner_ratio"] == pytest.approx(fwd / sum(r["seconds"].values()))
