"""Value codecs of the kdcache shard format: how teacher outputs become integers.

numpy, plus torch twins (``TopKCodec.encode_torch``, ``encode_dense_torch``)
that compute the same leaves on the teacher's device, so that only the narrow
leaves cross to the host; torch is imported only by those. Each codec turns
per-token arrays into a few *leaves*: plain integer or float arrays of shape
(N, k) (one value per top-k entry) or (N,) (one scalar per token). The shard
writer stores each leaf as a Parquet column ``list<fixed_size_list<elem, k>>``
(``list<elem>`` for scalars), one row per sequence, so pyarrow, duckdb or HF
datasets read every leaf without kdcache; the decode formulas below are all a
reader needs.

Parquet notes (pyarrow 26, measured, see shared/RAY_NOTES.md):
  * Parquet has no 8- or 16-bit physical type: uint8/uint16/int8 leaves are
    stored as INT32. Without BYTE_STREAM_SPLIT the three padding bytes sit
    between the payload bytes and zstd loses to them (a uint8 code leaf: 0.99
    instead of 0.64 B/value). So **every leaf of every codec here wants
    BYTE_STREAM_SPLIT** (``TopKCodec.bss_leaves()`` lists them), set on the leaf
    path (``col.list.element.list.element``), with dictionary encoding off.
  * polars cannot read float16 written with BYTE_STREAM_SPLIT (its issue 21803).

Top-k codecs (k = 64, SmolLM2-135M on Wikipedia extracts; measured on 28,672
tokens, fitted on up to 28,672 others; zstd 3;
``python -m experiments.topk_codec``):

  ======================  =======  =============  =====================================
  codec                   B/entry  KL nats/token  what it stores
  ======================  =======  =============  =====================================
  exact                   4.44     0              ids + float32 log-probs, as given
  f16-sorted              2.58     1.7e-7         id deltas + float16 log-probs
  q8-linear               2.19     1.2e-5         id deltas + 8-bit log-probs, per-token range
  pow-q8 levels=240       1.87     8.3e-5         id deltas + 8-bit codes of q**0.4 (+2 scalars)
  pow-q8 (default, 232)   1.865    8.9e-5         same, KL budget spent to 0.9e-4
  + fit, unigram counts   1.80     8.9e-5         ids ranked by input-id counts of 1M tokens
  + fit(clusters=0), 128  1.70     8.9e-5         ranked by top-k counts, 128 x 128 tokens
  + fit(), 8 sequences    1.71     8.9e-5         ranked and clustered by co-occurrence
  + fit(), 32 sequences   1.64     8.9e-5         (teacher top-k of N x 128 tokens)
  + fit(), 128 sequences  1.60     8.9e-5         ... recommended calibration
  same, levels=224        1.596    9.6e-5
  fit(), 128, zstd 9      1.57     8.9e-5         zstd level: a writer setting
  fit(), 128, zstd 19     1.54     8.9e-5
  ======================  =======  =============  =====================================

Where the bytes go (fit() on 128 sequences): ids 0.925 B (7.4 bits), codes 0.637
(5.1 bits), code_min 0.009, log_mass 0.029 (redundant with the shard's
``topk_log_tail``, but decode needs it to return absolute log-probs).
  * Ids, sorted by rank and delta-coded, cost about the order-0 entropy of the
    deltas. The tokenizer's order gives 9.5 bits; ranking by top-k counts 8.2;
    also grouping co-occurring ids (``fit``) 7.4. Counts of the corpus' input
    ids (no teacher) rank the vocabulary poorly: next-token candidates are not
    the frequent input tokens (1.80 B even from 1M tokens). Measured and not
    paying: ragged leaves per rank range (ranks < 256 as uint8 deltas, the rest
    as uint16; 2-4 streams: <= -0.01 B, the list levels eat the gain), escapes
    for large deltas, per-position leaves, bitmasks for frequent ids. Ids
    shared with the previous token (11 of 64) are left alone: the writer
    encodes whole batches and a reader must decode any row alone.
  * The codes cost ~5.1 bits at 8.9e-5 nats. That is the rate of uniform
    scalar quantisation at that KL: id and value share < 0.1 bit, per-row
    contexts (flatness classes) < 0.15 bit, better reconstruction points nothing;
    alpha 0.3 / 0.35 / 0.4 at 0.9e-4 nats (184 / 202 / 232 levels) measured
    5.05 / 4.98 / 4.94 bits of order-0 entropy, and alpha >= 0.45 needs > 256.
  * Sorting by probability makes the codes cheap (2.7 bits as deltas) but the
    ids dear (13 bits, or 11.6 with a vocabulary order): worse in total, and so
    was every mix tried (value classes, head by value + tail by id).

Why pow-q8 looks like it does:
  * KL(p || q) ~ 2 * sum_i (sqrt(p_i) - sqrt(q_i))^2: a quantiser uniform in
    p**alpha with alpha ~ 0.5 spreads the KL evenly over the entries (the step in
    log-prob grows like 1/sqrt(p)). alpha = 0.4 came out ~0.05 bit better than 0.5
    after zstd and needs only 240 levels, i.e. uint8 codes, for 8.4e-5 nats
    (232, the default, for 8.9e-5).
    (q8-linear spends 7.2 bits per code, for 1.2e-5 nats.)
  * Quantising q = p / (top-k mass) rather than p keeps the error the same for a
    flat teacher (quantising p gave 9e-3 nats on a near-uniform one) at the cost
    of the float16 ``log_mass`` scalar (0.03 B/entry).
  * Subtracting each token's smallest code (a uint8 scalar) saves ~0.08 B: rows
    differ mostly by how flat they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

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


# --------------------------------------------------------------------------- torch twins
#
# ``TopKCodec.encode_torch`` and ``encode_dense_torch`` run on the teacher's device and must give
# the leaves the numpy functions give, so that where a cache was encoded does not show in it. The
# same operations in the same precision do that: stable sorts, float64 wherever numpy uses float64,
# IEEE float32 division (tensor by tensor: see int8) and sqrt, round half to even, float16 rounded
# once (``_torch_float16``). Checked on CPU and on an H100 by tests/storage/test_codecs.py.
# Only exp and log may differ in the last bit between libraries; a code moves only if that bit
# straddles a bin edge (a chance of about 1e-14 per entry), and either code is a valid encoding.
# Nothing here reads a value back to the host (that would stall the device), so unlike ``encode``
# the values are not checked: the inputs are the teacher runner's own top-k.


def _torch_dtype(dtype: np.dtype):
    import torch

    return torch.from_numpy(np.empty(0, dtype)).dtype


def _check_torch_topk(ids: Any, logprobs: Any):
    import torch

    for name, x in (("ids", ids), ("logprobs", logprobs)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a torch tensor, got {type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"{name}: expected shape (N, k), got {tuple(x.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"ids: expected an integer dtype, got {ids.dtype}")
    if not logprobs.is_floating_point():
        raise ValueError(f"logprobs: expected a floating dtype, got {logprobs.dtype}")
    if logprobs.shape != ids.shape:
        raise ValueError(f"logprobs: shape {tuple(logprobs.shape)} does not match {tuple(ids.shape)}")
    return ids.long(), logprobs


def _torch_top_id(ids, vocab_size: int | None) -> int:
    """The largest id the id leaf must hold (reads ``ids.max()`` back only without ``vocab_size``)."""
    if vocab_size:
        return vocab_size - 1
    return int(ids.max()) if ids.numel() else 0


def _torch_float16(x):
    """``x`` as float16 rounded once, to nearest even, like numpy's ``astype(np.float16)``.

    torch converts float64 through float32, and that double rounding is one ulp off for about one
    value in 16,000 (those that land exactly on a float16 tie in float32). Rounding to float32 *to
    odd* first (toward zero, lowest bit set if inexact) makes the second rounding exact.
    """
    import torch

    if x.dtype != torch.float64:
        return x.to(torch.float16)
    f = x.to(torch.float32)
    f = torch.where(f.double().abs() > x.abs(), torch.nextafter(f, torch.zeros_like(f)), f)
    inexact = (f.double() != x).to(torch.int32)
    return (f.view(torch.int32) | inexact).view(torch.float32).to(torch.float16)


def _torch_sort_rows(key, *arrays):
    key, order = key.sort(dim=1, stable=True)
    return [key, *(a.gather(1, order) for a in arrays)]


def _torch_deltas(sorted_ids):
    return sorted_ids.diff(dim=1, prepend=sorted_ids.new_zeros((len(sorted_ids), 1)))


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

        _check_torch_topk(ids, logprobs)
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

        ids, logprobs = _check_torch_topk(ids, logprobs)
        top = _torch_top_id(ids, vocab_size)
        return {"ids": ids.to(_torch_dtype(narrowest_uint(top))), "logprobs": logprobs.to(torch.float32)}

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
        ids, logprobs = _check_torch_topk(ids, logprobs)
        top = _torch_top_id(ids, vocab_size)
        ids, logprobs = _torch_sort_rows(ids, logprobs)
        return {"id_deltas": _torch_deltas(ids).to(_torch_dtype(narrowest_uint(top))),
                "logprobs": _torch_float16(logprobs)}

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
        sample of top-k sets (N, k), e.g. the teacher's top-k on 128 sequences.

        The ``max_order`` most frequent ids of ``ids`` come first; the
        ``cluster_ids`` most frequent of those are also grouped by
        co-occurrence: ranks [0, 1024) of the frequency ranking, then the rest,
        each part ordered by cluster (clusters by total count), inside a
        cluster by count (ties by id). Ids that tend to share a top-k set
        (digits, capitalised words, word pieces, ...) so sit together and their
        deltas are small. Clusters: k-means (``clusters`` of them) on a 32-dim
        spectral embedding of the normalised co-occurrence matrix (randomised
        SVD, fixed ``seed``): deterministic for a given sample, a few seconds
        for 128 x 128 tokens. ``clusters=0``, or k < 8 (input ids passed as
        (N, 1) give unigram counts), ranks by count alone. Only ``vocab_order``
        (at most ``max_order`` ids) reaches the manifest.
        """
        ids = _check_2d("ids", ids, "int")
        if ids.size and ids.min() < 0:
            raise ValueError("ids: negative id")
        counts = np.bincount(ids.ravel(), minlength=1)
        seen = np.flatnonzero(counts)
        # Most frequent first; ties by id so that the order is reproducible.
        ranked = seen[np.lexsort((seen, -counts[seen]))][:max_order]
        if clusters > 1 and ids.shape[1] >= 8 and min(cluster_ids, len(ranked)) >= 4 * clusters:
            top = ranked[:cluster_ids]
            label = _cooccurrence_clusters(ids, top, counts[top], clusters, seed)
            band = np.arange(len(top)) >= 1024  # the 1,024 most frequent ids stay first
            mass = np.bincount(label, weights=counts[top], minlength=clusters)
            crank = np.argsort(np.argsort(-mass, kind="stable"), kind="stable")
            o = np.lexsort((top, -counts[top], crank[label], band))
            ranked = np.concatenate([top[o], ranked[len(top):]])
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

        ids, logprobs = _check_torch_topk(ids, logprobs)
        if vocab_size and self.vocab_order is not None and self.vocab_order.size \
                and self.vocab_order.max() >= vocab_size:
            raise ValueError(f"vocab_order: holds ids >= vocab_size {vocab_size}")
        size = vocab_size or _torch_top_id(ids, None) + 1
        key = (size, str(ids.device))
        ranks = self._device_ranks.get(key)
        if ranks is None:  # a plain lookup table: built once per vocabulary size and device
            ranks = self._device_ranks[key] = torch.from_numpy(self._table(size)[1]).to(ids.device)
        rank, logprobs = _torch_sort_rows(ranks[ids], logprobs.to(torch.float64))
        # Step for step the float64 arithmetic of ``encode``.
        log_mass = torch.logsumexp(logprobs, dim=1)
        u = torch.exp(self.alpha * (logprobs - log_mass[:, None]))
        code = torch.floor(u * self.levels).clamp(max=self.levels - 1).to(torch.int64)
        code_min = code.amin(dim=1) if code.numel() else code.new_zeros(len(code))
        top = vocab_size - 1 if vocab_size else size - 1
        return {"id_deltas": _torch_deltas(rank).to(_torch_dtype(narrowest_uint(top))),
                "codes": (code - code_min[:, None]).to(torch.uint8),
                "code_min": code_min.to(torch.uint8),
                "log_mass": _torch_float16(log_mass)}

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


