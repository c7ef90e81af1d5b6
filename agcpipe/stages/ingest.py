"""Stage 1: read a source into the canonical graph store (see :mod:`agcpipe.data.graph`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Config
from ..data.ingest import ingest, resolve_source, source_fingerprint
from ..settings import datasets_root
from .base import Stage, StageResult


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
            "fingerprint": source_fingerprint(src),
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
