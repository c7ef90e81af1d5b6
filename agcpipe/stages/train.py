"""Stage 3: train the method's encoder / head (nothing to train for non-parametric methods) and embed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..methods import registry
from .base import Stage, StageResult
from .common import build_method, method_context, resolve_n_clusters


class TrainStage(Stage):
    name = "train"

    def code_modules(self, cfg: Config) -> tuple[str, ...]:
        entry = registry.get(cfg.method.name)
        return (*super().code_modules(cfg), "agcpipe.methods.base", "agcpipe.methods.registry", *entry.code)

    def payload(self, cfg: Config, g: StageResult, p: StageResult) -> dict[str, Any]:  # type: ignore[override]
        method = build_method(cfg)
        return {
            "graph": g.summary["fingerprint"],
            "precompute": p.key,
            "method": cfg.method.name,
            "params": method.params,
            # a method that trains nothing (or deterministically) shares one artifact across seeds and k
            "seed": cfg.seed if method.seeded_training else None,
            "n_clusters": resolve_n_clusters(cfg, g.summary) if method.uses_n_clusters_in_training else None,
        }

    def compute(self, cfg: Config, out: Path, g: StageResult, p: StageResult) -> dict[str, Any]:  # type: ignore[override]
        method = build_method(cfg)
        state_dir, work_dir = out / "state", out / "work"
        state_dir.mkdir()
        work_dir.mkdir()
        ctx = method_context(cfg, g, p, state_dir, work_dir)
        info = method.fit(ctx)
        emb = method.embed(ctx)
        reused = next((name for name, arr in ctx.features.items() if emb is arr), None)
        if reused is not None:  # embeddings are a precomputed matrix: reference it, do not copy
            ref = {"artifact": "precompute", "file": f"{reused}.npy"}
        else:
            np.save(out / "embeddings.npy", np.ascontiguousarray(emb, dtype=np.float32))
            ref = {"artifact": "train", "file": "embeddings.npy"}
        shutil.rmtree(work_dir)  # scratch space is not part of the artifact
        summary = {"method": cfg.method.name, "family": method.family, "embeddings": ref, "shape": list(emb.shape), "fit": info}
        (out / "train.json").write_text(json.dumps(summary, default=str))
        return summary


STAGE = TrainStage()
