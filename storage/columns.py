"""Padded numpy batches <-> Arrow record batches, column by column.

The teacher works on padded tensors `[B, T, ...]` with per-row `lengths`; the cache stores only the
real tokens as Arrow lists. Both directions are vectorised with boolean masks over the padded
shape: `x[mask]` walks rows, then tokens, in exactly the order Arrow list offsets expect, so there is
no Python loop over tokens or elements anywhere.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .dense_forms import get_dense_form
from .errors import ColumnError
from .schema import CacheSpec


def _offsets(sizes: np.ndarray) -> pa.Array:
    out = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=out[1:])
    if out[-1] < 2**31:
        return pa.array(out.astype(np.int32))
    return pa.array(out)  # beyond 2 GiB of values per batch only large_list could hold it


def _list(sizes: np.ndarray, values: pa.Array, list_type: pa.DataType) -> pa.Array:
    offsets = _offsets(sizes)
    return pa.ListArray.from_arrays(offsets, values, type=list_type)


def _token_list(field: pa.Field, per_token: np.ndarray, lengths: np.ndarray) -> pa.Array:
    """`per_token` is (N, ...) over all real tokens of the batch; wrap it as one list per row."""
    inner_type = field.type.value_type
    if pa.types.is_fixed_size_list(inner_type):
        leaf = pa.array(np.ascontiguousarray(per_token).reshape(-1), type=inner_type.value_type)
        values = pa.FixedSizeListArray.from_arrays(leaf, inner_type.list_size)
    else:
        values = pa.array(np.ascontiguousarray(per_token).reshape(-1), type=inner_type)
    return _list(lengths, values, field.type)


def token_mask(lengths: np.ndarray, width: int) -> np.ndarray:
    return np.arange(width)[None, :] < np.asarray(lengths)[:, None]


def _check(batch: Mapping[str, Any], name: str, shape_prefix: tuple[int, ...]) -> np.ndarray:
    if name not in batch:
        raise ColumnError(f"batch lacks column {name!r}, which the cache options require")
    arr = np.asarray(batch[name])
    if arr.shape[: len(shape_prefix)] != shape_prefix:
        raise ValueError(f"column {name!r}: shape {arr.shape} does not start with {shape_prefix}")
    return arr


def _check_stored(name: str, arr: np.ndarray, shape: tuple[int, ...], element: pa.DataType) -> np.ndarray:
    """A pre-encoded leaf: exactly its padded shape and its stored element type."""
    if arr.shape != shape:
        raise ValueError(f"column {name!r}: encoded leaf has shape {arr.shape}, expected {shape}")
    if pa.from_numpy_dtype(arr.dtype) != element:
        raise ValueError(f"column {name!r}: encoded leaf has dtype {arr.dtype}, expected {element}")
    return arr


def to_record_batch(batch: Mapping[str, Any], spec: CacheSpec, schema: pa.Schema) -> pa.RecordBatch:
    """Encode one padded batch (numpy arrays, see docs/format.md "Writer input") as Arrow.

    Teacher outputs may come already encoded (the teacher runner encodes on its device): top-k as
    `batch["topk_encoded"] = {leaf: array}` with the codec's leaves padded to (B, T, k) or (B, T)
    instead of `topk_ids`/`topk_logprobs`, and dense columns in their storage dtype (bfloat16 as
    uint16 bits; int8 codes with `<name>_scale`, (B, T) float32). They are checked and stored as
    they are; raw columns are encoded here.
    """
    lengths = np.asarray(batch["lengths"], dtype=np.int64)
    B = len(lengths)
    T = int(np.asarray(batch["input_ids"]).shape[1])
    if B and (lengths.min() < 1 or lengths.max() > T):
        raise ValueError(f"lengths must be in [1, {T}] (the padded width), got {lengths.min()}..{lengths.max()}")
    mask = token_mask(lengths, T)
    full = B > 0 and int(lengths.min()) == T  # no padding (pack mode): real tokens are a reshape, not a copy

    def real(x: np.ndarray) -> np.ndarray:
        """(B, T, ...) -> (real tokens, ...), rows then tokens."""
        return x.reshape(B * T, *x.shape[2:]) if full else x[mask]

    cols: dict[str, pa.Array] = {}
    fields = {f.name: f for f in schema}

    cols["sample_id"] = pa.array(np.asarray(batch["sample_id"], dtype=np.int64))
    cols["source"] = pa.array([str(s) for s in batch["source"]], type=pa.string())
    cols["length"] = pa.array(lengths.astype(np.int32))
    ids = real(_check(batch, "input_ids", (B, T)))
    if B and (ids.min() < 0 or ids.max() >= spec.vocab_size):
        raise ValueError(f"input_ids outside the vocabulary [0, {spec.vocab_size})")
    cols["input_ids"] = _token_list(fields["input_ids"], ids, lengths)

    if spec.mlm:
        pos = _check(batch, "mlm_positions", (B,))
        labels = _check(batch, "mlm_labels", pos.shape)
        valid = pos >= 0  # -1 pads rows with fewer masked positions
        counts = valid.sum(axis=1)
        cols["mlm_positions"] = _list(counts, pa.array(pos[valid], type=fields["mlm_positions"].type.value_type),
                                      fields["mlm_positions"].type)
        cols["mlm_labels"] = _list(counts, pa.array(labels[valid], type=fields["mlm_labels"].type.value_type),
                                   fields["mlm_labels"].type)

    if spec.targets == "topk":
        if "topk_encoded" in batch:
            leaves = batch["topk_encoded"]
            types = spec.codec.element_types(spec.k, spec.vocab_size)
            scalars = spec.codec.scalar_leaves()
            encoded = {}
            for suffix, column in spec.topk_columns.items():
                if suffix not in leaves:
                    raise ColumnError(f"topk_encoded lacks the {spec.topk_codec} leaf {suffix!r} (column {column!r})")
                shape = (B, T) if suffix in scalars else (B, T, spec.k)
                encoded[suffix] = real(_check_stored(column, np.asarray(leaves[suffix]), shape, types[suffix]))
        else:
            topk_ids = real(_check(batch, "topk_ids", (B, T, spec.k)))
            topk_lp = real(_check(batch, "topk_logprobs", (B, T, spec.k)))
            encoded = spec.codec.encode(topk_ids.astype(np.int64, copy=False), topk_lp.astype(np.float32, copy=False),
                                        vocab_size=spec.vocab_size)
        for suffix, column in spec.topk_columns.items():
            cols[column] = _token_list(fields[column], encoded[suffix], lengths)
        tail = real(_check(batch, "topk_log_tail", (B, T)))
        cols["topk_log_tail"] = _token_list(fields["topk_log_tail"], tail.astype(np.float16, copy=False), lengths)
    elif spec.targets == "sampled":
        sids = _check(batch, "sample_ids", (B, T))
        weights = _check(batch, "sample_weights", sids.shape)
        tok_ids, tok_w = sids[mask], weights[mask]  # (N, n_max); weight 0 marks padding
        valid = tok_w > 0
        per_token = pa.ListArray.from_arrays(
            _offsets(valid.sum(axis=1)), pa.array(tok_ids[valid], type=fields["sample_ids"].type.value_type.value_type))
        cols["sample_ids"] = _list(lengths, per_token, fields["sample_ids"].type)
        per_token_w = pa.ListArray.from_arrays(
            _offsets(valid.sum(axis=1)), pa.array(tok_w[valid].astype(np.float16), type=pa.float16()))
        cols["sample_weights"] = _list(lengths, per_token_w, fields["sample_weights"].type)

    hidden_form = get_dense_form(spec.hidden_dtype)
    for layer in spec.hidden_layers:
        name = spec.hidden_column(layer)
        hidden = _check(batch, name, (B, T, spec.hidden_size))
        if hidden_form.is_stored(hidden):
            stored = real(hidden)
            if hidden_form.scaled:
                scale = _check_stored(f"{name}_scale", _check(batch, f"{name}_scale", (B, T)), (B, T), pa.float32())
                params = {"scale": real(scale)}
        else:
            stored, params = hidden_form.encode(real(hidden))
        cols[name] = _token_list(fields[name], stored, lengths)
        if hidden_form.scaled:
            cols[f"{name}_scale"] = _token_list(fields[f"{name}_scale"], np.asarray(params["scale"], np.float32),
                                                lengths)

    if spec.attention_layers:
        attention_form = get_dense_form(spec.attention_dtype)
        H = spec.num_heads
        q = np.arange(T)
        mask4 = (q[None, None, :, None] < lengths[:, None, None, None]) & (q[None, None, None, :] < lengths[:, None, None, None])
        mask4 = np.broadcast_to(mask4, (B, H, T, T))
        key_sizes = np.repeat(lengths, H * lengths)  # one list of n keys per (row, head, query)
        query_sizes = np.repeat(lengths, H)  # one list of n queries per (row, head)
        for layer in spec.attention_layers:
            name = spec.attention_column(layer)
            attn = _check(batch, name, (B, H, T, T))
            values = attn.reshape(-1) if full else attn[mask4]
            stored = values if attention_form.is_stored(attn) else attention_form.encode(values)[0]
            ftype = fields[name].type  # fixed_size_list<list<list<elem>>, heads>
            keys = _list(key_sizes, pa.array(stored, type=ftype.value_type.value_type.value_type),
                         ftype.value_type.value_type)
            queries = _list(query_sizes, keys, ftype.value_type)
            cols[name] = pa.FixedSizeListArray.from_arrays(queries, H)

    if spec.num_labels:
        logits = _check(batch, "task_logits", (B, spec.num_labels)).astype(np.float32)
        cols["task_logits"] = pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), spec.num_labels)
    if spec.has_labels:
        cols["label"] = pa.array(np.asarray(batch["label"], dtype=np.int32))
    return pa.RecordBatch.from_arrays([cols[f.name] for f in schema], schema=schema)


# ---------------------------------------------------------------------------------------------
# Arrow -> padded numpy


def _row_lengths(arr: pa.Array) -> np.ndarray:
    return pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)


def _leaf(arr: pa.Array, depth: int) -> np.ndarray:
    for _ in range(depth):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False)


def _pad_tokens(values: np.ndarray, lengths: np.ndarray, width: int, fill=0) -> np.ndarray:
    out = np.full((len(lengths), width, *values.shape[1:]), fill, dtype=values.dtype)
    out[token_mask(lengths, width)] = values
    return out


def to_numpy(rb: pa.RecordBatch, spec: CacheSpec, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Decode the columns present in `rb` into padded numpy arrays (the teacher's shapes).

    Token axes are padded to the longest row in the batch (or `pad_to`); padding positions hold 0
    (ids, values), -1 (mlm_positions) and weight 0 (sampled targets).
    """
    out: dict[str, np.ndarray] = {}
    names = set(rb.schema.names)
    lengths = None
    if "length" in names:
        lengths = rb.column("length").to_numpy().astype(np.int64)
    else:  # any per-token column knows the lengths
        for name in rb.schema.names:
            if name.startswith(("input_ids", "topk_", "hidden_", "sample_")):
                lengths = _row_lengths(rb.column(name))
                break
    width = pad_to or (int(lengths.max()) if lengths is not None and len(lengths) else 0)
    if lengths is not None:
        out["lengths"] = lengths
        out["attention_mask"] = token_mask(lengths, width).astype(np.int64)

    for name in ("sample_id", "length", "label"):
        if name in names:
            out[name] = rb.column(name).to_numpy()
    if "source" in names:
        out["source"] = np.asarray(rb.column("source").to_pylist(), dtype=object)
    if "input_ids" in names:
        out["input_ids"] = _pad_tokens(_leaf(rb.column("input_ids"), 1).astype(np.int64), lengths, width)
    for name, fill in (("mlm_positions", -1), ("mlm_labels", -100)):
        if name in names:
            counts = _row_lengths(rb.column(name))
            vals = _leaf(rb.column(name), 1).astype(np.int64)
            out[name] = _pad_tokens(vals, counts, int(counts.max()) if len(counts) else 0, fill)

    topk_cols = {suffix: col for suffix, col in spec.topk_columns.items() if col in names}
    if topk_cols:
        missing = set(spec.topk_columns.values()) - set(topk_cols.values())
        if missing:
            raise ColumnError(f"top-k targets need all of {sorted(spec.topk_columns.values())}; "
                              f"also project {sorted(missing)}")
        codec = spec.codec
        enc = {}
        for suffix, col in topk_cols.items():
            arr = rb.column(col)
            if pa.types.is_fixed_size_list(arr.type.value_type):
                enc[suffix] = _leaf(arr, 2).reshape(-1, spec.k)
            else:
                enc[suffix] = _leaf(arr, 1)
        ids, lp = codec.decode(enc, spec.k)
        out["topk_ids"] = _pad_tokens(ids, lengths, width)
        out["topk_logprobs"] = _pad_tokens(lp.astype(np.float32), lengths, width)
    if "topk_log_tail" in names:
        out["topk_log_tail"] = _pad_tokens(_leaf(rb.column("topk_log_tail"), 1).astype(np.float32), lengths, width)

    for name in ("sample_ids", "sample_weights"):
        if name in names:
            per_token = rb.column(name).flatten()  # one list of unique draws per token
            counts = _row_lengths(per_token)
            n_max = int(counts.max()) if len(counts) else 0
            vals = per_token.flatten().to_numpy(zero_copy_only=False)
            vals = vals.astype(np.int64 if name == "sample_ids" else np.float32)
            dense = _pad_tokens(vals, counts, n_max)  # (N, n_max)
            out[name] = _pad_tokens(dense, lengths, width)

    hidden_form = get_dense_form(spec.hidden_dtype)
    for layer in spec.hidden_layers:
        name = spec.hidden_column(layer)
        if name in names:
            stored = _leaf(rb.column(name), 2).reshape(-1, spec.hidden_size)
            params = {}
            if hidden_form.scaled:
                if f"{name}_scale" not in names:
                    raise ColumnError(f"{name} is {hidden_form.name}: also project {name}_scale")
                params["scale"] = _leaf(rb.column(f"{name}_scale"), 1)
            out[name] = _pad_tokens(hidden_form.decode(stored, params), lengths, width)

    for layer in spec.attention_layers:
        name = spec.attention_column(layer)
        if name in names:
            H = spec.num_heads
            stored = _leaf(rb.column(name), 3)
            dense = np.zeros((len(lengths), H, width, width), dtype=np.float32)
            q = np.arange(width)
            m = (q[None, :, None] < lengths[:, None, None]) & (q[None, None, :] < lengths[:, None, None])
            dense[np.broadcast_to(m[:, None], dense.shape)] = get_dense_form(spec.attention_dtype).decode(stored)
            out[name] = dense
    if "task_logits" in names:
        out["task_logits"] = _leaf(rb.column("task_logits"), 1).reshape(-1, spec.num_labels).astype(np.float32)
    return out
