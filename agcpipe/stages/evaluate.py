"""Stage 5: evaluation metrics (label metrics when labels exist; modularity, conductance always).

Peak memory (bytes): ``~30 N`` (the graph's class codes, the cluster labels and their dense codes, the
contingency temporaries) plus ``~50 x 2^21`` for one chunk of the CSR pass and the touched pages of the
memory-mapped CSR; never O(E) or O(N d). With ``dask.enabled`` the CSR pass and the contingency table
are summed from row / entry-range tasks (:func:`agcpipe.metrics.evaluate`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..data.graph import Graph
from ..metrics import evaluate
from .base import Stage, StageResult


class EvaluateStage(Stage):
    name = "evaluate"
    code = ("agcpipe.metrics",)

    def payload(self, cfg: Config, g: StageResult, c: StageResult) -> dict[str, Any]:  # type: ignore[override]
        return {"graph": g.summary["fingerprint"], "cluster": c.key}

    def compute(self, cfg: Config, out: Path, g: StageResult, c: StageResult) -> dict[str, Any]:  # type: ignore[override]
        labels = np.load(Path(c.path) / "labels.npy", mmap_mode="r")
        metrics = evaluate(Graph.open(g.path), labels, int(c.summary["n_clusters"]))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return metrics


STAGE = EvaluateStage()
