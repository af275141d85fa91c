"""Checkpoints: where they go (a Ray Train session, or <out>/checkpoints for --no-ray), the one
writer and the one reader.

A checkpoint holds model, optimiser, scheduler, loss-module (projection) and RNG state plus, per
rank, the data position (epoch, rows consumed in that epoch). Data order is a pure function of
(the cache's row groups, seed, epoch, world size, rank: `kdcache.storage.assign`) and dropout is
reseeded from (seed, step, rank) before every step, so the losses after a resume equal an
uninterrupted run's and no row is read twice or skipped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kdcache.pipeline.student.config import TrainConfig
from kdcache.pipeline.student.trainer.plan import CompatibilityError, RunPlan
from kdcache.pipeline.student.trainer.step import Components
from kdcache.storage import DATA_ORDER


@dataclass
class Position:
    """Where a rank is: optimiser steps taken, and the rows consumed in the current epoch."""

    step: int = 0
    epoch: int = 0
    rows: int = 0


class LocalSession:
    """One in-process worker; checkpoints in <out>/checkpoints/step-N (renamed into place when whole)."""

    rank, world_size = 0, 1

    def __init__(self, out: Path, keep: int):
        self.root = out / "checkpoints"
        self.keep = keep

    @contextlib.contextmanager
    def restore(self):
        done = sorted(p for p in self.root.glob("step-*") if (p / "state.json").exists()) if self.root.exists() else []
        yield done[-1] if done else None

    def save(self, step: int, write: Callable[[Path], None], metrics: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(self.root.glob("step-*"))[: -self.keep or None] if self.keep else []:
            shutil.rmtree(old, ignore_errors=True)


class RaySession:
    """Ray Train worker: checkpoints via `ray.train.report`; every rank writes its own files into the
    same checkpoint (Ray merges the workers' directories)."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    @contextlib.contextmanager
    def restore(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def save(self, step: int, write: Callable[[Path], None], metrics: dict) -> None:
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory(prefix="kdcache-ckpt-") as d:
            write(Path(d))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=f"step-{step:08d}")


# Data-order settings a checkpoint's positions are only valid under. A different number of workers is
# refused, not re-derived: a rank's position is rows of its own range, and the ranges of another world
# size cut the epoch elsewhere, so the rows already read would not be a prefix of any new rank's range.
RESUME_KEYS = ("batch_size", "workers", "seed", "shuffle", "shuffle_buffer")
_RESUME_DEFAULTS = {"shuffle_buffer": 0}  # checkpoints written before the key existed
_RESUME_WHY = {"workers": " (a run resumes only with the workers it started with: each rank's position is "
                          "within its own rows)"}


def _state_of(cfg: TrainConfig, plan: RunPlan, step: int) -> dict[str, Any]:
    return {"step": step, "cache_fingerprint": plan.cache_fingerprint, "data_order": DATA_ORDER,
            **{k: getattr(cfg, k) for k in RESUME_KEYS}, "config": dataclasses.asdict(cfg),
            "phases": _phase_bounds(plan)}


def _phase_bounds(plan: RunPlan) -> list[list]:
    return [[p.name, p.start, p.end] for p in plan.phases]


def check_resume(state: dict[str, Any], cfg: TrainConfig, plan: RunPlan, where: str) -> None:
    saved = {k: state.get(k, _RESUME_DEFAULTS.get(k)) for k in RESUME_KEYS}
    diffs = [f"{k}: checkpoint {saved[k]!r}, now {getattr(cfg, k)!r}{_RESUME_WHY.get(k, '')}"
             for k in RESUME_KEYS if saved[k] != getattr(cfg, k)]
    if state.get("data_order") != DATA_ORDER:
        diffs.append(f"its data positions are in another assignment of rows to workers "
                     f"({state.get('data_order') or 'whole shards per worker'}; this kdcache: {DATA_ORDER})")
    if state.get("cache_fingerprint") != plan.cache_fingerprint:
        diffs.append("the cache differs (fingerprint)")
    saved_phases, phases = state.get("phases"), _phase_bounds(plan)
    if saved_phases is not None and saved_phases != phases and max(len(saved_phases), len(phases)) > 1:
        # a step belongs to another phase when the steps or the schedule change (phases split the steps)
        diffs.append(f"its knowledge-transfer phases differ (checkpoint {saved_phases}, now {phases}: keep steps= "
                     "and knowledge_transfer= as they were)")
    if diffs:
        raise CompatibilityError(f"{where} holds a checkpoint (step {state.get('step')}) that this run cannot resume "
                                 f"exactly: {'; '.join(diffs)}. Re-run with the same settings, or use another --out / "
                                 "--run-name to start over")


def _rng_state() -> dict[str, Any]:
    out = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def open_session(cfg: TrainConfig) -> LocalSession | RaySession:
    return LocalSession(Path(cfg.out), cfg.keep_checkpoints) if cfg.no_ray else RaySession()


def save_checkpoint(session, cfg: TrainConfig, plan: RunPlan, c: Components, pos: Position, metrics: dict) -> None:
    """The one checkpoint writer: rank 0 writes the shared state, every rank its position and RNG."""
    rank = session.rank

    def write(d: Path) -> None:
        if rank == 0:
            torch.save(c.student.state_dict(), d / "model.pt")
            torch.save(c.loss_fn.state_dict(), d / "loss.pt")
            torch.save(c.optimizer.state_dict(), d / "optimizer.pt")
            torch.save(c.scheduler.state_dict(), d / "scheduler.pt")
        (d / f"rank-{rank:05d}.json").write_text(json.dumps(
            {"rank": rank, "epoch": pos.epoch, "rows": pos.rows, "step": pos.step}))
        torch.save(_rng_state(), d / f"rng-{rank:05d}.pt")
        if rank == 0:  # last: a local checkpoint with state.json is complete
            (d / "state.json").write_text(json.dumps(_state_of(cfg, plan, pos.step), default=str))

    session.save(pos.step, write, metrics)


def restore_checkpoint(session, cfg: TrainConfig, plan: RunPlan, c: Components) -> Position:
    """The one reader: the session's latest checkpoint into `c` and the RNGs; the rank's position."""
    rank, device = session.rank, c.device
    with session.restore() as ckpt:
        if ckpt is None:
            return Position()
        state = json.loads((ckpt / "state.json").read_text())
        check_resume(state, cfg, plan, str(ckpt))
        c.student.load_state_dict(torch.load(ckpt / "model.pt", map_location=device, weights_only=True))
        c.loss_fn.load_state_dict(torch.load(ckpt / "loss.pt", map_location=device, weights_only=True))
        c.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
        c.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        pos = json.loads((ckpt / f"rank-{rank:05d}.json").read_text())
        position = Position(int(state["step"]), int(pos["epoch"]), int(pos["rows"]))
        _set_rng_state(torch.load(ckpt / f"rng-{rank:05d}.pt", weights_only=False))
    return position
