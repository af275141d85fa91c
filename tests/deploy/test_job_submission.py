"""deploy/submit.sh against a real Ray head: `ray start --head` on loopback (its own ports and temp
dir, so it cannot collide with any other Ray cluster on the machine), `ray job submit` of a small
teacher pass and a small training run, both waited on until SUCCEEDED, the outputs checked from
outside the cluster, and the head stopped.

The head is stopped by ending the `ray start --block` process the test started, which shuts down
exactly the processes of that head (what `ray stop` does, minus `ray stop`'s habit of killing every
Ray process on the machine, other tests' clusters included); a finaliser then kills by pid anything
of that process tree still alive.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.s3server import free_port, wait_for_http
from tests.support import make_teacher, tiny_corpus

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # workers use the Python that started the head: this environment's


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with the dashboard (job API) on 127.0.0.1; yields (env for clients, dashboard URL)."""
    temp_dir = tempfile.mkdtemp(prefix="kdr", dir="/tmp")  # short: Ray's socket paths live under it
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port", "object-manager-port",
                                            "node-manager-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                            "metrics-export-port")}
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           *[f"--{k}={v}" for k, v in ports.items()], "--num-cpus=2", f"--object-store-memory={200 * 2**20}",
           f"--temp-dir={temp_dir}", "--include-dashboard=true", "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray-start.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        wait_for_http(dashboard + "/api/version", head, 180, "ray head", Path(log.name))  # a 401 (token) is up
        yield dict(env, RAY_ADDRESS=dashboard), dashboard
    finally:
        started = _descendants(head.pid)
        head.send_signal(signal.SIGTERM)  # `ray start --block` then stops its own processes
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in started):
            time.sleep(0.5)
        for pid in started:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()


def _submit(env: dict, job_id: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "deploy/submit.sh", *args], cwd=ROOT, env=dict(env, KDCACHE_JOB_ID=job_id),
                          capture_output=True, text=True, timeout=600)


def _status(env: dict, job_id: str) -> str:
    """The job's final state as `ray job status` reports it: SUCCEEDED, FAILED, ..."""
    r = subprocess.run([str(BIN / "ray"), "job", "status", job_id], env=env, capture_output=True, text=True,
                       timeout=120)
    found = re.search(rf"Job '{re.escape(job_id)}' (\w+)", r.stdout + r.stderr)
    assert found, r.stdout + r.stderr
    return found.group(1).upper()


def test_cache_and_train_jobs_submitted_to_a_running_cluster(ray_head, tmp_path):
    from transformers import AutoModelForMaskedLM

    from kdcache.pipeline.student.models import init_student_from_teacher

    env, dashboard = ray_head
    teacher = make_teacher(tmp_path / "teacher", "masked-lm")
    corpus = tiny_corpus(tmp_path / "corpus.jsonl", docs=40)
    cache = tmp_path / "cache"

    t0 = time.time()
    r = _submit(env, "kdcache-test-cache", "cache", "--teacher", teacher, "--corpus", corpus, "--out", str(cache),
                "--max-length", "16", "--batch-size", "8", "--shard-tokens", "128", "--top-k", "4",
                "--hidden-layers", "2", "--actors", "2", "--cpus-per-actor", "0.5", "--no-progress")
    cache_s = time.time() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "Job 'kdcache-test-cache' succeeded" in r.stdout + r.stderr
    assert _status(env, "kdcache-test-cache") == "SUCCEEDED"
    # The job joined the cluster it was submitted to (RAY_ADDRESS inside the job); it started none.
    logs = r.stdout + r.stderr
    assert "joined the Ray cluster at" in logs and "started a local Ray cluster" not in logs

    verify = subprocess.run([str(BIN / "kdcache"), "verify", str(cache)], capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    manifest = json.loads((cache / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 2

    init_student_from_teacher(teacher, tmp_path / "student", num_layers=1)
    t0 = time.time()
    r = _submit(env, "kdcache-test-train", "train", "--cache", str(cache), "--student", str(tmp_path / "student"),
                "--out", str(tmp_path / "run"), "--recipe", "distilbert", "--steps", "3", "--batch-size", "4",
                "--workers", "1", "--no-progress", "warmup_ratio=0")
    train_s = time.time() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert _status(env, "kdcache-test-train") == "SUCCEEDED"
    assert "joined the Ray cluster at" in r.stdout + r.stderr and "started a local Ray cluster" not in r.stdout + r.stderr

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3
    model = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "run" / "student"))
    assert model.config.num_hidden_layers == 1
    print(f"\njob submission: cache job {cache_s:.1f} s, train job {train_s:.1f} s (incl. submit + wait)")


def test_failed_job_reports_failed_and_a_nonzero_exit(ray_head, tmp_path):
    env, _ = ray_head
    r = _submit(env, "kdcache-test-bad", "verify", str(tmp_path / "no-such-cache"))
    assert r.returncode != 0
    assert _status(env, "kdcache-test-bad") == "FAILED"
