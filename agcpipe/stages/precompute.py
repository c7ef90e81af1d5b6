"""Stage 2: feature preprocessing and the propagated matrices a method asks for (one ``.npy`` each).

Peak memory (bytes): the most demanding op's working set, ``b x (buffers + 1) x 4 N`` for its column
block of b features (``buffers x 4 N d`` when that fits ``AGCPIPE_MEMORY_BUDGET``, default 4 GiB: then X
is read in place), ``~24 N`` of scale vectors and block pointers, the column panels' regrouped CSR
(``4 nnz + 4 N x panels``, ``+ 4 nnz`` weighted) and the pages of the memory-mapped CSR (``8 N + 4 nnz``).
buffers: ssgc 3, sgc / ppr / ax 2. 10M x 128 ssgc with the default budget: b = 24 columns, 3.84 GB +
~1.0 GB of panels + 0.9 GB of CSR pages (measured peak RSS: 6.66 GiB, ``bench/bench_scale.py``). X, the
output and the preprocessed copy go through row windows of their files. With ``dask.enabled`` the hops
run as row-block tasks (:class:`agcpipe.ops.propagate.DistributedAdjacency`) and the buffers are files.
The Dask settings are not part of the key: results are equal within float32 rounding.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import distributed
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
        client = distributed.current_client()
        runs: dict[str, Any] = {}
        _, stats = compute_features(
            graph, specs, cfg.features.preprocess, out,
            device="cpu" if client is not None else resolve_device(cfg.device), client=client, runs=runs,
        )
        (out / "preprocess.json").write_text(json.dumps(stats))
        return {
            "ops": [s["name"] for s in specs], "specs": specs, "shape": list(graph.features.shape),
            "preprocess": cfg.features.preprocess, "propagation": runs,
        }


STAGE = PrecomputeStage()
