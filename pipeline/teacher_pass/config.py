"""The teacher pass's options (`CacheConfig`: every YAML key; fields marked `flag(...)` are also flags) and what the
driver derives from them before any actor starts (`prepare` -> `Prepared`: the cache's spec and header)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kdcache.pipeline.common.config import flag

if TYPE_CHECKING:  # `kdcache --help` builds its flags from CacheConfig: no pyarrow import for that
    from kdcache.storage import CacheSpec, Header


DEFAULT_SHARD_BYTES = 256 << 20


@dataclass
class CacheConfig:
    """Every option of `kdcache cache` / `kdcache plan` (YAML keys = these names). A field with `flag(help)`
    metadata is also a flag; the CLI shows its default unless the help already says it."""

    teacher: str = field(metadata=flag("teacher folder (save_pretrained layout) or hub name"))
    corpus: list[str] = field(metadata=flag("corpus files: paths, globs or fsspec URLs (comma-separated or repeated)"))
    out: str = field(default="", metadata=flag("cache directory or URL to write"))
    mode: str = field(default="pack", metadata=flag(
        "pack (fixed-length sequences, pretraining KD) | examples (one per document, task KD)"))
    max_length: int = field(default=128, metadata=flag("tokens per sequence"))
    top_k: int = field(default=64, metadata=flag("top-k soft targets per token, 0 = none"))
    sample: int = field(default=0, metadata=flag(
        "RS-KD: N draws per token from the teacher instead of top-k, 0 = top-k targets"))
    hidden_layers: str = field(default="none", metadata=flag(
        "hidden states to cache: e.g. 0,3,6 | all | none (0 = embedding output)"))
    attention_layers: str = field(default="none", metadata=flag(
        "attention maps to cache: e.g. 6 | all | none (1-based)"))
    dtype: str = field(default="float16", metadata=flag(
        "hidden-state storage: float16 | bfloat16 | int8 (attention follows unless --attention-dtype)"))
    attention_dtype: str = field(default="", metadata=flag(
        "attention storage: float16 | bfloat16 | uint8 (default: --dtype's; uint8 when --dtype int8)"))
    mlm_probability: float = field(default=0.15, metadata=flag(
        "masked-LM teachers: share of tokens masked, 80/10/10"))
    dupe_factor: int = field(default=1, metadata=flag("masked-LM teachers: masked copies per sequence"))
    seed: int = field(default=0, metadata=flag("seed for masking and RS-KD sampling"))
    batch_size: int = field(default=32, metadata=flag("sequences per teacher forward"))
    actors: int = field(default=0, metadata=flag("teacher actors (default 0 = one per GPU, else 1)"))
    gpus_per_actor: float = field(default=1.0, metadata=flag("GPUs per actor, fractional allowed"))
    cpus_per_actor: float = field(default=0.0, metadata=flag(
        "CPUs per actor (default 0 = auto: beside a GPU 1; CPU actors share the cluster's CPUs, at most one node's)"))
    shard_tokens: int = field(default=0, metadata=flag("tokens per shard (default 0 = auto: about 256 MB per shard)"))
    text_field: str = field(default="text", metadata=flag(
        "text field/column of jsonl/json/csv/parquet/datasets corpora"))
    label_field: str | None = field(default=None, metadata=flag("label field (examples mode)"))
    label_map: dict | None = None
    include_labels: list | None = None
    txt_mode: str = field(default="line", metadata=flag(
        "line | block: one document per line or per blank-line block"))
    encoding_errors: str = field(default="strict", metadata=flag(
        "strict (default: fail naming the byte offset) | skip (count and skip)"))
    corpus_format: str | None = None
    task_logits: bool = True  # classifier teachers: cache per-example logits
    topk_codec: str = field(default="", metadata=flag(  # "": kdcache.storage.codecs.DEFAULT_TOPK_CODEC
        "top-k storage codec (default: the format's default)"))
    topk_calibration_sequences: int = field(default=128, metadata=flag(
        "sequences whose teacher top-k fit the top-k codec, 0 = off"))
    zstd_level: int = 3
    float16_byte_stream_split: bool = field(default=False, metadata=flag(
        "BYTE_STREAM_SPLIT on float16 columns: ~7% smaller hidden states, but duckdb cannot read them "
        "(docs/format.md §6)"))
    encoder_threads: int = 0  # threads per shard turning teacher outputs into Arrow (0 = auto: 1 on CPU, 2 on GPU)
    shards_in_flight: int = field(default=0, metadata=flag(
        "shards per teacher at once, one Parquet writer each (default 0 = auto: 1 on CPU; GPU: 4, more with "
        "hidden states or attention)"))
    overwrite: bool = field(default=False, metadata=flag("replace a different cache at --out"))
    max_retries: int = field(default=3, metadata=flag(  # system failures (actor/node death) only
        "resubmissions of a shard whose actor died"))
    teacher_kind: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = field(default=False, metadata=flag("run code shipped with the teacher (off by default)"))
    allow_pickle: bool = field(default=False, metadata=flag(
        "accept pickle (.bin) teacher weights, loaded with weights_only=True"))
    device: str = field(default="auto", metadata=flag("auto (cuda if available) | cpu | cuda | cuda:N"))
    autocast: str = "auto"
    address: str | None = field(default=None, metadata=flag(
        "Ray cluster address (default: RAY_ADDRESS, else a local cluster)"))
    executor: str = field(default="ray", metadata=flag(
        "ray (teacher actors, default) | local (in this process, no Ray)"))
    max_sequences: int = field(default=0, metadata=flag("stop after this many sequences, 0 = all"))
    progress: bool = field(default=True, metadata=flag("no progress bar"))


def parse_layers(value: str | list | tuple, n_layers: int, first: int, what: str) -> tuple[int, ...]:
    """'0,3,6' | 'all' | 'none' -> sorted layer indices, checked against the teacher's depth."""
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        items = [v for v in str(value).replace(" ", "").split(",") if v]
    if items in (["none"], []):
        return ()
    if items == ["all"]:
        return tuple(range(first, n_layers + 1))
    try:
        layers = sorted({int(v) for v in items})
    except ValueError:
        raise ValueError(f"--{what}: expected comma-separated integers, 'all' or 'none', got {value!r}") from None
    bad = [layer for layer in layers if not first <= layer <= n_layers]
    if bad:
        raise ValueError(f"--{what}: layer(s) {bad} out of range; the teacher has layers {first}..{n_layers}")
    return tuple(layers)


