"""Stage 3: train the method's encoder / head (nothing to train for non-parametric methods) and embed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..methods import registry
from ..methods.trainable import TrainableMethod
from ..settings import store_root
from ..train.history import HISTORY_FILE
from .base import Stage, StageResult
from .common import build_method, method_context, resolve_n_clusters


class TrainStage(Stage):
    name = "train"

    def code_modules(self, cfg: Config) -> tuple[str, ...]:
        entry = registry.get(cfg.method.name)
        return (*super().code_modules(cfg), "agcpipe.methods.base", "agcpipe.methods.registry", *entry.code)

    def payload(self, cfg: Config, g: StageResult, p: StageResult) -> dict[str, Any]:  # type: ignore[override]
        method = build_method(cfg)
        payload = {
            "graph": g.summary["fingerprint"],
            "precompute": p.key,
            "method": cfg.method.name,
            "params": method.params,
            # a method that trains nothing (or deterministically) shares one artifact across seeds and k
            "seed": cfg.seed if method.seeded_training else None,
            "n_clusters": resolve_n_clusters(cfg, g.summary) if method.uses_n_clusters_in_training else None,
        }
        if isinstance(method, TrainableMethod):  # the resolved generic settings that shape the weights
            payload["train"] = method.plan(cfg.train, int(g.summary["n_nodes"])).to_dict()
        return payload

    def checkpoint_dir(self, cfg: Config, g: StageResult, p: StageResult) -> Path:
        """``<store>/.checkpoints/train/<key>/``: outside the temp artifact, so a killed run resumes from it."""
        return store_root(cfg.store) / ".checkpoints" / self.name / self.key(cfg, g, p)

    def run(self, cfg: Config, *upstream: StageResult) -> StageResult:  # type: ignore[override]
        result = super().run(cfg, *upstream)
        # published (or found cached): the checkpoints of this key have served their purpose
        g, p = (StageResult.from_dict(u) for u in upstream)
        ckpt = self.checkpoint_dir(cfg, g, p)
        if ckpt.exists():
            shutil.rmtree(ckpt, ignore_errors=True)
        return result

    def compute(self, cfg: Config, out: Path, g: StageResult, p: StageResult) -> dict[str, Any]:  # type: ignore[override]
        method = build_method(cfg)
        state_dir, work_dir = out / "state", out / "work"
        state_dir.mkdir()
        work_dir.mkdir()
        trainable = isinstance(method, TrainableMethod)
        ctx = method_context(
            cfg,
            g,
            p,
            state_dir,
            work_dir,
            checkpoint_dir=self.checkpoint_dir(cfg, g, p) if trainable else None,
            history_path=out / HISTORY_FILE if trainable else None,
        )
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
        if trainable:  # numbers the tracking step logs as the train stage's metrics
            summary.update({k: info[k] for k in ("epochs_run", "final_loss", "best_loss", "seconds_per_epoch") if k in info})
        (out / "train.json").write_text(json.dumps(summary, default=str))
        return summary


STAGE = TrainStage()
