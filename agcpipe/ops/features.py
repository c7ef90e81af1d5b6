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
    memory_budget: int | None = None,
    client: Any = None,
    runs: dict[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Write ``<name>.npy`` for every spec into ``out_dir``; return them memory-mapped, and the stats.

    Peak memory: the working set of the most demanding op (:func:`.propagate.propagate`: full width when
    its buffers fit ``memory_budget``, else column blocks that do), the preprocessed features being a file
    (N x d float32 in ``out_dir``, written and read through row windows, deleted at the end; no copy when
    ``preprocess`` is ``none``). With a Dask ``client`` the hops run as row-block tasks. ``runs`` (a dict)
    receives, per op, the column block width and whether it ran on Dask.
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
        pre.flush()
        del pre
        pre = np.load(pre_path, mmap_mode="r")  # a fresh mapping: none of its pages resident yet
    runs = {} if runs is None else runs
    try:
        for spec in specs:
            params = {k: v for k, v in spec.items() if k != "name"}
            runs[spec["name"]] = propagate(
                params, graph.indptr, graph.indices, graph.weights, pre, out_dir / f"{spec['name']}.npy",
                device=device, memory_budget=memory_budget, client=client, work_dir=out_dir,
            )
    finally:
        del pre
        if pre_path is not None:
            os.remove(pre_path)
    return {s["name"]: np.load(out_dir / f"{s['name']}.npy", mmap_mode="r") for s in specs}, stats
