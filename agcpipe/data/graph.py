"""The canonical graph store format (one ingest artifact) and its reader.

A canonical graph is a folder::

    manifest.json      counts, dtypes, options, source, content fingerprint (FORMAT below)
    nodes.parquet      node_id int64 (dense 0..N-1, row order), key (original id: int64 or string),
                       label int64 (dense class code; null where the node has no label)
    features.npy       float32 N x d, C order (memory-mapped by readers)
    edges.parquet      src int64, dst int64[, weight float32]: the canonical edge list. Undirected graphs
                       list each edge once with src < dst (self-loops, if kept, once with src == dst).
    csr_indptr.npy     int64 N+1   \
    csr_indices.npy    int32 when N < 2**31 else int64 (int32 makes torch's CSR x dense ~4x faster here)
    csr_weights.npy    float32 nnz, only when the graph is weighted (else every entry weighs 1)
    order.npy          int64 N, only when ``graph.reorder`` is not ``none``: the input row (the position in
                       the source's node order) of each node; ``manifest["order"]`` names the method

Node ids are the rows of this folder. Without reordering they follow the source's node order; with
``graph.reorder`` they follow the locality order of :mod:`agcpipe.data.reorder`, and ``key`` (the user's
id; the input row when the source has none) is what outputs report.

The CSR holds the adjacency A used by every operator: rows = source, columns sorted within a row, both
directions present for undirected graphs, no self-loops unless kept by config. The artifact carries no
self-loops added for normalisation: operators add I themselves.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT = "agcpipe-graph/1"
MANIFEST = "manifest.json"
NODES = "nodes.parquet"
EDGES = "edges.parquet"
FEATURES = "features.npy"
INDPTR = "csr_indptr.npy"
INDICES = "csr_indices.npy"
WEIGHTS = "csr_weights.npy"
ORDER = "order.npy"


def index_dtype(n_nodes: int) -> np.dtype:
    return np.dtype(np.int32) if n_nodes < 2**31 else np.dtype(np.int64)


@dataclass
class Graph:
    """A canonical graph on disk. Arrays are memory-mapped read-only; nothing is loaded eagerly."""

    path: Path
    manifest: dict[str, Any] = field(repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "Graph":
        path = Path(path)
        with open(path / MANIFEST) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: not an agcpipe graph (format {manifest.get('format')!r})")
        return cls(path=path, manifest=manifest)

    # ---- counts
    @property
    def n_nodes(self) -> int:
        return int(self.manifest["n_nodes"])

    @property
    def n_edges(self) -> int:
        """Number of canonical edges (undirected graphs: each edge once)."""
        return int(self.manifest["n_edges"])

    @property
    def nnz(self) -> int:
        """Stored adjacency entries (undirected graphs: 2 x edges, minus kept self-loops)."""
        return int(self.manifest["nnz"])

    @property
    def n_features(self) -> int:
        return int(self.manifest["n_features"])

    @property
    def directed(self) -> bool:
        return bool(self.manifest["directed"])

    @property
    def weighted(self) -> bool:
        return bool(self.manifest["weighted"])

    @property
    def fingerprint(self) -> str:
        """Content fingerprint: sha256 over the canonical arrays (structure, weights, features, labels)."""
        return str(self.manifest["fingerprint"]["content"])

    # ---- arrays (memory-mapped)
    def _load(self, name: str) -> np.ndarray:
        return np.load(self.path / name, mmap_mode="r")

    @cached_property
    def indptr(self) -> np.ndarray:
        return self._load(INDPTR)

    @cached_property
    def indices(self) -> np.ndarray:
        return self._load(INDICES)

    @cached_property
    def weights(self) -> np.ndarray | None:
        return self._load(WEIGHTS) if self.weighted else None

    @cached_property
    def features(self) -> np.ndarray:
        return self._load(FEATURES)

    @cached_property
    def order(self) -> np.ndarray | None:
        """Input row of each node (``graph.reorder``), or None when the graph keeps the input order."""
        return self._load(ORDER) if self.manifest.get("order") else None

    # ---- node table
    def nodes_table(self, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path / NODES, columns=columns)

    @cached_property
    def labels(self) -> np.ndarray:
        """int64 class code per node, -1 where the node has no label (or the graph has none)."""
        if not self.manifest.get("has_labels"):
            return np.full(self.n_nodes, -1, dtype=np.int64)
        col = self.nodes_table(["label"]).column("label")
        return col.fill_null(-1).to_numpy().astype(np.int64, copy=False)

    def keys(self) -> pa.ChunkedArray:
        """Original node ids in dense-id order."""
        return self.nodes_table(["key"]).column("key")

    @property
    def label_classes(self) -> list[Any]:
        """Original label values; class code i stands for ``label_classes[i]``."""
        return list(self.manifest.get("label_classes") or [])

    def degrees(self) -> np.ndarray:
        """Weighted out-degree per node (float64), without self-loops added for normalisation."""
        if self.weights is None:
            return np.diff(self.indptr).astype(np.float64)
        rows = np.repeat(np.arange(self.n_nodes), np.diff(self.indptr))
        return np.bincount(rows, weights=self.weights, minlength=self.n_nodes)

    def to_scipy(self):
        """The adjacency as a scipy CSR matrix (shares memory with the memory-mapped arrays)."""
        import scipy.sparse as sp

        data = self.weights if self.weights is not None else np.ones(self.nnz, dtype=np.float32)
        return sp.csr_matrix((data, self.indices, self.indptr), shape=(self.n_nodes, self.n_nodes))

    def edge_index(self) -> np.ndarray:
        """2 x nnz int64 COO of the stored adjacency (PyG convention: row 0 = source)."""
        rows = np.repeat(np.arange(self.n_nodes, dtype=np.int64), np.diff(self.indptr))
        return np.stack([rows, np.asarray(self.indices, dtype=np.int64)])

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {k: m.get(k) for k in ("n_nodes", "n_edges", "nnz", "n_features", "directed", "weighted", "has_labels", "n_labelled", "n_classes")}
