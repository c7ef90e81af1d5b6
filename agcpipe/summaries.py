"""Cluster-level outputs of a clustering: the coarsened cluster graph, per-cluster feature summaries and
each cluster's top-k representative nodes. Written as Parquet by the cluster stage for every method.

All passes are chunked over rows / CSR entries: peak extra memory O(chunk + k^2 + k d), never O(E) or
O(N d) temporaries (the features and the CSR are read through their memory maps).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

#: CSR entries / feature rows processed per chunk
CHUNK = 1 << 21


def cluster_graph(indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray | None, labels: np.ndarray, k: int, *, directed: bool = False, chunk: int = CHUNK) -> pa.Table:
    """The coarsened graph S^T A S for hard assignments: one row per non-empty (cluster, cluster) pair.

    Columns: ``src``, ``dst`` (cluster ids), ``weight`` (sum of edge weights between them) and ``edges``
    (number of edges). Undirected graphs list each pair once with ``src <= dst`` and count each edge once.
    """
    labels = np.asarray(labels, dtype=np.int64)
    w_acc = np.zeros(k * k, dtype=np.float64)
    c_acc = np.zeros(k * k, dtype=np.int64)
    nnz = int(indptr[-1])
    for s in range(0, nnz, chunk):
        e = min(nnz, s + chunk)
        rows = np.searchsorted(indptr, np.arange(s, e), side="right") - 1
        cols = np.asarray(indices[s:e], dtype=np.int64)
        w = np.ones(e - s) if weights is None else np.asarray(weights[s:e], dtype=np.float64)
        if not directed:  # each undirected edge is stored twice (once if a self-loop): keep row <= col
            keep = rows <= cols
            rows, cols, w = rows[keep], cols[keep], w[keep]
        code = labels[rows] * k + labels[cols]
        w_acc += np.bincount(code, weights=w, minlength=k * k)
        c_acc += np.bincount(code, minlength=k * k)
    w_mat, c_mat = w_acc.reshape(k, k), c_acc.reshape(k, k)
    if not directed:  # fold (a, b) and (b, a) onto a <= b
        w_mat = np.triu(w_mat + w_mat.T - np.diag(np.diag(w_mat)))
        c_mat = np.triu(c_mat + c_mat.T - np.diag(np.diag(c_mat)))
    src, dst = np.nonzero(c_mat)
    return pa.table({"src": src.astype(np.int64), "dst": dst.astype(np.int64), "weight": w_mat[src, dst], "edges": c_mat[src, dst].astype(np.int64)})


def cluster_features(features: np.ndarray, labels: np.ndarray, k: int, *, feature_names: list[str] | None = None, top: int = 10, chunk: int = CHUNK) -> pa.Table:
    """Per-cluster feature summaries: size, mean and std of every feature, and the ``top`` features that
    most distinguish the cluster (largest standardised difference of the cluster mean from the global mean).

    Columns: ``cluster``, ``size``, ``mean`` (list<float>), ``std`` (list<float>), ``top_features``
    (list<string>: names, or column indices), ``top_scores`` (list<float>: the standardised differences).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n, d = features.shape
    sums = np.zeros((k, d))
    sq = np.zeros((k, d))
    rows = max(1, chunk // max(d, 1))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        x = np.asarray(features[s:e], dtype=np.float64)
        _scatter_add(sums, labels[s:e], x, k)
        _scatter_add(sq, labels[s:e], x * x, k)
    size = np.bincount(labels, minlength=k).astype(np.float64)
    mean = sums / np.maximum(size, 1)[:, None]
    std = np.sqrt(np.maximum(sq / np.maximum(size, 1)[:, None] - mean**2, 0))
    g_mean = sums.sum(0) / max(n, 1)
    g_std = np.sqrt(np.maximum(sq.sum(0) / max(n, 1) - g_mean**2, 0))
    z = (mean - g_mean) / np.where(g_std > 0, g_std, 1.0)
    top = min(top, d)
    order = np.argsort(-np.abs(z), axis=1)[:, :top]
    names = np.asarray(feature_names, dtype=object) if feature_names else np.arange(d).astype(str).astype(object)
    return pa.table(
        {
            "cluster": np.arange(k, dtype=np.int64),
            "size": size.astype(np.int64),
            "mean": pa.array(list(mean.astype(np.float32)), type=pa.list_(pa.float32())),
            "std": pa.array(list(std.astype(np.float32)), type=pa.list_(pa.float32())),
            "top_features": pa.array([list(names[o]) for o in order], type=pa.list_(pa.string())),
            "top_scores": pa.array([list(z[c, o].astype(np.float32)) for c, o in enumerate(order)], type=pa.list_(pa.float32())),
        }
    )


def _scatter_add(acc: np.ndarray, labels: np.ndarray, x: np.ndarray, k: int) -> None:
    """acc[c] += sum of the rows of x labelled c, via one sparse indicator product (O(rows * d))."""
    import scipy.sparse as sp

    ind = sp.csr_matrix((np.ones(labels.size), (labels, np.arange(labels.size))), shape=(k, labels.size))
    acc += ind @ x


def representatives(labels: np.ndarray, score: np.ndarray, keys: pa.ChunkedArray | pa.Array, k: int, top: int = 10) -> pa.Table:
    """Each cluster's ``top`` nodes by score (highest first): ``cluster``, ``rank``, ``node_id``, ``key``, ``score``."""
    labels = np.asarray(labels, dtype=np.int64)
    score = np.asarray(score, dtype=np.float64)
    order = np.lexsort((-score, labels))  # by cluster, then score descending
    lab_sorted = labels[order]
    starts = np.searchsorted(lab_sorted, np.arange(k))
    rank = np.arange(order.size) - starts[lab_sorted]
    pick = order[rank < top]
    return pa.table(
        {
            "cluster": labels[pick],
            "rank": rank[rank < top].astype(np.int64),
            "node_id": pick.astype(np.int64),
            "key": pa.chunked_array(keys).take(pa.array(pick)) if len(pick) else pa.chunked_array(keys).slice(0, 0),
            "score": score[pick].astype(np.float32),
        }
    )


def summary_stats(cg: pa.Table) -> dict[str, Any]:
    """Small numbers about the cluster graph (logged as metrics)."""
    src, dst, w = (cg.column(c).to_numpy() for c in ("src", "dst", "weight"))
    internal = float(w[src == dst].sum())
    total = float(w.sum())
    return {"cluster_graph_pairs": int(cg.num_rows), "cluster_graph_internal_weight_fraction": internal / total if total else 0.0}
