"""README command 1 in its quick profile: real teacher, real text, Ray actors, Ray Train, offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.ray
def test_demo_quick_runs_end_to_end_and_reuses_its_work(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli", "demo", "--quick", "--out", str(tmp_path / "demo"), "--json"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = json.loads(first.stdout.strip().splitlines()[-1])
    assert report["teacher_params"] > 2 * report["student_params"]
    assert report["cache_tokens"] == 256 * 128 and report["teacher_pass_forward_calls"] > 0
    assert report["loss_last"] < report["loss_first"]
    # Again: the cache and the finished run are reused, the teacher is not paid twice.
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads(second.stdout.strip().splitlines()[-1])
    assert again["teacher_pass_forward_calls"] == 0 and "no new inference" in second.stdout
