"""Training students from a cache: the teacher is never loaded, only its cached outputs are read.

Library pieces, top to bottom (a recipe is just a YAML file in `pipeline/recipes/`):

* `TrainConfig` and `load_train_config`: every option; recipe < --config < flags < key=value.
* `StudentOutputs`, `HFStudent`, `build_student`: the loop needs nothing from a student but a
  module `forward(input_ids, attention_mask)` returning logits / hidden states / attentions, so a
  non-transformer student plugs in through `student_factory: "module:function"`.
* `plan_run`: every compatibility check between the config, the cache and the student, before
  step 1 (also what `kdcache train --validate` runs).
* `RankStream`: the batches of one rank, deterministic and addressed by (epoch, rows consumed), so
  a resumed run reads exactly the rows an uninterrupted one would have.
* `DistillLoss`, `build_optimizer`, `build_scheduler`, `train_step`: one optimisation step.
* `train_loop(config: dict)`: the per-worker function (Ray Train or in-process). It takes a plain
  dict so Ray Tune can sweep it.
* `train(cfg)`: the driver: checks, then `TorchTrainer.fit()` (or the in-process loop).

Resume contract: a checkpoint holds model, optimiser, scheduler, loss-module (projection) and RNG
state plus, per rank, the data position (epoch, rows consumed in that epoch). Data order is a pure
function of (seed, epoch, rank) and dropout is reseeded from (seed, step, rank) before every step,
so the losses after a resume equal an uninterrupted run's and no row is read twice or skipped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import queue
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from kdcache.pipeline.common import allocator
from kdcache.pipeline.common.hf import TOKENIZER_FILES, import_user_object
from kdcache.pipeline.common.runtime import amp_dtype
from kdcache.pipeline.student.config import TrainConfig
from kdcache.storage.fs import is_url

# --------------------------------------------------------------------------------------------- #
# config
# --------------------------------------------------------------------------------------------- #



# --------------------------------------------------------------------------------------------- #
# student adapter
# --------------------------------------------------------------------------------------------- #


@dataclass
class StudentOutputs:
    """What the losses read from a student: all optional, shapes as in `kdcache.pipeline.student.losses`."""

    logits: torch.Tensor | None = None  # [B, T, V] (token) or [B, C] (classifier)
    hidden_states: tuple | None = None  # index 0 = embeddings, l = after layer l
    attentions: tuple | None = None  # attentions[l - 1] = layer l, [B, heads, T, T]


class HFStudent(nn.Module):
    """A Hugging Face model behind the `forward(input_ids, attention_mask) -> StudentOutputs` interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> StudentOutputs:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return StudentOutputs(logits=getattr(out, "logits", None), hidden_states=getattr(out, "hidden_states", None),
                              attentions=getattr(out, "attentions", None))

    def save(self, folder: Path) -> None:
        # Hidden states and attentions were switched on for the losses; the saved student returns
        # them only on request, like any checkpoint (a config saying output_attentions=True also
        # fails to load or save under the default SDPA attention).
        config = self.model.config
        flags = config.output_hidden_states, config.output_attentions
        config.output_hidden_states = config.output_attentions = False
        try:
            self.model.save_pretrained(str(folder))
        finally:
            config.output_hidden_states, config.output_attentions = flags



def build_student(cfg: TrainConfig, needs_hidden: bool, needs_attentions: bool) -> nn.Module:
    """The student module in train mode; a factory's module must follow `HFStudent.forward`."""
    if cfg.student_factory:
        return import_user_object(cfg.student_factory)(dataclasses.asdict(cfg)).train()
    from transformers.utils import logging as hf_logging

    from kdcache.pipeline.student.models import load_student

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per worker is noise
    model = load_student(cfg.student, output_hidden_states=needs_hidden, output_attentions=needs_attentions,
                         trust_remote_code=cfg.trust_remote_code, dtype=torch.float32)
    return HFStudent(model).train()


def _describe_student(cfg: TrainConfig) -> dict[str, Any]:
    """Sizes the checks need, from the student's config (or a factory module's attributes)."""
    if cfg.student_factory:
        module = import_user_object(cfg.student_factory)(dataclasses.asdict(cfg))
        get = lambda k: getattr(module, k, None)  # noqa: E731
        return {k: get(k) for k in ("num_layers", "hidden_size", "num_heads", "vocab_size", "max_positions",
                                    "num_labels")} | {"architecture": type(module).__name__, "meta": {}}
    from transformers import AutoConfig

    from kdcache.pipeline.student.models import read_student_meta

    if not (Path(cfg.student) / "config.json").exists():
        raise FileNotFoundError(f"student {cfg.student} has no config.json; make one with `kdcache init-student "
                                "--teacher T --out STUDENT` (or point --student at a save_pretrained folder)")
    c = AutoConfig.from_pretrained(cfg.student, trust_remote_code=cfg.trust_remote_code)
    archs = getattr(c, "architectures", None) or []
    return {"num_layers": getattr(c, "num_hidden_layers", None), "hidden_size": getattr(c, "hidden_size", None),
            "num_heads": getattr(c, "num_attention_heads", None), "vocab_size": getattr(c, "vocab_size", None),
            "max_positions": getattr(c, "max_position_embeddings", None),
            "num_labels": c.num_labels if any("Classification" in a for a in archs) else None,
            "architecture": archs[0] if archs else type(c).__name__, "meta": read_student_meta(cfg.student) or {}}


