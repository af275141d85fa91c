"""Faults that kill or starve real processes (docs/reliability.md): the `kdcache` driver SIGKILLed
mid-pass and run again, the disk filling up under a running pass, a corrupted cache under training.

Drivers run as real subprocesses (`python -m kdcache.pipeline.cli.main`), so a SIGKILL is a SIGKILL. A driver
that starts its own Ray cluster leaves Ray's processes behind when it is killed (seen on these machines): every
test takes the list of the driver's descendants just before the kill and ends them by process id.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdcache.storage import CacheReader
from kdcache.storage.verify import verify_cache
from tests.support import make_teacher, tiny_corpus

ROOT = Path(__file__).resolve().parents[2]
KDCACHE = [sys.executable, "-m", "kdcache.pipeline.cli.main"]
BATCH = 2


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KDCACHE_FAULTS", "RAY_ADDRESS"))}
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def _start(args: list, log: Path, **env: str) -> subprocess.Popen:
    out = open(log, "w")
    try:
        return subprocess.Popen([*KDCACHE, *map(str, args)], stdout=out, stderr=subprocess.STDOUT, env=_env(**env),
                                cwd=ROOT)
    finally:
        out.close()  # the child holds its own copy


def _run(args: list, log: Path, timeout: float = 300, **env: str) -> tuple[int, str]:
    proc = _start(args, log, **env)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        _kill_family(proc)
    return rc, log.read_text()


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def _family(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_family(proc: subprocess.Popen, family: list | None = None) -> None:
    """SIGKILL the driver's descendants (Ray's raylet, GCS, workers, actors...) by process id."""
    import psutil

    family = (family or []) + _family(proc.pid)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=15)


def _output(proc: subprocess.Popen, log: Path | None) -> str:
    if log is not None:
        return log.read_text()
    return "".join(proc.communicate()) if proc.poll() is not None else "(still running)"


def _wait_for(what, proc: subprocess.Popen, log: Path | None, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) before the fault point:\n"
                                 f"{_output(proc, log)}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for the fault point:\n{_output(proc, log)}")


def _markers(cache: Path) -> list[str]:
    shards = cache / "shards"
    return sorted(p.name for p in shards.glob("shard-*.json")) if shards.exists() else []


def _temps(cache: Path) -> list[str]:
    shards = cache / "shards"
    return sorted(p.name for p in shards.glob(".tmp-*")) if shards.exists() else []


def _committed(cache: Path) -> set[int]:
    """Shards a re-run must keep: a completion marker whose file is there with the size it records."""
    out = set()
    for name in _markers(cache):
        info = json.loads((cache / "shards" / name).read_text())
        path = cache / info["file"]
        if path.exists() and path.stat().st_size == info["bytes"]:
            out.add(info["index"])
    return out


def _files(cache: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((cache / "shards").glob("*.parquet"))}


def _shard_table(cache: Path) -> list[tuple]:
    m = CacheReader(str(cache)).manifest
    return [(s.file, s.rows, s.tokens, s.bytes, s.checksum, s.sample_id_first, s.sample_id_last)
            for s in sorted(m.shards, key=lambda s: s.index)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher") / "t", "masked-lm")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", docs=40)


# The options of every pass here (YAML keys; `_cache_args` spells them as the command line).
OPTIONS = dict(max_length=16, batch_size=BATCH, shard_tokens=16 * 6, top_k=4, hidden_layers="2",
               topk_calibration_sequences=16)


def _cache_args(teacher: str, corpus: str, out: Path, executor: str) -> list:
    return ["cache", "--teacher", teacher, "--corpus", corpus, "--out", out, "--executor", executor, "--no-progress",
            "--json", *(f"{k}={v}" for k, v in OPTIONS.items())]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher, corpus):
    """An uninterrupted pass (in this process, local executor): the bytes every interrupted pass must end with.
    The teacher pass is deterministic on CPU whatever runs it (local or Ray actors, 1 or 2 torch threads)."""
    from kdcache.pipeline.teacher_pass.run import run_cache_pass
    from kdcache.pipeline.teacher_pass.config import CacheConfig

    out = tmp_path_factory.mktemp("reference") / "cache"
    summary = run_cache_pass(CacheConfig(teacher=teacher, corpus=[corpus], out=str(out), progress=False, **OPTIONS),
                             executor="local", log=lambda *_: None)
    assert summary["shards_total"] >= 6 and summary["forward_calls"] > 0
    return out, summary


# --------------------------------------------------------------------------------------------- #
# 2. the driver SIGKILLed mid-pass, then the same command again
# --------------------------------------------------------------------------------------------- #


@pytest.mark.ray
@pytest.mark.slow
def test_driver_sigkilled_mid_pass_rerun_finishes_only_missing_shards(tmp_path, teacher, corpus, reference):
    """`kdcache cache` (Ray teacher actors, the default executor) killed with SIGKILL inside a shard.
    On the way, the teacher actor working on shard 1 is SIGKILLed too: it is replaced and the shard redone."""
    ref, ref_summary = reference
    total = ref_summary["shards_total"]
    cache = tmp_path / "cache"
    args = _cache_args(teacher, corpus, cache, "ray")
    once = tmp_path / "fired"
    once.mkdir()
    # Every shard pauses mid-way (a temporary file open): the kill lands inside a shard, with some committed.
    proc = _start(args, tmp_path / "killed.log", KDCACHE_FAULTS="stall@*,kill@1", KDCACHE_FAULTS_STALL_S="0.5",
                  KDCACHE_FAULTS_ONCE=str(once))
    family: list = []
    try:
        _wait_for(lambda: len(_markers(cache)) >= 2 and _temps(cache), proc, tmp_path / "killed.log")
        family = _family(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)  # the fault: the driver alone, with no chance to clean up
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        _kill_family(proc, family)

    # What the kill left: no manifest (so no reader accepts the cache), a temporary file, and every
    # file under a final shard name complete.
    assert not (cache / "manifest.json").exists()
    assert _temps(cache), "the kill should have left the in-flight shard's temporary file"
    kept = _committed(cache)
    assert 2 <= len(kept) < total
    assert (once / "fired-kill-1").exists() and {0, 1} <= kept  # the actor's SIGKILL cost only a retry of shard 1
    import pyarrow.parquet as pq

    for name in _files(cache):
        pq.read_metadata(cache / "shards" / name)  # a complete Parquet file, or this raises
    assert verify_cache(str(cache))[0], "verify must refuse a cache without a manifest"

    rc, text = _run(args, tmp_path / "rerun.log")
    assert rc == 0, text
    rerun = _last_json(text)
    assert f"resuming: {len(kept)} shard(s) already committed" in text
    assert rerun["shards_skipped"] == len(kept) and rerun["shards_written"] == total - len(kept)
    # Inference only for the missing shards: one forward per batch of each shard that was not committed.
    rows = {int(f.split("-")[1].split(".")[0]): r for f, r, *_ in _shard_table(ref)}
    expected = sum(math.ceil(rows[i] / BATCH) for i in range(total) if i not in kept)
    assert rerun["forward_calls"] == expected < ref_summary["forward_calls"]
    # The result is the uninterrupted pass's, byte for byte; the stale temporary file is gone.
    assert _shard_table(cache) == _shard_table(ref)
    assert _files(cache) == _files(ref)
    assert _temps(cache) == []
    problems, totals = verify_cache(str(cache))
    assert problems == [] and totals["shards"] == total


# --------------------------------------------------------------------------------------------- #
# 8. the disk fills up / a permission is taken away under a running pass
# --------------------------------------------------------------------------------------------- #


# Runs the rest of its arguments as a process the permission bits apply to. Root keeps uid 0 (so it can
# still run a Python installed under /root) but drops CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER
# from its bounding set (prctl PR_CAPBSET_DROP), which the exec then applies. A normal user just execs.
AS_UNPRIVILEGED = """
import ctypes, os, sys
if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed: cannot drop root's overrides")
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def _fill_disk(proc: subprocess.Popen, cache: Path) -> None:
    import resource

    # The kernel's file-size limit (`ulimit -f`) set on the running driver: every write that would grow
    # a file past 1 byte now fails with EFBIG, as writes fail with ENOSPC on a full disk.
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1, 1))


