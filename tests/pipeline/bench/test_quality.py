"""`kdcache bench quality` on a tiny causal-LM teacher: the cached and the online-KD run of one
student see the same batches and the same targets up to the codec's rounding, and the report
carries finite, positive held-out KL figures. (The real SmolLM2 run is in docs/performance.md.)"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import make_teacher, tiny_corpus

ROOT = Path(__file__).resolve().parents[3]
STEPS, BATCH, SEQ_LEN = 4, 4, 16


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    path = tiny_corpus(tmp_path_factory.mktemp("corpus") / "c.jsonl", docs=120, words_per_doc=(20, 60))
    return [json.loads(line)["text"] for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def result(tmp_path_factory, texts):
    from kdcache.pipeline.bench.quality import measure_quality

    root = tmp_path_factory.mktemp("quality")
    teacher = make_teacher(root / "teacher", "causal-lm", layers=2, hidden=32, heads=4)
    return measure_quality(teacher, texts[:80], texts[80:], root / "work", steps=STEPS, batch_size=BATCH,
                           seq_len=SEQ_LEN, train_sequences=12, eval_sequences=8, top_k=8, student_layers=1)


def test_report_has_finite_positive_kl_for_both_students(result):
    for key in ("eval_kl_cached", "eval_kl_online", "relative_gap", "steps", "teacher", "tokens_trained",
                "ppl_teacher", "ppl_cached", "ppl_online"):
        assert key in result, key
    kl_c, kl_o = result["eval_kl_cached"], result["eval_kl_online"]
    assert math.isfinite(kl_c) and kl_c > 0 and math.isfinite(kl_o) and kl_o > 0
    assert result["relative_gap"] == pytest.approx(abs(kl_c - kl_o) / kl_o)
    assert result["steps"] == STEPS
    assert result["tokens_trained"] == STEPS * BATCH * SEQ_LEN  # packed sequences: every slot a real token
    assert result["eval_tokens"] == 8 * SEQ_LEN
    for key in ("ppl_teacher", "ppl_cached", "ppl_online"):
        assert math.isfinite(result[key]) and result[key] > 1
    # Training moved the students away from their common starting point.
    assert kl_c != result["eval_kl_initial"] and kl_o != result["eval_kl_initial"]
    json.dumps(result)  # the --json line


def test_both_runs_saw_the_same_batches_and_targets(result):
    # Two independent streams over the cache (targets read vs input ids only): same rows, same order.
    assert result["same_batches"]
    # Same student, same batch, targets equal up to pow-q8 rounding: the first losses agree closely
    # (a different batch, temperature or tail handling moves them by far more).
    a, b = result["first_step_loss_cached"], result["first_step_loss_online"]
    assert a == pytest.approx(b, rel=1e-3)
    assert result["max_step_loss_relative_gap"] < 1e-2
    tc = result["target_check"]
    assert tc["ids_equal"] == 1.0  # the codec stores ids exactly
    assert tc["log_tail_max_abs_diff"] < 0.01  # float16 tail vs float32
    assert 0 <= tc["rounding_kl_per_token"] < 1e-3  # the codec's budget is ~1e-4 nats/token


def test_overlapping_eval_text_is_refused(tmp_path, texts):
    from kdcache.pipeline.bench.quality import measure_quality

    with pytest.raises(ValueError, match="overlap"):
        measure_quality(str(tmp_path / "unused"), texts[:10], texts[5:15], tmp_path / "work")


def test_cli_registers_bench_quality():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "kdcache.pipeline.cli.main", "bench", "quality", "--help"], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--steps", "--json", "--top-k", "--train-sequences", "--eval-sequences"):
        assert flag in proc.stdout
