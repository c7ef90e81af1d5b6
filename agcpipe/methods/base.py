"""The interface every clustering method implements.

The pipeline calls a method in four places, one per stage:

* **precompute** -- :meth:`Method.precompute_ops` names the propagated feature matrices the method needs
  (``[{"name": "x", "op": "ssgc", "K": 16, "alpha": 0.05}]``); the precompute stage writes each as
  ``<name>.npy``. ``op: identity`` is the preprocessed raw feature matrix.
* **train** -- :meth:`Method.fit` trains on the graph and writes whatever it needs later (weights, spec)
  under ``ctx.state_dir``; :meth:`Method.embed` returns the node embeddings. Non-parametric methods
  train nothing and embed with a precomputed matrix.
* **cluster** -- :meth:`Method.cluster`: post-hoc KMeans on the embeddings by default; joint methods
  override it and read their head.
* **assign** (registered model, possibly a new graph) -- :meth:`Method.assign`: embed with the stored
  state, then nearest centre by default.

Everything a method needs at assign time must be under ``state_dir`` (plus the centres the cluster stage
returns), because the registered MLflow model carries exactly that folder.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..config import ClusterConfig, TrainConfig
from ..data.graph import Graph


@dataclass
class MethodContext:
    """What a method sees in the train, cluster and assign stages."""

    graph: Graph
    #: precomputed matrices by name (memory-mapped float32 N x d), as named by ``precompute_ops``
    features: dict[str, np.ndarray]
    n_clusters: int
    seed: int
    device: str
    #: folder for the method's trained state (written by ``fit``, read by ``embed`` / ``assign``)
    state_dir: Path
    #: scratch folder inside the stage's temporary artifact directory
    work_dir: Path
    #: ``log(metrics, step)`` records per-step metrics (losses); a no-op outside tracked runs
    log: Callable[[dict[str, float], int], None] = field(default=lambda metrics, step: None)
    #: generic training settings (``train:`` in the config); None outside a run (assign): defaults apply
    train: TrainConfig | None = None
    #: where a trainable method keeps resumable checkpoints (train stage: outside the temp artifact,
    #: ``<store>/.checkpoints/train/<key>/``, removed once the artifact is published); None = no checkpoints
    checkpoint_dir: Path | None = None
    #: where the training engine writes the loss history (train stage: ``<artifact>/history.parquet``)
    history_path: Path | None = None


@dataclass
class Clustering:
    """A clustering of the nodes of one graph."""

    labels: np.ndarray  # int64 N
    confidence: np.ndarray  # float32 N, in [0, 1]
    centers: np.ndarray | None = None  # float32 k x h (in the space clustering ran in)
    info: dict[str, Any] = field(default_factory=dict)
    #: per-node score within its own cluster, to rank representatives (e.g. a learned TopK/SAG score);
    #: None = use ``confidence``
    scores: np.ndarray | None = None


class Method:
    """Base class. Subclasses are registered with :func:`agcpipe.methods.registry.register`."""

    name: ClassVar[str]
    family: ClassVar[str]
    #: whether training depends on the seed (non-parametric methods: no, so seeds share one train artifact)
    seeded_training: ClassVar[bool] = False
    #: whether training needs the number of clusters (joint methods), so k is part of the train key
    uses_n_clusters_in_training: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any]):
        self.params = dict(params)

    # ------------------------------------------------------------------ precompute
    def precompute_ops(self) -> list[dict[str, Any]]:
        return [{"name": "x", "op": "identity"}]

    # ------------------------------------------------------------------ train
    def fit(self, ctx: MethodContext) -> dict[str, Any]:
        """Train and write state under ``ctx.state_dir``; return a small JSON-able summary."""
        return {"trained": False}

    def embed(self, ctx: MethodContext) -> np.ndarray:
        """Embeddings (N x h float32) of ``ctx.graph``; default: the first precomputed matrix."""
        return ctx.features[self.precompute_ops()[0]["name"]]

    # ------------------------------------------------------------------ cluster
    def cluster(self, ctx: MethodContext, embeddings: np.ndarray, cfg: ClusterConfig) -> Clustering:
        """Post-hoc KMeans (the published protocol: k-means++, restarts, L2-normalised embeddings)."""
        from ..cluster.kmeans import KMeans

        km = KMeans(
            ctx.n_clusters,
            n_init=cfg.n_init,
            max_iter=cfg.max_iter,
            tol=cfg.tol,
            normalize=cfg.normalize,
            chunk_size=cfg.chunk_size,
            init_sample=cfg.init_sample,
            seed=ctx.seed,
            device=ctx.device,
        ).fit(embeddings)
        return Clustering(
            labels=km.labels_,
            confidence=km.confidence(embeddings),
            centers=km.cluster_centers_,
            info={"inertia": float(km.inertia_), "n_iter": int(km.n_iter_), "best_init": int(km.best_init_)},
        )

    # ------------------------------------------------------------------ assign
    def assign(self, ctx: MethodContext, embeddings: np.ndarray, centers: np.ndarray, cfg: ClusterConfig) -> Clustering:
        """Assign (possibly new) nodes to the stored centres: nearest centre, same normalisation."""
        from ..cluster.kmeans import KMeans

        km = KMeans.from_centers(centers, normalize=cfg.normalize, chunk_size=cfg.chunk_size, device=ctx.device)
        return Clustering(labels=km.predict(embeddings), confidence=km.confidence(embeddings), centers=centers)