def _cooccurrence_clusters(ids: np.ndarray, top: np.ndarray, counts: np.ndarray,
                           clusters: int, seed: int, dims: int = 32) -> np.ndarray:
    """Cluster label of each id in ``top`` from how often ids share a row of
    ``ids``: k-means (cosine) on the leading right singular vectors of the
    row-by-id incidence matrix with columns scaled by 1/sqrt(count), i.e. a
    spectral embedding of D^-1/2 C D^-1/2 for the co-occurrence counts C."""
    rng = np.random.default_rng(seed)
    m = len(top)
    pos = np.full(int(max(ids.max(), top.max())) + 1, m, dtype=np.int64)
    pos[top] = np.arange(m)
    col = pos[ids]                                   # (N, k); m marks ids outside top
    scale = np.append(1 / np.sqrt(counts.astype(np.float64)), 0.0)
    flat_col, flat_row = col.ravel(), np.repeat(np.arange(len(ids)), ids.shape[1])
    keep = flat_col < m
    flat_col, flat_row = flat_col[keep], flat_row[keep]

    def xv(v):  # X @ v, v: (m, d)
        vp = np.vstack([v, np.zeros((1, v.shape[1]))]) * scale[:, None]
        return np.add.reduceat(vp[col].reshape(-1, v.shape[1]), np.arange(0, col.size, col.shape[1]))

    def xtu(u):  # X.T @ u, u: (N, d)
        return np.stack([np.bincount(flat_col, weights=u[flat_row, j], minlength=m)
                         for j in range(u.shape[1])], axis=1) * scale[:m, None]

    def orth(a):  # orthonormal basis of a's columns, from its small Gram matrix
        w, v = np.linalg.eigh(a.T @ a)
        return a @ (v / np.sqrt(np.maximum(w, w.max() * 1e-12)))

    d = min(dims, m - 1)
    q = orth(xv(rng.standard_normal((m, d + 8))))
    for _ in range(3):  # subspace iteration
        q = orth(xv(xtu(q)))
    b = xtu(q)  # (m, d + 8): its leading left singular vectors embed the ids
    w, v = np.linalg.eigh(b.T @ b)
    w, v = w[::-1][:d], v[:, ::-1][:, :d]
    y = b @ (v / np.sqrt(np.maximum(w, w[0] * 1e-12)))  # unit columns, as from an SVD
    y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    centre = y[rng.choice(m, clusters, replace=False)]
    for _ in range(30):
        label = ((y * y).sum(1)[:, None] - 2 * y @ centre.T + (centre * centre).sum(1)).argmin(1)
        for c in range(clusters):
            if (label == c).any():
                centre[c] = y[label == c].mean(0)
    return label


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


