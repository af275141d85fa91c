"""The per-worker training loop (Ray Train or in-process), read top to bottom: setup, train, cleanup.
It takes a plain dict so Ray Tune can sweep it."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from kdcache.pipeline.common import allocator, faults
from kdcache.pipeline.student.config import TrainConfig
from kdcache.pipeline.student.trainer.checkpoint import Position, open_session, restore_checkpoint, save_checkpoint
from kdcache.pipeline.student.trainer.data import RankStream, prefetched, to_device
from kdcache.pipeline.student.trainer.metrics import MetricsSink, reduce_losses, step_metrics
from kdcache.pipeline.student.trainer.plan import RunPlan, plan_run
from kdcache.pipeline.student.trainer.step import (Components, broadcast_parameters, build_components, enter_phase,
                                                   lr_at, step_seed, train_step)


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """One worker's training loop; `config` is `dataclasses.asdict(TrainConfig)` (Ray Tune can sweep it).

    Returns the run summary on rank 0 (Ray Train hands it back as `Result.return_value`).
    """
    from kdcache.storage import CacheReader

    # -- setup: where checkpoints go, the device, the plan, the student and its optimiser, the data
    loop_started = time.time()
    cfg = TrainConfig(**config)
    session = open_session(cfg)
    rank, world = session.rank, session.world_size
    device = _device(cfg)
    plan = plan_run(cfg, check_tokenizer=False)  # the driver already compared tokenizers
    c = build_components(cfg, plan, device, world)
    reader = CacheReader(cfg.cache, verify=cfg.verify)
    pos = restore_checkpoint(session, cfg, plan, c)
    resumed_from = pos.step
    if world > 1:
        broadcast_parameters(c)
    sink = MetricsSink(cfg, rank, pos.step, plan.steps)

    # -- train: phase by phase (one, unless knowledge_transfer splits the run), each reading only its
    # columns; in a phase: a batch, a step, its metrics, a checkpoint every `checkpoint_every` steps
    first_batch_at = None
    try:
        for phase in (p for p in plan.phases if p.end > pos.step):
            enter_phase(c, phase)
            stream = RankStream(reader, phase.columns, cfg.batch_size, rank, world, cfg.seed, cfg.shuffle,
                                cfg.shuffle_buffer)
            batches = _batches(stream, pos, cfg.prefetch, rank)
            t_data = time.perf_counter()
            while pos.step < phase.end:
                batch = next(batches)
                data_s = time.perf_counter() - t_data
                if first_batch_at is None:
                    first_batch_at = time.time()  # start-up ends here: worker up, student loaded, data flowing
                pos.step += 1
                faults.before_step(cfg.fail_at_step, cfg.fail_rank, pos.step, rank, cfg.out)

                t0 = time.perf_counter()
                n_rows, sample_ids = batch.pop("rows"), batch.pop("sample_id").tolist()
                batch = to_device(batch, device)
                total, parts = train_step(c, batch, step_seed(cfg.seed, pos.step, rank))
                pos.rows += n_rows
                vals = reduce_losses(total, parts, float(batch["attention_mask"].sum()), world)
                step_s = time.perf_counter() - t0
                metrics = step_metrics(pos.step, pos.epoch, parts, vals, lr_at(c, pos.step), step_s, data_s)
                if len(plan.phases) > 1:
                    metrics["phase"] = phase.name
                sink.log(metrics, sample_ids)

                if pos.step % max(1, cfg.checkpoint_every) == 0 or pos.step == plan.steps:
                    save_checkpoint(session, cfg, plan, c, pos, dict(sink.last))
                t_data = time.perf_counter()
            batches.close()  # its read-ahead is dropped: the next phase reads on from `pos`
    finally:
        sink.close()

    # -- cleanup: rank 0 writes the trained student and the run summary
    if rank != 0:
        return {}
    summary = _finish(cfg, plan, c, Path(cfg.out), pos.step, resumed_from, sink.last, sink.timings)
    summary.update(workers=world, loop_started_at=loop_started, first_batch_at=first_batch_at,
                   malloc_tuned=device.type == "cpu" and allocator.tuned())
    (Path(cfg.out) / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def _device(cfg: TrainConfig) -> torch.device:
    """The worker's device (Ray Train assigns a rank its GPU); CPU threads and allocator as configured."""
    in_ray = not cfg.no_ray
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.use_gpu and torch.cuda.is_available():
        if in_ray:
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cuda")
    if not in_ray:  # Ray Train workers start with the settings in their environment
        allocator.tune_this_process()
    return torch.device("cpu")


def _batches(stream: RankStream, pos: Position, prefetch: int, rank: int) -> Iterator[dict[str, Any]]:
    """The rank's batches from `pos` on, epoch after epoch; at an epoch's end `pos` moves to the next.

    Every rank has the same batches per epoch, so ranks wrap together. `pos.rows` is advanced by the
    loop, so an epoch that yielded nothing is seen here.
    """
    empty_epochs = 0
    while True:
        yield from prefetched(stream.batches(pos.epoch, pos.rows), prefetch)
        empty_epochs = empty_epochs + 1 if pos.rows == 0 else 0
        if empty_epochs > 1:
            raise RuntimeError(f"rank {rank} has no rows to read")
        pos.epoch, pos.rows = pos.epoch + 1, 0


def _finish(cfg: TrainConfig, plan: RunPlan, c: Components, out: Path, step: int, resumed_from: int,
            last: dict[str, Any], timings: dict[str, list]) -> dict[str, Any]:
    """Rank 0: the trained student into <out>/student, loadable with AutoModel*.from_pretrained."""
    dest = out / "student"
    tmp = out / ".student.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = Path(cfg.student) if cfg.student else None
    if src is not None and src.is_dir():
        # Tokenizer files, generation config, remote code, kdcache_student.json travel with the student;
        # weights and config are written fresh below.
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt")) and f.name not in (
                    "config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
                shutil.copy2(f, tmp / f.name)
    module = c.student
    if hasattr(module, "save"):
        module.save(tmp)
    elif hasattr(module, "save_pretrained"):
        module.save_pretrained(str(tmp))
    else:
        torch.save(module.state_dict(), tmp / "student.pt")
    if not last and (out / "metrics.jsonl").exists():  # a re-run that found the run finished
        lines = (out / "metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    s = sorted(timings["step_s"])
    summary = {"out": str(out), "student_out": str(dest), "steps": step, "resumed_from_step": resumed_from,
               "final_loss": last.get("loss"), "final_metrics": last, "loss_weights": plan.loss_spec.active(),
               "columns": plan.columns, "median_step_s": s[len(s) // 2] if s else None,
               "median_data_s": sorted(timings["data_s"])[len(s) // 2] if s else None}
    (tmp / "kdcache_train.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), **summary}, indent=1,
                                                       default=str) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    if cfg.student_url:  # on a cluster rank 0's local disk is any node's: object storage is where it is found
        from kdcache.storage.fs import upload_folder

        summary["student_url"] = upload_folder(dest, cfg.student_url, last="kdcache_train.json")
    return summary