@dataclass
class Prepared:
    """What the driver derives before any actor starts."""

    cfg: CacheConfig
    spec: CacheSpec
    header: Header
    kind: str
    sequences_per_shard: int
    pad_id: int
    notes: tuple[str, ...] = ()  # what the driver decided for the user (e.g. a headless folder run as an encoder)

    @property
    def uses_head(self) -> bool:
        return head_used(self.cfg, self.kind)

    def teacher_options(self):
        """How actors load the teacher: as the kind resolved here, not the config's `auto`."""
        from kdcache.pipeline.teacher_pass.teacher import teacher_options_from

        return teacher_options_from(self.cfg, self.kind)


def head_used(cfg: CacheConfig, kind: str) -> bool:
    """Whether a cache with these options reads the teacher's head: soft targets from an LM head, task
    logits from a classifier's."""
    if kind in ("masked-lm", "causal-lm"):
        return cfg.top_k > 0 or cfg.sample > 0
    return kind == "classifier" and cfg.task_logits


def write_options(cfg: CacheConfig):
    """The Parquet writer's options for this pass (driver and actors alike)."""
    from kdcache.storage import WriteOptions

    return WriteOptions(zstd_level=cfg.zstd_level, float16_byte_stream_split=cfg.float16_byte_stream_split)


def output_spec(prep: Prepared):
    """What the teacher runner extracts for this cache (`teacher.OutputSpec`)."""
    from kdcache.pipeline.teacher_pass.teacher import OutputSpec

    spec = prep.spec
    return OutputSpec(targets=spec.targets, k=spec.k, num_samples=spec.num_samples, hidden_layers=spec.hidden_layers,
                      hidden_dtype=spec.hidden_dtype, attention_layers=spec.attention_layers,
                      attention_dtype=spec.attention_dtype, task_logits=spec.num_labels > 0, seed=prep.cfg.seed,
                      vocab_size=spec.vocab_size)


