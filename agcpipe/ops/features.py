"""Preprocess a graph's features and compute the propagated matrices a method needs.

Used by the precompute stage (training graph) and by model assignment (a new graph, with the training
graph's preprocessing statistics), so both compute features the same way.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..data.graph import Graph
from .preprocess import preprocess_features
from .propagate import propagate, validate_op


def normalize_specs(raw_specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validated op specs, each with its ``name`` (the output file stem)."""
    out = []
    for raw in raw_specs:
        params = validate_op({k: v for k, v in raw.items() if k != "name"})
        out.append({"name": raw["name"], **params})
    return out


def compute_features(
    graph: Graph,
    specs: list[dict[str, Any]],
    preprocess: str,
    out_dir: Path,
    *,
    stats: dict[str, Any] | None = None,
    device: str = "cpu",
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Write ``<name>.npy`` for every spec into ``out_dir``; return them memory-mapped, and the stats.

    Peak memory: the preprocessed features (N x d float32, memory-mapped in ``out_dir`` and deleted at
    the end; no copy when ``preprocess`` is ``none``) plus the working buffers of the most demanding op
    (see :mod:`.propagate`).
    """
    n, d = graph.features.shape
    if preprocess == "none" and graph.features.dtype == np.float32:
        # nothing to transform: propagate straight from the graph's (memory-mapped) features, no copy
        pre, pre_path = graph.features, None
        stats = {"method": "none"}
    else:
        pre_path = out_dir / ".preprocessed.npy"
        pre = np.lib.format.open_memmap(pre_path, mode="w+", dtype=np.float32, shape=(n, d))
        pre, stats = preprocess_features(graph.features, preprocess, stats, out=pre)
    try:
        for spec in specs:
            params = {k: v for k, v in spec.items() if k != "name"}
            propagate(params, graph.indptr, graph.indices, graph.weights, pre, out_dir / f"{spec['name']}.npy", device=device)
    finally:
        del pre
        if pre_path is not None:
            os.remove(pre_path)
    return {s["name"]: np.load(out_dir / f"{s['name']}.npy", mmap_mode="r") for s in specs}, stats
