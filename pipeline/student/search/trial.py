"""One candidate of the search: build the student, train it from the cache with Tang's loss, and
measure dev accuracy and CPU latency every `report_every` steps. The same function runs a Ray Tune
trial (reporting to Tune, checkpointing so a restored search resumes mid-trial) and the final
retraining with other seeds. Nothing here reads the teacher: the token table comes from a student
folder that `kdcache init-student` made, the targets from the cache.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kdcache.pipeline.student.small import SMALL_STUDENTS, load_small_student, param_counts, save_small_student


@dataclass
class SearchSetup:
    """What every trial shares (plain values: it travels to Ray workers)."""

    cache: str
    space: dict
    out: str
    dev_cache: str = ""  # labelled held-out rows; "" = a hash-held-out slice of the cache's labelled rows
    holdout: float = 0.1
    embeddings: str = ""  # a small-student folder: token table (PCA-projected per trial) and tokenizer files
    latency_target_ms: float = 0.0  # batch-32 latency the objective aims under (0 = accuracy only)
    penalty: float = 0.05  # λ of accuracy − λ·max(0, ln(latency / target))
    latency_batch: int = 32
    latency_warmup: int = 3
    latency_repeats: int = 10
    threads: int = 1
    seed: int = 0


# --------------------------------------------------------------------------------------------- #
# dev rows, latency, objective
# --------------------------------------------------------------------------------------------- #

def is_held_out(sample_ids: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A fixed slice of sample ids (splitmix64 hash): the same rows in every trial and every run."""
    x = (sample_ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1))
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(10_000)) < np.uint64(round(fraction * 10_000))


def dev_rows(setup: SearchSetup) -> dict[str, torch.Tensor]:
    """The labelled dev rows as one padded batch (input_ids, attention_mask, label); read once per
    process (Tune reuses a trial's worker for the next trial), shared read-only by its trials."""
    return _dev_rows(setup.dev_cache, setup.cache, setup.holdout, setup.seed)


@functools.lru_cache(maxsize=2)
def _dev_rows(dev_cache: str, cache: str, holdout: float, seed: int) -> dict[str, torch.Tensor]:
    from kdcache.storage import CacheReader
    from kdcache.pipeline.student.trainer.data import decode_batch

    where = dev_cache or cache
    reader = CacheReader(where, verify="size")
    if not reader.spec.has_labels:
        raise ValueError(f"{where} has no label column: the search measures dev accuracy on gold labels "
                         "(cache with --mode examples --label-field FIELD, or pass --dev-cache)")
    parts = []
    for rb in reader.iter_batches(["input_ids", "label", "sample_id"], batch_size=1024):
        b = decode_batch(rb, reader.spec)
        keep = b["label"] >= 0
        if not dev_cache:
            keep &= torch.from_numpy(is_held_out(b["sample_id"].numpy(), holdout, seed))
        parts.append({k: b[k][keep] for k in ("input_ids", "attention_mask", "label")})
    width = max(p["input_ids"].shape[1] for p in parts)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    rows = {"input_ids": torch.cat([pad(p["input_ids"]) for p in parts]),
            "attention_mask": torch.cat([pad(p["attention_mask"]) for p in parts]),
            "label": torch.cat([p["label"] for p in parts])}
    if len(rows["label"]) == 0:
        raise ValueError(f"{where}: no labelled dev rows (holdout {holdout}); raise --holdout or pass --dev-cache")
    return rows


@torch.no_grad()
def dev_accuracy(model: torch.nn.Module, dev: dict[str, torch.Tensor], batch: int = 256) -> float:
    model.eval()
    right = 0
    for i in range(0, len(dev["label"]), batch):
        logits = model(dev["input_ids"][i:i + batch], dev["attention_mask"][i:i + batch]).logits
        right += int((logits.argmax(-1) == dev["label"][i:i + batch]).sum())
    model.train()
    return right / len(dev["label"])


@torch.no_grad()
def measure_latency(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, warmup: int,
                    repeats: int) -> dict[str, float]:
    """Milliseconds per batch: `warmup` untimed calls, then `repeats` timed ones (always that many);
    the median and the spread (interquartile range) of the timed ones."""
    model.eval()
    for _ in range(warmup):
        model(ids, mask)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(ids, mask)
        times.append((time.perf_counter() - t0) * 1e3)
    model.train()
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"latency_ms": statistics.median(times), "latency_spread_ms": q[2] - q[0], "latency_repeats": repeats}


