"""The driver: normalise and check the config, then `TorchTrainer.fit()` (or the in-process loop).
Re-running the same command resumes from the run's latest checkpoint."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from kdcache.pipeline.common import allocator
from kdcache.pipeline.common.console import run_console
from kdcache.pipeline.common.console import worker_env as console_worker_env
from kdcache.pipeline.student.config import TrainConfig
from kdcache.pipeline.student.trainer.checkpoint import check_resume
from kdcache.pipeline.student.trainer.loop import train_loop
from kdcache.pipeline.student.trainer.plan import RunPlan, describe_data, plan_run
from kdcache.storage.fs import is_url


def normalize(cfg: TrainConfig) -> TrainConfig:
    """Absolute local paths (Ray Train workers run in their own working directory) and defaults."""
    if not cfg.out:
        raise ValueError("kdcache train needs --out (the run folder)")
    if is_url(cfg.out):
        raise ValueError("--out must be a local (or mounted shared) folder; put checkpoints on object storage "
                         "with --storage-path, and the final student with student_url=s3://...")
    changes: dict[str, Any] = {"out": str(Path(cfg.out).resolve())}
    for name in ("cache", "student"):
        value = getattr(cfg, name)
        if value and not is_url(value):
            changes[name] = str(Path(value).resolve())
    out = changes["out"]
    sp = cfg.storage_path or os.path.join(out, "ray")
    changes["storage_path"] = sp if is_url(sp) else str(Path(sp).resolve())
    changes["run_name"] = cfg.run_name or f"kdcache-{Path(out).name}-{hashlib.sha256(out.encode()).hexdigest()[:8]}"
    return dataclasses.replace(cfg, **changes)


def validate(cfg: TrainConfig) -> dict[str, Any]:
    """`kdcache train --validate`: every check, no training. Returns what the run would do."""
    cfg = normalize(cfg)
    plan = plan_run(cfg)
    _check_existing_checkpoint(cfg, plan)
    return {"ok": True, "cache": cfg.cache, "student": cfg.student, "out": cfg.out, **plan.summary()}


def _latest_state(cfg: TrainConfig) -> tuple[dict | None, str]:
    """The newest checkpoint's state.json under this run's storage (local storage only)."""
    roots = [Path(cfg.out) / "checkpoints"] if cfg.no_ray else (
        [] if is_url(cfg.storage_path) else [Path(cfg.storage_path) / cfg.run_name])
    for root in roots:
        if not cfg.no_ray:
            # Ray Train resumes from the checkpoint its snapshot names; a folder written but not yet registered
            # when the driver was killed is not resumed from, so it must not be reported (or checked) as the one.
            try:
                snapshot = json.loads((root / "checkpoint_manager_snapshot.json").read_text())
                state = root / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] / "state.json"
                return json.loads(state.read_text()), str(state.parent)
            except (OSError, ValueError, KeyError, TypeError):
                return None, ""
        found = sorted(root.glob("step-*/state.json")) if root.exists() else []
        if found:
            return json.loads(found[-1].read_text()), str(found[-1].parent)
    return None, ""


def _check_existing_checkpoint(cfg: TrainConfig, plan: RunPlan) -> None:
    state, where = _latest_state(cfg)
    if state is not None:
        check_resume(state, cfg, plan, where)


def auto_cpus_per_worker(cfg: TrainConfig) -> float:
    if cfg.cpus_per_worker:
        return float(cfg.cpus_per_worker)
    if cfg.use_gpu:
        return 1.0
    import ray

    total = float(ray.cluster_resources().get("CPU", 1))
    # Leave about one CPU for the reader threads and Ray's own tasks: whole-CPU workers that use every
    # core can starve them and hang a small machine (seen: 0.9 x 2 on 2 CPUs hung, 0.5 x 2 ran).
    return max(0.1, min(1.0, round((total - 1) / cfg.workers, 2) or 0.1))


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Check, then train (Ray Train, or in-process with `no_ray`). Re-running the same command resumes."""
    cfg = normalize(cfg)
    plan = plan_run(cfg)
    _check_existing_checkpoint(cfg, plan)
    log(describe_data(plan.data))
    state, where = _latest_state(cfg)
    if state is not None:
        log(f"resuming from {where} (step {state['step']} of {plan.steps})")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    if cfg.no_ray and cfg.workers != 1:
        raise ValueError("no_ray runs one worker in this process; drop --workers or drop --no-ray")
    # Ray's and the libraries' messages go to <out>/kdcache.log; the terminal keeps kdcache's lines.
    with run_console(None if is_url(cfg.out) else cfg.out, say_where=log):
        if not cfg.no_ray:
            return _fit_with_ray(cfg, plan, log)
        t0 = time.time()
        summary = train_loop(dataclasses.asdict(cfg))
        summary["startup_s"] = (summary.get("first_batch_at") or t0) - t0
        return summary


def _fit_with_ray(cfg: TrainConfig, plan: RunPlan, log) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from kdcache.pipeline.common.runtime import init_ray

    started = init_ray(cfg.address)
    try:
        cpus = auto_cpus_per_worker(cfg)
        resources = {"CPU": cpus} | ({"GPU": 1} if cfg.use_gpu else {})
        # CPU workers reuse freed memory instead of faulting it in every step (allocator.py: ~10% per step);
        # every worker's progress bar is drawn by this driver (common.console).
        worker_env = console_worker_env() | ({} if cfg.use_gpu else allocator.worker_env())
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=dataclasses.asdict(cfg),
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name=cfg.run_name, storage_path=cfg.storage_path,
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints or None),
                                 failure_config=FailureConfig(max_failures=cfg.max_failures),
                                 # Ray Train v2's: passed only when set, so a v1 RunConfig still takes the rest.
                                 **({"worker_runtime_env": {"env_vars": worker_env}} if worker_env else {})),
        )
        log(f"Ray Train: {cfg.workers} worker(s) x {resources}, run {cfg.run_name} in {cfg.storage_path}")
        t0 = time.time()
        result = trainer.fit()
        summary = dict(result.return_value or {})
        if not summary and (Path(cfg.out) / "summary.json").exists():
            summary = json.loads((Path(cfg.out) / "summary.json").read_text())
        summary["startup_s"] = (summary.get("first_batch_at") or t0) - t0
        summary["checkpoint"] = result.checkpoint.path if result.checkpoint else None
        summary["fit_s"] = time.time() - t0
        return summary
    finally:
        if started:
            ray.shutdown()