# --------------------------------------------------------------------------- dense tensors
#
# Errors measured on real outputs (SmolLM2-135M: 4 x 128 tokens, 31 hidden layers
# of 576, 30 x 9 attention heads; all-MiniLM-L6-v2: 8 x 128, 7 x 384, 6 x 12):
#   float16   hidden: relative error <= 2^-11 (values beyond 65,504 become inf)
#   bfloat16  hidden: relative error <= 2^-8 (float32 range kept)
#   int8      hidden: |error| <= absmax/254 of the vector (one float32 scale each)
#   uint8     attention probabilities, sqrt domain: max |error| <= 1/255 (only
#             near p = 1), mean 5.7e-5 (SmolLM2) and 1.0e-4 (MiniLM). Linear
#             x*255 has the smaller max (1/510) but a 5-6x larger mean (2.9e-4,
#             6.6e-4): most attention weights are below 1e-3, where it keeps no
#             digit at all (KL per attention row 0.3 vs 2.3e-4 for sqrt). A cube
#             root would halve that KL again but break the 1/255 bound (5.9e-3).

DENSE_FORMS = ("float16", "bfloat16", "int8", "uint8")


def dense_element_type(form: str) -> pa.DataType:
    """Arrow element type of a dense form (bfloat16 travels as its uint16 bits)."""
    _check_form(form)
    return {"float16": pa.float16(), "bfloat16": pa.uint16(),
            "int8": pa.int8(), "uint8": pa.uint8()}[form]


