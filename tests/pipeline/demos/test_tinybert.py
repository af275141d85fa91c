"""README command 1 in its quick profile: real teacher, real text, Ray actors, Ray Train, offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
@pytest.mark.ray
# two demo runs: 702 s on a quiet 2-core machine (docs/performance.md); the suite's 900 s default
# would fail a slower machine of the same kind
@pytest.mark.timeout(2400)
def test_demo_quick_runs_both_stages_evaluates_and_reuses_its_work(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "kdcache.pipeline.cli.main", "demo", "--quick", "--out", str(out), "--json"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = json.loads(first.stdout.strip().splitlines()[-1])
    # The evaluation JSON: every key scripts rely on, measured on the held-out test split.
    for key in ("teacher_params", "student_params", "speedup_batch1", "speedup_batch32", "quality_retained",
                "baseline_quality_retained"):
        assert isinstance(report[key], (int, float)), key
    assert report["teacher_params"] > 2 * report["student_params"]
    assert report["test_examples"] == 400 and report["teacher_pass_forward_calls"] > 0
    models = report["models"]
    assert set(models) == {"teacher", "student", "baseline", "bilstm", "bilstm baseline (no KD)", "cnn",
                           "cnn baseline (no KD)", "searched", "mobilebert", "mobilebert baseline (no KD)"}
    assert models["student"]["params"] == models["baseline"]["params"]  # same shape
    # The seed's table from one teacher pass: every student keyed, with the same figures.
    students = report["students"]
    assert set(students) == {"tinybert", "mobilebert", "bilstm", "cnn", "searched"}
    for name, s in students.items():
        for key in ("params", "speedup_batch1", "speedup_batch32", "quality_retained", "baseline_quality_retained"):
            assert isinstance(s[key], (int, float)) or (name, key) == ("searched", "baseline_quality_retained"), \
                (name, key)
        assert s["targets_met"] and all(isinstance(v, bool) for v in s["targets_met"].values())
    for arch in ("bilstm", "cnn"):
        assert students[arch]["params"] == models[arch]["params"] > models[arch]["params_without_embeddings"]
        assert models[arch]["architecture"] == arch and students[arch]["speedup_batch32"] > 1
    # MobileBERT: the teacher's depth and width between blocks, >= 2.5x fewer parameters, its baseline the same shape
    mobile = students["mobilebert"]
    assert models["mobilebert"]["architecture"] == "mobilebert" and models["mobilebert"]["hidden_size"] == 384
    assert models["mobilebert"]["layers"] == 6 and mobile["size_ratio"] >= 2.5
    assert models["mobilebert baseline (no KD)"]["params"] == mobile["params"]
    assert set(mobile["targets_met"]) == {"size_ratio", "speedup_batch32", "quality_retained", "above_baseline",
                                          "progressive_at_least_auxiliary"}
    assert isinstance(mobile["auxiliary_kt_accuracy"], float)
    progressive = [json.loads(x) for x in (out / "mobilebert" / "general-progressive" / "metrics.jsonl")
                   .read_text().splitlines()]
    assert [r["phase"] for r in progressive][::2] == ["embeddings", *(f"layer {i}" for i in range(1, 7))]
    assert set(json.loads((out / "mobilebert" / "baseline" / "summary.json").read_text())["loss_weights"]) == {"ce"}
    # the searched student: two 4-trial searches over the transfer-set cache, the best retrained
    found = students["searched"]
    assert found["baseline_quality_retained"] is None and found["trials"] == {"optuna": 4, "random": 4}
    assert set(found["targets_met"]) == {"speedup_batch32", "within_3_points", "on_or_beyond_hand_designed_front",
                                         "optuna_beats_random"}
    assert models["searched"]["params"] == found["params"] and found["family"] in ("cellcnn", "cnn", "bilstm",
                                                                                    "tinytransformer")
    for search in ("search", "search-random"):
        assert len((out / search / "trials.jsonl").read_text().splitlines()) == 4
    assert (out / "report" / "search_front.png").stat().st_size > 0 and report["smoke_test"] is True
    aug = report["augmentation"]
    assert aug["replacer"] == "frequency-band" and aug["originals"] == 800 and aug["augmented"] > 800
    rows = [json.loads(x) for x in (out / "small" / "cnn-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 100 and set(json.loads((out / "small" / "cnn-baseline-seed0" / "summary.json").read_text())
                                    ["loss_weights"]) == {"ce"}
    for run, steps in (("general", 40), ("task-intermediate", 25), ("task-pred", 50), ("baseline", 75)):
        rows = [json.loads(x) for x in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, steps + 1)), run
        if run in ("general", "task-intermediate"):  # the MSE losses fall fast; quick's task runs are too short
            first, last = (sum(r["loss"] for r in part) / 5 for part in (rows[:5], rows[-5:]))
            assert last < 0.8 * first, run
    text = (out / "report" / "report.md").read_text()
    assert report["headline"] in text and "keeps" in report["headline"]
    assert "## Low-resource students" in text and "| cnn baseline (no KD) |" in text
    assert "## MobileBERT" in text and "| mobilebert baseline (no KD) |" in text
    assert "## Searched student" in text and "Quick profile: a smoke test" in text.split("## Targets")[0]
    assert (out / "report" / "size_speed_quality.png").stat().st_size > 0
    assert (out / "report" / "training_curves.png").stat().st_size > 0
    # Splits are disjoint: no test text was distilled on.
    texts = {s: {json.loads(x)["text"] for x in (out / "data" / f"{s}-{n}.jsonl").read_text().splitlines()}
             for s, n in (("train", 800), ("test", 400))}
    assert not texts["train"] & texts["test"]
    # Again: every cache, the fine-tuned teacher and the finished runs are reused; no teacher inference.
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads(second.stdout.strip().splitlines()[-1])
    assert again["teacher_pass_forward_calls"] == 0 and "no new inference" in second.stdout
    assert "already fine-tuned" in second.stdout and "optuna search: finished earlier, reused" in second.stdout
    assert again["models"]["student"]["accuracy"] == models["student"]["accuracy"]
