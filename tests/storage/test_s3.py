"""Caches, checkpoints and students on object storage, against a real S3-protocol server (moto's
standalone server, its own process, on loopback): nothing in boto, s3fs or pyarrow is patched.

The network faults are real too: `FlakyProxy` sits between the client and the server and cuts
connections in the middle of response bodies.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdcache.storage import CacheReader, CacheSpec, ShardError
from kdcache.storage.fs import Location, RetryPolicy, is_transient
from tests.s3server import FlakyProxy, make_bucket, moto_server, s3_env
from tests.support import make_teacher, tiny_corpus, write_cache

BUCKET = "kdcache-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server's endpoint; AWS_* variables point every client in this process (and the Ray
    clusters it starts) at it for the module's duration."""
    import s3fs

    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        env = s3_env(endpoint)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        # fsspec caches clients by their arguments, not by the AWS_* environment: one made by an
        # earlier test (another endpoint) must not be reused.
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            make_bucket(endpoint, BUCKET)
            yield endpoint
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def big_cache(s3):
    """3 shards of ~0.8 MB each, mostly one hidden-state column."""
    spec = CacheSpec(vocab_size=300, max_length=64, targets="topk", k=8, hidden_layers=(0,), hidden_size=128)
    manifest, _ = write_cache(f"s3://{BUCKET}/big", spec, shards=3, rows_per_shard=64, batch_rows=16)
    return f"s3://{BUCKET}/big", manifest


def _all_batches(reader: CacheReader, columns=None) -> list:
    return list(reader.iter_batches(columns, batch_size=16))


def test_reads_through_connections_cut_mid_body_return_the_same_rows(s3, big_cache, caplog):
    url, manifest = big_cache
    direct = _all_batches(CacheReader(url))
    assert sum(b.num_rows for b in direct) == manifest.rows == 192

    proxy = FlakyProxy(s3, cut_after=20_000, rate=0.5, seed=1)
    try:
        # 1. The client's own retries (s3fs/botocore defaults) behind ours.
        got = _all_batches(CacheReader(url, {"endpoint_url": proxy.endpoint, "skip_instance_cache": True}))
        assert len(got) == len(direct) and all(a.equals(b) for a, b in zip(direct, got))
        cuts_before = proxy.cuts
        assert cuts_before > 0  # the faults really happened

        # 2. The client's retries switched off: only kdcache's layer (re-open at the offset) can recover.
        reader = CacheReader(url, {"endpoint_url": proxy.endpoint, "skip_instance_cache": True,
                                   "config_kwargs": {"retries": {"max_attempts": 1}}})
        reader.loc.fs.retries = 1  # s3fs: one try per request
        reader.loc.retry = RetryPolicy(retries=10, backoff=0.01)
        with caplog.at_level(logging.WARNING, logger="kdcache.storage"):
            got = _all_batches(reader)
        assert len(got) == len(direct) and all(a.equals(b) for a, b in zip(direct, got))
        assert proxy.cuts > cuts_before
        retried = [r.getMessage() for r in caplog.records if "transient error" in r.getMessage()]
        assert retried and all("shard-" in m for m in retried), retried
    finally:
        proxy.close()


def test_projected_read_fetches_only_its_columns(s3, big_cache):
    url, manifest = big_cache
    total = sum(s.bytes for s in manifest.shards)
    proxy = FlakyProxy(s3, cut_after=0, rate=0.0)  # a byte counter, no faults
    try:
        reader = CacheReader(url, {"endpoint_url": proxy.endpoint, "skip_instance_cache": True}, verify="size")
        reader.loc.read_block_size = 8 << 10  # small blocks: the test shards are small
        ids = [i for b in reader.iter_batches(["sample_id"], batch_size=64) for i in b.column("sample_id").to_pylist()]
        assert ids == list(range(manifest.rows))
        projected = proxy.bytes_down
        # Streaming, not a download: the hidden-state pages (most of each shard) were never fetched.
        assert projected < 0.25 * total, (projected, total)
        _all_batches(reader)
        assert proxy.bytes_down - projected >= 0.9 * total
    finally:
        proxy.close()


def test_ranks_sharing_one_shard_each_fetch_only_their_row_groups(s3):
    """Two training ranks on a one-shard cache: ranged reads of their own row groups, not two downloads."""
    from kdcache.pipeline.student.trainer import RankStream

    spec = CacheSpec(vocab_size=300, max_length=64, targets="topk", k=8, hidden_layers=(0,), hidden_size=128)
    url = f"s3://{BUCKET}/one-shard"
    manifest, _ = write_cache(url, spec, shards=1, rows_per_shard=128, batch_rows=16)
    total, seen = manifest.shards[0].bytes, []
    for rank in range(2):
        proxy = FlakyProxy(s3, cut_after=0, rate=0.0)  # a byte counter, no faults
        try:
            reader = CacheReader(url, {"endpoint_url": proxy.endpoint, "skip_instance_cache": True}, verify="size")
            reader.loc.read_block_size = 8 << 10
            stream = RankStream(reader, reader.resolve_columns(["hidden_0"]), 16, rank, 2)
            seen += [int(i) for b in stream.batches(0) for i in b["sample_id"]]
            assert 0.4 * total < proxy.bytes_down < 0.65 * total, (rank, proxy.bytes_down, total)
        finally:
            proxy.close()
    assert sorted(seen) == list(range(manifest.rows))


