"""The teacher pass on a real local Ray cluster: actors, retries of dead actors, no retry of bugs."""
from __future__ import annotations

import os

import pytest

from kdcache.pipeline.teacher_pass.run import run_cache_pass
from kdcache.pipeline.teacher_pass.config import CacheConfig
from kdcache.pipeline.teacher_pass.executor import ShardFailed
from kdcache.storage import CacheReader
from kdcache.storage.verify import verify_cache
from tests.support import make_teacher, tiny_corpus

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher") / "t", "masked-lm")


def _cfg(tmp_path, teacher, **kw):
    corpus = tiny_corpus(tmp_path / "corpus.jsonl", docs=60)
    return CacheConfig(teacher=teacher, corpus=[corpus], out=str(tmp_path / "cache"), max_length=16, batch_size=2,
                       shard_tokens=16 * 5, actors=2, cpus_per_actor=1, progress=False, top_k=4,
                       hidden_layers="2", **kw)


def _sample_ids(url):
    return sorted(int(i) for b in CacheReader(url).iter_batches(["sample_id"]) for i in b.column("sample_id").to_numpy())


def test_two_actors_fill_the_cache(ray_cluster, tmp_path, teacher):
    cfg = _cfg(tmp_path, teacher)
    summary = run_cache_pass(cfg, log=lambda *_: None)
    assert summary["shards_total"] >= 4 and summary["shards_written"] == summary["shards_total"]
    assert verify_cache(cfg.out)[0] == []
    assert _sample_ids(cfg.out) == list(range(CacheReader(cfg.out).manifest.rows))


def test_actor_killed_mid_shard_is_replaced_and_the_shard_redone(ray_cluster, tmp_path, teacher, monkeypatch):
    monkeypatch.setenv("KDCACHE_FAULTS", "die@2")
    monkeypatch.setenv("KDCACHE_FAULTS_ONCE", str(tmp_path))
    cfg = _cfg(tmp_path, teacher)
    summary = run_cache_pass(cfg, log=lambda *_: None)
    assert (tmp_path / "fired-die-2").exists()  # the fault really fired
    assert verify_cache(cfg.out)[0] == []
    assert _sample_ids(cfg.out) == list(range(CacheReader(cfg.out).manifest.rows))  # each id exactly once
    assert summary["shards_written"] == summary["shards_total"]


def test_shard_that_keeps_killing_its_actor_fails_after_bounded_retries(ray_cluster, tmp_path, teacher, monkeypatch):
    monkeypatch.setenv("KDCACHE_FAULTS", "die@1")
    cfg = _cfg(tmp_path, teacher, max_retries=1)
    with pytest.raises(ShardFailed, match=r"shard 1: its teacher actor died 2 times.*--max-retries 1"):
        run_cache_pass(cfg, log=lambda *_: None)
    shards = os.listdir(tmp_path / "cache" / "shards")
    assert "shard-000001.json" not in shards and "shard-000000.json" in shards  # the others are committed
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_application_error_is_not_retried(ray_cluster, tmp_path, teacher, monkeypatch):
    monkeypatch.setenv("KDCACHE_FAULTS", "raise@0")
    monkeypatch.setenv("KDCACHE_FAULTS_ONCE", str(tmp_path))  # a retry would succeed: it must not happen
    cfg = _cfg(tmp_path, teacher)
    with pytest.raises(ShardFailed, match=r"shard 0 failed: RuntimeError: injected failure in shard 0.*not retried"):
        run_cache_pass(cfg, log=lambda *_: None)


def test_default_cpu_actor_takes_the_clusters_cpus_and_a_tuned_allocator(ray_cluster, tmp_path, teacher):
    """`kdcache cache` on a CPU machine without --actors/--cpus-per-actor: one actor whose forward
    runs on every CPU of the (2-CPU) cluster, in a process started with the allocator settings."""
    import dataclasses

    from kdcache.pipeline.common import allocator
    from kdcache.pipeline.teacher_pass.config import prepare
    from kdcache.pipeline.teacher_pass.executor import RayExecutor

    cfg = dataclasses.replace(_cfg(tmp_path, teacher), actors=0, cpus_per_actor=0.0)
    ex = RayExecutor(prepare(cfg), cfg.out)
    ex.close()  # records how each actor ran
    (stats,) = ex.placement
    assert stats["threads"] == 2 and stats["malloc_tuned"] == allocator.enabled()
    assert ex.resources == {"num_cpus": 2.0}


@pytest.mark.parametrize("nodes, actors, share", [([2], 1, 2), ([2], 2, 1), ([8, 8], 3, 4), ([8, 8], 2, 8),
                                                   ([16, 4], 2, 8), ([2], 3, 1), ([], 1, 1)])
def test_cpu_share_fits_every_actor_on_a_node(nodes, actors, share):
    from kdcache.pipeline.teacher_pass.executor import cpu_share

    assert cpu_share(nodes, actors) == share