def _deny_writes(proc: subprocess.Popen, cache: Path) -> None:
    (cache / "shards").chmod(0o555)


@pytest.mark.slow
@pytest.mark.parametrize("fault,reason", [(_fill_disk, "File too large (EFBIG)"),
                                          (_deny_writes, "Permission denied (EACCES)")],
                         ids=["disk-full", "permission"])
def test_write_fault_mid_pass_is_a_clear_error_and_keeps_earlier_shards(tmp_path, teacher, corpus, reference,
                                                                        fault, reason):
    from kdcache.pipeline.teacher_pass.run import run_cache_pass
    from kdcache.pipeline.teacher_pass.config import CacheConfig
    from kdcache.storage.checksum import checksum_stream

    ref, ref_summary = reference
    cache = tmp_path / "cache"
    # Pipes, not files, take the driver's output: a file-size limit would stop its error message too.
    # (exec keeps the process id: the limit below lands on the driver itself)
    proc = subprocess.Popen([sys.executable, "-c", AS_UNPRIVILEGED, *KDCACHE[1:],
                             *map(str, _cache_args(teacher, corpus, cache, "local"))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=_env(KDCACHE_FAULTS="stall@*", KDCACHE_FAULTS_STALL_S="0.5"))
    try:
        _wait_for(lambda: len(_markers(cache)) >= 2 and _temps(cache), proc, None)
        fault(proc, cache)
        out, err = proc.communicate(timeout=300)
    finally:
        _kill_family(proc)
        (cache / "shards").chmod(0o755)
    assert proc.returncode == 1, out + err
    assert "Traceback" not in err
    assert "kdcache cache: error: [Errno" in err and reason in err and "re-running the same command resumes" in err
    assert f"{cache}/shards/shard-0000" in err  # names the shard it could not write
    assert not (cache / "manifest.json").exists()

    # The shards committed before the fault are intact: each file has the size and checksum its marker
    # records, and is the uninterrupted pass's shard byte for byte.
    kept = _committed(cache)
    assert 2 <= len(kept) < ref_summary["shards_total"]
    ref_files = _files(ref)
    for index in kept:
        info = json.loads((cache / "shards" / f"shard-{index:06d}.json").read_text())
        with open(cache / info["file"], "rb") as f:
            assert checksum_stream(f) == (info["checksum"], info["bytes"])
        assert _files(cache)[f"shard-{index:06d}.parquet"] == ref_files[f"shard-{index:06d}.parquet"]

    # Space (or the permission) back: the same pass resumes from them and ends as the uninterrupted one.
    summary = run_cache_pass(CacheConfig(teacher=teacher, corpus=[corpus], out=str(cache), progress=False,
                                         **OPTIONS), executor="local", log=lambda *_: None)
    assert summary["shards_skipped"] == len(kept)
    assert _shard_table(cache) == _shard_table(ref) and _files(cache) == ref_files and _temps(cache) == []


# --------------------------------------------------------------------------------------------- #
# 5. the training reader stops on a damaged cache, naming the file
# --------------------------------------------------------------------------------------------- #


def _flip_byte(cache: Path) -> str:
    shard = cache / "shards" / "shard-000000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x20
    shard.write_bytes(bytes(data))
    return r"shard-000000.parquet: checksum"


def _truncate(cache: Path) -> str:
    shard = cache / "shards" / "shard-000001.parquet"
    shard.write_bytes(shard.read_bytes()[:-50])
    return r"shard-000001.parquet is .* bytes but the manifest says"


def _delete(cache: Path) -> str:
    (cache / "shards" / "shard-000000.parquet").unlink()
    return r"shard-000000.parquet"


def _empty_manifest(cache: Path) -> str:
    (cache / "manifest.json").write_text("")
    return r"manifest.json.*is empty"


def _corrupt_manifest(cache: Path) -> str:
    (cache / "manifest.json").write_text('{"format": "kdcache", "shards": [')
    return r"manifest.json.*not valid JSON"


@pytest.mark.parametrize("damage", [_flip_byte, _truncate, _delete, _empty_manifest, _corrupt_manifest],
                         ids=lambda f: f.__name__.strip("_"))
def test_training_reader_stops_on_a_damaged_cache_naming_the_file(tmp_path_factory, tmp_path, teacher, reference,
                                                                  damage):
    import shutil

    from kdcache.pipeline.student.models import init_student_from_teacher
    from kdcache.pipeline.student.trainer import train
    from kdcache.pipeline.student.config import load_train_config
    from kdcache.storage import CacheError

    student = tmp_path_factory.getbasetemp() / "faults-student"
    if not student.exists():
        init_student_from_teacher(teacher, student, num_layers=1)
    cache = tmp_path / "cache"
    shutil.copytree(reference[0], cache)
    match = damage(cache)
    cfg = load_train_config("distilbert", None, {"cache": str(cache), "student": str(student),
                                                 "out": str(tmp_path / "run"), "no_ray": True, "steps": 4,
                                                 "batch_size": 4, "progress": False, "tensorboard": False})
    with pytest.raises(CacheError, match=match):
        train(cfg, log=lambda *_: None)
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))  # nothing trained on damaged data


