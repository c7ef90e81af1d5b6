"""Stage 4: cluster the embeddings (post-hoc KMeans, or the joint method's head).

Besides the assignments, every run writes the cluster-level outputs of :mod:`agcpipe.summaries`:
``cluster_graph.parquet`` (coarsened cluster x cluster edge weights), ``cluster_features.parquet``
(per-cluster feature means / stds / most distinctive features) and ``representatives.parquet`` (each
cluster's top nodes by the method's score, or by assignment confidence).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import summaries
from ..config import Config
from ..data.graph import Graph
from .base import Stage, StageResult
from .common import build_method, load_embeddings, method_context, resolve_n_clusters


#: representative nodes kept per cluster
REPRESENTATIVES = 10


class ClusterStage(Stage):
    name = "cluster"
    code = ("agcpipe.cluster", "agcpipe.methods.base", "agcpipe.summaries")

    def payload(self, cfg: Config, g: StageResult, p: StageResult, t: StageResult) -> dict[str, Any]:  # type: ignore[override]
        return {
            "train": t.key,
            "method": cfg.method.name,
            "cluster": cfg.cluster.model_dump(mode="json", exclude={"n_clusters"}),
            "n_clusters": resolve_n_clusters(cfg, g.summary),
            "seed": cfg.seed,
        }

    def compute(self, cfg: Config, out: Path, g: StageResult, p: StageResult, t: StageResult) -> dict[str, Any]:  # type: ignore[override]
        method = build_method(cfg)
        ctx = method_context(cfg, g, p, state_dir=Path(t.path) / "state", work_dir=out)
        emb = load_embeddings(p, t)
        result = method.cluster(ctx, emb, cfg.cluster)
        labels = np.asarray(result.labels, dtype=np.int64)
        confidence = np.asarray(result.confidence, dtype=np.float32)
        np.save(out / "labels.npy", labels)
        if result.centers is not None:
            np.save(out / "centers.npy", np.asarray(result.centers, dtype=np.float32))
        graph = Graph.open(g.path)
        write_assignments(out / "assignments.parquet", graph, labels, confidence)
        k = ctx.n_clusters
        cg = summaries.cluster_graph(graph.indptr, graph.indices, graph.weights, labels, k, directed=graph.directed)
        pq.write_table(cg, out / "cluster_graph.parquet")
        pq.write_table(
            summaries.cluster_features(graph.features, labels, k, feature_names=graph.manifest.get("feature_names")),
            out / "cluster_features.parquet",
        )
        score = confidence if result.scores is None else np.asarray(result.scores, dtype=np.float32)
        pq.write_table(summaries.representatives(labels, score, graph.keys(), k, top=REPRESENTATIVES), out / "representatives.parquet")
        summary = {
            "n_clusters": k,
            "n_nonempty": int(np.unique(labels).size),
            "has_centers": result.centers is not None,
            "representative_score": "confidence" if result.scores is None else "method",
            **summaries.summary_stats(cg),
            **{k: v for k, v in result.info.items() if isinstance(v, (int, float, str, bool))},
        }
        (out / "cluster.json").write_text(json.dumps(summary))
        return summary


def write_assignments(path: Path, graph: Graph, labels: np.ndarray, confidence: np.ndarray) -> None:
    """Parquet: original node id, dense id, cluster, confidence (row groups of 1M nodes)."""
    keys = graph.keys()
    n = graph.n_nodes
    schema = pa.schema([("key", keys.type), ("node_id", pa.int64()), ("cluster", pa.int64()), ("confidence", pa.float32())])
    step = 1 << 20
    with pq.ParquetWriter(path, schema) as w:
        for s in range(0, n, step):
            e = min(n, s + step)
            w.write_table(
                pa.table(
                    {
                        "key": keys.slice(s, e - s),
                        "node_id": pa.array(np.arange(s, e, dtype=np.int64)),
                        "cluster": pa.array(labels[s:e]),
                        "confidence": pa.array(confidence[s:e]),
                    },
                    schema=schema,
                )
            )


STAGE = ClusterStage()
