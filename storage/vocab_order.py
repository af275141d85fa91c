"""A vocabulary order for the pow-q8 top-k codec, fitted on a calibration sample of top-k ids.

Ids ranked by how often they occur in the sample's top-k sets, co-occurring ones grouped: the ids
of a token's top-k then sit close together in rank order and their deltas are small (see
``PowQ8Codec`` and docs/format.md, §5).
"""
from __future__ import annotations

import numpy as np


def fit_vocab_order(ids: np.ndarray, max_order: int = 16384, clusters: int = 32,
                    cluster_ids: int = 16384, seed: int = 0) -> np.ndarray:
    """Ids ranked for ``PowQ8Codec(vocab_order=...)``; ``ids`` (N, k) are validated top-k sets.

    The ``max_order`` most frequent ids of ``ids`` come first; the ``cluster_ids`` most frequent
    of those are also grouped by co-occurrence: ranks [0, 1024) of the frequency ranking, then the
    rest, each part ordered by cluster (clusters by total count), inside a cluster by count (ties
    by id). Ids that tend to share a top-k set (digits, capitalised words, word pieces, ...) so sit
    together. Clusters: k-means (``clusters`` of them) on a 32-dim spectral embedding of the
    normalised co-occurrence matrix (randomised SVD, fixed ``seed``): deterministic for a given
    sample. ``clusters=0``, or k < 8 (input ids passed as (N, 1) give unigram counts), ranks by
    count alone.
    """
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
    return ranked


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
