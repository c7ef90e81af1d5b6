"""Stage 2: feature preprocessing and the propagated matrices a method asks for (one ``.npy`` each)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import Config
from ..data.graph import Graph
from ..ops.features import compute_features, normalize_specs
from ..settings import resolve_device
from .base import Stage, StageResult
from .common import build_method


def op_specs(cfg: Config) -> list[dict[str, Any]]:
    return normalize_specs(build_method(cfg).precompute_ops())


class PrecomputeStage(Stage):
    name = "precompute"
    code = ("agcpipe.ops",)

    def payload(self, cfg: Config, g: StageResult) -> dict[str, Any]:  # type: ignore[override]
        return {
            "graph": g.summary["fingerprint"],
            "features": cfg.features.model_dump(mode="json"),
            "ops": op_specs(cfg),
        }

    def compute(self, cfg: Config, out: Path, g: StageResult) -> dict[str, Any]:  # type: ignore[override]
        graph = Graph.open(g.path)
        specs = op_specs(cfg)
        _, stats = compute_features(graph, specs, cfg.features.preprocess, out, device=resolve_device(cfg.device))
        (out / "preprocess.json").write_text(json.dumps(stats))
        return {"ops": [s["name"] for s in specs], "specs": specs, "shape": list(graph.features.shape), "preprocess": cfg.features.preprocess}


STAGE = PrecomputeStage()