# --------------------------------------------------------------------------------------------- #
# 7. the training driver SIGKILLed, then the same command again (same run name)
# --------------------------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def student(tmp_path_factory, teacher):
    from kdcache.pipeline.student.models import init_student_from_teacher

    out = tmp_path_factory.mktemp("student") / "s"
    init_student_from_teacher(teacher, out, num_layers=1)
    return out


TRAIN_STEPS = 30


def _train_args(cache: Path, student: Path, out: Path) -> list:
    return ["train", "--recipe", "distilbert", "--cache", cache, "--student", student, "--out", out, "--workers", 1,
            "--steps", TRAIN_STEPS, "--batch-size", 4, "--checkpoint-every", 2, "--no-progress", "--json",
            "warmup_ratio=0", "lr=2e-3", "tensorboard=false", "keep_checkpoints=2"]


def _registered_step(checkpoints: Path) -> int:
    """The step of the newest checkpoint in Ray Train's own record of the run (0 while there is none)."""
    try:
        snapshot = json.loads((checkpoints / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["checkpoint_dir_name"].split("-")[1])
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # not written yet, or being written
        return 0


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.ray
@pytest.mark.slow
def test_training_driver_sigkilled_then_rerun_resumes_from_its_checkpoint(tmp_path, reference, student):
    """`kdcache train` (Ray Train) killed with SIGKILL after its first checkpoints; the same command resumes
    from the last of them and its losses equal an uninterrupted run's (in this process, rtol 1e-5 on CPU)."""
    from kdcache.pipeline.student.trainer import train
    from kdcache.pipeline.student.trainer.driver import normalize
    from kdcache.pipeline.student.config import load_train_config

    cache = reference[0]
    uninterrupted = tmp_path / "uninterrupted"
    flags = {"cache": str(cache), "student": str(student), "out": str(uninterrupted), "no_ray": True,
             "steps": TRAIN_STEPS, "batch_size": 4, "checkpoint_every": 2, "progress": False, "tensorboard": False}
    train(load_train_config("distilbert", None, flags, ["warmup_ratio=0", "lr=2e-3"]), log=lambda *_: None)
    ref = _metrics(uninterrupted)
    assert [r["step"] for r in ref] == list(range(1, TRAIN_STEPS + 1))

    run = tmp_path / "run"
    args = _train_args(cache, student, run)
    cfg = normalize(load_train_config("distilbert", None, {"cache": str(cache), "student": str(student),
                                                           "out": str(run)}))
    checkpoints = Path(cfg.storage_path) / cfg.run_name  # where this command's run name keeps them
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
    proc = _start(args, tmp_path / "killed.log", **env)
    family: list = []
    try:
        # Killed once Ray Train has registered a checkpoint (a checkpoint folder written but not yet in Ray
        # Train's snapshot is not one it resumes from).
        _wait_for(lambda: _registered_step(checkpoints), proc, tmp_path / "killed.log", timeout=300)
        family = _family(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        _kill_family(proc, family)
    last = _registered_step(checkpoints)
    assert 2 <= last < TRAIN_STEPS and len(_metrics(run)) < TRAIN_STEPS  # killed mid-run

    rc, text = _run(args, tmp_path / "rerun.log", **env)
    assert rc == 0, text
    summary = _last_json(text)
    assert summary["resumed_from_step"] == last and f"step-{last:08d} (step {last} of {TRAIN_STEPS})" in text
    got = _metrics(run)
    assert [r["step"] for r in got] == list(range(1, TRAIN_STEPS + 1))  # one run's log, however many attempts
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
