"""What a source reader hands to the canonical writer.

Readers (Planetoid, npz, tables, synthetic) translate a source into dense ids and arrays; they do no
symmetrising, de-duplication or CSR building: :mod:`agcpipe.data.canonical` does that once for all.

Edges come either as whole arrays (``src`` / ``dst`` / ``weight``: small sources read in memory) or as
a stream of chunks (``edge_chunks``: large sources, never held whole), which the writer sorts externally.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

#: one chunk of edges: (src int64, dst int64, weight float32 or None), dense ids
EdgeChunk = tuple[np.ndarray, np.ndarray, np.ndarray | None]


@dataclass
class RawGraph:
    """A graph as read from its source, before canonicalisation.

    ``features`` may be a ``np.memmap`` already written to ``<out_dir>/features.npy`` by a reader that
    generates or streams features (synthetic, large tables); the writer then does not copy it.

    Streaming readers leave ``src`` / ``dst`` / ``weight`` as None and set ``edge_chunks``: a callable
    returning an iterator over :data:`EdgeChunk` in input order (``weighted`` says whether chunks carry
    weights). Its ids must already be dense and in range; it raises :class:`~agcpipe.errors.InputError`
    itself for source problems.
    """

    n_nodes: int
    src: np.ndarray | None  # int64 dense ids, one entry per input edge (any direction, duplicates allowed)
    dst: np.ndarray | None  # int64 dense ids
    features: np.ndarray  # N x d, float32 (or castable), row i = dense id i
    weight: np.ndarray | None = None  # float32 per input edge; None = unweighted
    labels: np.ndarray | None = None  # int64 class code per node, -1 = no label; None = no label column
    label_classes: list[Any] | None = None  # original label value of each class code
    keys: pa.Array | None = None  # original node ids in dense order; None = 0..N-1
    feature_names: list[str] | None = None
    #: reader-specific facts recorded in the manifest (e.g. {"label_less_nodes": 15})
    info: dict[str, Any] = field(default_factory=dict)
    #: streamed edges (instead of src / dst / weight)
    edge_chunks: Callable[[], Iterator[EdgeChunk]] | None = None
    #: whether the streamed chunks carry weights
    weighted: bool = False

    @property
    def streamed(self) -> bool:
        return self.edge_chunks is not None

    @property
    def has_weights(self) -> bool:
        return self.weighted if self.streamed else self.weight is not None
