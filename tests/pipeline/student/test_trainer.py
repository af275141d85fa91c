"""Training students from a cache (kdcache.pipeline.student.trainer): tiny teachers and caches, the teacher folder deleted
before any training, the in-process loop for most checks and a few real Ray Train runs.

Test hook used here: `fail_at_step=N[,M...]` (with `fail_rank`, default 0) makes that rank raise just
before step N, once per run folder (a marker file in --out), to exercise Ray Train's FailureConfig and
the resume path. It is a TrainConfig key like any other, inert unless set.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import pytest

from kdcache.pipeline.common import allocator
from kdcache.pipeline.student.trainer import train, validate
from kdcache.pipeline.student.trainer.driver import normalize
from kdcache.pipeline.student.trainer.plan import CompatibilityError
from kdcache.pipeline.student.config import load_train_config
from kdcache.storage import CacheReader, ColumnError, assign
from tests.support import WORDS, llama_tokenizer, make_teacher, run_metrics as _metrics, run_samples as _samples, tiny_corpus

BATCH = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two caches of one masked-LM teacher, three students; then the teacher folder is deleted."""
    from kdcache.pipeline.teacher_pass.run import run_cache_pass
    from kdcache.pipeline.teacher_pass.config import CacheConfig
    from kdcache.pipeline.student.models import init_student_from_teacher

    root = tmp_path_factory.mktemp("train")
    teacher = make_teacher(root / "teacher", "masked-lm", layers=4, hidden=32, heads=4)
    corpus = tiny_corpus(root / "corpus.jsonl", docs=60)
    common = dict(teacher=teacher, corpus=[corpus], max_length=16, batch_size=8, shard_tokens=16 * 12,
                  progress=False)
    # everything: top-k, every hidden layer and attention map
    run_cache_pass(CacheConfig(out=str(root / "cache"), top_k=8, hidden_layers="all", attention_layers="all",
                               **common), executor="local", log=lambda *_: None)
    # no soft targets, only the last hidden layer
    run_cache_pass(CacheConfig(out=str(root / "cache_small"), top_k=0, hidden_layers="4", **common),
                   executor="local", log=lambda *_: None)
    init_student_from_teacher(teacher, root / "student", num_layers=2)  # copy mode: blocks 0 and 3
    init_student_from_teacher(teacher, root / "narrow", num_layers=2, hidden_size=16, num_heads=2, seed=1)
    shutil.rmtree(teacher)  # from here on nothing can load the teacher
    assert not Path(teacher).exists()
    return root


def _cfg(root: Path, out: str, recipe: str = "distilbert", student: str = "student", cache: str = "cache",
         **flags):
    overrides = flags.pop("overrides", [])
    base = {"cache": str(root / cache), "student": str(root / student), "out": str(root / out),
            "batch_size": BATCH, "progress": False, **flags}
    return load_train_config(recipe, None, base, ["warmup_ratio=0", "lr=2e-3", *overrides])


def _assigned_ids(reader, rank: int, world: int) -> list[int]:
    """Sample ids of rank's epoch-0 rows under the row-group assignment (ids read from the spans)."""
    spans = assign(reader.row_groups(), world, BATCH).spans[rank]
    return [int(i) for b in reader.read_spans(spans, ["sample_id"]) for i in b.column("sample_id").to_numpy()]


# --------------------------------------------------------------------------------------------- #
# in-process loop (--no-ray)
# --------------------------------------------------------------------------------------------- #


