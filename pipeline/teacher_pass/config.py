"""The teacher pass's options (`CacheConfig`, every one also a flag and a YAML key) and what the
driver derives from them before any actor starts (`prepare` -> `Prepared`: the cache's spec and header)."""
from __future__ import annotations

from dataclasses import dataclass


from kdcache.storage import CacheSpec, Header
from kdcache.storage.fs import redact


DEFAULT_SHARD_BYTES = 256 << 20


@dataclass
class CacheConfig:
    """Every option of `kdcache cache` / `kdcache plan` (YAML keys = these names)."""

    teacher: str
    corpus: list[str]
    out: str = ""
    mode: str = "pack"  # pack (pretraining distillation) | examples (task distillation)
    max_length: int = 128
    top_k: int = 64  # 0 = no soft targets
    sample: int = 0  # > 0: RS-KD targets with this many draws per token instead of top-k
    hidden_layers: str = "none"  # "0,3,6" | all | none (0 = embedding output)
    attention_layers: str = "none"  # "6" | all | none (1-based)
    dtype: str = "float16"  # hidden states: float16 | bfloat16 | int8
    attention_dtype: str = ""  # float16 | bfloat16 | uint8; default: dtype (uint8 when dtype=int8)
    mlm_probability: float = 0.15  # masked-LM teachers only
    dupe_factor: int = 1
    seed: int = 0
    batch_size: int = 32
    actors: int = 0  # 0 = one per GPU, or 1 on a machine without GPUs
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 0.0  # 0 = auto: a CPU actor gets its share of the cluster's CPUs, a GPU actor 1
    shard_tokens: int = 0  # 0 = auto: about 256 MB per shard
    text_field: str = "text"
    label_field: str | None = None
    label_map: dict | None = None
    include_labels: list | None = None
    txt_mode: str = "line"
    encoding_errors: str = "strict"
    corpus_format: str | None = None
    task_logits: bool = True  # classifier teachers: cache per-example logits
    topk_codec: str = ""  # default: kdcache.storage.codecs.DEFAULT_TOPK_CODEC
    topk_calibration_sequences: int = 128  # teacher top-k of the first N sequences fits the codec (0 = off)
    zstd_level: int = 3
    encoder_threads: int = 0  # threads per shard turning teacher outputs into Arrow (0 = auto: 1 on CPU, 2 on GPU)
    shards_in_flight: int = 0  # per teacher, one writer each (0 = auto: 1 on CPU; GPU: 4, more with dense columns)
    overwrite: bool = False
    max_retries: int = 3  # per shard, for system failures (actor/node death) only
    teacher_kind: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    device: str = "auto"
    autocast: str = "auto"
    address: str | None = None  # Ray cluster; default: RAY_ADDRESS or a local cluster
    executor: str = "ray"  # ray (teacher actors) | local (this process: debugging, machines without Ray)
    max_sequences: int = 0  # stop after this many sequences (0 = whole corpus)
    progress: bool = True


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

    from kdcache.storage.codecs import DEFAULT_TOPK_CODEC, get_topk_codec
    from kdcache.pipeline.teacher_pass.teacher import teacher_fingerprint_from_config, teacher_options_from
    from kdcache.pipeline.common.hf import check_weights, detect_kind, tokenizer_fingerprint

    opts = teacher_options_from(cfg)
    check_weights(cfg.teacher, cfg.allow_pickle)
    config = AutoConfig.from_pretrained(cfg.teacher, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher, revision=cfg.revision,
                                              trust_remote_code=cfg.trust_remote_code)
    kind = detect_kind(config) if cfg.teacher_kind == "auto" else cfg.teacher_kind
    n_layers = config.num_hidden_layers
    has_lm_head = kind in ("masked-lm", "causal-lm")
    if cfg.mode not in ("pack", "examples"):
        raise ValueError(f"--mode must be pack or examples, got {cfg.mode!r}")
    if cfg.sample and cfg.top_k and cfg.sample > 0 and cfg.top_k != 64:
        raise ValueError("give either --top-k or --sample, not both")
    targets = "none"
    if has_lm_head and cfg.sample > 0:
        targets = "sampled"
    elif has_lm_head and cfg.top_k > 0:
        targets = "topk"
    vocab_size = max(int(config.vocab_size), len(tokenizer))
    codec_name = cfg.topk_codec or DEFAULT_TOPK_CODEC
    if targets == "topk" and cfg.top_k > vocab_size:
        raise ValueError(f"--top-k {cfg.top_k} is larger than the vocabulary ({vocab_size} tokens)")
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
        hidden_layers=parse_layers(cfg.hidden_layers, n_layers, 0, "hidden-layers"), hidden_size=config.hidden_size,
        hidden_dtype=hidden_dtype,
        attention_layers=parse_layers(cfg.attention_layers, n_layers, 1, "attention-layers"),
        num_heads=config.num_attention_heads, attention_dtype=attention_dtype,
        mlm=kind == "masked-lm", num_labels=int(config.num_labels) if kind == "classifier" and cfg.task_logits else 0,
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
    return Prepared(cfg=cfg, spec=spec, header=header, kind=kind, sequences_per_shard=per_shard, pad_id=int(pad))


def auto_shard_tokens(spec: CacheSpec) -> int:
    from kdcache.pipeline.teacher_pass.sizes import bytes_per_token

    per_token = sum(bytes_per_token(spec).values())
    return int(min(max(DEFAULT_SHARD_BYTES / per_token, 4096), 4_000_000))


def teacher_device(cfg: CacheConfig) -> str:
    from kdcache.pipeline.common.runtime import resolve_device

    return resolve_device(cfg.device).type