# --------------------------------------------------------------------------------------------- #
# plan: every compatibility check, before step 1
# --------------------------------------------------------------------------------------------- #


class CompatibilityError(ValueError):
    """The config, the cache and the student do not fit together; the message says what to do."""


@dataclass
class RunPlan:
    loss_spec: Any  # kdcache.pipeline.student.losses.LossSpec
    columns: list[str]  # what every worker reads (only what the losses need)
    steps: int
    rows_per_rank: list[int]
    student: dict[str, Any]
    teacher_layers: int
    teacher_hidden: int | None
    cache_fingerprint: str
    needs_hidden: bool
    needs_attentions: bool

    def summary(self) -> dict[str, Any]:
        s = self.loss_spec
        return {"loss_weights": s.active(), "temperature": s.temperature, "kd_tail": s.kd_tail,
                "layer_map": s.layer_map, "cos_layer": s.cos_layer, "columns": self.columns, "steps": self.steps,
                "rows_per_rank": self.rows_per_rank, "student": {k: v for k, v in self.student.items() if k != "meta"},
                "teacher_layers": self.teacher_layers, "teacher_hidden_size": self.teacher_hidden,
                "projection": bool(self.teacher_hidden and self.student["hidden_size"]
                                   and self.teacher_hidden != self.student["hidden_size"]
                                   and {"emb", "hidden"} & set(s.active())),
                "cache_fingerprint": self.cache_fingerprint}


def _pair(text: str | None) -> tuple[int, int] | None:
    if text in (None, ""):
        return None
    if isinstance(text, (list, tuple)):
        return int(text[0]), int(text[1])
    s, colon, t = str(text).partition(":")
    if not colon:
        raise ValueError(f"cos_layer must be 'S:T' (student:teacher), got {text!r}; in a YAML file quote it "
                         "('6:12'), or YAML reads it as a base-60 number")
    return int(s), int(t)


def build_loss_spec(cfg: TrainConfig, n_student: int, n_teacher: int, targets: str, student_map=None):
    """The preset named by `cfg.loss`, with the config's overrides applied."""
    from kdcache.pipeline.student.losses import PRESETS, parse_layer_map, preset

    if cfg.loss not in PRESETS:
        raise ValueError(f"unknown loss preset {cfg.loss!r}; known: {sorted(PRESETS)}")
    kwargs = dict(cfg.preset_args or {})
    params = inspect.signature(PRESETS[cfg.loss]).parameters
    if "n_student" in params:
        kwargs.setdefault("n_student", n_student)
    if "n_teacher" in params:
        kwargs.setdefault("n_teacher", n_teacher)
    if cfg.loss == "lm" and "kd" not in kwargs:
        kwargs["kd"] = "sampled" if targets == "sampled" else "topk"  # follow the cache
    spec = preset(cfg.loss, **kwargs)
    changes: dict[str, Any] = {}
    if cfg.loss_weights:
        changes["weights"] = {**spec.weights, **{k: float(v) for k, v in cfg.loss_weights.items()}}
    for name in ("temperature", "kd_tail", "attention_kind", "average_heads", "per_layer_projection"):
        if getattr(cfg, name) is not None:
            changes[name] = getattr(cfg, name)
    if cfg.layer_map not in ("auto", "", None):
        if ":" not in str(cfg.layer_map):
            raise ValueError(f"layer_map must be 'auto' or 'S:T,S:T,...', got {cfg.layer_map!r}; in a YAML file "
                             "quote it, or YAML reads '2:4' as a base-60 number")
        changes["layer_map"] = parse_layer_map(str(cfg.layer_map), n_student, n_teacher)
    elif spec.layer_map is not None and student_map:
        # A copied student knows which teacher block each of its blocks came from.
        changes["layer_map"] = [tuple(p) for p in student_map]
    if cfg.cos_layer:
        changes["cos_layer"] = _pair(cfg.cos_layer)
    return dataclasses.replace(spec, **changes) if changes else spec


