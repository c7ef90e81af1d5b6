"""Helpers several stages share: opening upstream artifacts, resolving n_clusters, the method context."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import Config
from ..data.graph import Graph
from ..errors import ConfigError
from ..methods import registry
from ..methods.base import Method, MethodContext
from ..settings import resolve_device
from .base import StageResult


def build_method(cfg: Config) -> Method:
    return registry.get(cfg.method.name).build(cfg.method.params)


def resolve_n_clusters(cfg: Config, graph_summary: dict) -> int:
    """cluster.n_clusters, or the number of label classes when it is not set; checked against N."""
    k = cfg.cluster.n_clusters
    n = int(graph_summary["n_nodes"])
    if k is None:
        k = int(graph_summary.get("n_classes") or 0)
        if k < 2:
            raise ConfigError(
                "cluster.n_clusters is not set and the graph has no label classes to take it from; "
                "set cluster.n_clusters"
            )
    if k < 2:
        raise ConfigError(f"cluster.n_clusters must be at least 2, got {k}")
    if k > n:
        raise ConfigError(f"cluster.n_clusters={k} is larger than the number of nodes ({n})")
    return k


def precomputed(p: StageResult) -> dict[str, np.ndarray]:
    """The precompute artifact's matrices by op name, memory-mapped."""
    return {name: np.load(Path(p.path) / f"{name}.npy", mmap_mode="r") for name in p.summary["ops"]}


def method_context(
    cfg: Config,
    g: StageResult,
    p: StageResult,
    state_dir: Path,
    work_dir: Path,
    *,
    checkpoint_dir: Path | None = None,
    history_path: Path | None = None,
) -> MethodContext:
    return MethodContext(
        graph=Graph.open(g.path),
        features=precomputed(p),
        n_clusters=resolve_n_clusters(cfg, g.summary),
        seed=cfg.seed,
        device=resolve_device(cfg.device),
        state_dir=state_dir,
        work_dir=work_dir,
        train=cfg.train,
        checkpoint_dir=checkpoint_dir,
        history_path=history_path,
    )


def load_embeddings(p: StageResult, t: StageResult) -> np.ndarray:
    ref = t.summary["embeddings"]
    base = Path(p.path) if ref["artifact"] == "precompute" else Path(t.path)
    return np.load(base / ref["file"], mmap_mode="r")
