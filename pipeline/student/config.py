"""Every option of `kdcache train` in one dataclass (`TrainConfig`: YAML keys, flags and their help
come from its fields) and the one way to build it: recipe < --config < flags < key=value."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.pipeline.common.config import flag


@dataclass
class TrainConfig:
    """Every option of `kdcache train` (YAML keys = these names; key=value overrides any). A field with
    `flag(help)` metadata is also a flag; the CLI shows its default unless the help already says it."""

    cache: str = field(default="", metadata=flag("cache directory or URL (made by `kdcache cache`)"))
    student: str = field(default="", metadata=flag(
        "student folder (save_pretrained layout, e.g. from `kdcache init-student`)"))
    out: str = field(default="", metadata=flag("run folder: student/, metrics.jsonl, tb/, ray/ (checkpoints)"))
    recipe: str = field(default="", metadata=flag(  # kept in the config for the record
        "distilbert | tinybert-general | tinybert-task | mobilebert | mobilebert-task | lm | bilstm | cnn "
        "(pipeline/student/recipes/NAME.yaml) or a YAML file"))

    # -- what to optimise: a preset of kdcache.pipeline.student.presets, then per-field overrides ------------------
    loss: str = "distilbert"  # distilbert | tinybert-general | tinybert-task | mobilebert | lm | tang
    # How the layer-wise terms are scheduled (kdcache.pipeline.student.phases): all terms at every step,
    # layer-wise then prediction terms, or one phase per layer with the layers below frozen.
    knowledge_transfer: str = field(default="auxiliary", metadata=flag(
        "auxiliary (every term every step) | joint (layer-wise terms, then prediction terms) | progressive "
        "(one phase per layer, lower layers frozen; MobileBERT)"))
    preset_args: dict | None = None  # extra preset arguments, e.g. {stage: intermediate}, {kd: sampled}
    loss_weights: dict | None = None  # merged over the preset's weights; 0 disables a term
    temperature: float | None = field(default=None, metadata=flag("KD temperature (default: the recipe's)"))
    kd_tail: str | None = None  # bucket | renorm
    kd_positions: str = "all"  # all | masked (KD only at the cached mask positions)
    # The vocabulary head runs only on the rows the losses read, `logit_chunk` rows at a time
    # (0 = auto: ~2^23 logits a chunk; -1 = one chunk). full_logits: the model's own head at every
    # position, then gathered (the path of a student_factory module).
    full_logits: bool = False
    logit_chunk: int = 0
    layer_map: str = "auto"  # auto (student's kdcache_student.json, else the preset's) | "0:0,1:4,..."
    cos_layer: str | None = None  # "6:12" (student:teacher hidden-state index); default: preset's
    attention_kind: str | None = None  # probs | kl
    average_heads: bool | None = None
    per_layer_projection: bool | None = None

    # -- optimisation --------------------------------------------------------------------------
    steps: int = field(default=0, metadata=flag(
        "optimiser steps (default 0 = one pass over the cache: every rank's batches of one epoch)"))
    batch_size: int = field(default=32, metadata=flag("rows per worker per step"))
    lr: float = field(default=5e-4, metadata=flag("peak learning rate"))
    weight_decay: float = field(default=0.01, metadata=flag("AdamW weight decay on matrices"))
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    warmup_steps: int = field(default=0, metadata=flag(
        "linear warmup steps (default 0: the recipe's warmup_ratio of the steps)"))
    warmup_ratio: float = 0.0  # used when warmup_steps is 0: share of `steps`
    schedule: str = "linear"  # linear | cosine | constant (after warmup)
    max_grad_norm: float = 1.0  # 0 = no clipping
    seed: int = field(default=0, metadata=flag("seed for initialisation, dropout and the data shuffle"))
    # Seeded per epoch: the order of the cache's row groups, then rows within windows of shuffle_buffer rows.
    shuffle: bool = False
    shuffle_buffer: int = 0  # rows permuted together with shuffle (0 = 4 batches); memory holds one window

    # -- checkpoints and failures --------------------------------------------------------------
    checkpoint_every: int = field(default=100, metadata=flag("checkpoint every N steps (the last step always)"))
    keep_checkpoints: int = 2
    max_failures: int = field(default=0, metadata=flag(
        "worker failures to recover from, restarting at the last checkpoint"))

    # -- where it runs -------------------------------------------------------------------------
    workers: int = field(default=1, metadata=flag("Ray Train workers (each reads its own rows: any number up to the cache's row groups)"))
    use_gpu: bool = field(default=False, metadata=flag("one GPU per worker"))
    cpus_per_worker: float = 0.0  # 0 = auto: 1 per GPU worker; on CPU (cluster CPUs - 1) / workers, <= 1
    threads: int = 0  # torch intra-op threads per worker (0 = leave torch's / Ray's choice)
    storage_path: str = field(default="", metadata=flag(
        "where Ray Train keeps checkpoints: folder or URL (default <out>/ray)"))
    run_name: str = field(default="", metadata=flag(
        "Ray Train run name (default: derived from --out; the same name resumes)"))
    address: str | None = field(default=None, metadata=flag(
        "Ray cluster address (default: RAY_ADDRESS, else a local cluster)"))
    no_ray: bool = field(default=False, metadata=flag(  # resumes from <out>/checkpoints
        "train in this process, one worker (benchmarks, debugging)"))
    autocast: str = "auto"  # auto (bf16 on GPU, off on CPU) | bfloat16 | float16 | none
    verify: str = "full"  # shard checks on open: full (checksum) | size | off
    prefetch: int = 2  # batches decoded ahead in a background thread (0 = none)

    # -- output --------------------------------------------------------------------------------
    log_every: int = 1  # metrics.jsonl / TensorBoard every N steps
    student_url: str = field(default="", metadata=flag(
        "also copy the final student here (folder or URL, e.g. s3://bucket/students/d6)"))
    progress: bool = field(default=True, metadata=flag("no progress bar"))
    tensorboard: bool = True
    check_tokenizer: bool = True  # compare the student's tokenizer fingerprint with the cache's
    trust_remote_code: bool = field(default=False, metadata=flag("run code shipped with the student (off by default)"))
    student_factory: str | None = None  # "module:function" -> nn.Module, called with the config dict

    # -- test hooks (inert by default) ---------------------------------------------------------
    # fail on rank `fail_rank` just before each of these steps, once per --out (Ray Train's restart path):
    # "5" raises, "5:kill" SIGKILLs the worker process
    fail_at_step: list[str] = field(default_factory=list)
    fail_rank: int = 0
    log_samples: bool = False  # write <out>/samples/rank-R.jsonl: the sample ids of every step


DICT_FIELDS = ("preset_args", "loss_weights")


RAW_FIELDS = ("layer_map", "cos_layer")  # "S:T" strings


def load_train_config(recipe: str | None = None, config: str | None = None, flags: dict | None = None,
                      overrides: list[str] | None = None) -> TrainConfig:
    """recipe YAML < user YAML (`--config`) < flags < key=value (`loss_weights.cos=0` edits one entry).

    Each YAML is first loaded alone through `build_config`, so an unknown key or a bad value is
    reported with the file it came from.
    """
    import yaml

    from kdcache.pipeline.common.config import build_config
    from kdcache.pipeline.student.recipes import recipe_path

    user: dict[str, Any] = {}
    if config:
        build_config(TrainConfig, config)
        user = yaml.safe_load(Path(config).read_text()) or {}
    recipe = recipe or (flags or {}).get("recipe") or user.get("recipe")
    layers: dict[str, Any] = {}
    if recipe:
        path = recipe_path(recipe)
        build_config(TrainConfig, path)
        layers.update(yaml.safe_load(path.read_text()) or {})
        layers["recipe"] = recipe
    layers.update(user)
    layers.update({k: v for k, v in (flags or {}).items() if v is not None})

    plain: list[str] = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        head, dot, sub = key.partition(".")
        name = head.replace("-", "_")
        if sep and dot and name in DICT_FIELDS:
            # Dotted keys edit one entry of a dict field instead of replacing the whole dict.
            layers[name] = {**(layers.get(name) or {}), sub: yaml.safe_load(value)}
        elif sep and not dot and name in RAW_FIELDS:
            layers[name] = value  # not through YAML, which reads "6:12" as the base-60 integer 372
        else:
            plain.append(item)
    return build_config(TrainConfig, None, layers, plain)