def _check_layers(spec, cache_spec, n_student: int) -> None:
    """Every teacher layer a loss compares must be stored; every student layer must exist."""
    active = spec.active()
    wanted: list[tuple[str, str, int, int]] = []  # (loss, kind, student, teacher)
    if "cos" in active:
        s, t = spec.cos_pair()
        wanted.append(("cos", "hidden", s, t))
    if "emb" in active:
        wanted += [("emb", "hidden", s, t) for s, t in spec.emb_pairs()]
    if "hidden" in active:
        wanted += [("hidden", "hidden", s, t) for s, t in spec.layer_pairs("hidden")]
    if "attn" in active:
        wanted += [("attn", "attention", s, t) for s, t in spec.layer_pairs("attn")]
    for loss, kind, s, t in wanted:
        if not 0 <= s <= n_student:
            raise CompatibilityError(f"loss {loss!r}: layer map pair ({s}, {t}) names student layer {s}, but the "
                                     f"student has layers 0..{n_student}; fix layer_map= / cos_layer=")
        stored = cache_spec.hidden_layers if kind == "hidden" else cache_spec.attention_layers
        if t not in stored:
            need = sorted({tt for ll, kk, _, tt in wanted if kk == kind})
            flag = "--hidden-layers" if kind == "hidden" else "--attention-layers"
            raise CompatibilityError(
                f"loss {loss!r}: layer map pair ({s}, {t}) needs teacher {kind} layer {t}, but the cache stores "
                f"{kind} layers {list(stored) or 'none'}. Map the student onto stored layers (layer_map=S:T,... / "
                f"cos_layer=S:T), set loss_weights.{loss}=0, or re-run the teacher pass with "
                f"{flag} {','.join(map(str, need))} into a new cache")


def plan_run(cfg: TrainConfig, *, check_tokenizer: bool | None = None) -> RunPlan:
    """Check config × cache × student; raise `CompatibilityError` / `ColumnError` with a remedy."""
    from kdcache.storage import CacheReader, ColumnError, assign_shards

    from kdcache.pipeline.student.losses import CompositeLoss, required_columns

    if not cfg.cache or not cfg.student:
        raise ValueError("kdcache train needs --cache and --student (and --out to write the run)")
    if cfg.batch_size < 1 or cfg.workers < 1:
        raise ValueError(f"batch_size and workers must be >= 1, got {cfg.batch_size}, {cfg.workers}")
    if cfg.kd_positions not in ("all", "masked"):
        raise ValueError(f"kd_positions must be 'all' or 'masked', got {cfg.kd_positions!r}")
    if cfg.schedule not in ("linear", "cosine", "constant"):
        raise ValueError(f"schedule must be linear, cosine or constant, got {cfg.schedule!r}")
    reader = CacheReader(cfg.cache, verify="off")  # the manifest only; shards are checked when read
    cspec, header = reader.spec, reader.manifest.header
    student = _describe_student(cfg)
    n_student = int(student["num_layers"] or 1)
    stored = [*cspec.hidden_layers, *cspec.attention_layers]
    n_teacher = int(header.teacher.get("num_layers") or (max(stored) if stored else n_student))

    # 1. same tokenizer: token ids mean the same thing on both sides
    if check_tokenizer if check_tokenizer is not None else cfg.check_tokenizer:
        _check_tokenizer(cfg, header.tokenizer)
    if student["vocab_size"] is not None and int(student["vocab_size"]) < cspec.vocab_size:
        raise CompatibilityError(f"the student's vocabulary has {student['vocab_size']} entries but the cache's token "
                                 f"ids go up to {cspec.vocab_size - 1}; the student needs the teacher's vocabulary")
    if student["max_positions"] is not None and int(student["max_positions"]) < cspec.max_length:
        raise CompatibilityError(f"cache sequences are up to {cspec.max_length} tokens but the student has "
                                 f"{student['max_positions']} positions")

    # 2. the loss spec, and the layers it maps
    spec = build_loss_spec(cfg, n_student, n_teacher, cspec.targets, student["meta"].get("hidden_layer_map"))
    active = spec.active()
    if not active:
        raise CompatibilityError("every loss weight is 0: nothing to train")
    if cfg.kd_positions == "masked" and not ({"kd", "rskd"} & set(active)):
        raise CompatibilityError("kd_positions=masked restricts the KD term, but no KD loss (kd/rskd) is active")
    _check_layers(spec, cspec, n_student)

    # 3. widths and heads
    s_h, t_h = student["hidden_size"], cspec.hidden_size or None
    if "cos" in active and s_h and t_h and s_h != t_h:
        raise CompatibilityError(
            f"loss 'cos' (cosine between hidden states) needs equal widths, but the student is {s_h} wide and the "
            f"teacher {t_h}; a learned projection cannot make a cosine target meaningful. Set loss_weights.cos=0 "
            "(or use a same-width student: `kdcache init-student` without --hidden-size)")
    if {"emb", "hidden"} & set(active) and t_h and not s_h:
        raise CompatibilityError(
            f"losses emb/hidden compare hidden states of width {t_h}, but the student's width is unknown, so no "
            "projection can be built: give the student a `hidden_size` attribute (student_factory) or an HF config")
    if "attn" in active and student["num_heads"] and cspec.num_heads and student["num_heads"] != cspec.num_heads \
            and not spec.average_heads:
        raise CompatibilityError(
            f"loss 'attn' compares attention maps head by head, but the student has {student['num_heads']} heads "
            f"and the teacher {cspec.num_heads}: set average_heads=true (compares head-averaged maps), or make the "
            f"student with --num-heads {cspec.num_heads}")
    if {"pred", "ce"} & set(active):
        if student["num_labels"] is None:
            raise CompatibilityError(f"losses pred/ce need a classifier student ({student['architecture']} is not "
                                     "one): init the student from the classifier teacher")
        if "pred" in active and cspec.num_labels and int(student["num_labels"]) != cspec.num_labels:
            raise CompatibilityError(f"the cache's task logits have {cspec.num_labels} classes, the student "
                                     f"{student['num_labels']}")

    # 4. columns: name the loss that needs a missing column
    for name, weight in active.items():
        need = cache_columns(required_columns(dataclasses.replace(spec, weights={name: weight})), cspec)
        try:
            reader.resolve_columns(need)
        except ColumnError as exc:
            hint = ""
            if name == "kd" and cspec.targets != "topk":
                hint = f" (the cache holds {cspec.targets!r} targets: use loss_weights.kd=0 loss_weights.rskd=5)"
            elif name == "rskd" and cspec.targets != "sampled":
                hint = f" (the cache holds {cspec.targets!r} targets: use loss_weights.rskd=0 loss_weights.kd=5)"
            raise ColumnError(f"loss {name!r} (weight {weight}) cannot run from this cache{hint}: {exc}") from None
    wanted = set(required_columns(spec))
    if cfg.kd_positions == "masked":
        if not cspec.mlm:
            raise CompatibilityError("kd_positions=masked needs the cache's mask positions (a masked-LM teacher)")
        wanted |= {"mlm_positions", "mlm_labels"}
    columns = reader.resolve_columns(cache_columns(wanted, cspec))
    # Fail here, not at step 1, if the loss module itself refuses the spec (e.g. rskd at T != 1).
    try:
        CompositeLoss(spec, s_h, t_h)
    except ValueError as exc:
        raise CompatibilityError(f"loss spec rejected: {exc}") from None

    # 5. data: every rank needs rows
    if len(reader.shards) < cfg.workers:
        raise CompatibilityError(f"the cache has {len(reader.shards)} shard(s), fewer than --workers {cfg.workers}: "
                                 "each worker reads whole shards; use fewer workers (or a cache with more shards, "
                                 "--shard-tokens)")
    rows = [sum(s.rows for s in assign_shards(reader.shards, r, cfg.workers)) for r in range(cfg.workers)]
    steps = cfg.steps or min(math.ceil(n / cfg.batch_size) for n in rows)
    return RunPlan(loss_spec=spec, columns=columns, steps=int(steps), rows_per_rank=rows, student=student,
                   teacher_layers=n_teacher, teacher_hidden=t_h, cache_fingerprint=header.fingerprint,
                   needs_hidden=bool({"cos", "emb", "hidden"} & set(active)), needs_attentions="attn" in active)