def test_losses_decrease_and_student_loads_without_teacher(setup):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    summary = train(_cfg(setup, "run_dec", no_ray=True, steps=40, overrides=["checkpoint_every=20"]),
                    log=lambda *_: None)
    rows = _metrics(setup / "run_dec")
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert {"loss", "loss_kd", "loss_mlm", "loss_cos", "lr", "tokens_per_s"} <= set(rows[0])
    first, last = rows[:5], rows[-5:]
    for key in ("loss", "loss_kd"):
        assert sum(r[key] for r in last) < 0.9 * sum(r[key] for r in first), key
    assert summary["steps"] == 40 and summary["resumed_from_step"] == 0
    # only the columns the losses read
    assert "attention_1" not in summary["columns"] and "hidden_2" not in summary["columns"]
    student = AutoModelForMaskedLM.from_pretrained(str(setup / "run_dec" / "student"))
    tok = AutoTokenizer.from_pretrained(str(setup / "run_dec" / "student"))
    assert student.config.num_hidden_layers == 2 and len(tok) == student.config.vocab_size
    assert list((setup / "run_dec" / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("kd_positions", ["all", "masked"])
def test_head_only_where_read_trains_like_the_full_logits(setup, kd_positions):
    """`kdcache train` with the head on the losses' rows, chunked (logit_chunk=3), and with the
    model's own head at every position: the same losses step after step, the same student."""
    from safetensors.torch import load_file

    runs = {}
    for name, extra in (("full", ["full_logits=true"]), ("rows", ["logit_chunk=3"])):
        out = f"head_{kd_positions}_{name}"
        train(_cfg(setup, out, no_ray=True, steps=4, kd_positions=kd_positions, overrides=extra), log=lambda *_: None)
        runs[name] = (_metrics(setup / out), load_file(str(setup / out / "student" / "model.safetensors")))
    (full_rows, full_w), (rows, w) = runs["full"], runs["rows"]
    for a, b in zip(full_rows, rows, strict=True):
        for key in ("loss", "loss_kd", "loss_mlm", "loss_cos"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4), (a["step"], key, a[key], b[key])
    for k in full_w:
        assert (full_w[k] - w[k]).abs().max() < 1e-4, k


def test_in_process_resume_is_exact_across_epochs(setup):
    """Crash after a checkpoint, re-run: the same losses and rows as one uninterrupted run (shuffled
    row-group order, a resume in the middle of a shuffle window, an epoch boundary and a short last
    batch included)."""
    rows = CacheReader(str(setup / "cache")).manifest.rows
    steps = math.ceil(rows / 5) + 3
    # batches span row groups and shards; the step-4 checkpoint (row 20) falls inside the third 7-row window
    extra = ["shuffle=true", "shuffle_buffer=7", "log_samples=true", "checkpoint_every=4", "batch_size=5"]
    train(_cfg(setup, "ref", no_ray=True, steps=steps, overrides=extra), log=lambda *_: None)
    crashed = _cfg(setup, "crash", no_ray=True, steps=steps, overrides=[*extra, "fail_at_step=7"])
    with pytest.raises(RuntimeError, match="injected failure before step 7"):
        train(crashed, log=lambda *_: None)
    said: list[str] = []
    summary = train(crashed, log=said.append)
    assert summary["resumed_from_step"] == 4 and "resuming" in said[1]
    assert said[0] == f"data: {rows} rows in 17 row groups of 9 shard(s) -> 1 worker(s): rows per worker [{rows}], " \
                      f"{math.ceil(rows / 5)} batches each per epoch"
    ref, got = _metrics(setup / "ref"), _metrics(setup / "crash")
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
    assert _samples(setup / "ref", 0) == _samples(setup / "crash", 0)
    samples = _samples(setup / "crash", 0)
    assert {s["epoch"] for s in samples} == {0, 1} and rows % 5 and len(samples[-4]["sample_ids"]) == rows % 5
    seen = [i for s in samples if s["epoch"] == 0 for i in s["sample_ids"]]
    assert sorted(seen) == list(range(rows))
    # a different batch size cannot continue these data positions
    with pytest.raises(CompatibilityError, match="batch_size"):
        validate(_cfg(setup, "crash", no_ray=True, steps=steps, overrides=[*extra, "batch_size=3"]))


def test_tinybert_general_with_projection_and_masked_kd(setup):
    # narrower student: emb/hidden losses get a learned projection (16 -> 32), attention heads averaged
    cfg = _cfg(setup, "run_tiny", recipe="tinybert-general", student="narrow", no_ray=True, steps=6,
               overrides=["average_heads=true"])
    report = validate(cfg)
    assert report["projection"] and report["layer_map"] == [(0, 0), (1, 2), (2, 4)]
    assert set(report["loss_weights"]) == {"emb", "hidden", "attn"}
    summary = train(cfg, log=lambda *_: None)
    assert math.isfinite(summary["final_loss"])
    # KD restricted to the cached mask positions
    cfg = _cfg(setup, "run_masked", no_ray=True, steps=3, kd_positions="masked")
    assert math.isfinite(train(cfg, log=lambda *_: None)["final_metrics"]["loss_kd"])


def test_lm_and_task_recipes(tmp_path):
    """lm follows the cache's targets (top-k -> kd at T=2, RS-KD -> rskd at T=1); tinybert-task reads
    only the classifier teacher's task logits."""
    from kdcache.pipeline.teacher_pass.run import run_cache_pass
    from kdcache.pipeline.teacher_pass.config import CacheConfig
    from kdcache.pipeline.student.models import init_student_from_teacher

    corpus = tiny_corpus(tmp_path / "c.jsonl", docs=30)
    lm = make_teacher(tmp_path / "lm", "causal-lm", layers=2)
    clf = make_teacher(tmp_path / "clf", "classifier", layers=2)
    common = dict(corpus=[corpus], max_length=16, batch_size=8, progress=False)
    for out, kw in (("c_topk", dict(teacher=lm, top_k=8, hidden_layers="2")),
                    ("c_rskd", dict(teacher=lm, sample=8, hidden_layers="2")),
                    ("c_clf", dict(teacher=clf, mode="examples", label_field="label"))):
        run_cache_pass(CacheConfig(out=str(tmp_path / out), **kw, **common), executor="local", log=lambda *_: None)
    init_student_from_teacher(lm, tmp_path / "s_lm", num_layers=1)
    init_student_from_teacher(clf, tmp_path / "s_clf", num_layers=1)
    shutil.rmtree(lm)
    shutil.rmtree(clf)
    expect = {"c_topk": ({"kd", "clm", "cos"}, 2.0), "c_rskd": ({"rskd", "clm", "cos"}, 1.0), "c_clf": ({"pred"}, 1.0)}
    for recipe, cache, student in (("lm", "c_topk", "s_lm"), ("lm", "c_rskd", "s_lm"),
                                   ("tinybert-task", "c_clf", "s_clf")):
        cfg = _cfg(tmp_path, f"run_{cache}", recipe=recipe, student=student, cache=cache, no_ray=True, steps=3)
        report = validate(cfg)
        assert (set(report["loss_weights"]), report["temperature"]) == expect[cache]
        assert math.isfinite(train(cfg, log=lambda *_: None)["final_loss"])
    assert report["columns"] == ["sample_id", "length", "input_ids", "task_logits"]
    with pytest.raises(CompatibilityError, match="rskd needs temperature 1.0"):
        validate(_cfg(tmp_path, "x", recipe="lm", student="s_lm", cache="c_rskd", temperature=2.0))


class GRUStudent:
    """A non-transformer student: only forward(input_ids, attention_mask) -> StudentOutputs."""

    @staticmethod
    def make(config: dict):
        import torch.nn as nn

        from kdcache.pipeline.student.trainer.adapter import StudentOutputs

        class Net(nn.Module):
            num_layers, hidden_size, vocab_size = 1, 32, len(WORDS) + 5

            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(self.vocab_size, 32)
                self.rnn = nn.GRU(32, 32, batch_first=True)
                self.head = nn.Linear(32, self.vocab_size)

            def forward(self, input_ids, attention_mask):
                e = self.emb(input_ids.long())
                h, _ = self.rnn(e)
                return StudentOutputs(logits=self.head(h), hidden_states=(e, h))

        return Net()


def make_gru_student(config: dict):
    return GRUStudent.make(config)


def test_non_transformer_student(setup):
    cfg = _cfg(setup, "run_gru", no_ray=True, steps=25, cos_layer="1:4",
               overrides=["student_factory=tests.pipeline.student.test_trainer:make_gru_student", "lr=1e-2"])
    train(cfg, log=lambda *_: None)
    rows = _metrics(setup / "run_gru")
    assert sum(r["loss"] for r in rows[-5:]) < sum(r["loss"] for r in rows[:5])
    assert (setup / "run_gru" / "student" / "student.pt").exists()


@pytest.mark.gpu
def test_cuda_training_and_resume(setup):
    """use_gpu in-process: bf16 autocast, checkpoints written from CUDA tensors, resume onto the GPU."""
    import torch

    extra = ["checkpoint_every=3", "log_samples=true"]
    train(_cfg(setup, "gpu_ref", no_ray=True, use_gpu=True, steps=8, overrides=extra), log=lambda *_: None)
    crashed = _cfg(setup, "gpu_crash", no_ray=True, use_gpu=True, steps=8, overrides=[*extra, "fail_at_step=5"])
    with pytest.raises(RuntimeError, match="injected failure"):
        train(crashed, log=lambda *_: None)
    assert train(crashed, log=lambda *_: None)["resumed_from_step"] == 3
    ref, got = _metrics(setup / "gpu_ref"), _metrics(setup / "gpu_crash")
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(ref, got):  # CUDA kernels (atomics in embedding backward) need not be bitwise repeatable
        assert math.isfinite(b["loss"]) and b["loss"] == pytest.approx(a["loss"], rel=1e-3), a["step"]
    assert _samples(setup / "gpu_ref", 0) == _samples(setup / "gpu_crash", 0)
    state = torch.load(setup / "gpu_crash" / "checkpoints" / "step-00000008" / "model.pt", weights_only=True)
    assert next(iter(state.values())).device.type == "cuda"


def test_fail_at_step_fires_once_per_run_folder(tmp_path):
    """The trainer's switch of the shared fault mechanism: `N` raises on `fail_rank`, once per --out."""
    from kdcache.pipeline.common import faults

    faults.before_step(["3", "5:kill"], 1, 3, 0, str(tmp_path))  # another rank: nothing
    faults.before_step(["3", "5:kill"], 1, 4, 1, str(tmp_path))  # another step: nothing
    with pytest.raises(RuntimeError, match="injected failure before step 3 on rank 1 \\(fail_at_step\\)"):
        faults.before_step(["3", "5:kill"], 1, 3, 1, str(tmp_path))
    faults.before_step(["3", "5:kill"], 1, 3, 1, str(tmp_path))  # the resumed attempt goes past it
    assert (tmp_path / ".fail-at-step-3-rank-1").exists()


# --------------------------------------------------------------------------------------------- #
# compatibility checks, before step 1
# --------------------------------------------------------------------------------------------- #


def test_tokenizer_mismatch_and_missing_tokenizer(setup, tmp_path):
    other = tmp_path / "other_tok"
    shutil.copytree(setup / "student", other)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (other / f).unlink(missing_ok=True)
    with pytest.raises(CompatibilityError, match="no loadable tokenizer.*check_tokenizer=false"):
        validate(_cfg(setup, "x", student=str(other)))
    llama_tokenizer().save_pretrained(str(other))
    with pytest.raises(CompatibilityError, match="tokenizer .* differs from the one the cache was made with"):
        validate(_cfg(setup, "x", student=str(other)))
    assert validate(_cfg(setup, "x", student=str(other), overrides=["check_tokenizer=false"]))["ok"]


def test_width_and_head_mismatches(setup):
    with pytest.raises(CompatibilityError, match="'cos'.*equal widths.*loss_weights.cos=0"):
        validate(_cfg(setup, "x", student="narrow"))
    with pytest.raises(CompatibilityError, match="2 heads and the teacher 4.*average_heads=true"):
        validate(_cfg(setup, "x", recipe="tinybert-general", student="narrow"))


def test_missing_column_names_the_loss(setup):
    # the small cache has no top-k targets: the KD term cannot run
    with pytest.raises(ColumnError, match="loss 'kd'.*'none' targets.*topk_"):
        validate(_cfg(setup, "x", cache="cache_small"))
    with pytest.raises(CompatibilityError, match="pred/ce need a classifier student"):
        validate(_cfg(setup, "x", recipe="tinybert-task"))


def test_layer_map_outside_the_cached_layers(setup):
    with pytest.raises(CompatibilityError, match=r"teacher hidden layer 0, but the cache stores hidden layers \[4\]"
                                                 r".*--hidden-layers 0,1,4"):
        validate(_cfg(setup, "x", recipe="tinybert-general", cache="cache_small",
                      overrides=["loss_weights.attn=0"]))
    with pytest.raises(CompatibilityError, match="student layer 5"):
        validate(_cfg(setup, "x", cos_layer="5:4"))
    with pytest.raises(CompatibilityError, match=r"--workers 99: the cache has \d+ row group\(s\) in \d+ shard\(s\), "
                                                 "fewer than the 99 workers asked for"):
        validate(_cfg(setup, "x", workers=99))


def test_cli_validate_and_overrides(setup, capsys, tmp_path):
    from kdcache.pipeline.cli.train import register

    parser = argparse.ArgumentParser(prog="kdcache")
    register(parser.add_subparsers(dest="command"))
    user = tmp_path / "user.yaml"
    user.write_text("recipe: distilbert\nlr: 1.0e-4\nloss_weights: {kd: 1.0}\n")
    args = parser.parse_args(["train", "--cache", str(setup / "cache"), "--student", str(setup / "student"),
                              "--out", str(tmp_path / "run"), "--config", str(user), "--steps", "7",
                              "--validate", "--json", "loss_weights.cos=0", "temperature=3"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # recipe < --config < flags < key=value; dotted keys edit one weight
    assert report["loss_weights"] == {"kd": 1.0, "mlm": 2.0} and report["temperature"] == 3.0
    assert report["steps"] == 7
    with pytest.raises(ValueError, match="unknown key 'bogus'"):
        load_train_config("distilbert", None, {}, ["bogus=1"])
    with pytest.raises(ValueError, match="unknown recipe"):
        load_train_config("nope", None, {}, [])


# --------------------------------------------------------------------------------------------- #
# Ray Train (each fit costs ~15-30 s on 2 cores: few, short runs)
# --------------------------------------------------------------------------------------------- #


def _ray_cfg(setup, out: str, **extra):
    steps = assign(CacheReader(str(setup / "cache")).row_groups(), 2, BATCH).steps + 1  # epoch 0, then one of epoch 1
    overrides = ["checkpoint_every=3", "keep_checkpoints=2", "log_samples=true", "tensorboard=false",
                 *extra.pop("overrides", [])]
    return _cfg(setup, out, workers=2, steps=steps, overrides=overrides, **extra)


@pytest.fixture(scope="module")
def reference_run(setup, ray_cluster):
    """An uninterrupted 2-worker Ray Train run, checkpointing every 3 steps."""
    cfg = normalize(_ray_cfg(setup, "ray_ref"))  # resolved storage_path / run_name
    return cfg, train(cfg, log=lambda *_: None)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_two_workers_checkpoint(setup, reference_run):
    from transformers import AutoModelForMaskedLM

    cfg, summary = reference_run
    run = Path(cfg.out)
    assert summary["steps"] == cfg.steps and summary["resumed_from_step"] == 0
    assert summary["malloc_tuned"] == allocator.enabled()  # CPU workers start with pipeline/common/allocator.py's settings
    ckpts = sorted(p.name for p in (Path(cfg.storage_path) / cfg.run_name).glob("step-*"))
    assert len(ckpts) == 2 and ckpts[-1] == f"step-{cfg.steps:08d}"  # num_to_keep=2, the last step included
    last = Path(cfg.storage_path) / cfg.run_name / ckpts[-1]
    names = {p.name for p in last.iterdir()}
    assert {"model.pt", "optimizer.pt", "scheduler.pt", "loss.pt", "state.json", "rank-00000.json",
            "rank-00001.json", "rng-00000.pt", "rng-00001.pt"} <= names  # both workers' files, merged
    assert [r["step"] for r in _metrics(run)] == list(range(1, cfg.steps + 1))
    assert AutoModelForMaskedLM.from_pretrained(str(run / "student")).config.num_hidden_layers == 2


@pytest.mark.ray
@pytest.mark.slow
def test_ray_failures_resume_exactly(setup, reference_run, capsys):
    """A worker process is SIGKILLed after the step-3 checkpoint: Ray Train restarts the group from it
    (max_failures=1). A second failure (an exception), after the step-6 checkpoint, exhausts
    max_failures and the command fails;
    running the same command again resumes from step 6. Losses and rows equal the uninterrupted run's."""
    from kdcache.pipeline.cli.train import register

    ref_cfg, _ = reference_run
    parser = argparse.ArgumentParser(prog="kdcache")
    register(parser.add_subparsers(dest="command"))
    run = setup / "ray_fail"
    argv = ["train", "--recipe", "distilbert", "--cache", str(setup / "cache"), "--student", str(setup / "student"),
            "--out", str(run), "--workers", "2", "--steps", str(ref_cfg.steps), "--batch-size", str(BATCH),
            "--checkpoint-every", "3", "--max-failures", "1", "--no-progress", "--json", "warmup_ratio=0",
            "lr=2e-3", "log_samples=true", "tensorboard=false", "fail_at_step=5:kill,8", "fail_rank=1"]
    args = parser.parse_args(argv)
    assert args.func(args) == 1  # the second failure is one more than max_failures allows
    assert "re-run the same command" in capsys.readouterr().err
    assert (run / ".fail-at-step-5-rank-1").exists() and (run / ".fail-at-step-8-rank-1").exists()
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["resumed_from_step"] == 6  # so the restarted group had gone on from step 3 to 6

    ref, got = _metrics(Path(ref_cfg.out)), _metrics(run)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, ref_cfg.steps + 1))
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
    reader = CacheReader(str(setup / "cache"))
    for rank in range(2):
        assert _samples(run, rank) == _samples(Path(ref_cfg.out), rank)
        seen = [i for s in _samples(run, rank) if s["epoch"] == 0 for i in s["sample_ids"]]
        assert seen == _assigned_ids(reader, rank, 2)  # each of the rank's rows once, in order: none twice, none skipped


@pytest.mark.ray
@pytest.mark.slow
def test_kdcache_train_screen_shows_kdcache_lines_only(setup):
    """A real `kdcache train` on a Ray Train worker: Ray's worker-prefixed lines (controller, placement-group
    cleaner, checkpoint reports) go to <out>/kdcache.log; the terminal gets the run's own lines and one
    progress bar drawn by the driver."""
    import re
    import subprocess
    import sys

    run = setup / "screen"
    proc = subprocess.run(
        [sys.executable, "-m", "kdcache.pipeline.cli.main", "train", "--recipe", "distilbert",
         "--cache", str(setup / "cache"), "--student", str(setup / "student"), "--out", str(run),
         "--workers", "1", "--steps", "6", "--batch-size", str(BATCH), "--checkpoint-every", "3",
         "tensorboard=false"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "120"})
    screen = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    assert proc.returncode == 0, screen[-3000:]
    prefixed = [line for line in re.split(r"[\r\n]", screen) if re.match(r"\s*\(\w+ pid=\d+", line)]
    assert prefixed == [], prefixed[:5]
    assert f"library and Ray messages: {run / 'kdcache.log'}" in proc.stdout
    assert re.search(r"train: 100%.*6/6", screen), screen[-2000:]  # the worker's bar, drawn by the driver
    logged = (run / "kdcache.log").read_text()
    assert re.search(r"\(\w+ pid=\d+\) ", logged)  # Ray's chatter is kept, in the file
    assert (run / "metrics.jsonl").exists()
