"""`kdcache search` (kdcache.pipeline.student.search): the cell space's operations, the latency
measure, the space file, and a real 4-trial Ray Tune search over a tiny classifier's cache — with
the teacher folder deleted first, so no trial can load it — its outputs, `init-student
--architecture-config` on the best architecture, and `Tuner.restore` after an interrupted search."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from kdcache.pipeline.cli.main import main
from kdcache.pipeline.student.search.run import hypervolume, pareto_front
from kdcache.pipeline.student.search.space import architecture, load_space, tune_space
from kdcache.pipeline.student.search.trial import is_held_out, measure_latency
from kdcache.pipeline.student.small import CELL_OPS, SMALL_STUDENTS, CellCNNClassifier, load_small_student
from tests.support import make_teacher, tiny_corpus

SPACE = """\
families: [cellcnn, cnn, bilstm, tinytransformer]
embedding_size: [8, 16]
cellcnn: {channels: [8, 12], cells: [1, 2], nodes: 2}
cnn: {filters: [8], kernel_sizes: [[2, 3], [3, 4, 5]]}
bilstm: {hidden: [8], dense: [8]}
tinytransformer: {layers: [1, 2], width: [8], heads: [2], ffn: [16]}
loss: {alpha: [0.0, 0.5], distill: [mse, kl], temperature: [1.0, 2.0]}
train: {steps: 30, report_every: 10, batch_size: 8, lr: [1.0e-3, 3.0e-3]}
"""


@pytest.mark.parametrize("op", CELL_OPS)
def test_every_cell_op_keeps_the_length_and_leaves_pads_zero(op):
    torch.manual_seed(0)
    module = CELL_OPS[op](6)
    x = torch.randn(3, 6, 9)
    mask = (torch.arange(9)[None, :] < torch.tensor([9, 4, 1])[:, None])[:, None, :]
    x = x.masked_fill(~mask, 0.0)
    y = module(x, mask) if op.endswith("pool3") else module(x)
    assert y.shape == x.shape
    if op.endswith("pool3"):
        assert torch.all(y.masked_select(~mask.expand_as(y)) == 0)
        # a row's real tokens pool only real tokens: row 2 (one token) pools to itself
        torch.testing.assert_close(y[2, :, 0], x[2, :, 0])


def test_a_cell_reading_a_state_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="node 0 reads state 2"):
        CellCNNClassifier(vocab_size=20, genotype=[[["conv3", 2], ["identity", 0]]])
    with pytest.raises(ValueError, match="cell op 'conv9'"):
        CellCNNClassifier(vocab_size=20, genotype=[[["conv9", 0], ["identity", 1]]])


def test_latency_counts_are_fixed_and_reported_with_their_spread():
    model = CellCNNClassifier(vocab_size=30, embedding_size=8, channels=8)
    ids, mask = torch.randint(5, 30, (32, 12)), torch.ones(32, 12, dtype=torch.long)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    out = measure_latency(model, ids, mask, warmup=2, repeats=5)
    assert len(calls) == 7 and out["latency_repeats"] == 5
    assert out["latency_ms"] > 0 and out["latency_spread_ms"] >= 0
    assert model.training  # measured in eval mode, handed back in train mode


def test_space_file_is_checked_and_flattened(tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE)
    space = load_space(tmp_path / "s.yaml")
    flat = tune_space(space)
    assert "cnn.kernel_sizes#" in flat and "cell.node1.in1" in flat and flat["train.batch_size"] == 8
    cfg = {k: (v.categories[-1] if hasattr(v, "categories") else v) for k, v in flat.items()}
    cfg["family"] = "cellcnn"
    arch = architecture(cfg, space)
    assert arch["architecture"] == "cellcnn" and len(arch["genotype"]) == 2
    CellCNNClassifier(vocab_size=20, **{k: v for k, v in arch.items() if k != "architecture"})
    cfg["family"] = "cnn"
    assert architecture(cfg, space)["kernel_sizes"] == [3, 4, 5]
    # every family of the default space, at its first and last choices, builds and predicts
    default = load_space(None)
    flat = tune_space(default)
    for pick in (0, -1):
        cfg = {k: (v.categories[pick] if hasattr(v, "categories") else v) for k, v in flat.items()}
        for fam in default["families"]:
            arch = {k: v for k, v in architecture({**cfg, "family": fam}, default).items() if k != "architecture"}
            model = SMALL_STUDENTS[fam](vocab_size=30, **arch)
            assert model(torch.tensor([[5, 6, 7]])).logits.shape == (1, 2)
    (tmp_path / "heads.yaml").write_text("tinytransformer: {width: [96, 64], heads: [3]}\n")
    with pytest.raises(ValueError, match="width 64 does not split into 3 heads"):
        load_space(tmp_path / "heads.yaml")
    (tmp_path / "bad.yaml").write_text("cellcnn: {ops: [conv3, sepconv3]}\n")
    with pytest.raises(ValueError, match="cellcnn op 'sepconv3'"):
        load_space(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("bilstm: {layers: [1, 2]}\n")
    with pytest.raises(ValueError, match="bilstm.layers is not a setting"):
        load_space(tmp_path / "bad2.yaml")


def test_front_and_hypervolume():
    trials = [{"dev_accuracy": a, "latency_ms": l} for a, l in ((0.7, 1.0), (0.8, 2.0), (0.75, 3.0), (0.6, 0.5))]
    front = pareto_front(trials)
    assert [(t["dev_accuracy"], t["latency_ms"]) for t in front] == [(0.6, 0.5), (0.7, 1.0), (0.8, 2.0)]
    assert hypervolume(front, 3.0) == pytest.approx(0.6 * 0.5 + 0.7 * 1.0 + 0.8 * 1.0)
    assert hypervolume(front[:2], 3.0) < hypervolume(front, 3.0)


def test_held_out_slice_is_fixed():
    ids = torch.arange(10_000).numpy()
    a, b = is_held_out(ids, 0.1), is_held_out(ids, 0.1)
    assert (a == b).all() and 800 < a.sum() < 1200


# --------------------------------------------------------------------------------------------- #
# a real search
# --------------------------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A classifier's task-logit cache and a token-table student; the teacher is then moved away
    (kept aside only for `init-student` below), so a trial that tried to load it would fail."""
    from kdcache.pipeline.student.small import init_small_student
    from kdcache.pipeline.teacher_pass.config import CacheConfig
    from kdcache.pipeline.teacher_pass.run import run_cache_pass

    root = tmp_path_factory.mktemp("search")
    corpus = tiny_corpus(root / "c.jsonl", docs=80)
    clf = make_teacher(root / "clf", "classifier", layers=2)
    run_cache_pass(CacheConfig(out=str(root / "cache"), teacher=clf, corpus=[corpus], mode="examples",
                               label_field="label", max_length=16, batch_size=8, shard_tokens=16 * 16, progress=False),
                   executor="local", log=lambda *_: None)
    init_small_student(clf, root / "table", "cnn", filters=4)  # the teacher's width: a plain copy of its table
    shutil.move(clf, root / "aside")
    (root / "space.yaml").write_text(SPACE)
    out = root / "out"
    rc = main(["search", "--cache", str(root / "cache"), "--space", str(root / "space.yaml"), "--out", str(out),
               "--trials", "4", "--max-concurrent", "2", "--cpus-per-trial", "0.5", "--embeddings", str(root / "table"),
               "--final-top", "1", "--final-seeds", "2", "--latency-target-ms", "0.5", "--json",
               # after the search only: the retrained students beside the teacher (its folder under a new name)
               "--eval-task", str(corpus), "--eval-teacher", str(root / "aside")])
    assert rc == 0
    return root