def _check_form(form: str) -> None:
    if form not in DENSE_FORMS:
        raise ValueError(f"form: must be one of {DENSE_FORMS}, got {form!r}")


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 values, rounded to nearest even,
    NaN as 0x7FC0: the same bits as ``torch.tensor(x).to(torch.bfloat16)``."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit and truncating rounds half to even;
    # NaNs would carry into the exponent, so they get torch's canonical NaN.
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded.astype(np.uint16))


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def encode_dense(x: np.ndarray, form: str) -> tuple[np.ndarray, dict]:
    """Store a float tensor of any shape in ``form``; returns (codes, params).

    ``params`` is {} except for int8, where ``params["scale"]`` (float32, shape
    ``x.shape[:-1]``) holds absmax/127 of each vector along the last axis, i.e.
    one scale per token for hidden states; the writer stores it as a column.
    ``uint8`` is for probabilities in [0, 1] (attention maps): round(255*sqrt(p)).
    """
    _check_form(form)
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x: expected a floating numpy array, got {getattr(x, 'dtype', type(x))}")
    if form == "float16":
        return x.astype(np.float16), {}
    if form == "bfloat16":
        return float32_to_bfloat16_bits(x), {}
    if form == "int8":
        if x.ndim < 1:
            raise ValueError("x: int8 needs at least one axis to scale over")
        x32 = x.astype(np.float32)
        scale = np.abs(x32).max(axis=-1) / np.float32(127)
        safe = np.where(scale > 0, scale, np.float32(1))[..., None]
        return np.rint(x32 / safe).clip(-127, 127).astype(np.int8), {"scale": scale.astype(np.float32)}
    # uint8 probabilities: sqrt keeps relative precision for the many small weights.
    return np.rint(np.sqrt(np.clip(x, 0, 1, dtype=np.float32)) * 255).astype(np.uint8), {}


