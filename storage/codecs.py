"""Top-k codecs of the kdcache shard format: how a token's top-k (id, log-prob) pairs become integers.

One registry, ``CODECS`` (name -> ``TopKCodec`` class; ``get_topk_codec`` rebuilds one from the
parameters a manifest recorded). The dense forms of hidden states and attention maps have theirs in
``storage.dense_forms``. numpy, plus torch twins (``TopKCodec.encode_torch``, see
``storage.torch_twins``) that compute the same leaves on the teacher's device, so that only the
narrow leaves cross to the host; torch is imported only by those. Each codec turns per-token arrays
into a few *leaves*: plain integer or float arrays of shape (N, k) (one value per top-k entry) or
(N,) (one scalar per token). The shard writer stores each leaf as a Parquet column
``list<fixed_size_list<elem, k>>`` (``list<elem>`` for scalars), one row per sequence, so pyarrow,
duckdb or HF datasets read every leaf without kdcache; the decode formulas below are all a reader
needs.

Parquet notes (pyarrow 26, measured):
  * Parquet has no 8- or 16-bit physical type: uint8/uint16/int8 leaves are stored as INT32.
    Without BYTE_STREAM_SPLIT the three padding bytes sit between the payload bytes and zstd loses
    to them. So **every leaf of every codec here wants BYTE_STREAM_SPLIT** (``TopKCodec.bss_leaves()``
    lists them), set on the leaf path (``col.list.element.list.element``), with dictionary encoding off.
  * float16 leaves are the exception: duckdb 2.0.1 refuses FLOAT16 with BYTE_STREAM_SPLIT (polars 2.1
    and pyarrow read both), so the writer stores them PLAIN unless ``WriteOptions.float16_byte_stream_split``
    (docs/format.md section 6).

Why the codecs look as they do, with the measurements behind it (``python -m
experiments.topk_codec``): docs/format.md, Appendix A.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from .torch_twins import check_torch_topk, torch_deltas, torch_dtype, torch_float16, torch_sort_rows, torch_top_id
from .vocab_order import fit_vocab_order

DEFAULT_TOPK_CODEC = "pow-q8"

# --------------------------------------------------------------------------- helpers


def narrowest_uint(max_value: int) -> np.dtype:
    """Smallest unsigned dtype (uint16 or wider) that holds ``max_value``.

    uint8 is never returned for ids: Parquet stores it as INT32 anyway and a
    vocabulary below 256 is not worth a special case. For a vocabulary of V ids
    call ``narrowest_uint(V - 1)``: uint16 up to 65,536 ids, uint32 above.
    """
    max_value = int(max_value)
    if max_value < 0:
        raise ValueError(f"max_value: must be >= 0, got {max_value}")
    if max_value <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if max_value <= np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    return np.dtype(np.uint64)


def _check_2d(name: str, x: Any, kind: str, shape: tuple | None = None) -> np.ndarray:
    """Validate one input array; errors start with the field's name so that the
    caller sees at once which input was wrong."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name}: expected shape (N, k), got {x.shape}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name}: shape {x.shape} does not match {shape}")
    if kind == "int" and not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name}: expected an integer dtype, got {x.dtype}")
    if kind == "float" and not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: expected a floating dtype, got {x.dtype}")
    return x


