"""``init-student``: build a student from a teacher's *weights*, never running it.

(Over 500 lines: the teacher-weight reader, the layer choice, the key mapping across architectures
and the copy walk are one job, initialisation, and share their private helpers; loading a saved
student and adding a classification head are the last ~80 lines and use the same helpers.)

Two initialisations:

* **DistilBERT style** (width kept: ``hidden_size``/``intermediate_size``/
  ``num_heads`` unset or equal to the teacher's): the student has the
  teacher's config with fewer layers; embeddings, the chosen transformer
  blocks, the final norm and the head are copied tensor for tensor. Default
  blocks: every other one (0, 2, 4, ...); ``num_layers=n`` spreads n blocks
  evenly, first and last included (12 → 6 gives DistilBERT's 0,2,4,7,9,11);
  ``layers=[...]`` picks them explicitly. For BERT-family models (configs with
  ``type_vocab_size``) the token-type table is cut to row 0 (``type_vocab_size
  = 1``; row 0 is what BERT adds when no ``token_type_ids`` are given, so
  single-segment inputs embed exactly as before) and the pooler of a bare
  ``BertModel``-style model is dropped, as DistilBERT does. A
  ``*ForSequenceClassification`` head reads the pooler, so there it is kept
  and copied along with the classifier.
* **TinyBERT style** (any width setting differs): a new, narrower config of
  the same architecture, randomly initialised under ``seed``. Nothing is
  copied; the student learns from the cache through the intermediate losses.

Weights are read with safetensors, lazily (``safe_open``), so only the tensors
taken are loaded; a teacher with only ``pytorch_model.bin`` (pickle, which can
run code) is refused unless ``allow_pickle=True``, and then read with
``torch.load(weights_only=True)``.

Limits: key names are matched as saved (plus the base-model prefix and the
legacy ``LayerNorm.gamma/beta`` spellings); checkpoints that need
transformers' load-time weight *conversion* (e.g. fused MoE experts) are not
supported and fail with the list of unmatched parameters.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from kdcache.pipeline.common.hf import TOKENIZER_COPY_PATTERNS, architecture_kind, auto_class, refuse_pickle

STUDENT_META = "kdcache_student.json"


# Per-layer config lists that must follow the chosen layers.
_PER_LAYER_CONFIG_KEYS = ("layer_types",)

# Attention-dropout knobs across architectures (BERT, Llama-likes, GPT-2).
_ATTN_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


# --------------------------------------------------------------------------- #
# teacher weights
# --------------------------------------------------------------------------- #


class TeacherWeights:
    """Name → tensor for a checkpoint folder, read on demand."""

    def __init__(self, folder: Path, allow_pickle: bool):
        self._where: dict[str, Any] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        st_single = folder / "model.safetensors"
        st_index = folder / "model.safetensors.index.json"
        if st_single.exists() or st_index.exists():
            from safetensors import safe_open

            files = [st_single] if st_single.exists() else sorted(
                {folder / f for f in json.loads(st_index.read_text())["weight_map"].values()}
            )
            for f in files:
                h = safe_open(str(f), framework="pt", device="cpu")
                for k in h.keys():
                    self._where[k] = h
            self.source = "safetensors"
            return
        bins = [folder / "pytorch_model.bin"] if (folder / "pytorch_model.bin").exists() else []
        bin_index = folder / "pytorch_model.bin.index.json"
        if not bins and bin_index.exists():
            bins = sorted({folder / f for f in json.loads(bin_index.read_text())["weight_map"].values()})
        if not bins:
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")
        refuse_pickle(str(folder), [f.name for f in bins], allow_pickle, "allow_pickle=True")
        self._pickled = {}
        for f in bins:
            self._pickled.update(torch.load(f, map_location="cpu", weights_only=True))
        self.source = "pickle"

    def keys(self) -> list[str]:
        return list(self._pickled) if self._pickled is not None else list(self._where)

    def get(self, key: str) -> torch.Tensor:
        if self._pickled is not None:
            return self._pickled[key]
        return self._where[key].get_tensor(key)


def _legacy_name(key: str) -> str:
    # Old BERT checkpoints spell LayerNorm parameters gamma/beta.
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


# --------------------------------------------------------------------------- #
# config / class helpers
# --------------------------------------------------------------------------- #


def _load_config(path: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def _architecture(config) -> str | None:
    archs = getattr(config, "architectures", None) or []
    return archs[0] if archs else None


def _auto_class(arch: str | None):
    return auto_class(architecture_kind(arch))


def _model_class(config):
    """The transformers class named in ``config.architectures`` (None for remote code)."""
    import transformers as tf

    arch = _architecture(config)
    if arch is None or (getattr(config, "auto_map", None) and not hasattr(tf, arch)):
        return None
    cls = getattr(tf, arch, None)
    if cls is None:
        raise ValueError(
            f"architecture {arch!r} is not in transformers {tf.__version__}; "
            "if the checkpoint ships its own code pass trust_remote_code=True"
        )
    return cls


def _build_model(config, trust_remote_code: bool, init_kwargs: dict):
    cls = _model_class(config)
    if cls is None:
        auto = _auto_class(_architecture(config))
        return auto.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32, **init_kwargs)
    return cls._from_config(config, dtype=torch.float32, **init_kwargs)


def _get(config, name: str, default=None):
    return getattr(config, name, default)


def _make_config(teacher_config, overrides: dict[str, Any]):
    """Teacher config with ``overrides`` (canonical names), rebuilt so validation runs."""
    d = teacher_config.to_dict()
    amap = getattr(teacher_config, "attribute_map", {}) or {}
    for k, v in overrides.items():
        d[amap.get(k, k)] = v
    for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        d.pop(k, None)
    return type(teacher_config).from_dict(d)


def _spread(n: int, total: int) -> list[int]:
    """n indices spread evenly over 0..total-1, first and last included."""
    if n == 1:
        return [0]
    step = (total - 1) / (n - 1)  # >= 1, so floor(x + .5) never collides
    return [int(math.floor(i * step + 0.5)) for i in range(n)]


def _choose_layers(n_teacher: int, layers: Iterable[int] | None, num_layers: int | None) -> list[int]:
    if layers is None:
        if num_layers is None:
            return list(range(0, n_teacher, 2))
        if not 1 <= num_layers <= n_teacher:
            raise ValueError(f"num_layers={num_layers} must be in 1..{n_teacher} (the teacher has {n_teacher} layers)")
        return _spread(num_layers, n_teacher)
    layers = [int(x) for x in layers]
    if not layers:
        raise ValueError("layers is empty")
    bad = [x for x in layers if not 0 <= x < n_teacher]
    if bad:
        raise ValueError(
            f"teacher layer(s) {bad} out of range: valid indices are 0..{n_teacher - 1} "
            f"(the teacher has {n_teacher} layers)"
        )
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"layers must be strictly increasing, got {layers}")
    if num_layers is not None and num_layers != len(layers):
        raise ValueError(f"num_layers={num_layers} disagrees with {len(layers)} layers given")
    return layers


def _layer_list_prefix(model: nn.Module, n_layers: int, teacher_keys: set[str], n_teacher: int, base: str):
    """Dotted path of the ModuleList holding the transformer blocks.

    Found structurally (a ModuleList of the student's depth whose path, with or
    without the base-model prefix, has index ``n_teacher - 1`` in the teacher's
    checkpoint), so no per-architecture table is needed.
    """
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) != n_layers:
            continue
        for cand in _prefix_variants(name, base):
            probe = f"{cand}.{n_teacher - 1}."
            if any(k.startswith(probe) for k in teacher_keys):
                return name
    raise ValueError("could not locate the transformer blocks in the teacher checkpoint")


def _prefix_variants(key: str, base: str) -> list[str]:
    out = [key]
    if base and key.startswith(base + "."):
        out.append(key[len(base) + 1 :])
    elif base:
        out.append(f"{base}.{key}")
    return out


# --------------------------------------------------------------------------- #
# init-student
# --------------------------------------------------------------------------- #


def init_student_from_teacher(
    teacher_dir: str | Path,
    out_dir: str | Path,
    layers: list[int] | None = None,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_heads: int | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    seed: int = 0,
    embedding_init: str = "random",
) -> dict[str, Any]:
    """Write a student checkpoint to ``out_dir``; return its ``kdcache_student.json`` record.

    ``embedding_init="pca"`` (narrower students only): the embedding tables (token, position,
    token-type) are the teacher's, projected onto the top principal directions of its token
    embeddings, instead of random; the transformer blocks stay random.

    ``layers`` are 0-based teacher block indices (copy mode only). The record's
    ``hidden_layer_map`` gives the (student, teacher) hidden-state pairs (0 =
    embeddings) that line up, ready for ``LossSpec.layer_map``: copy mode pairs
    student block i with the teacher block it was copied from; random mode uses
    TinyBERT's uniform map. Caveat for pre-LN models (Llama, GPT-2): HF's last
    hidden state is taken *after* the final norm, so when the last block copied
    is not the teacher's last, the last pair compares normed with un-normed
    states; ``num_layers=n`` always includes the last block.

    The student is saved in float32 whatever the teacher's dtype.
    """
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    if not (teacher_dir / "config.json").exists():
        raise FileNotFoundError(f"{teacher_dir} has no config.json")
    if out_dir.exists() and out_dir.resolve() == teacher_dir.resolve():
        raise ValueError("out_dir is the teacher's folder; writing there would overwrite the teacher")
    tcfg = _load_config(teacher_dir, trust_remote_code)
    arch = _architecture(tcfg)
    n_t = int(tcfg.num_hidden_layers)
    h_t = int(tcfg.hidden_size)
    heads_t = int(tcfg.num_attention_heads)
    inter_key = "intermediate_size" if hasattr(tcfg, "intermediate_size") else "n_inner"
    inter_t = _get(tcfg, inter_key)

    copy_mode = (
        (hidden_size is None or hidden_size == h_t)
        and (num_heads is None or num_heads == heads_t)
        and (intermediate_size is None or intermediate_size == inter_t)
    )
    weights = TeacherWeights(teacher_dir, allow_pickle)  # also enforces the pickle rule early
    overrides: dict[str, Any] = {}
    if copy_mode:
        chosen = _choose_layers(n_t, layers, num_layers)
        per_layer_src = chosen
        if hasattr(tcfg, "type_vocab_size") and int(tcfg.type_vocab_size) > 1:
            overrides["type_vocab_size"] = 1
    else:
        if layers is not None:
            raise ValueError(
                "layers picks teacher blocks to copy, but with a different width nothing is "
                "copied (TinyBERT-style random init); give num_layers instead"
            )
        n_s = num_layers if num_layers is not None else len(range(0, n_t, 2))
        if not 1 <= n_s <= n_t:
            raise ValueError(f"num_layers={n_s} must be in 1..{n_t} (the teacher has {n_t} layers)")
        chosen = None
        per_layer_src = _spread(n_s, n_t)
        h_s = hidden_size or h_t
        heads_s = num_heads or heads_t
        if h_s % heads_s:
            raise ValueError(f"hidden_size {h_s} is not divisible by {heads_s} heads; pass num_heads")
        overrides.update(hidden_size=h_s, num_attention_heads=heads_s)
        if intermediate_size is not None:
            overrides[inter_key] = intermediate_size
        elif inter_t is not None:
            overrides[inter_key] = int(round(inter_t * h_s / h_t))  # keep the FFN ratio
        if "head_dim" in tcfg.to_dict():
            overrides["head_dim"] = h_s // heads_s
        kv_t = _get(tcfg, "num_key_value_heads")
        if kv_t is not None:
            # keep GQA grouping when it divides the new head count, else plain MHA
            overrides["num_key_value_heads"] = heads_s if (kv_t == heads_t or heads_s % kv_t) else kv_t
    overrides["num_hidden_layers"] = len(per_layer_src)
    for key in _PER_LAYER_CONFIG_KEYS:
        val = _get(tcfg, key)
        if isinstance(val, (list, tuple)) and len(val) == n_t:
            overrides[key] = [val[i] for i in per_layer_src]
    scfg = _make_config(tcfg, overrides)

    # Drop the pooler of a bare encoder (BertModel & co.); heads that read it keep it.
    init_kwargs: dict[str, Any] = {}
    cls = _model_class(scfg)
    if cls is not None and "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
        init_kwargs["add_pooling_layer"] = False

    torch.manual_seed(seed)
    student = _build_model(scfg, trust_remote_code, init_kwargs)

    dropped: list[str] = []
    new_init: list[str] = []
    if copy_mode:
        new_init, dropped = _copy_weights(student, weights, chosen, n_t)
    else:
        new_init = ["<all: random init, seed %d>" % seed]
        if embedding_init == "pca":
            projected = _pca_embeddings(student, weights, h_t)
            new_init = [f"<all but {', '.join(projected)}: random init, seed {seed}>"]
        elif embedding_init != "random":
            raise ValueError(f"embedding_init must be 'random' or 'pca', got {embedding_init!r}")

    out_dir.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(str(out_dir))
    tok_files = copy_tokenizer(teacher_dir, out_dir, drop_token_types="type_vocab_size" in overrides)
    if trust_remote_code:
        for f in teacher_dir.glob("*.py"):  # the auto_map in config.json points at these
            if not (out_dir / f.name).exists():
                shutil.copy2(f, out_dir / f.name)

    if copy_mode:
        hidden_map = [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(chosen)]
    else:
        from kdcache.pipeline.student.losses import uniform_layer_map

        hidden_map = uniform_layer_map(len(per_layer_src), n_t)
    record = {
        "format": 1,
        "mode": "copy" if copy_mode else "random",
        "teacher_dir": str(teacher_dir.resolve()),
        "teacher_architecture": arch,
        "teacher_num_layers": n_t,
        "teacher_hidden_size": h_t,
        "teacher_num_heads": heads_t,
        "teacher_layers": chosen,
        "num_layers": len(per_layer_src),
        "hidden_size": int(scfg.hidden_size),
        "num_heads": int(scfg.num_attention_heads),
        "hidden_layer_map": [list(p) for p in hidden_map],
        "type_vocab_size_cut_to_1": "type_vocab_size" in overrides,
        "init_kwargs": init_kwargs,
        "dropped_teacher_weights": dropped,
        "newly_initialized": new_init,
        "weights_source": weights.source,
        "embedding_init": embedding_init if not copy_mode else "copy",
        "seed": seed,
        "tokenizer_files": tok_files,
    }
    (out_dir / STUDENT_META).write_text(json.dumps(record, indent=2) + "\n")
    return record


@torch.no_grad()
def _pca_embeddings(student: nn.Module, weights: TeacherWeights, h_teacher: int) -> list[str]:
    """Teacher embedding tables times P, P = the top principal directions of the token embeddings.

    A narrow student cannot copy the teacher's tables, but most of what they hold survives a
    projection onto their own principal subspace; the same P maps position and token-type rows so
    that their sum stays consistent. Returns the student parameter names set.
    """
    base = getattr(student, "base_model_prefix", "")
    keys = set(weights.keys())
    token_table = student.get_input_embeddings().weight
    h_student = token_table.shape[1]
    tables = {}
    for name, param in student.named_parameters():
        if param.dim() != 2 or param.shape[1] != h_student or "embed" not in name:
            continue
        key = next((k for k in _prefix_variants(name, base) if k in keys), None)
        if key is not None and tuple(weights.get(key).shape) == (param.shape[0], h_teacher):
            tables[name] = (param, weights.get(key).float())
    token_name = next((n for n, (p, _) in tables.items() if p is token_table), None)
    if token_name is None:
        raise ValueError("embedding_init='pca': the teacher's token embedding table was not found")
    proj = pca_projection(tables[token_name][1], h_student)
    for param, teacher_table in tables.values():
        param.copy_((teacher_table @ proj).to(param.dtype))
    return sorted(tables)


def pca_projection(table: torch.Tensor, width: int) -> torch.Tensor:
    """(h_teacher, width): the top `width` principal directions of an embedding table's rows."""
    _, _, vh = torch.linalg.svd(table - table.mean(0), full_matrices=False)
    return vh[:width].T