def cache_columns(needed: set[str], cache_spec) -> list[str]:
    """Loss inputs -> cache columns. The losses read decoded `topk_ids`/`topk_logprobs`; on disk
    they are the top-k codec's leaf columns (`CacheSpec.topk_columns`), decoded together."""
    cols = set(needed)
    if cols & {"topk_ids", "topk_logprobs"} and cache_spec.topk_columns:
        cols -= {"topk_ids", "topk_logprobs"}
        cols |= set(cache_spec.topk_columns.values())
    return sorted(cols)



def _check_tokenizer(cfg: TrainConfig, cached: dict[str, Any]) -> None:
    if not cached.get("vocab_hash") or cached.get("vocab_hash") == "none":
        return  # a cache written without a tokenizer record (synthetic): nothing to compare
    if cfg.student_factory:
        return
    from transformers import AutoTokenizer

    from kdcache.pipeline.common.hf import tokenizer_fingerprint

    def missing(why: str) -> CompatibilityError:
        return CompatibilityError(
            f"the student folder {cfg.student} has no loadable tokenizer ({why}), so it cannot be checked against "
            "the cache's; copy the teacher's tokenizer files into it (`kdcache init-student` does), or pass "
            "check_tokenizer=false if you are sure the token ids agree")

    folder = Path(cfg.student)
    # Checked first: transformers 5 builds an empty tokenizer from a config alone instead of failing.
    if folder.is_dir() and not any(next(folder.glob(p), None) for p in TOKENIZER_FILES):
        raise missing("no tokenizer files")
    try:
        tok = AutoTokenizer.from_pretrained(cfg.student, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable tokenizer there
        raise missing(type(exc).__name__) from None
    mine = tokenizer_fingerprint(tok)
    if mine["vocab_hash"] != cached["vocab_hash"] or mine["vocab_size"] != cached.get("vocab_size"):
        raise CompatibilityError(
            f"the student's tokenizer ({mine['class']}, {mine['vocab_size']} tokens, {mine['vocab_hash'][:19]}...) "
            f"differs from the one the cache was made with ({cached.get('class', '?')}, {cached.get('vocab_size')} "
            f"tokens, {str(cached['vocab_hash'])[:19]}...): the cached token ids would mean other tokens. Use a "
            "student made from the cache's teacher (`kdcache init-student --teacher T`), or re-run the teacher pass "
            "with a teacher that shares the student's tokenizer")


# --------------------------------------------------------------------------------------------- #
# data: one rank's batches, addressed by (epoch, rows consumed)
# --------------------------------------------------------------------------------------------- #


class RankStream:
    """Fixed-size batches over one rank's shards.

    Batch i of an epoch is rows [i·B, (i+1)·B) of the rank's row stream, whatever the shards' row
    groups: record batches are re-cut here, across shard boundaries, so `skip_rows = i·B` resumes
    on exactly the batch an uninterrupted run would read next. The last batch of an epoch may be
    short; nothing is dropped.
    """

    def __init__(self, reader, columns: list[str], batch_size: int, rank: int, world_size: int, seed: int = 0,
                 shuffle: bool = False):
        from kdcache.storage import assign_shards

        self.reader, self.columns, self.batch_size = reader, columns, batch_size
        self.rank, self.seed, self.shuffle = rank, seed, shuffle
        self.shards = assign_shards(reader.shards, rank, world_size)
        self.rows_per_epoch = sum(s.rows for s in self.shards)

    def shard_order(self, epoch: int) -> list:
        if not self.shuffle:
            return list(self.shards)
        order = np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(self.shards))
        return [self.shards[i] for i in order]

    def record_batches(self, epoch: int, skip_rows: int = 0):
        """(Arrow record batch of up to B rows) in order, starting `skip_rows` into the epoch."""
        import pyarrow as pa

        pending, have = [], 0
        for rb in self.reader.iter_batches(self.columns, batch_size=self.batch_size, shards=self.shard_order(epoch),
                                           skip_rows=skip_rows):
            while rb.num_rows:
                take = min(self.batch_size - have, rb.num_rows)
                pending.append(rb.slice(0, take))
                have += take
                rb = rb.slice(take)
                if have == self.batch_size:
                    yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)
                    pending, have = [], 0
        if pending:
            yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)

    def batches(self, epoch: int, skip_rows: int = 0) -> Iterator[dict[str, Any]]:
        for rb in self.record_batches(epoch, skip_rows):
            yield decode_batch(rb, self.reader.spec)


