"""The run plan: every compatibility check between the config, the cache and the student, before
step 1 (also what `kdcache train --validate` runs). What each loss term needs is the term's own
declaration (`kdcache.pipeline.student.terms`); this module asks every active term."""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.pipeline.common.hf import TOKENIZER_FILES
from kdcache.pipeline.student.config import TrainConfig
from kdcache.pipeline.student.losses import parse_layer_map
from kdcache.pipeline.student.phases import Phase, build_phases
from kdcache.pipeline.student.presets import PRESETS, preset
from kdcache.pipeline.student.terms import TERMS, CompositeLoss, LossSpec, required_columns
from kdcache.pipeline.student.trainer.adapter import describe_student


class CompatibilityError(ValueError):
    """The config, the cache and the student do not fit together; the message says what to do."""


@dataclass
class RunPlan:
    loss_spec: LossSpec
    columns: list[str]  # what every worker reads (only what the losses need)
    steps: int
    data: dict[str, Any]  # the epoch's split over the workers (`Assignment.summary`)
    student: dict[str, Any]
    teacher_layers: int
    teacher_hidden: int | None
    cache_fingerprint: str
    needs_hidden: bool
    needs_attentions: bool
    phases: list[Phase]  # one unless knowledge_transfer splits the run; each reads only its columns

    @property
    def rows_per_rank(self) -> list[int]:
        return self.data["rows_per_rank"]

    def summary(self) -> dict[str, Any]:
        s = self.loss_spec
        return {"loss_weights": s.active(), "temperature": s.temperature, "kd_tail": s.kd_tail,
                "layer_map": s.layer_map, "cos_layer": s.cos_layer, "columns": self.columns, "steps": self.steps,
                "rows_per_rank": self.rows_per_rank, "data": self.data,
                "student": {k: v for k, v in self.student.items() if k != "meta"},
                "teacher_layers": self.teacher_layers, "teacher_hidden_size": self.teacher_hidden,
                "projection": bool(self.teacher_hidden and self.student["hidden_size"]
                                   and self.teacher_hidden != self.student["hidden_size"]
                                   and any(t.projected for t in s.active_terms())),
                "knowledge_transfer": [p.summary() for p in self.phases],
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
    elif student_map and (spec.layer_map is not None or any(
            w and n in TERMS and TERMS[n].layerwise for n, w in changes.get("weights", spec.weights).items())):
        # A copied student knows which teacher block each of its blocks came from (a MobileBERT student:
        # l <-> l); layer-wise terms switched on through loss_weights in a preset without a map use it too.
        changes["layer_map"] = [tuple(p) for p in student_map]
    if cfg.cos_layer:
        changes["cos_layer"] = _pair(cfg.cos_layer)
    return dataclasses.replace(spec, **changes) if changes else spec



def plan_run(cfg: TrainConfig, *, check_tokenizer: bool | None = None) -> RunPlan:
    """Check config × cache × student; raise `CompatibilityError` / `ColumnError` with a remedy."""
    from kdcache.storage import CacheReader

    _check_options(cfg)
    reader = CacheReader(cfg.cache, verify="off")  # the manifest only; shards are checked when read
    cspec, header = reader.spec, reader.manifest.header
    student = describe_student(cfg)
    n_student = int(student["num_layers"] or 1)
    stored = [*cspec.hidden_layers, *cspec.attention_layers]
    n_teacher = int(header.teacher.get("num_layers") or (max(stored) if stored else n_student))

    # 1. same tokenizer: token ids mean the same thing on both sides
    if check_tokenizer if check_tokenizer is not None else cfg.check_tokenizer:
        _check_tokenizer(cfg, header.tokenizer)
    _check_vocabulary(student, cspec)

    # 2. the loss spec; every active term checks the layers it maps and what it needs from the student
    spec = build_loss_spec(cfg, n_student, n_teacher, cspec.targets, student["meta"].get("hidden_layer_map"))
    _check_terms(cfg, spec, student, cspec, n_student)

    # 3. columns: only what the losses read, a missing one named with the loss that needs it
    columns = _columns(cfg, spec, reader)
    t_h = cspec.hidden_size or None
    # Fail here, not at step 1, if the loss module itself refuses the spec (e.g. rskd at T != 1).
    try:
        CompositeLoss(spec, student["hidden_size"], t_h)
    except ValueError as exc:
        raise CompatibilityError(f"loss spec rejected: {exc}") from None

    # 4. data: which rows each rank reads (row groups, not shards: any number of workers up to those)
    data = _assignment(cfg, reader)
    steps = int(cfg.steps or data.steps)

    # 5. knowledge transfer: the run's phases, each reading only the columns of its own terms
    try:
        phases = build_phases(cfg.knowledge_transfer, spec, steps)
    except ValueError as exc:
        raise CompatibilityError(str(exc)) from None
    for phase in phases:
        phase.columns = columns if len(phases) == 1 else _columns(cfg, phase.spec, reader)
    terms = spec.active_terms()
    return RunPlan(loss_spec=spec, columns=columns, steps=steps, data=data.summary(), student=student,
                   teacher_layers=n_teacher, teacher_hidden=t_h, cache_fingerprint=header.fingerprint,
                   needs_hidden=any("hidden_states" in t.outputs for t in terms),
                   needs_attentions=any("attentions" in t.outputs for t in terms), phases=phases)


def _check_options(cfg: TrainConfig) -> None:
    if not cfg.cache or not cfg.student:
        raise ValueError("kdcache train needs --cache and --student (and --out to write the run)")
    if cfg.batch_size < 1 or cfg.workers < 1:
        raise ValueError(f"batch_size and workers must be >= 1, got {cfg.batch_size}, {cfg.workers}")
    if cfg.kd_positions not in ("all", "masked"):
        raise ValueError(f"kd_positions must be 'all' or 'masked', got {cfg.kd_positions!r}")
    if cfg.shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0 (0 = four batches), got {cfg.shuffle_buffer}")
    if cfg.logit_chunk < -1:
        raise ValueError(f"logit_chunk must be -1 (one chunk), 0 (auto) or a row count, got {cfg.logit_chunk}")
    if cfg.schedule not in ("linear", "cosine", "constant"):
        raise ValueError(f"schedule must be linear, cosine or constant, got {cfg.schedule!r}")


def _check_vocabulary(student: dict[str, Any], cspec) -> None:
    if student["vocab_size"] is not None and int(student["vocab_size"]) < cspec.vocab_size:
        raise CompatibilityError(f"the student's vocabulary has {student['vocab_size']} entries but the cache's token "
                                 f"ids go up to {cspec.vocab_size - 1}; the student needs the teacher's vocabulary")
    if student["max_positions"] is not None and int(student["max_positions"]) < cspec.max_length:
        raise CompatibilityError(f"cache sequences are up to {cspec.max_length} tokens but the student has "
                                 f"{student['max_positions']} positions")


def _check_terms(cfg: TrainConfig, spec: LossSpec, student: dict[str, Any], cspec, n_student: int) -> None:
    """Layers first (every term), then what each term needs from the student and the cache's spec."""
    if not spec.active():
        raise CompatibilityError("every loss weight is 0: nothing to train")
    terms = spec.active_terms()
    if cfg.kd_positions == "masked" and not any(t.token_kd for t in terms):
        raise CompatibilityError("kd_positions=masked restricts the KD term, but no KD loss (kd/rskd) is active")
    _check_layers(spec, cspec, n_student)
    for term in terms:
        why = term.problem(spec, student, cspec)
        if why:
            raise CompatibilityError(why)


def _check_layers(spec: LossSpec, cache_spec, n_student: int) -> None:
    """Every teacher layer a loss compares must be stored; every student layer must exist."""
    # (loss, kind, student, teacher)
    wanted = [(term.name, kind, s, t) for term in spec.active_terms() for kind, s, t in term.layers(spec)]
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


def _columns(cfg: TrainConfig, spec: LossSpec, reader) -> list[str]:
    from kdcache.storage import ColumnError

    cspec = reader.spec
    for name, weight in spec.active().items():
        need = cache_columns(required_columns(dataclasses.replace(spec, weights={name: weight})), cspec)
        try:
            reader.resolve_columns(need)
        except ColumnError as exc:
            hint = TERMS[name].column_hint(cspec)
            raise ColumnError(f"loss {name!r} (weight {weight}) cannot run from this cache{hint}: {exc}") from None
    wanted = set(required_columns(spec))
    if cfg.kd_positions == "masked":
        if not cspec.mlm:
            raise CompatibilityError("kd_positions=masked needs the cache's mask positions (a masked-LM teacher)")
        wanted |= {"mlm_positions", "mlm_labels"}
    return reader.resolve_columns(cache_columns(wanted, cspec))


def describe_data(data: dict[str, Any]) -> str:
    """One line for the terminal: how the epoch is split over the workers."""
    where = f"{data['row_groups']} row groups of {data['shards']} shard(s)"
    batches = sorted(set(data["batches_per_rank"]))
    line = (f"data: {data['rows']} rows in {where} -> {data['workers']} worker(s): rows per worker "
            f"{data['rows_per_rank']}, {'/'.join(map(str, batches))} batches each per epoch")
    if data["repeated_rows"]:
        line += f"; {data['repeated_rows']} row(s) read twice per epoch to even out the last step"
    return line


def _assignment(cfg: TrainConfig, reader):
    """Epoch 0's split of the cache over the workers (every epoch's has the same sizes)."""
    from kdcache.storage import AssignmentError, assign

    try:
        return assign(reader.row_groups(), cfg.workers, cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle)
    except AssignmentError as exc:
        raise CompatibilityError(f"--workers {cfg.workers}: {exc}") from None


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
