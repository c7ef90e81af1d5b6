"""Stage 1: read a source into the canonical graph store (see :mod:`agcpipe.data.graph`).

Peak memory: the reader's and the canonical writer's (:mod:`agcpipe.data.canonical`): for streamed
sources (tables, synthetic) ``~40 N`` bytes of node arrays (int64 ids, their sorted lookup, labels),
one edge chunk (``~76 x 2^22`` bytes) and the bounded external sort (``~21 G`` bytes for merge ranges of
G = 2^25 entries, ``8 R`` per run of R = 2^25 entries: ~0.7 GiB), plus with ``graph.reorder: community``
``~(8 + 20 P) N`` (P = 16 projections) and the touched pages of the memory-mapped CSR (``8 N + 4 nnz``).
Disk: the canonical folder plus ``8 nnz`` bytes of sorted runs while it is built (twice with a reorder).
Measured, 10M nodes / 100M edges / 128 features from 128 Parquet files, community order: 974 s, peak RSS
6.48 GiB (before the feature permutation dropped its pages, ``bench/bench_scale.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Config
from ..data.ingest import ingest, resolve_source, source_fingerprint
from ..settings import datasets_root, store_root
from .base import Stage, StageResult

#: digests of unchanged input files are reused (stat-keyed, see agcpipe.data.ingest)
DIGEST_CACHE = ".cache/file-digests.json"


def resolved_source(cfg: Config):
    return resolve_source(
        cfg.source,
        datasets_root=datasets_root(cfg.datasets_root),
        base_dir=Path(cfg.base_dir) if cfg.base_dir else None,
    )


class IngestStage(Stage):
    name = "ingest"
    code = ("agcpipe.data",)

    def payload(self, cfg: Config, *upstream: StageResult) -> dict[str, Any]:
        src = resolved_source(cfg)
        return {
            "source": src.model_dump(mode="json"),
            "fingerprint": source_fingerprint(src, cache=store_root(cfg.store) / DIGEST_CACHE),
            "options": cfg.graph.model_dump(mode="json"),
        }

    def compute(self, cfg: Config, out: Path, *upstream: StageResult) -> dict[str, Any]:
        m = ingest(resolved_source(cfg), cfg.graph, out)
        return {
            "n_nodes": m["n_nodes"],
            "n_edges": m["n_edges"],
            "n_features": m["n_features"],
            "has_labels": m["has_labels"],
            "n_classes": m.get("n_classes") or 0,
            "fingerprint": m["fingerprint"]["content"],
        }


STAGE = IngestStage()