def decode_batch(rb, cache_spec) -> dict[str, Any]:
    """Arrow rows -> padded CPU tensors (the losses' shapes); `rows` counts them."""
    from kdcache.storage.columns import to_numpy
    from kdcache.storage.reader import numpy_to_torch

    out = {k: v for k, v in numpy_to_torch(to_numpy(rb, cache_spec)).items() if isinstance(v, torch.Tensor)}
    out["rows"] = rb.num_rows
    return out


def prefetched(it: Iterator, depth: int) -> Iterator:
    """Run `it` `depth` items ahead in a thread (Parquet decode overlaps the step). Order is kept."""
    if depth <= 0:
        yield from it
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def work():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            q.put(exc)

    t = threading.Thread(target=work, daemon=True, name="kdcache-prefetch")
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# --------------------------------------------------------------------------------------------- #
# loss, optimiser, schedule, one step
# --------------------------------------------------------------------------------------------- #


class DistillLoss(nn.Module):
    """`CompositeLoss`, plus KD restricted to the cached mask positions when `kd_positions="masked"`.

    Restricting gathers the student logits and the teacher's top-k/samples at the M masked
    positions ([B, M, ...]) so the full-vocabulary log-softmax runs at M, not T, positions.
    """

    def __init__(self, spec, student_hidden: int | None, teacher_hidden: int | None, kd_positions: str = "all"):
        super().__init__()
        from kdcache.pipeline.student.losses import CompositeLoss

        self.kd_name = next((n for n in ("kd", "rskd") if n in spec.active()), None)
        self.masked = kd_positions == "masked" and self.kd_name is not None
        self.spec = spec
        self.kd_weight = spec.active().get(self.kd_name, 0.0) if self.masked else 0.0
        rest = {k: v for k, v in spec.active().items() if not (self.masked and k == self.kd_name)}
        self.composite = CompositeLoss(dataclasses.replace(spec, weights=rest), student_hidden, teacher_hidden) \
            if rest else None

    def forward(self, outputs, batch):
        total, parts = (self.composite(outputs, batch) if self.composite is not None else (None, {}))
        if self.masked:
            from kdcache.pipeline.student.losses import sampled_kd_loss, topk_kd_loss

            pos = batch["mlm_positions"].long()
            valid = pos >= 0
            idx = pos.clamp(min=0)

            def at(x):  # [B, T, ...] -> [B, M, ...]
                return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))

            logits = at(outputs.logits)
            if self.kd_name == "kd":
                tail = at(batch["topk_log_tail"].unsqueeze(-1)).squeeze(-1) if "topk_log_tail" in batch else None
                kd = topk_kd_loss(logits, at(batch["topk_ids"]), at(batch["topk_logprobs"]), tail, valid,
                                  self.spec.temperature, self.spec.kd_tail)
            else:
                kd = sampled_kd_loss(logits, at(batch["sample_ids"]), at(batch["sample_weights"]), valid,
                                     self.spec.temperature)
            parts = {**parts, self.kd_name: kd.detach()}
            total = self.kd_weight * kd if total is None else total + self.kd_weight * kd
        return total, parts