def objective(accuracy: float, latency_ms: float, target_ms: float, penalty: float) -> float:
    """accuracy − λ·max(0, ln(latency / target)): no reward for being faster than the target."""
    if not target_ms:
        return accuracy
    return accuracy - penalty * max(0.0, math.log(latency_ms / target_ms))


# --------------------------------------------------------------------------------------------- #
# the candidate: build, train, report
# --------------------------------------------------------------------------------------------- #

def build_student(arch: dict[str, Any], setup: SearchSetup, seed: int, folder: Path) -> dict[str, Any]:
    """Write the candidate's initial student to `folder` (loadable by `load_small_student`)."""
    from kdcache.storage import CacheReader

    reader = CacheReader(setup.cache, verify="off")
    spec, tok = reader.spec, reader.manifest.header.tokenizer
    if not spec.num_labels:
        raise ValueError(f"{setup.cache} holds no task logits: search a cache made with a classifier teacher "
                         "(kdcache cache --mode examples --teacher-kind classifier)")
    kwargs = {"vocab_size": spec.vocab_size, "num_labels": spec.num_labels,
              "pad_token_id": int(tok.get("pad_token_id") or 0), **arch}
    torch.manual_seed(seed)
    model = SMALL_STUDENTS[arch["architecture"]](**kwargs)
    source = "random"
    if setup.embeddings:
        width = arch["embedding_size"]
        table, full = _projected_table(setup.embeddings, width)
        if table.shape[0] != spec.vocab_size:
            raise ValueError(f"--embeddings {setup.embeddings}: {table.shape[0]} tokens, the cache has {spec.vocab_size}")
        with torch.no_grad():
            model.embed.weight.copy_(table)
        source = f"{setup.embeddings}, PCA {full} -> {width}"
    record = {**kwargs, "seed": seed, "embedding_init": source, **param_counts(model)}
    save_small_student(model, folder, setup.embeddings or None, record)
    return record


@functools.lru_cache(maxsize=8)
def _projected_table(folder: str, width: int) -> tuple[torch.Tensor, int]:
    """The token table of `folder` projected on its top `width` principal directions, and its full
    width; once per process and width (an SVD of the whole table costs seconds on a CPU)."""
    from kdcache.pipeline.student.models import pca_projection

    table = load_small_student(folder).embed.weight.detach()
    if width > table.shape[1]:
        raise ValueError(f"--embeddings {folder} is {table.shape[1]} wide; the space asks for "
                         f"embedding_size {width}: make it with a wider --embedding-size (default: the teacher's)")
    return (table @ pca_projection(table, width) if width < table.shape[1] else table), table.shape[1]