def _check_topk(ids: Any, logprobs: Any, vocab_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    ids = _check_2d("ids", ids, "int")
    logprobs = _check_2d("logprobs", logprobs, "float", ids.shape)
    if ids.size and ids.min() < 0:
        raise ValueError("ids: negative id")
    if vocab_size is not None and ids.size and ids.max() >= vocab_size:
        raise ValueError(f"ids: id {int(ids.max())} >= vocab_size {vocab_size}")
    if np.isnan(logprobs).any() or (logprobs > 1e-3).any():
        # A small positive slack: log_softmax in float32 can round just above 0.
        raise ValueError("logprobs: must be log-probabilities (<= 0, not NaN)")
    return ids.astype(np.int64, copy=False), logprobs


def _leaf(cols: dict, name: str, k: int | None = None, n: int | None = None) -> np.ndarray:
    """Fetch a leaf for decoding: (N, k) per entry when ``k`` is given, else (N,)."""
    if name not in cols:
        raise ValueError(f"{name}: leaf missing from cols (have {sorted(cols)})")
    x = np.asarray(cols[name])
    if k is not None:
        if x.ndim != 2 or x.shape[1] != k:
            raise ValueError(f"{name}: expected shape (N, {k}), got {x.shape}")
    elif x.ndim != 1 or (n is not None and x.shape[0] != n):
        raise ValueError(f"{name}: expected shape ({n},), got {x.shape}")
    return x


def _sort_rows(key: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(key, axis=1, kind="stable")
    return [np.take_along_axis(a, order, axis=1) for a in (key, *arrays)]


def _deltas(sorted_ids: np.ndarray) -> np.ndarray:
    """First value as is, then differences: decode is ``np.cumsum(d, axis=1)``."""
    return np.diff(sorted_ids, axis=1, prepend=0)


# --------------------------------------------------------------------------- top-k codecs


class TopKCodec:
    """One way to store per-token top-k (id, log-prob) pairs as integer leaves.

    ``encode`` accepts the entries of a token in any order; ``decode`` returns them
    in the codec's own order (by id for all but ``exact``), ids always exact.
    """

    name: str = ""
    lossless_ids: bool = True
    lossless_values: bool = False

    def element_types(self, k: int, vocab_size: int) -> dict[str, pa.DataType]:
        raise NotImplementedError

    def encode(self, ids: np.ndarray, logprobs: np.ndarray,
               vocab_size: int | None = None) -> dict[str, np.ndarray]:
        """Leaves keyed like ``element_types``. Pass ``vocab_size`` to get exactly
        its id dtype; without it the narrowest dtype for these ids is used."""
        raise NotImplementedError

    def encode_torch(self, ids, logprobs, vocab_size: int | None = None) -> dict[str, Any]:
        """``encode`` on torch tensors: the same leaves, as tensors on the inputs' device.

        Codecs that override it run on the device (a GPU teacher then ships only the narrow leaves
        to the host); this default encodes on the host with ``encode`` and moves the leaves back.
        """
        import torch

        check_torch_topk(ids, logprobs)
        enc = self.encode(ids.cpu().numpy(), logprobs.cpu().numpy(), vocab_size=vocab_size)
        return {name: torch.from_numpy(leaf).to(ids.device) for name, leaf in enc.items()}

    def decode(self, cols: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def params(self) -> dict:
        """Whatever the manifest must record, besides ``name``, to decode."""
        return {}

    def scalar_leaves(self) -> set[str]:
        """Leaves with one value per token, shape (N,); the others are (N, k)."""
        return set()

    def bss_leaves(self) -> set[str]:
        """Leaves that want BYTE_STREAM_SPLIT: all of them (see module docstring)."""
        return set(self.element_types(1, 2))

    def fit(self, ids: np.ndarray) -> "TopKCodec":
        """A codec tuned on a calibration sample of top-k ids; by default itself."""
        return self


class ExactCodec(TopKCodec):
    """Bit-exact: ids (narrowest uint) and float32 log-probs, in the order given."""

    name = "exact"
    lossless_values = True

    def element_types(self, k, vocab_size):
        return {"ids": pa.from_numpy_dtype(narrowest_uint(vocab_size - 1)),
                "logprobs": pa.float32()}

    def encode(self, ids, logprobs, vocab_size=None):
        ids, logprobs = _check_topk(ids, logprobs, vocab_size)
        top = vocab_size - 1 if vocab_size else (ids.max() if ids.size else 0)
        return {"ids": ids.astype(narrowest_uint(top)), "logprobs": logprobs.astype(np.float32)}

    def encode_torch(self, ids, logprobs, vocab_size=None):
        import torch

        ids, logprobs = check_torch_topk(ids, logprobs)
        top = torch_top_id(ids, vocab_size)
        return {"ids": ids.to(torch_dtype(narrowest_uint(top))), "logprobs": logprobs.to(torch.float32)}

    def decode(self, cols, k):
        ids = _leaf(cols, "ids", k)
        lp = _leaf(cols, "logprobs", k)
        if lp.shape != ids.shape:
            raise ValueError(f"logprobs: shape {lp.shape} does not match ids {ids.shape}")
        return ids.astype(np.int64), lp.astype(np.float32)


class Float16SortedCodec(TopKCodec):
    """Ids sorted ascending and delta-coded, log-probs as float16 (rel. error 2^-11).

    Decode: ``ids = cumsum(id_deltas, axis=1)``; ``logprobs = float(logprobs)``.
    """

    name = "f16-sorted"

    def element_types(self, k, vocab_size):
        return {"id_deltas": pa.from_numpy_dtype(narrowest_uint(vocab_size - 1)),
                "logprobs": pa.float16()}

    def encode(self, ids, logprobs, vocab_size=None):
        ids, logprobs = _check_topk(ids, logprobs, vocab_size)
        ids, logprobs = _sort_rows(ids, logprobs)
        top = vocab_size - 1 if vocab_size else (ids.max() if ids.size else 0)
        return {"id_deltas": _deltas(ids).astype(narrowest_uint(top)),
                "logprobs": logprobs.astype(np.float16)}

    def encode_torch(self, ids, logprobs, vocab_size=None):
        ids, logprobs = check_torch_topk(ids, logprobs)
        top = torch_top_id(ids, vocab_size)
        ids, logprobs = torch_sort_rows(ids, logprobs)
        return {"id_deltas": torch_deltas(ids).to(torch_dtype(narrowest_uint(top))),
                "logprobs": torch_float16(logprobs)}

    def decode(self, cols, k):
        d = _leaf(cols, "id_deltas", k)
        lp = _leaf(cols, "logprobs", k)
        return np.cumsum(d.astype(np.int64), axis=1), lp.astype(np.float32)


class LinearQ8Codec(TopKCodec):
    """Reference point: log-probs quantised linearly to 8 bits between each token's
    min and max (two float32 scalars per token); ids as in ``f16-sorted``.

    Decode: ``logprobs = lp_min + codes * (lp_max - lp_min) / 255``.
    Kept to show what the pow-q8 domain buys: uniform steps in log-prob waste
    precision on the many tiny entries and lack it on the few large ones.
    """

    name = "q8-linear"

    def scalar_leaves(self):
        return {"lp_min", "lp_max"}

    def element_types(self, k, vocab_size):
        return {"id_deltas": pa.from_numpy_dtype(narrowest_uint(vocab_size - 1)),
                "codes": pa.uint8(), "lp_min": pa.float32(), "lp_max": pa.float32()}

    def encode(self, ids, logprobs, vocab_size=None):
        ids, logprobs = _check_topk(ids, logprobs, vocab_size)
        ids, logprobs = _sort_rows(ids, logprobs)
        lo = logprobs.min(axis=1).astype(np.float32)
        hi = logprobs.max(axis=1).astype(np.float32)
        step = np.where(hi > lo, (hi - lo) / 255, 1.0)[:, None]
        codes = np.rint((logprobs - lo[:, None]) / step).clip(0, 255).astype(np.uint8)
        top = vocab_size - 1 if vocab_size else (ids.max() if ids.size else 0)
        return {"id_deltas": _deltas(ids).astype(narrowest_uint(top)), "codes": codes,
                "lp_min": lo, "lp_max": hi}

    def decode(self, cols, k):
        d = _leaf(cols, "id_deltas", k)
        codes = _leaf(cols, "codes", k)
        lo = _leaf(cols, "lp_min", n=len(d)).astype(np.float32)
        hi = _leaf(cols, "lp_max", n=len(d)).astype(np.float32)
        lp = lo[:, None] + codes.astype(np.float32) * ((hi - lo) / 255)[:, None]
        return np.cumsum(d.astype(np.int64), axis=1), lp.astype(np.float32)


class PowQ8Codec(TopKCodec):
    """Default: ids delta-coded in vocabulary-rank order; each token's top-k
    renormalised to sum 1 and stored as 8-bit codes of q**alpha, shifted by the
    token's smallest code; the top-k mass kept as one float16 per token.

    Leaves and decode formula (``order`` is the identity unless ``vocab_order``
    is set, see below)::

        rank     = cumsum(id_deltas, axis=1)           # ascending per token
        ids      = order[rank]
        code     = codes + code_min[:, None]
        q        = ((code + 0.5) / levels) ** (1 / alpha)  # bin middle in q**alpha
        logprobs = log(q / q.sum(axis=1, keepdims=True)) + log_mass[:, None]

    Error: code = floor(q**alpha * levels), so q**alpha is off by at most
    0.5/levels. With alpha = 0.4 and 240 levels: KL ~ 8.4e-5 nats/token on
    SmolLM2 top-64, and at most ~1.3e-4 when all 64 entries are equal (the
    worst case, as each entry adds ~ q**0.2 / (3.84 levels**2)). Renormalising
    first makes the error independent of how flat the teacher is: quantising p
    itself gave 9e-3 on a near-uniform random teacher. Ids are exact.

    ``vocab_order`` (optional, from ``fit``): ids ranked by how often they occur
    in top-k sets of a calibration sample, co-occurring ones grouped; ids not
    listed follow in ascending id order, so
    ``order = vocab_order + sorted(set(range(V)) - set(vocab_order))``.
    Ids of a token's top-k then sit close together and their deltas are small.
    """

    name = "pow-q8"

    def __init__(self, alpha: float = 0.4, levels: int = 232,
                 vocab_order: list[int] | None = None):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha: must be in (0, 1], got {alpha}")
        if not 2 <= levels <= 256:
            raise ValueError(f"levels: must be in [2, 256] to fit uint8, got {levels}")
        self.alpha, self.levels = float(alpha), int(levels)
        self.vocab_order = None
        if vocab_order is not None:
            order = np.asarray(vocab_order, dtype=np.int64)
            if order.ndim != 1 or (order.size and order.min() < 0) or \
                    np.unique(order).size != order.size:
                raise ValueError("vocab_order: must be distinct non-negative ids")
            self.vocab_order = order
        self._tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._device_ranks: dict[tuple[int, str], Any] = {}  # (size, device) -> rank table tensor

    def scalar_leaves(self):
        return {"code_min", "log_mass"}

    def params(self):
        order = None if self.vocab_order is None else self.vocab_order.tolist()
        return {"alpha": self.alpha, "levels": self.levels, "vocab_order": order}

    def element_types(self, k, vocab_size):
        return {"id_deltas": pa.from_numpy_dtype(narrowest_uint(vocab_size - 1)),
                "codes": pa.uint8(), "code_min": pa.uint8(), "log_mass": pa.float16()}

    def fit(self, ids: np.ndarray, max_order: int = 16384, clusters: int = 32,
            cluster_ids: int = 16384, seed: int = 0) -> "PowQ8Codec":
        """Same codec with a vocabulary order fitted on ``ids``, a calibration
        sample of top-k sets (N, k), e.g. the teacher's top-k on 128 sequences
        (a few seconds for 128 x 128 tokens). The arguments are those of
        ``storage.vocab_order.fit_vocab_order``; only ``vocab_order`` (at most
        ``max_order`` ids) reaches the manifest.
        """
        ids = _check_2d("ids", ids, "int")
        if ids.size and ids.min() < 0:
            raise ValueError("ids: negative id")
        ranked = fit_vocab_order(ids, max_order, clusters, cluster_ids, seed)
        return PowQ8Codec(self.alpha, self.levels, ranked.tolist())

    def _table(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, rank) over ids [0, size): order[rank[i]] == i. Tables for
        different sizes agree on their common prefix, so encoder and decoder
        need not agree on the vocabulary size."""
        if self.vocab_order is None:
            ident = np.arange(size, dtype=np.int64)
            return ident, ident
        size = max(size, int(self.vocab_order.max()) + 1 if self.vocab_order.size else 0)
        if size not in self._tables:
            rest = np.setdiff1d(np.arange(size, dtype=np.int64), self.vocab_order)
            order = np.concatenate([self.vocab_order, rest])
            rank = np.empty_like(order)
            rank[order] = np.arange(size, dtype=np.int64)
            self._tables[size] = (order, rank)
        return self._tables[size]

    def encode(self, ids, logprobs, vocab_size=None):
        ids, logprobs = _check_topk(ids, logprobs, vocab_size)
        if vocab_size and self.vocab_order is not None and self.vocab_order.size \
                and self.vocab_order.max() >= vocab_size:
            raise ValueError(f"vocab_order: holds ids >= vocab_size {vocab_size}")
        size = vocab_size or (int(ids.max()) + 1 if ids.size else 1)
        rank, logprobs = _sort_rows(self._table(size)[1][ids], logprobs.astype(np.float64))
        log_mass = np.logaddexp.reduce(logprobs, axis=1) if logprobs.size else np.zeros(len(rank))
        if not np.isfinite(log_mass).all():
            raise ValueError("logprobs: a token has no finite log-prob")
        # float64 throughout: a bin edge must not move between encoder and reader.
        u = np.exp(self.alpha * (logprobs - log_mass[:, None]))
        code = np.minimum(np.floor(u * self.levels), self.levels - 1).astype(np.int64)
        code_min = code.min(axis=1) if code.size else np.zeros(len(code), np.int64)
        top = vocab_size - 1 if vocab_size else size - 1
        return {"id_deltas": _deltas(rank).astype(narrowest_uint(top)),
                "codes": (code - code_min[:, None]).astype(np.uint8),
                "code_min": code_min.astype(np.uint8),
                "log_mass": log_mass.astype(np.float16)}

    def encode_torch(self, ids, logprobs, vocab_size=None):
        import torch

        ids, logprobs = check_torch_topk(ids, logprobs)
        if vocab_size and self.vocab_order is not None and self.vocab_order.size \
                and self.vocab_order.max() >= vocab_size:
            raise ValueError(f"vocab_order: holds ids >= vocab_size {vocab_size}")
        size = vocab_size or torch_top_id(ids, None) + 1
        key = (size, str(ids.device))
        ranks = self._device_ranks.get(key)
        if ranks is None:  # a plain lookup table: built once per vocabulary size and device
            ranks = self._device_ranks[key] = torch.from_numpy(self._table(size)[1]).to(ids.device)
        rank, logprobs = torch_sort_rows(ranks[ids], logprobs.to(torch.float64))
        # Step for step the float64 arithmetic of ``encode``.
        log_mass = torch.logsumexp(logprobs, dim=1)
        u = torch.exp(self.alpha * (logprobs - log_mass[:, None]))
        code = torch.floor(u * self.levels).clamp(max=self.levels - 1).to(torch.int64)
        code_min = code.amin(dim=1) if code.numel() else code.new_zeros(len(code))
        top = vocab_size - 1 if vocab_size else size - 1
        return {"id_deltas": torch_deltas(rank).to(torch_dtype(narrowest_uint(top))),
                "codes": (code - code_min[:, None]).to(torch.uint8),
                "code_min": code_min.to(torch.uint8),
                "log_mass": torch_float16(log_mass)}

    def decode(self, cols, k):
        d = _leaf(cols, "id_deltas", k)
        codes = _leaf(cols, "codes", k)
        if codes.shape != d.shape:
            raise ValueError(f"codes: shape {codes.shape} does not match id_deltas {d.shape}")
        code_min = _leaf(cols, "code_min", n=len(d)).astype(np.float64)
        log_mass = _leaf(cols, "log_mass", n=len(d)).astype(np.float64)
        rank = np.cumsum(d.astype(np.int64), axis=1)
        order = self._table(int(rank.max()) + 1 if rank.size else 1)[0]
        code = codes.astype(np.float64) + code_min[:, None]
        log_q = np.log((code + 0.5) / self.levels) / self.alpha
        # Renormalised again so that the decoded mass is exactly exp(log_mass):
        # 1 - sum(exp(logprobs)) stays the teacher's tail mass.
        log_q -= np.logaddexp.reduce(log_q, axis=1, keepdims=True) if log_q.size else 0
        return order[rank], (log_q + log_mass[:, None]).astype(np.float32)


CODECS: dict[str, type[TopKCodec]] = {
    c.name: c for c in (ExactCodec, Float16SortedCodec, LinearQ8Codec, PowQ8Codec)
}


def get_topk_codec(name: str, params: dict | None = None) -> TopKCodec:
    """The codec called ``name``, rebuilt from the ``params()`` a manifest recorded."""
    if name not in CODECS:
        raise ValueError(f"name: unknown top-k codec {name!r}; known: {sorted(CODECS)}")
    return CODECS[name](**(params or {}))


def topk_kl_error(ids: np.ndarray, logprobs: np.ndarray,
                  ids2: np.ndarray, logprobs2: np.ndarray) -> float:
    """Mean over tokens of KL(p || q) in nats, p from (ids, logprobs) and q from
    (ids2, logprobs2), both renormalised over the token's k ids. Entries may be
    in any order; each token must hold the same id set in both."""
    ids = _check_2d("ids", ids, "int")
    logprobs = _check_2d("logprobs", logprobs, "float", ids.shape)
    ids2 = _check_2d("ids2", ids2, "int", ids.shape)
    logprobs2 = _check_2d("logprobs2", logprobs2, "float", ids.shape)
    a_ids, a = _sort_rows(ids, logprobs.astype(np.float64))
    b_ids, b = _sort_rows(ids2, logprobs2.astype(np.float64))
    if not np.array_equal(a_ids, b_ids):
        raise ValueError("ids2: the id sets differ from ids")
    a = a - np.logaddexp.reduce(a, axis=1, keepdims=True)
    b = b - np.logaddexp.reduce(b, axis=1, keepdims=True)
    return float((np.exp(a) * (a - b)).sum(axis=1).mean()) if len(a) else 0.0