def build_optimizer(cfg: TrainConfig, modules: list[nn.Module]) -> torch.optim.Optimizer:
    """AdamW; matrices decay, biases and norms do not (nanoGPT's split)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:  # tied weights appear once
                seen.add(id(p))
                (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    betas = tuple(float(b) for b in cfg.adam_betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps)


def build_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:  # step = optimiser steps already taken
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_seed(seed: int, step: int, rank: int) -> int:
    # Dropout masks depend only on (seed, step, rank): a resumed step draws what the original did.
    return (seed * 1_000_003 + step * 4099 + rank) % (2**63 - 1)


def _allreduce_grads(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average gradients over ranks.

    Not DDP: the loss module's projection must be averaged too, losses that do not read some
    student output (e.g. no logits in TinyBERT's general stage) leave parameters without a
    gradient, and a non-HF student should not need DDP's find_unused_parameters traversal.
    """
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0

    def flush():
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        flat.div_(world_size)
        for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(synced)

    for g in grads:  # ~32M elements a bucket: one flat copy at a time, not the whole model
        bucket.append(g)
        size += g.numel()
        if size >= 32 << 20:
            flush()
            bucket, size = [], 0
    if bucket:
        flush()


@dataclass
class Components:
    student: nn.Module
    loss_fn: DistillLoss
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list
    device: torch.device
    amp: torch.dtype | None
    world_size: int = 1
    max_grad_norm: float = 0.0


def build_components(cfg: TrainConfig, plan: RunPlan, device: torch.device, world_size: int = 1) -> Components:
    torch.manual_seed(cfg.seed)  # the projection's init: the same on every rank
    student = build_student(cfg, plan.needs_hidden, plan.needs_attentions).to(device)
    loss_fn = DistillLoss(plan.loss_spec, plan.student["hidden_size"], plan.teacher_hidden, cfg.kd_positions).to(device)
    optimizer = build_optimizer(cfg, [student, loss_fn])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    amp = amp_dtype(cfg.autocast, device)
    return Components(student, loss_fn, optimizer, build_scheduler(cfg, optimizer, plan.steps), params, device, amp,
                      world_size, cfg.max_grad_norm)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_step(c: Components, batch: dict[str, Any], seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward, loss, backward, gradient sync, clip, optimiser and schedule step."""
    torch.manual_seed(seed)
    with torch.autocast(c.device.type, dtype=c.amp, enabled=c.amp is not None):
        outputs = c.student(batch["input_ids"], batch["attention_mask"])
        total, parts = c.loss_fn(outputs, batch)
    c.optimizer.zero_grad(set_to_none=True)
    total.backward()
    if c.world_size > 1:
        _allreduce_grads(c.params, c.world_size)
    if c.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(c.params, c.max_grad_norm)
    c.optimizer.step()
    c.scheduler.step()
    return total.detach(), parts


# --------------------------------------------------------------------------------------------- #
# sessions: where checkpoints go (Ray Train, or a local folder for --no-ray)
# --------------------------------------------------------------------------------------------- #


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


# Data-order settings a checkpoint's positions are only valid under.
RESUME_KEYS = ("batch_size", "workers", "seed", "shuffle")


def _state_of(cfg: TrainConfig, plan: RunPlan, step: int) -> dict[str, Any]:
    return {"step": step, "cache_fingerprint": plan.cache_fingerprint, **{k: getattr(cfg, k) for k in RESUME_KEYS},
            "config": dataclasses.asdict(cfg)}


def check_resume(state: dict[str, Any], cfg: TrainConfig, plan: RunPlan, where: str) -> None:
    diffs = [f"{k}: checkpoint {state.get(k)!r}, now {getattr(cfg, k)!r}" for k in RESUME_KEYS
             if state.get(k) != getattr(cfg, k)]
    if state.get("cache_fingerprint") != plan.cache_fingerprint:
        diffs.append("the cache differs (fingerprint)")
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


# --------------------------------------------------------------------------------------------- #
# the per-worker loop
# --------------------------------------------------------------------------------------------- #


def _keep_until(path: Path, step: int) -> None:
    """Drop JSONL lines of steps after `step` (written by an attempt that did not reach a checkpoint)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in lines))