def encode_dense_torch(x, form: str) -> tuple[Any, dict]:
    """``encode_dense`` on a torch tensor, on its device: the same codes (and int8 scales), as
    tensors. bfloat16 codes are the uint16 bit patterns, NaN as 0x7FC0, as on the host."""
    import torch

    _check_form(form)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x: expected a floating torch tensor, got {getattr(x, 'dtype', type(x))}")
    if form == "float16":
        return _torch_float16(x), {}
    x32 = x.to(torch.float32)
    if form == "bfloat16":
        bits = x32.to(torch.bfloat16).view(torch.int16)
        return torch.where(torch.isnan(x32), torch.full_like(bits, 0x7FC0), bits).view(torch.uint16), {}
    if form == "int8":
        if x.ndim < 1:
            raise ValueError("x: int8 needs at least one axis to scale over")
        absmax = x32.abs().amax(dim=-1)
        # A tensor divisor: CUDA divides by a Python scalar as a product with its reciprocal, which
        # is not the correctly rounded float32 quotient numpy computes (one ulp off, now and then).
        scale = absmax / torch.full_like(absmax, 127)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
        return torch.round(x32 / safe).clamp(-127, 127).to(torch.int8), {"scale": scale}
    return torch.round(torch.sqrt(x32.clamp(0, 1)) * 255).to(torch.uint8), {}


def decode_dense(codes: np.ndarray, form: str, params: dict | None = None) -> np.ndarray:
    """Inverse of ``encode_dense``: float32 of the same shape as ``codes``."""
    _check_form(form)
    codes = np.asarray(codes)
    if form == "float16":
        return codes.astype(np.float32)
    if form == "bfloat16":
        return bfloat16_bits_to_float32(codes)
    if form == "int8":
        if not params or "scale" not in params:
            raise ValueError("params: int8 needs params['scale']")
        scale = np.asarray(params["scale"], dtype=np.float32)
        if scale.shape != codes.shape[:-1]:
            raise ValueError(f"params: scale shape {scale.shape} != codes shape {codes.shape[:-1]}")
        return codes.astype(np.float32) * scale[..., None]
    return np.square(codes.astype(np.float32) / np.float32(255))