def _copy_weights(student: nn.Module, weights: TeacherWeights, chosen: list[int], n_teacher: int):
    """Copy embeddings, chosen blocks, final norm and head into ``student`` in place."""
    raw_keys = weights.keys()
    by_name = {_legacy_name(k): k for k in raw_keys}
    base = getattr(student, "base_model_prefix", "") or ""
    blocks = _layer_list_prefix(student, len(chosen), set(by_name), n_teacher, base)

    def teacher_key(skey: str) -> str | None:
        if skey.startswith(blocks + "."):
            idx, rest = skey[len(blocks) + 1 :].split(".", 1)
            skey = f"{blocks}.{chosen[int(idx)]}.{rest}"
        for cand in _prefix_variants(skey, base):
            if cand in by_name:
                return by_name[cand]
        return None

    used: set[str] = set()
    missing: list[str] = []
    named = list(student.named_parameters()) + list(student.named_buffers())
    param_names = {n for n, _ in student.named_parameters()}
    with torch.no_grad():
        for name, tensor in named:
            tk = teacher_key(name)
            if tk is None:
                if name in param_names:
                    missing.append(name)
                continue
            src = weights.get(tk)
            if name.endswith("token_type_embeddings.weight") and src.shape[0] > tensor.shape[0]:
                src = src[: tensor.shape[0]]  # keep row 0: the embedding of segment A
            if src.shape != tensor.shape:
                raise ValueError(
                    f"shape mismatch for {name}: student {tuple(tensor.shape)}, teacher {tk} {tuple(src.shape)}"
                )
            tensor.copy_(src.to(tensor.dtype))
            used.add(tk)
    in_blocks = [m for m in missing if m.startswith(blocks + ".")]
    if in_blocks or (missing and len(missing) * 2 > len(param_names)):
        raise ValueError(
            f"teacher checkpoint has no weights for {len(missing)} student parameters, e.g. {missing[:5]}; "
            "its key names do not follow the architecture (a checkpoint needing weight conversion?)"
        )
    # Unused teacher weights, minus the blocks we skipped on purpose.
    skipped = [tk for tk in raw_keys if tk not in used]
    block_like = tuple(f"{p}." for p in _prefix_variants(blocks, base))
    dropped = [k for k in skipped if not _legacy_name(k).startswith(block_like)]
    return missing, sorted(dropped)


