"""The terminal shows kdcache's lines; Ray's forwarded worker output and library chatter go to the
run folder's log file."""
from __future__ import annotations

import io
import json
import logging
import re

import pytest

from kdcache.pipeline.common import console

RAY_PREFIX = re.compile(r"^\(\w+ pid=\d+\)", re.M)


def _batch(lines, actor="RayTrainWorker", pid=123, is_err=False):
    return {"pid": pid, "actor_name": actor, "lines": lines, "is_err": is_err, "ip": "127.0.0.1"}


def test_router_sends_worker_chatter_to_the_file_and_marked_lines_to_the_terminal():
    log, shown = io.StringIO(), []
    router = console.RayOutputRouter(log, terminal=shown.append)
    router(_batch(["Failed to query Ray Train Controller actor state. Continuing to monitor."],
                  actor="PlacementGroupCleaner"))
    router(_batch([console.MARK + "resuming from step 4", "Checkpoint successfully created at: ..."]))
    router(_batch(["ValueError: loss is nan at step 7"], is_err=True))
    router(_batch(["Traceback (most recent call last):", "ConnectionError: Found multiple active Ray instances"],
                  actor="PlacementGroupCleaner", is_err=True))  # Ray's own actor, recovered: logged only
    router.close()
    assert shown == ["resuming from step 4", "(RayTrainWorker pid=123) ValueError: loss is nan at step 7"]
    logged = log.getvalue()
    assert "(PlacementGroupCleaner pid=123) Failed to query" in logged
    assert "(RayTrainWorker pid=123) Checkpoint successfully created" in logged
    assert "(PlacementGroupCleaner pid=123) ConnectionError: Found multiple" in logged


def test_worker_progress_becomes_one_bar_on_the_driver(capsys, monkeypatch):
    monkeypatch.setenv(console.REMOTE_ENV, "1")
    bar = console.progress_bar(total=3, initial=0, desc="train", unit="step", mininterval=0.0)
    for _ in range(3):
        bar.set_postfix_str("loss=1.0")
        bar.update(1)
    bar.close()
    worker_lines = capsys.readouterr().out.splitlines()
    assert worker_lines and all(line.startswith(console.PROGRESS_MARK) for line in worker_lines)
    assert json.loads(worker_lines[-1][len(console.PROGRESS_MARK):])["n"] == 3

    log = io.StringIO()
    router = console.RayOutputRouter(log, terminal=print)
    router(_batch(worker_lines))
    router.close()
    err = capsys.readouterr().err
    assert "train" in err and "3/3" in err  # tqdm drew it on the driver
    assert console.PROGRESS_MARK not in log.getvalue() and not RAY_PREFIX.search(err)


def test_library_logging_goes_to_the_log_file(tmp_path, capfd):
    with console.run_console(tmp_path) as path:
        logging.getLogger("transformers.modeling_utils").warning("some weights were newly initialized")
        logging.getLogger("ray.train").info("Started training worker group")
    out, err = capfd.readouterr()
    assert "some weights" not in out + err and "Started training" not in out + err
    assert f"library and Ray messages: {path}" in out
    text = path.read_text()
    assert "some weights were newly initialized" in text and "Started training worker group" in text


@pytest.mark.slow
@pytest.mark.ray
def test_a_real_cluster_forwards_nothing_but_kdcache_lines(tmp_path, capfd):
    import ray

    from kdcache.pipeline.common.runtime import init_ray

    with console.run_console(tmp_path) as path:
        started = init_ray(None, num_cpus=1)
        try:
            @ray.remote(num_cpus=0.5, runtime_env={"env_vars": console.worker_env()})
            def chatty():
                import sys

                print("(internal) Failed to query actor state. Continuing to monitor.")
                print("warning from a library", file=sys.stderr)
                console.say("stage 2 of 3 done")
                bar = console.progress_bar(total=2, desc="work", unit="step", mininterval=0.0)
                bar.update(2)
                bar.close()
                return 1

            assert ray.get(chatty.remote()) == 1
            import time

            time.sleep(3)  # Ray's log monitor forwards output about once a second
        finally:
            if started:
                ray.shutdown()
    out, err = capfd.readouterr()
    screen = re.sub(r"\x1b\[[0-9;]*m", "", out + err)
    assert not RAY_PREFIX.search(screen), screen[-2000:]
    assert "stage 2 of 3 done" in screen and "Failed to query" not in screen
    logged = path.read_text()
    assert "Failed to query actor state" in logged and "warning from a library" in logged