def fit_candidate(arch: dict[str, Any], train: dict[str, Any], setup: SearchSetup, seed: int, workdir: Path,
                  report: Callable[[dict[str, Any], Path], None] | None = None,
                  restore: Path | None = None) -> dict[str, Any]:
    """Train one candidate; every `report_every` steps measure it and call `report(metrics, folder)`
    with a checkpoint folder (the state and the student so far). Returns the last metrics."""
    from kdcache.pipeline.student.config import load_train_config
    from kdcache.pipeline.student.trainer.data import RankStream
    from kdcache.pipeline.student.trainer.plan import plan_run
    from kdcache.pipeline.student.trainer.step import build_components, step_seed, train_step
    from kdcache.storage import CacheReader

    # -- setup: student, loss and optimiser (the trainer's own parts), dev rows, latency batch
    torch.set_num_threads(max(1, setup.threads))
    init = workdir / "init"
    record = build_student(arch, setup, seed, init)
    cfg = load_train_config("cnn", None, {
        "cache": setup.cache, "student": str(init), "out": str(workdir / "run"), "steps": train["steps"],
        "batch_size": train["batch_size"], "lr": train["lr"], "temperature": train["temperature"], "seed": seed,
        "progress": False, "tensorboard": False, "no_ray": True, "check_tokenizer": bool(setup.embeddings)},
        [f"preset_args.alpha={train['alpha']}", f"preset_args.distill={train['distill']}"])
    plan = plan_run(cfg)
    if len(plan.phases) > 1:  # the trial's loop below has no phases
        raise ValueError(f"search trials train one phase; knowledge_transfer={cfg.knowledge_transfer} splits this "
                         "loss into several: use knowledge_transfer=auxiliary")
    c = build_components(cfg, plan, torch.device("cpu"))
    reader = CacheReader(setup.cache, verify="full")
    columns = sorted({*plan.columns, "sample_id"})
    stream = RankStream(reader, columns, cfg.batch_size, 0, 1, seed, shuffle=True)
    dev = dev_rows(setup)
    lat_ids = dev["input_ids"][:setup.latency_batch]
    lat_mask = dev["attention_mask"][:setup.latency_batch]
    if len(lat_ids) < setup.latency_batch:  # a tiny dev slice: repeat rows up to the batch
        reps = -(-setup.latency_batch // len(lat_ids))
        lat_ids, lat_mask = lat_ids.repeat(reps, 1)[:setup.latency_batch], lat_mask.repeat(reps, 1)[:setup.latency_batch]
    step, epoch, rows = 0, 0, 0
    if restore is not None:
        state = torch.load(restore / "state.pt", weights_only=True)
        c.student.load_state_dict(state["student"])
        c.loss_fn.load_state_dict(state["loss_fn"])
        c.optimizer.load_state_dict(state["optimizer"])
        c.scheduler.load_state_dict(state["scheduler"])
        step, epoch, rows = state["step"], state["epoch"], state["rows"]
    latency = measure_latency(c.student, lat_ids, lat_mask, setup.latency_warmup, setup.latency_repeats)
    static = {"params": record["params"], "params_without_embeddings": record["params_without_embeddings"],
              **latency, "dev_rows": len(dev["label"]), "seed": seed}

    # -- train: batches (the dev slice dropped), a step, a report every `report_every` steps
    metrics: dict[str, Any] = {}
    batches = stream.batches(epoch, rows)
    while step < train["steps"]:
        batch = next(batches, None)
        if batch is None:
            epoch, rows = epoch + 1, 0
            batches = stream.batches(epoch, 0)
            continue
        rows += batch.pop("rows")
        ids = batch.pop("sample_id")
        if not setup.dev_cache:
            keep = ~torch.from_numpy(is_held_out(ids.numpy(), setup.holdout, setup.seed))
            if not bool(keep.any()):
                continue
            batch = {k: v[keep] for k, v in batch.items()}
        step += 1
        loss, _ = train_step(c, batch, step_seed(seed, step, 0))
        if step % train["report_every"] == 0 or step == train["steps"]:
            acc = dev_accuracy(c.student, dev)
            metrics = {"step": step, "loss": float(loss), "dev_accuracy": acc, **static,
                       "score": objective(acc, static["latency_ms"], setup.latency_target_ms, setup.penalty)}
            if report is not None:  # Tune keeps a copy of the folder: the state to resume from, the student so far
                with tempfile.TemporaryDirectory(prefix="kdcache-search-") as tmp:
                    folder = Path(tmp)
                    torch.save({"student": c.student.state_dict(), "loss_fn": c.loss_fn.state_dict(),
                                "optimizer": c.optimizer.state_dict(), "scheduler": c.scheduler.state_dict(),
                                "step": step, "epoch": epoch, "rows": rows}, folder / "state.pt")
                    save_small_student(c.student, folder / "student", init, record)
                    report(metrics, folder)
            elif step == train["steps"]:
                save_small_student(c.student, workdir / "student", init, record)
    return metrics


def tune_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """The Ray Tune trainable: one candidate, its reports and checkpoints going to Tune."""
    from ray import tune

    from kdcache.pipeline.student.search.space import architecture, training

    s = SearchSetup(**setup)
    ckpt = tune.get_checkpoint()

    def report(metrics: dict[str, Any], folder: Path) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(folder)))

    with tempfile.TemporaryDirectory(prefix="kdcache-trial-") as work:
        if ckpt is None:
            fit_candidate(architecture(config, s.space), training(config, s.space), s, s.seed, Path(work), report)
        else:
            with ckpt.as_directory() as state:
                fit_candidate(architecture(config, s.space), training(config, s.space), s, s.seed, Path(work), report,
                              restore=Path(state))


def setup_dict(setup: SearchSetup) -> dict[str, Any]:
    return dataclasses.asdict(setup)
