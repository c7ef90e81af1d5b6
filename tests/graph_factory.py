"""Test helper: write a tiny canonical graph folder (agcpipe/data/graph.py format) and open it.

It follows the on-disk format directly with numpy / pyarrow, independently of the canonical writer, so
unit tests that need a small :class:`Graph` do not depend on ingest. Duplicate input edges are merged
keeping the largest weight (the ``duplicate_weight: max`` default).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from agcpipe.data import graph as g


def make_graph(
    tmp_path: Path,
    edges,
    features: np.ndarray | None = None,
    labels=None,
    weights=None,
    directed: bool = False,
    keep_self_loops: bool = False,
    n_nodes: int | None = None,
) -> g.Graph:
    """Write a canonical graph under a fresh folder of ``tmp_path`` and return ``Graph.open`` of it.

    ``edges``: (m, 2) node ids (any direction; undirected graphs are symmetrised); ``weights``: one per
    input edge (None = unweighted); ``labels``: class per node, -1 = unlabelled (stored as dense class
    codes; ``label_classes`` keeps the given values); ``features`` default: seeded random N x 8.
    ``n_nodes`` default: rows of ``features``, else length of ``labels``, else largest id + 1.
    """
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    w = None if weights is None else np.asarray(weights, dtype=np.float32).reshape(-1)
    if n_nodes is None:
        if features is not None:
            n_nodes = len(features)
        elif labels is not None:
            n_nodes = len(labels)
        else:
            n_nodes = int(e.max()) + 1 if e.size else 0
    if e.size and (e.min() < 0 or e.max() >= n_nodes):
        raise ValueError(f"edge ids must lie in 0..{n_nodes - 1}")
    if w is not None and w.size != len(e):
        raise ValueError("weights needs one value per edge")

    # canonical edge list: undirected edges once with src <= dst, duplicates merged (max weight)
    src, dst = e[:, 0], e[:, 1]
    if not directed:
        src, dst = np.minimum(src, dst), np.maximum(src, dst)
    keep = (src != dst) | keep_self_loops
    src, dst = src[keep], dst[keep]
    w = None if w is None else w[keep]
    order = np.lexsort((dst, src) if w is None else (-w, dst, src))  # within a pair: largest weight first
    src, dst = src[order], dst[order]
    first = np.ones(src.size, dtype=bool)
    first[1:] = (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])
    src, dst = src[first], dst[first]
    w = None if w is None else w[order][first]

    # CSR: both directions for undirected graphs (self-loops once), columns sorted within rows
    rows, cols, vals = src, dst, w
    if not directed:
        off = src != dst
        rows, cols = np.concatenate([src, dst[off]]), np.concatenate([dst, src[off]])
        vals = None if w is None else np.concatenate([w, w[off]])
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    indptr = np.zeros(n_nodes + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_nodes), out=indptr[1:])
    indices = cols.astype(g.index_dtype(n_nodes))
    csr_weights = None if vals is None else vals[order].astype(np.float32)

    if features is None:
        features = np.random.default_rng(0).standard_normal((n_nodes, 8))
    x = np.ascontiguousarray(features, dtype=np.float32)

    lab = np.full(n_nodes, -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    has = lab >= 0
    classes = np.unique(lab[has])
    codes = np.where(has, np.searchsorted(classes, lab), -1)

    folder = Path(tempfile.mkdtemp(prefix="graph-", dir=tmp_path))
    np.save(folder / g.INDPTR, indptr)
    np.save(folder / g.INDICES, indices)
    if csr_weights is not None:
        np.save(folder / g.WEIGHTS, csr_weights)
    np.save(folder / g.FEATURES, x)
    edge_cols = {"src": pa.array(src), "dst": pa.array(dst)}
    if w is not None:
        edge_cols["weight"] = pa.array(w)
    pq.write_table(pa.table(edge_cols), folder / g.EDGES)
    ids = np.arange(n_nodes, dtype=np.int64)
    pq.write_table(
        pa.table({"node_id": ids, "key": ids, "label": pa.array(codes, mask=~has, type=pa.int64())}),
        folder / g.NODES,
    )

    # content fingerprint: the recipe documented in agcpipe/data/canonical.py
    text = f"{g.FORMAT}\ndirected={directed}\n"
    for name, arr in (("indptr", indptr), ("indices", indices), ("weights", csr_weights), ("features", x),
                      ("labels", codes if labels is not None else None)):
        digest = None if arr is None else hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
        text += f"{name} none\n" if arr is None else f"{name} {arr.dtype.str} {arr.shape} {digest}\n"
    manifest = {
        "format": g.FORMAT,
        "n_nodes": n_nodes,
        "n_edges": int(src.size),
        "nnz": int(indices.size),
        "n_features": int(x.shape[1]),
        "directed": directed,
        "weighted": w is not None,
        "has_labels": labels is not None,
        "n_labelled": int(has.sum()),
        "n_classes": int(classes.size),
        "label_classes": classes.tolist(),
        "fingerprint": {"content": hashlib.sha256(text.encode()).hexdigest(), "algorithm": "sha256"},
    }
    (folder / g.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return g.Graph.open(folder)
