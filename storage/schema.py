"""What a cache holds: `CacheSpec` (the options that shape the columns) and the Arrow schema built from it.

One row per sequence. Per-token columns are Arrow `list`s over the row's real tokens (no padding is
stored); fixed inner dimensions (k, hidden size, heads) are `fixed_size_list`s, so pyarrow, HF
`datasets` and duckdb read every column with its shape and without kdcache. docs/format.md is the
normative description; this module is its executable form.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from .codecs import DEFAULT_TOPK_CODEC, get_topk_codec, narrowest_uint
from .dense_forms import forms_for, get_dense_form

FORMAT_VERSION = 1

TARGET_KINDS = ("topk", "sampled", "none")
HIDDEN_FORMS = forms_for("hidden")
ATTENTION_FORMS = forms_for("attention")


@dataclass(frozen=True)
class CacheSpec:
    """The options that decide which columns exist and their types (recorded in the manifest)."""

    vocab_size: int
    max_length: int
    targets: str = "topk"  # topk | sampled | none
    k: int = 64  # top-k entries per token
    num_samples: int = 0  # RS-KD draws per token (targets="sampled")
    topk_codec: str = DEFAULT_TOPK_CODEC
    hidden_layers: tuple[int, ...] = ()  # 0 = embedding output
    hidden_size: int = 0
    hidden_dtype: str = "float16"
    attention_layers: tuple[int, ...] = ()  # 1-based transformer layers (attention of layer l)
    num_heads: int = 0
    attention_dtype: str = "float16"
    mlm: bool = False  # static mask positions + original labels stored
    num_labels: int = 0  # > 0: the teacher is a classifier, per-example logits stored
    has_labels: bool = False  # task label per example stored
    codec_params: dict[str, Any] = field(default_factory=dict, compare=False)  # e.g. a fitted vocab order

    def __post_init__(self):
        object.__setattr__(self, "hidden_layers", tuple(int(x) for x in self.hidden_layers))
        object.__setattr__(self, "attention_layers", tuple(int(x) for x in self.attention_layers))
        problems = []
        if self.vocab_size <= 0:
            problems.append(f"vocab_size must be positive, got {self.vocab_size}")
        if self.max_length <= 0:
            problems.append(f"max_length must be positive, got {self.max_length}")
        if self.targets not in TARGET_KINDS:
            problems.append(f"targets must be one of {TARGET_KINDS}, got {self.targets!r}")
        if self.targets == "topk" and not 0 < self.k <= self.vocab_size:
            problems.append(f"top-k k={self.k} must be between 1 and the vocabulary size {self.vocab_size}")
        if self.targets == "sampled" and self.num_samples <= 0:
            problems.append("sampled targets need num_samples > 0 (RS-KD draws per token)")
        if self.hidden_layers and self.hidden_size <= 0:
            problems.append("hidden layers requested but hidden_size is not set")
        if self.hidden_dtype not in HIDDEN_FORMS:
            problems.append(f"hidden_dtype must be one of {HIDDEN_FORMS}, got {self.hidden_dtype!r}")
        if self.attention_layers and self.num_heads <= 0:
            problems.append("attention layers requested but num_heads is not set")
        if self.attention_dtype not in ATTENTION_FORMS:
            problems.append(f"attention_dtype must be one of {ATTENTION_FORMS}, got {self.attention_dtype!r}")
        if problems:
            raise ValueError("invalid cache options: " + "; ".join(problems))

    @property
    def codec(self):
        """The top-k codec with the parameters this cache was written with."""
        cached = self.__dict__.get("_codec")
        if cached is None:
            cached = get_topk_codec(self.topk_codec, self.codec_params or None)
            object.__setattr__(self, "_codec", cached)
        return cached

    # -- column names ---------------------------------------------------------------------------
    @property
    def topk_columns(self) -> dict[str, str]:
        """Codec leaf suffix -> column name (e.g. "ids" -> "topk_ids")."""
        if self.targets != "topk":
            return {}
        return {suffix: f"topk_{suffix}" for suffix in self.codec.element_types(self.k, self.vocab_size)}

    def hidden_column(self, layer: int) -> str:
        return f"hidden_{layer}"

    def attention_column(self, layer: int) -> str:
        return f"attention_{layer}"

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["hidden_layers"] = list(self.hidden_layers)
        out["attention_layers"] = list(self.attention_layers)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CacheSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown cache options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def _meta(**values: Any) -> dict[bytes, bytes]:
    return {f"kdcache.{k}".encode(): (v if isinstance(v, str) else json.dumps(v)).encode() for k, v in values.items()}


def build_schema(spec: CacheSpec) -> pa.Schema:
    """The Arrow schema every shard of a cache with these options has, column for column."""
    token_id = pa.from_numpy_dtype(narrowest_uint(spec.vocab_size - 1))
    position = pa.from_numpy_dtype(narrowest_uint(spec.max_length - 1))
    fields = [
        pa.field("sample_id", pa.int64(), nullable=False, metadata=_meta(doc="deterministic sequence id")),
        pa.field("source", pa.string(), nullable=False, metadata=_meta(doc="corpus file:document@token")),
        pa.field("length", pa.int32(), nullable=False, metadata=_meta(doc="real tokens in the row")),
        pa.field("input_ids", pa.list_(token_id), nullable=False, metadata=_meta(shape=["length"])),
    ]
    if spec.mlm:
        fields += [
            pa.field("mlm_positions", pa.list_(position), nullable=False, metadata=_meta(shape=["masked"])),
            pa.field("mlm_labels", pa.list_(token_id), nullable=False, metadata=_meta(shape=["masked"])),
        ]
    if spec.targets == "topk":
        codec = spec.codec
        scalars = codec.scalar_leaves()
        for suffix, elem in codec.element_types(spec.k, spec.vocab_size).items():
            if suffix in scalars:  # one value per token
                meta = _meta(codec=codec.name, shape=["length"])
                fields.append(pa.field(f"topk_{suffix}", pa.list_(elem), nullable=False, metadata=meta))
            else:  # one value per top-k entry
                meta = _meta(codec=codec.name, shape=["length", spec.k])
                fields.append(pa.field(f"topk_{suffix}", pa.list_(pa.list_(elem, spec.k)), nullable=False,
                                       metadata=meta))
        fields.append(
            pa.field("topk_log_tail", pa.list_(pa.float16()), nullable=False,
                     metadata=_meta(shape=["length"], doc="log of teacher probability mass outside the top-k"))
        )
    elif spec.targets == "sampled":
        fields += [
            pa.field("sample_ids", pa.list_(pa.list_(token_id)), nullable=False,
                     metadata=_meta(shape=["length", "unique draws"])),
            pa.field("sample_weights", pa.list_(pa.list_(pa.float16())), nullable=False,
                     metadata=_meta(shape=["length", "unique draws"], doc="RS-KD importance weights, sum 1")),
        ]
    hidden_form = get_dense_form(spec.hidden_dtype)
    for layer in spec.hidden_layers:
        elem = hidden_form.element_type
        meta = _meta(dtype=spec.hidden_dtype, shape=["length", spec.hidden_size], layer=layer)
        fields.append(pa.field(spec.hidden_column(layer), pa.list_(pa.list_(elem, spec.hidden_size)),
                               nullable=False, metadata=meta))
        if hidden_form.scaled:
            fields.append(pa.field(f"{spec.hidden_column(layer)}_scale", pa.list_(pa.float32()), nullable=False,
                                   metadata=_meta(shape=["length"], doc="per-token absmax/127")))
    for layer in spec.attention_layers:
        elem = get_dense_form(spec.attention_dtype).element_type
        meta = _meta(dtype=spec.attention_dtype, shape=["heads", "length", "length"], layer=layer,
                     doc="post-softmax attention probabilities over the row's real tokens")
        fields.append(pa.field(spec.attention_column(layer),
                               pa.list_(pa.list_(pa.list_(elem)), spec.num_heads), nullable=False, metadata=meta))
    if spec.num_labels:
        fields.append(pa.field("task_logits", pa.list_(pa.float32(), spec.num_labels), nullable=False,
                               metadata=_meta(shape=[spec.num_labels])))
    if spec.has_labels:
        fields.append(pa.field("label", pa.int32(), nullable=False))
    return pa.schema(fields, metadata={b"kdcache.format_version": str(FORMAT_VERSION).encode(),
                                       b"kdcache.spec": json.dumps(spec.to_json(), sort_keys=True).encode()})


def per_token_columns(schema: pa.Schema) -> list[str]:
    """Columns whose outer list runs over the row's tokens (what 'bytes per token' divides)."""
    return [f.name for f in schema if f.name not in ("sample_id", "source", "length", "task_logits", "label")]


def schema_to_json(schema: pa.Schema) -> list[dict[str, Any]]:
    """A readable, comparable form of the schema for the manifest."""
    out = []
    for f in schema:
        entry = {"name": f.name, "type": str(f.type)}
        if f.metadata:
            entry["metadata"] = {k.decode(): v.decode() for k, v in f.metadata.items()}
        out.append(entry)
    return out