@pytest.mark.slow
@pytest.mark.ray
def test_search_writes_trials_front_best_and_final(searched):
    out = searched / "out"
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 4 and all(t["status"] == "TERMINATED" for t in trials)
    assert all(0 <= t["dev_accuracy"] <= 1 and t["latency_ms"] > 0 and t["params"] > 0 for t in trials)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["score"] == max(t["score"] for t in trials)
    assert (out / "front.png").stat().st_size > 1000 and "| trial |" in (out / "front.md").read_text()
    # the best student loads as it is, and init-student rebuilds its architecture on the teacher
    best = load_small_student(out / "best")
    arch = json.loads((out / "best" / "architecture.json").read_text())
    assert type(best).__name__.lower().startswith(arch["architecture"][:3])
    rc = main(["init-student", "--architecture-config", str(out / "best" / "architecture.json"), "--teacher",
               str(searched / "aside"), "--out", str(searched / "rebuilt")])
    assert rc == 0
    rebuilt = load_small_student(searched / "rebuilt")
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in best.parameters())
    final = summary["final"][0]
    assert final["seeds"] == 2 and len(final["dev_accuracy_seeds"]) == 2
    for folder in final["students"]:
        load_small_student(folder)
    assert len(final["test_accuracy_seeds"]) == 2 and final["speedup_batch32"] > 0
    assert "| teacher |" in (out / "eval" / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.ray
def test_final_seed_of_the_search_is_the_trial_itself_and_equals_a_retraining(searched, tmp_path):
    """Seed 0 of the final retraining adopts the trial's own run when it ran every step with that
    seed; training the candidate again from scratch gives the same weights."""
    from kdcache.pipeline.student.search.trial import SearchSetup, fit_candidate

    out = searched / "out"
    final = json.loads((out / "summary.json").read_text())["final"][0]
    trial = next(t for t in map(json.loads, (out / "trials.jsonl").read_text().splitlines())
                 if t["trial_id"] == final["trial_id"])
    seed0 = json.loads((out / "final" / f"{trial['trial_id']}-seed0" / "metrics.json").read_text())
    if trial["stopped_early"]:
        pytest.skip("the best trial was stopped early by ASHA: its seed 0 was retrained")
    assert seed0["from_trial"] == trial["trial_id"] and seed0["dev_accuracy"] == trial["dev_accuracy"]
    setup = SearchSetup(cache=str(searched / "cache"), space=json.loads((out / "space.yaml").read_text()),
                        out=str(out), embeddings=str(searched / "table"), latency_target_ms=0.5)
    again = fit_candidate(trial["architecture"], trial["training"], setup, 0, tmp_path)
    assert again["dev_accuracy"] == trial["dev_accuracy"]
    adopted = load_small_student(final["students"][0]).state_dict()
    for name, value in load_small_student(tmp_path / "student").state_dict().items():
        assert torch.equal(value, adopted[name]), name


def _reports(result):
    return [json.loads(line) for line in result.read_text().splitlines() if line.strip()]


def _finished_trials(tune_dir, steps):
    """Trial folder -> its reported steps, for trials whose last report reached `steps`."""
    done = {}
    for result in tune_dir.glob("*/result.json"):
        reported = [r["step"] for r in _reports(result)]
        if reported and reported[-1] == steps:
            done[result.parent.name] = reported
    return done


@pytest.mark.slow
@pytest.mark.ray
def test_an_interrupted_search_continues_without_rerunning_finished_trials(searched):
    """Ctrl+C once a trial has finished: the command says how to continue and exits 130; the same
    command again restores Tune's experiment, keeps the finished trial (its results are not
    reported twice) and completes the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (searched / "long.yaml").write_text(SPACE.replace("steps: 30", "steps: 150"))
    out = searched / "interrupted"
    cmd = [sys.executable, "-m", "kdcache.pipeline.cli.main", "search", "--cache", str(searched / "cache"),
           "--space", str(searched / "long.yaml"), "--out", str(out), "--trials", "3", "--max-concurrent", "1",
           "--scheduler", "fifo", "--final-top", "0"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 300
    while not _finished_trials(out / "tune", 150) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)
    said = first.communicate(timeout=300)[0]
    assert first.returncode == 130, said
    assert "run the same command again to continue" in said and not (out / "trials.jsonl").exists()
    kept = _finished_trials(out / "tune", 150)
    assert len(kept) >= 1

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "continuing the search" in second.stdout
    assert "Configuration for experiment" not in second.stdout  # Tune's prints go to the log file
    after = _finished_trials(out / "tune", 150)
    assert len(after) == 3
    for name, steps in kept.items():
        assert after[name] == steps  # the finished trial did not run (or report) again
    for name, steps in after.items():
        # A resumed trial continues from the last checkpoint in Tune's saved state: the reports between
        # that checkpoint and Ctrl+C may come again (Tune logged them before its snapshot), but never
        # from an earlier step, and a redone report equals the first (the run resumes exactly).
        assert steps == sorted(steps) and sorted(set(steps)) == list(range(10, 151, 10)), steps
        first_seen = {}
        for r in _reports(out / "tune" / name / "result.json"):
            seen = first_seen.setdefault(r["step"], r)
            assert (r["loss"], r["dev_accuracy"]) == (seen["loss"], seen["dev_accuracy"]), (name, r["step"])
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 3 and all(t["status"] == "TERMINATED" and t["step"] == 150 for t in trials)
