"""Data-parallel training on any cache (trainer/data.py over kdcache.storage.assign): real Ray Train
workers on caches of 1, 3 and 7 shards, more workers than shards included. What each rank read is
collected from the workers themselves (log_samples=true)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from kdcache.pipeline.student.config import load_train_config
from kdcache.pipeline.student.trainer import train
from kdcache.storage import CacheReader, assign
from tests.support import make_teacher, run_metrics, run_samples, tiny_corpus

BATCH = 4
# rows per shard x 16 tokens: 73 sequences in 1, 3 or 7 shards, row groups of 4 (the teacher's batch)
SHARD_TOKENS = {1: 100_000, 3: 16 * 25, 7: 16 * 11}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    from kdcache.pipeline.student.models import init_student_from_teacher
    from kdcache.pipeline.teacher_pass.config import CacheConfig
    from kdcache.pipeline.teacher_pass.run import run_cache_pass

    root = tmp_path_factory.mktemp("dp")
    teacher = make_teacher(root / "teacher", "masked-lm", layers=2, hidden=16, heads=2)
    corpus = tiny_corpus(root / "corpus.jsonl", docs=40)
    for shards, tokens in SHARD_TOKENS.items():
        run_cache_pass(CacheConfig(out=str(root / f"cache{shards}"), teacher=teacher, corpus=[corpus], max_length=16,
                                   batch_size=4, shard_tokens=tokens, top_k=4, hidden_layers="2", progress=False),
                       executor="local", log=lambda *_: None)
        assert len(CacheReader(str(root / f"cache{shards}")).shards) == shards
    init_student_from_teacher(teacher, root / "student", num_layers=1)
    return root


def _run(root: Path, shards: int, workers: int, out: str, *overrides: str) -> tuple[Path, int, object]:
    reader = CacheReader(str(root / f"cache{shards}"))
    epoch0 = assign(reader.row_groups(), workers, BATCH)
    cfg = load_train_config("distilbert", None, {
        "cache": str(root / f"cache{shards}"), "student": str(root / "student"), "out": str(root / out),
        "batch_size": BATCH, "workers": workers, "steps": epoch0.steps + 2, "progress": False},
        ["warmup_ratio=0", "lr=2e-3", "threads=1", "log_samples=true", "tensorboard=false", "checkpoint_every=3",
         "shuffle=true", *overrides])
    train(cfg, log=lambda *_: None)
    return root / out, epoch0.steps, reader


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("shards,workers", [(1, 2), (1, 3), (3, 2), (7, 4)])
def test_every_row_once_per_epoch_and_equal_batches(caches, ray_cluster, shards, workers):
    run, steps, reader = _run(caches, shards, workers, f"run_{shards}x{workers}")
    rows = reader.manifest.rows
    seen: Counter = Counter()
    for rank in range(workers):
        got = run_samples(run, rank)
        assert [s["step"] for s in got] == list(range(1, steps + 3))
        # the same batches per epoch on every rank: epoch 1 starts at step steps+1 everywhere
        assert [s["epoch"] for s in got] == [0] * steps + [1, 1], rank
        mine = [i for s in got if s["epoch"] == 0 for i in s["sample_ids"]]
        shuffled = assign(reader.row_groups(), workers, BATCH, epoch=0, seed=0, shuffle=True).spans[rank]
        assert sorted(mine) == sorted(i for b in reader.read_spans(shuffled, ["sample_id"])
                                      for i in b.column("sample_id").to_pylist())
        seen.update(mine)
    repeated = assign(reader.row_groups(), workers, BATCH).repeated
    assert set(seen) == set(range(rows))  # every row, in every layout
    assert sorted(seen.values()) == [1] * (rows - repeated) + [2] * repeated  # once (bar the documented pad)
    assert repeated < workers and (repeated == 0) == (rows % (workers * BATCH) == 0 or rows % (workers * BATCH) >= workers)


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_worker_resumes_mid_epoch_exactly(caches, ray_cluster):
    """Three workers on one shard; rank 1 is SIGKILLed before step 5: Ray Train restarts the group from
    the step-3 checkpoint (mid-epoch, mid shuffle window) and the run reads what the uninterrupted one read."""
    ref = caches / "run_1x3"  # the uninterrupted run: the layout test's, if it ran
    steps = assign(CacheReader(str(caches / "cache1")).row_groups(), 3, BATCH).steps
    if not (ref / "summary.json").exists():
        _run(caches, 1, 3, "run_1x3")
    got, _, _ = _run(caches, 1, 3, "killed_1x3", "fail_at_step=5:kill", "fail_rank=1", "max_failures=1")
    assert (got / ".fail-at-step-5-rank-1").exists()
    assert 3 < 5 < steps  # the failure and the checkpoint it resumes from are inside epoch 0
    a, b = run_metrics(ref), run_metrics(got)
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, steps + 3))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]
    for rank in range(3):
        assert run_samples(got, rank) == run_samples(ref, rank)
