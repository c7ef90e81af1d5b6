"""Base class of the joint methods: an encoder and a cluster head trained end to end; clusters read from the head.

A joint method subclasses :class:`JointMethod` (itself a :class:`~.trainable.TrainableMethod`, so the
engine, mini-batches, checkpoints, history and the registered-model state work unchanged) and implements,
besides ``build_model`` and ``loss``:

* ``head_probs(model, z) -> Tensor`` -- the soft assignment ``S`` (rows sum to 1, ``n x k``) of the rows of
  the embedding ``z`` (the encoder's output). Default: ``softmax(model.head(z))``.

What the base class does with it:

* the train stage stores the encoder's output as the embeddings (used by reports and by ``assign``);
* :meth:`cluster` (cluster stage) and :meth:`assign` (registered model, possibly a new graph) apply the
  trained head to the embeddings in row chunks: label = ``argmax S``, confidence = ``max S``, and the
  per-node score that ranks a cluster's representatives = ``S[i, label]`` unless the method has a learned
  node score (override :meth:`node_scores`). Memory: ``4 (n_chunk (h + k))`` besides the embeddings;
  never ``N x k`` at once.
* ``uses_n_clusters_in_training``: ``k`` is part of the train stage's key.

Register with ``code=JOINT_CODE`` so that edits to the engine, encoders, pooling losses or this module retrain.

Methods whose head has centres in embedding space (DAEGC, DinkNet) may return them from
:meth:`head_centers`; they are stored with the assignments (``centers.npy``) but assignment always goes
through :meth:`head_probs`, so a registered model assigns exactly as the cluster stage did.

Methods trained in phases (pretraining, then the joint objective: DAEGC, Dink-Net) run the engine once per
phase inside their ``fit`` with :meth:`phase_engine` (checkpoints in ``<checkpoint_dir>/<phase>/``),
:meth:`phase_history` (one history: earlier phases prefixed, epochs offset) and :meth:`save_phase` /
:meth:`load_phase` (a resumed run skips a finished phase).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .base import Clustering, MethodContext
from .trainable import TRAINABLE_CODE, TrainableMethod

#: modules whose source is part of a joint method's train-stage code version (pass as ``code=``)
JOINT_CODE = (*TRAINABLE_CODE, "agcpipe.methods.joint", "agcpipe.nn.pooling")
#: rows of embeddings pushed through the head at once
HEAD_CHUNK = 1 << 16


class JointMethod(TrainableMethod):
    """Base of the joint methods (see the module docstring)."""

    uses_n_clusters_in_training: ClassVar[bool] = True

    # ------------------------------------------------------------------------------ to implement
    def head_probs(self, model, z):
        """Soft assignment ``S`` (``n x k``, rows sum to 1) of embedding rows ``z``."""
        return model.head(z).softmax(dim=-1)

    # ------------------------------------------------------------------------------ optional
    def head_centers(self, model) -> np.ndarray | None:
        """Cluster centres in embedding space, when the head has them (stored, not used to assign)."""
        return None

    def node_scores(self, model, ctx: MethodContext, embeddings: np.ndarray, labels: np.ndarray, confidence: np.ndarray) -> np.ndarray | None:
        """A learned per-node score to rank representatives (e.g. a TopK/SAG score); None = ``S[i, label]``."""
        return None

    # ------------------------------------------------------------------------------ reading the head
    def read_head(self, model, embeddings: np.ndarray, device) -> tuple[np.ndarray, np.ndarray]:
        """``(labels int64 N, confidence float32 N)`` from the head, in row chunks of :data:`HEAD_CHUNK`."""
        import torch

        n = int(embeddings.shape[0])
        labels = np.empty(n, dtype=np.int64)
        conf = np.empty(n, dtype=np.float32)
        model.eval()
        with torch.no_grad():
            for s in range(0, n, HEAD_CHUNK):
                e = min(n, s + HEAD_CHUNK)
                z = torch.from_numpy(np.array(embeddings[s:e], dtype=np.float32)).to(device)  # a writable copy of the chunk
                p = self.head_probs(model, z).float()
                c, lab = p.max(dim=1)
                labels[s:e] = lab.cpu().numpy()
                conf[s:e] = c.cpu().numpy()
        return labels, conf

    def _clustering(self, ctx: MethodContext, embeddings: np.ndarray) -> Clustering:
        from ..config import TrainConfig
        from ..train.engine import Engine, TrainPlan

        threads = (ctx.train or TrainConfig()).threads
        with Engine(TrainPlan("full", 1, 1, [], 0), threads=threads).thread_limit():
            model = self.load_model(ctx)
            labels, conf = self.read_head(model, embeddings, ctx.device)
            scores = self.node_scores(model, ctx, embeddings, labels, conf)
            centers = self.head_centers(model)
        sizes = np.bincount(labels, minlength=ctx.n_clusters)
        info: dict[str, Any] = {"head": True, "n_empty_clusters": int((sizes == 0).sum())}
        return Clustering(labels=labels, confidence=conf, centers=centers, info=info, scores=scores)

    # ------------------------------------------------------------------------------ stages
    def cluster(self, ctx: MethodContext, embeddings: np.ndarray, cfg) -> Clustering:
        """The trained head's argmax (the post-hoc KMeans settings of ``cluster:`` do not apply)."""
        return self._clustering(ctx, embeddings)

    def assign(self, ctx: MethodContext, embeddings: np.ndarray, centers: np.ndarray | None, cfg) -> Clustering:
        """Assign (possibly new) nodes with the trained head, exactly as the cluster stage did."""
        return self._clustering(ctx, embeddings)

    # ------------------------------------------------------------------------------ phased training
    # Methods that pretrain the encoder before the joint phase (DAEGC, Dink-Net) run the engine once per
    # phase inside ``fit``. Each phase has its own TrainPlan, its own checkpoint folder
    # ``<checkpoint_dir>/<phase>/`` (so a killed run resumes inside the phase it was in), and a finished
    # phase leaves its end state in ``<checkpoint_dir>/<phase>-done/`` so that a resumed run skips it. The
    # history of phase ``p`` is recorded with its components prefixed (``pretrain_loss``, ...) and its
    # epochs shifted by the epochs of the phases before it, so one history (and one MLflow step axis)
    # holds them all; the last phase keeps the plain names (``loss``).

    def phase_engine(self, ctx: MethodContext, plan, phase: str, *, prefix: str = "", epoch_offset: int = 0):
        """An :class:`~agcpipe.train.engine.Engine` for one phase (checkpoints in ``<checkpoint_dir>/<phase>/``,
        no history file of its own, logged metrics prefixed and shifted by ``epoch_offset`` epochs)."""
        import dataclasses

        from ..train.engine import Engine

        sub = None if ctx.checkpoint_dir is None else Path(ctx.checkpoint_dir) / phase

        def log(metrics: dict[str, float], step: int) -> None:
            ctx.log({f"{prefix}{k}": v for k, v in metrics.items()}, step + epoch_offset)

        phase_ctx = dataclasses.replace(ctx, checkpoint_dir=sub, history_path=None, log=log)
        return Engine.from_context(phase_ctx, plan, desc=f"{self.name} {phase} ({plan.mode})")

    @staticmethod
    def phase_history(result, *, prefix: str = "", epoch_offset: int = 0) -> list[tuple[int, str, float]]:
        """The rows of a phase's :class:`~agcpipe.train.engine.TrainResult` history, prefixed and shifted."""
        return [(e + epoch_offset, f"{prefix}{c}", v) for e, c, v in result.history.rows]

    def save_phase(self, ctx: MethodContext, phase: str, model, rows: list, summary: dict[str, Any]) -> None:
        """Record a finished phase (weights, history rows, summary) so that a resumed run skips it."""
        if ctx.checkpoint_dir is None:
            return
        from ..train.checkpoint import save_checkpoint

        state = {"model": model.state_dict(), "rows": [list(r) for r in rows], "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, bool, str)) or v is None}}
        save_checkpoint(Path(ctx.checkpoint_dir) / f"{phase}-done", state)

    def load_phase(self, ctx: MethodContext, phase: str, model) -> tuple[list, dict[str, Any]] | None:
        """A finished phase saved by :meth:`save_phase`: loads its weights into ``model`` and returns
        ``(history rows, summary)``; None when there is none."""
        if ctx.checkpoint_dir is None:
            return None
        from ..train.checkpoint import load_checkpoint

        ck = load_checkpoint(Path(ctx.checkpoint_dir) / f"{phase}-done")
        if ck is None:
            return None
        model.load_state_dict(ck["model"])
        return [tuple(r) for r in ck["rows"]], dict(ck["summary"])