def copy_tokenizer(teacher_dir: Path, out_dir: Path, drop_token_types: bool) -> list[str]:
    copied = []
    for pattern in TOKENIZER_COPY_PATTERNS:
        for f in sorted(teacher_dir.glob(pattern)):
            if f.is_file():
                shutil.copy2(f, out_dir / f.name)
                copied.append(f.name)
    tc = out_dir / "tokenizer_config.json"
    if drop_token_types and tc.exists():
        # The student has one token-type row; a pair input's 1s would index out of
        # range. Make the tokenizer stop emitting token_type_ids (like DistilBERT's).
        cfg = json.loads(tc.read_text())
        cfg["model_input_names"] = ["input_ids", "attention_mask"]
        tc.write_text(json.dumps(cfg, indent=2) + "\n")
    return sorted(set(copied))


# --------------------------------------------------------------------------- #
# load
# --------------------------------------------------------------------------- #


def read_student_meta(path: str | Path) -> dict[str, Any] | None:
    f = Path(path) / STUDENT_META
    return json.loads(f.read_text()) if f.exists() else None


def load_student(
    path: str | Path,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    attention_dropout: float | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
):
    """Load a student (any HF checkpoint) ready for distillation.

    * ``output_attentions=True`` switches to eager attention (SDPA/flash return
      no weights) and, unless ``attention_dropout`` is given, sets attention
      dropout to 0: HF returns the *post-dropout* probabilities, which would
      make the attention loss chase dropout noise.
    * ``output_hidden_states`` / ``output_attentions`` are set on the config, so
      a plain ``model(input_ids, attention_mask)`` returns them.
    * Returned in eval mode (as ``from_pretrained`` does); call ``.train()``.
    """
    path = Path(path)
    config = _load_config(path, trust_remote_code)
    config.output_hidden_states = output_hidden_states
    config.output_attentions = output_attentions
    if output_attentions and attention_dropout is None:
        attention_dropout = 0.0
    if attention_dropout is not None:
        for key in _ATTN_DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, attention_dropout)
    meta = read_student_meta(path) or {}
    kwargs: dict[str, Any] = dict(meta.get("init_kwargs", {}))
    if output_attentions:
        kwargs["attn_implementation"] = "eager"
    if dtype is not None:
        kwargs["dtype"] = dtype
    cls = _model_class(config)
    if cls is None:
        cls = _auto_class(_architecture(config))
        kwargs["trust_remote_code"] = trust_remote_code
    return cls.from_pretrained(str(path), config=config, **kwargs)


def with_classification_head(student_dir: str | Path, out_dir: str | Path, num_labels: int, seed: int = 0) -> Path:
    """A copy of an encoder student with a freshly initialised sequence-classification head.

    TinyBERT's task stage starts from the general-distilled student: the encoder weights (and the
    layer map in ``kdcache_student.json``) carry over; the pooler and classifier, which the general
    stage never trained, start from ``seed``. Written once: an existing ``out_dir`` is reused.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    student_dir, out_dir = Path(student_dir), Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    torch.manual_seed(seed)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialised: classifier.*" is the point here
    try:
        config = AutoConfig.from_pretrained(str(student_dir), num_labels=num_labels)
        config.output_hidden_states = config.output_attentions = False
        model = AutoModelForSequenceClassification.from_pretrained(str(student_dir), config=config,
                                                                   use_safetensors=True)
    finally:
        hf_logging.set_verbosity(level)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(student_dir)).save_pretrained(str(tmp))
    meta = read_student_meta(student_dir)
    if meta is not None:
        # The layer map carries over; the encoder-only init arguments (no pooler) do not.
        meta.pop("init_kwargs", None)
        (tmp / STUDENT_META).write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(out_dir)
    return out_dir