def prepare(cfg: CacheConfig) -> Prepared:
    """Read the teacher's config and tokenizer (never its weights) and fix the cache's options."""
    from transformers import AutoConfig, AutoTokenizer

    from kdcache.storage import CacheSpec, Header
    from kdcache.storage.fs import redact
    from kdcache.storage.codecs import DEFAULT_TOPK_CODEC, get_topk_codec
    from kdcache.pipeline.teacher_pass.teacher import (TeacherLoadError, resolve_kind, teacher_fingerprint_from_config,
                                                       teacher_options_from)
    from kdcache.pipeline.common.hf import check_weights, detect_kind, tokenizer_fingerprint

    opts = teacher_options_from(cfg)
    check_weights(cfg.teacher, cfg.allow_pickle)
    try:
        config = AutoConfig.from_pretrained(cfg.teacher, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(cfg.teacher, revision=cfg.revision,
                                                  trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        if "trust_remote_code" in str(exc):
            # The folder ships its own Python: say so, and name the one switch that runs it.
            raise TeacherLoadError(f"teacher {cfg.teacher}: it needs its own code to load (trust_remote_code); "
                                   "kdcache does not run a folder's code unless you pass --trust-remote-code "
                                   "after reading that code") from None
        raise TeacherLoadError(f"teacher {cfg.teacher}: reading its config or tokenizer failed "
                               f"({type(exc).__name__}: {first}); point --teacher at a folder written by "
                               "save_pretrained (config.json, tokenizer files, *.safetensors)") from None
    wanted = detect_kind(config) if cfg.teacher_kind == "auto" else cfg.teacher_kind
    kind, notes = resolve_kind(opts, config, head_used(cfg, wanted))
    n_layers = config.num_hidden_layers
    has_lm_head = kind in ("masked-lm", "causal-lm")
    if cfg.mode not in ("pack", "examples"):
        raise ValueError(f"--mode must be pack or examples, got {cfg.mode!r}")
    targets = "none"
    if has_lm_head and cfg.sample > 0:
        targets = "sampled"
    elif has_lm_head and cfg.top_k > 0:
        targets = "topk"
    vocab_size = max(int(config.vocab_size), len(tokenizer))
    codec_name = cfg.topk_codec or DEFAULT_TOPK_CODEC
    if targets == "topk" and cfg.top_k > vocab_size:
        raise ValueError(f"--top-k {cfg.top_k} is larger than the vocabulary ({vocab_size} tokens)")
    hidden_layers = parse_layers(cfg.hidden_layers, n_layers, 0, "hidden-layers")
    attention_layers = parse_layers(cfg.attention_layers, n_layers, 1, "attention-layers")
    task = kind == "classifier" and cfg.task_logits
    if targets == "none" and not (hidden_layers or attention_layers or task):
        why = " ".join(notes) or f"a {kind} teacher with --top-k 0"
        raise ValueError(f"nothing to cache: {why}. Add --hidden-layers (e.g. all) and/or --attention-layers, "
                         "or use a teacher with an LM head for soft targets")
    hidden_dtype = cfg.dtype
    attention_dtype = cfg.attention_dtype or ("uint8" if cfg.dtype == "int8" else cfg.dtype)
    if cfg.max_length > getattr(config, "max_position_embeddings", cfg.max_length):
        raise ValueError(f"--max-length {cfg.max_length} exceeds the teacher's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    spec = CacheSpec(
        vocab_size=vocab_size, max_length=cfg.max_length, targets=targets, k=cfg.top_k if targets == "topk" else 64,
        num_samples=cfg.sample if targets == "sampled" else 0, topk_codec=codec_name,
        # Always recorded, so a later change of a codec's defaults cannot change how this cache decodes.
        codec_params=get_topk_codec(codec_name).params(),
        hidden_layers=hidden_layers, hidden_size=config.hidden_size,
        hidden_dtype=hidden_dtype,
        attention_layers=attention_layers,
        num_heads=config.num_attention_heads, attention_dtype=attention_dtype,
        mlm=kind == "masked-lm", num_labels=int(config.num_labels) if task else 0,
        has_labels=cfg.mode == "examples" and cfg.label_field is not None,
    )
    generation = {
        "mode": cfg.mode, "max_length": cfg.max_length, "seed": cfg.seed,
        "mlm_probability": cfg.mlm_probability if spec.mlm else None, "dupe_factor": cfg.dupe_factor if spec.mlm else 1,
        "temperature": 1.0, "corpus": [redact(p) for p in cfg.corpus], "text_field": cfg.text_field,
        "label_field": cfg.label_field, "label_map": cfg.label_map, "include_labels": cfg.include_labels,
        "txt_mode": cfg.txt_mode, "encoding_errors": cfg.encoding_errors, "max_sequences": cfg.max_sequences,
        "autocast": cfg.autocast,
    }
    header = Header(spec=spec, teacher=teacher_fingerprint_from_config(opts, config, kind),
                    tokenizer=tokenizer_fingerprint(tokenizer), generation=generation)
    shard_tokens = cfg.shard_tokens or auto_shard_tokens(spec)
    per_shard = max(1, shard_tokens // cfg.max_length)
    header.generation["sequences_per_shard"] = per_shard
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return Prepared(cfg=cfg, spec=spec, header=header, kind=kind, sequences_per_shard=per_shard, pad_id=int(pad),
                    notes=tuple(notes))


def auto_shard_tokens(spec: CacheSpec) -> int:
    from kdcache.pipeline.teacher_pass.sizes import bytes_per_token

    per_token = sum(bytes_per_token(spec).values())
    return int(min(max(DEFAULT_SHARD_BYTES / per_token, 4096), 4_000_000))


def teacher_device(cfg: CacheConfig) -> str:
    from kdcache.pipeline.common.runtime import resolve_device

    return resolve_device(cfg.device).type