def _maybe_fail(cfg: TrainConfig, step: int, rank: int) -> None:
    """Test hook `fail_at_step` (e.g. `fail_at_step=5:kill,8`): before step 5 the worker process is
    SIGKILLed (as by the OOM killer or a lost node), before step 8 it raises. Each fires once per run
    folder (a marker file remembers it), so the attempt that resumes past it does not fail again."""
    wanted = dict(f"{s}:raise".split(":")[:2] for s in map(str, cfg.fail_at_step or []))
    kind = wanted.get(str(step))
    if rank != cfg.fail_rank or kind is None:
        return
    marker = Path(cfg.out) / f".fail-at-step-{step}-rank-{rank}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    if kind == "kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected failure before step {step} on rank {rank} (fail_at_step)")


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """One worker's training loop; `config` is `dataclasses.asdict(TrainConfig)` (Ray Tune can sweep it).

    Returns the run summary on rank 0 (Ray Train hands it back as `Result.return_value`).
    """
    from kdcache.storage import CacheReader

    loop_started = time.time()
    cfg = TrainConfig(**config)
    in_ray = not cfg.no_ray
    session = RaySession() if in_ray else LocalSession(Path(cfg.out), cfg.keep_checkpoints)
    rank, world = session.rank, session.world_size
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.use_gpu and torch.cuda.is_available():
        if in_ray:
            import ray.train.torch

            device = ray.train.torch.get_device()
        else:
            device = torch.device("cuda")
    else:
        device = torch.device("cpu")
        if not in_ray:  # Ray Train workers start with the settings in their environment
            allocator.tune_this_process()
    out = Path(cfg.out)

    plan = plan_run(cfg, check_tokenizer=False)  # the driver already compared tokenizers
    c = build_components(cfg, plan, device, world)
    reader = CacheReader(cfg.cache, verify=cfg.verify)
    stream = RankStream(reader, plan.columns, cfg.batch_size, rank, world, cfg.seed, cfg.shuffle)

    step, epoch, rows = 0, 0, 0
    with session.restore() as ckpt:
        if ckpt is not None:
            state = json.loads((ckpt / "state.json").read_text())
            check_resume(state, cfg, plan, str(ckpt))
            c.student.load_state_dict(torch.load(ckpt / "model.pt", map_location=device, weights_only=True))
            c.loss_fn.load_state_dict(torch.load(ckpt / "loss.pt", map_location=device, weights_only=True))
            c.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
            c.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
            pos = json.loads((ckpt / f"rank-{rank:05d}.json").read_text())
            step, epoch, rows = int(state["step"]), int(pos["epoch"]), int(pos["rows"])
            _set_rng_state(torch.load(ckpt / f"rng-{rank:05d}.pt", weights_only=False))
    resumed_from = step
    if world > 1:  # same start everywhere, whatever a factory did at init
        import torch.distributed as dist

        with torch.no_grad():
            for p in c.params:
                dist.broadcast(p.data, src=0)

    metrics_path, samples_path = out / "metrics.jsonl", out / "samples" / f"rank-{rank:05d}.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _keep_until(metrics_path, step)  # the log reads as one run, however many attempts it took
    if cfg.log_samples:
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        _keep_until(samples_path, step)
    tb = None
    if rank == 0 and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / "tb"), purge_step=step + 1)
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.steps, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)

    def write_checkpoint(d: Path) -> None:
        if rank == 0:
            torch.save(c.student.state_dict(), d / "model.pt")
            torch.save(c.loss_fn.state_dict(), d / "loss.pt")
            torch.save(c.optimizer.state_dict(), d / "optimizer.pt")
            torch.save(c.scheduler.state_dict(), d / "scheduler.pt")
        (d / f"rank-{rank:05d}.json").write_text(json.dumps(
            {"rank": rank, "epoch": epoch, "rows": rows, "step": step}))
        torch.save(_rng_state(), d / f"rng-{rank:05d}.pt")
        if rank == 0:  # last: a local checkpoint with state.json is complete
            (d / "state.json").write_text(json.dumps(_state_of(cfg, plan, step), default=str))

    def batches_from(e: int, skip: int):
        return prefetched(stream.batches(e, skip), cfg.prefetch)

    it = batches_from(epoch, rows)
    empty_epochs = 0
    first_batch_at = None
    timings = {"step_s": [], "data_s": []}
    last_metrics: dict[str, Any] = {}
    t_data = time.perf_counter()
    try:
        while step < plan.steps:
            try:
                batch = next(it)
            except StopIteration:
                # Next epoch. Ranks may hold different row counts: each wraps on its own, steps stay in lockstep.
                empty_epochs = empty_epochs + 1 if rows == 0 else 0
                if empty_epochs > 1:
                    raise RuntimeError(f"rank {rank} has no rows to read") from None
                epoch, rows = epoch + 1, 0
                it = batches_from(epoch, rows)
                continue
            data_s = time.perf_counter() - t_data
            if first_batch_at is None:
                first_batch_at = time.time()  # start-up ends here: worker up, student loaded, data flowing
            step += 1
            _maybe_fail(cfg, step, rank)
            t0 = time.perf_counter()
            n_rows = batch.pop("rows")
            sample_ids = batch.pop("sample_id").tolist()
            batch = to_device(batch, device)
            total, parts = train_step(c, batch, step_seed(cfg.seed, step, rank))
            rows += n_rows
            tokens = float(batch["attention_mask"].sum())
            # Every rank's losses, averaged: the logged loss is the global batch's.
            vals = torch.stack([total.float(), *[v.float() for v in parts.values()],
                                torch.tensor(tokens, device=total.device)])
            if world > 1:  # on the device: NCCL reduces only CUDA tensors
                import torch.distributed as dist

                dist.all_reduce(vals)
                vals[:-1] /= world
            vals = vals.cpu()
            step_s = time.perf_counter() - t0
            timings["step_s"].append(step_s)
            timings["data_s"].append(data_s)
            wall = step_s + data_s
            last_metrics = {"step": step, "epoch": epoch, "loss": float(vals[0]),
                            **{f"loss_{k}": float(v) for k, v in zip(parts, vals[1:-1])},
                            "lr": _lr_at(c, step), "tokens": int(vals[-1]),
                            "tokens_per_s": float(vals[-1]) / max(wall, 1e-9), "step_s": step_s, "data_s": data_s}
            if cfg.log_samples:
                with samples_path.open("a") as f:
                    f.write(json.dumps({"step": step, "epoch": epoch, "sample_ids": sample_ids}) + "\n")
            if rank == 0 and (step % cfg.log_every == 0 or step == plan.steps):
                with metrics_path.open("a") as f:
                    f.write(json.dumps(last_metrics) + "\n")
                if tb is not None:
                    for k, v in last_metrics.items():
                        if k.startswith("loss") or k in ("lr", "tokens_per_s"):
                            tb.add_scalar(k.replace("loss_", "loss/"), v, step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last_metrics['loss']:.4f}", tok_s=f"{last_metrics['tokens_per_s']:,.0f}",
                                refresh=False)
            if step % max(1, cfg.checkpoint_every) == 0 or step == plan.steps:
                session.save(step, write_checkpoint, {k: v for k, v in last_metrics.items()})
            t_data = time.perf_counter()
    finally:
        if bar is not None:
            bar.close()
        if tb is not None:
            tb.close()

    summary: dict[str, Any] = {}
    if rank == 0:
        summary = _finish(cfg, plan, c, out, step, resumed_from, last_metrics, timings)
        summary["loop_started_at"] = loop_started
        summary["first_batch_at"] = first_batch_at
        summary["malloc_tuned"] = device.type == "cpu" and allocator.tuned()
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def _lr_at(c: Components, step: int) -> float:
    # LambdaLR: lr(step k) = base_lr * factor(k - 1); after scheduler.step() last_epoch == step.
    group = c.optimizer.param_groups[0]
    return float(group["initial_lr"] * c.scheduler.lr_lambdas[0](step - 1))


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