def test_missing_object_fails_at_once_without_retries(s3, big_cache, caplog):
    import s3fs

    spec = CacheSpec(vocab_size=50, max_length=8, targets="topk", k=4)
    url = f"s3://{BUCKET}/damaged"
    manifest, _ = write_cache(url, spec, shards=2, rows_per_shard=4)
    s3fs.S3FileSystem(skip_instance_cache=True).rm(f"{BUCKET}/damaged/{manifest.shards[1].file}")
    reader = CacheReader(url, {"skip_instance_cache": True})
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="kdcache.storage"):
        with pytest.raises(ShardError, match=r"s3://kdcache-test/damaged/shards/shard-000001\.parquet is listed in "
                                             r"the manifest but missing"):
            _all_batches(reader)
    assert time.monotonic() - t0 < 5
    assert not [r for r in caplog.records if "transient" in r.getMessage()]
    assert not is_transient(FileNotFoundError("x")) and not is_transient(PermissionError("denied"))


def test_unreachable_endpoint_gives_up_naming_the_object(s3):
    from tests.s3server import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    loc = Location.parse(f"s3://{BUCKET}/anything", {"endpoint_url": dead, "skip_instance_cache": True,
                                                      "config_kwargs": {"retries": {"max_attempts": 1}}})
    loc.fs.retries = 1
    loc.retry = RetryPolicy(retries=2, backoff=0.01)
    with pytest.raises(OSError, match=r"s3://kdcache-test/anything/manifest\.json: still failing after 3 attempts"):
        loc.read_text("manifest.json")


@pytest.mark.ray
@pytest.mark.slow
def test_cache_verify_train_and_resume_on_s3(s3, tmp_path):
    """The teacher pass writes to s3://, `kdcache verify` (a real process) checks it there, Ray Train
    reads it from there, keeps its checkpoints there, restarts from one after a worker failure, and the
    final student lands there and loads."""
    import ray
    import s3fs
    from transformers import AutoModelForMaskedLM

    from kdcache.pipeline.teacher_pass.run import run_cache_pass
    from kdcache.pipeline.teacher_pass.config import CacheConfig
    from kdcache.pipeline.student.models import init_student_from_teacher
    from kdcache.pipeline.student.trainer import train
    from kdcache.pipeline.student.config import load_train_config

    teacher = make_teacher(tmp_path / "teacher", "masked-lm")
    corpus = tiny_corpus(tmp_path / "corpus.jsonl", docs=40)
    cache = f"s3://{BUCKET}/e2e/cache"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20)
    try:
        summary = run_cache_pass(CacheConfig(teacher=teacher, corpus=[corpus], out=cache, max_length=16, batch_size=8,
                                             shard_tokens=16 * 8, top_k=4, hidden_layers="2", actors=2,
                                             cpus_per_actor=0.5, progress=False), log=lambda *_: None)
        assert summary["shards_written"] == summary["shards_total"] >= 4

        verify = subprocess.run([os.path.join(os.path.dirname(sys.executable), "kdcache"), "verify", cache],
                                capture_output=True, text=True, timeout=300)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert f"ok: {summary['shards_total']} shards" in verify.stdout

        init_student_from_teacher(teacher, tmp_path / "student", num_layers=1)
        cfg = load_train_config("distilbert", None, {
            "cache": cache, "student": str(tmp_path / "student"), "out": str(tmp_path / "run"), "batch_size": 4,
            "progress": False, "steps": 4, "workers": 2, "storage_path": f"s3://{BUCKET}/e2e/ray",
            "max_failures": 1}, ["warmup_ratio=0", "checkpoint_every=2", "fail_at_step=3",
                                 f"student_url=s3://{BUCKET}/e2e/students/s1"])
        result = train(cfg, log=lambda *_: None)
    finally:
        ray.shutdown()

    assert (tmp_path / "run" / ".fail-at-step-3-rank-0").exists()  # the failure really fired
    assert result["steps"] == 4 and result["resumed_from_step"] == 2  # restarted from the step-2 checkpoint
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    run_dir = f"{BUCKET}/e2e/ray/{Path(result['checkpoint']).parent.name}"
    steps = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(run_dir) if "/step-" in p)
    assert steps == ["step-00000002", "step-00000004"]
    assert fs.exists(f"{run_dir}/step-00000004/state.json") and fs.exists(f"{run_dir}/step-00000004/rank-00001.json")

    assert result["student_url"] == f"s3://{BUCKET}/e2e/students/s1"
    fs.get(f"{BUCKET}/e2e/students/s1/", str(tmp_path / "downloaded"), recursive=True)
    assert (tmp_path / "downloaded" / "kdcache_train.json").exists()
    model = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "downloaded"))
    assert model.config.num_hidden_layers == 1
