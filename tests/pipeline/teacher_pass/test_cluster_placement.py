"""Placement across nodes, on a real multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`:
a raylet per node). Two nodes declare 2 "GPUs" each; the teacher actors ask for one GPU apiece (and,
finding no CUDA device inside, run the teacher on the CPU), so Ray must put two on each node. Training
runs 2 Ray Train workers on nodes that each fit one.

CPU requests are fractional and small so that a 2-core machine never waits on a CPU (whole-CPU requests
that leave no CPU free were seen to hang a 2-CPU cluster).
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import pytest

from kdcache.pipeline.teacher_pass.run import run_cache_pass
from kdcache.pipeline.teacher_pass.config import CacheConfig
from kdcache.storage import CacheReader
from kdcache.storage.verify import verify_cache
from tests.support import make_teacher, tiny_corpus

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def two_nodes():
    """2 nodes x (1 CPU, 2 GPUs); yields the node ids. Workers inherit PYTHONPATH so that they can
    import this test module (the training test's student factory lives here)."""
    import ray
    from ray.cluster_utils import Cluster

    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), saved) if p)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 2, "include_dashboard": False,
                                                            "object_store_memory": 150 * 2**20})
    cluster.add_node(num_cpus=1, num_gpus=2, object_store_memory=150 * 2**20)
    try:
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        assert len(nodes) == 2 and ray.cluster_resources()["GPU"] == 4
        yield nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def test_one_teacher_actor_per_gpu_spread_over_the_nodes(two_nodes, tmp_path, caplog):
    teacher = make_teacher(tmp_path / "teacher", "masked-lm")
    corpus = tiny_corpus(tmp_path / "corpus.jsonl", docs=60)
    cfg = CacheConfig(teacher=teacher, corpus=[corpus], out=str(tmp_path / "cache"), max_length=16, batch_size=4,
                      shard_tokens=16 * 4, top_k=4, hidden_layers="2", cpus_per_actor=0.25, progress=False)
    assert cfg.actors == 0 and cfg.gpus_per_actor == 1  # the defaults: one actor per GPU
    with caplog.at_level(logging.INFO, logger="kdcache.executor"):
        summary = run_cache_pass(cfg, log=lambda *_: None)

    (record,) = [r for r in caplog.records if r.getMessage().startswith("teacher actors:")]
    placement = json.loads(record.args[2])
    assert len(placement) == 4  # 4 declared GPUs -> 4 teacher actors
    assert all(a["num_gpus"] == 1 for a in placement)
    assert Counter(a["node"] for a in placement) == {two_nodes[0]: 2, two_nodes[1]: 2}
    assert all(a["forward_calls"] > 0 for a in placement), placement  # every actor did teacher work

    # Every shard written exactly once, the manifest complete.
    n = summary["shards_total"]
    assert n >= 8 and summary["shards_written"] == n
    shards = sorted(os.listdir(tmp_path / "cache" / "shards"))
    assert shards == sorted([f"shard-{i:06d}.parquet" for i in range(n)] + [f"shard-{i:06d}.json" for i in range(n)])
    assert verify_cache(cfg.out)[0] == []
    reader = CacheReader(cfg.out)
    assert [s.index for s in reader.shards] == list(range(n))
    ids = [i for b in reader.iter_batches(["sample_id"]) for i in b.column("sample_id").to_pylist()]
    assert sorted(ids) == list(range(reader.manifest.rows)) == sorted(set(ids))


def recording_student(config: dict):
    """Student factory: the usual HF student, plus a file saying which node this worker runs on."""
    import ray

    from kdcache.pipeline.student.models import load_student
    from kdcache.pipeline.student.trainer import HFStudent

    model = load_student(config["student"], output_hidden_states=True)
    module = HFStudent(model)
    c = model.config
    module.num_layers, module.hidden_size, module.num_heads = c.num_hidden_layers, c.hidden_size, c.num_attention_heads
    module.vocab_size, module.max_positions, module.num_labels = c.vocab_size, c.max_position_embeddings, None
    ctx = ray.get_runtime_context() if ray.is_initialized() else None
    if ctx is not None and ctx.get_actor_id():  # a Ray Train worker (the driver also calls factories)
        where = Path(config["out"]).parent / "placement"
        where.mkdir(exist_ok=True)
        (where / f"{os.getpid()}.json").write_text(json.dumps({"node": ctx.get_node_id()}))
    return module


def test_two_training_workers_run_on_two_nodes(two_nodes, tmp_path):
    from kdcache.pipeline.student.models import init_student_from_teacher
    from kdcache.pipeline.student.trainer import train
    from kdcache.pipeline.student.config import load_train_config

    teacher = make_teacher(tmp_path / "teacher", "masked-lm")
    corpus = tiny_corpus(tmp_path / "corpus.jsonl", docs=30)
    cache = str(tmp_path / "cache")
    run_cache_pass(CacheConfig(teacher=teacher, corpus=[corpus], out=cache, max_length=16, batch_size=8,
                               shard_tokens=16 * 8, top_k=4, hidden_layers="2", progress=False),
                   executor="local", log=lambda *_: None)
    init_student_from_teacher(teacher, tmp_path / "student", num_layers=1)
    # 0.6 CPU per worker on 1-CPU nodes: one worker per node, so two workers need both nodes.
    cfg = load_train_config("distilbert", None, {
        "cache": cache, "student": str(tmp_path / "student"), "out": str(tmp_path / "run"), "batch_size": 4,
        "steps": 3, "workers": 2, "progress": False}, ["warmup_ratio=0", "cpus_per_worker=0.6",
                                                      f"student_factory={__name__}:recording_student"])
    summary = train(cfg, log=lambda *_: None)
    assert summary["steps"] == 3
    nodes = [json.loads(p.read_text())["node"] for p in (tmp_path / "placement").glob("*.json")]
    assert sorted(nodes) == two_nodes  # one worker on each node
    assert (tmp_path / "run" / "student" / "config.json").exists()