# --------------------------------------------------------------------------------------------- #
# the driver
# --------------------------------------------------------------------------------------------- #


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
    # core can starve them and hang a small machine (RAY_NOTES: 0.9 x 2 on 2 CPUs hung, 0.5 x 2 ran).
    return max(0.1, min(1.0, round((total - 1) / cfg.workers, 2) or 0.1))


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Check, then train (Ray Train, or in-process with `no_ray`). Re-running the same command resumes."""
    cfg = normalize(cfg)
    plan = plan_run(cfg)
    _check_existing_checkpoint(cfg, plan)
    state, where = _latest_state(cfg)
    if state is not None:
        log(f"resuming from {where} (step {state['step']} of {plan.steps})")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    if cfg.no_ray:
        if cfg.workers != 1:
            raise ValueError("no_ray runs one worker in this process; drop --workers or drop --no-ray")
        t0 = time.time()
        summary = train_loop(dataclasses.asdict(cfg))
        summary["startup_s"] = (summary.get("first_batch_at") or t0) - t0
        return summary
    return _fit_with_ray(cfg, plan, log)


def _fit_with_ray(cfg: TrainConfig, plan: RunPlan, log) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from kdcache.pipeline.common.runtime import init_ray

    started = init_ray(cfg.address)
    try:
        cpus = auto_cpus_per_worker(cfg)
        resources = {"CPU": cpus} | ({"GPU": 1} if cfg.use_gpu else {})
        # CPU workers reuse freed memory instead of faulting it in every step (allocator.py: ~10% per step).
        worker_env = {} if cfg.use_gpu else allocator.worker_env()
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
