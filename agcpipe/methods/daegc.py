r"""DAEGC: Deep Attentional Embedded Graph Clustering (Wang et al., IJCAI 2019) -- a joint method.

A graph attention encoder (GAT) maps features to ``Z``; training has two phases:

1. **pretraining** (graph attention auto-encoder): inner-product reconstruction of the graph,
   ``sigma(z_i . z_j)``, as binary cross-entropy of the observed edges against as many uniformly drawn
   node pairs (negative sampling, PyG's ``GAE.recon_loss``, PyAGC's DAEGC):

       L_r = mean_{(i,j) in E} -log sigma(z_i . z_j) + mean_{(i,k) random} -log(1 - sigma(z_i . z_k))

2. **self-training**: the centres ``mu_j`` are initialised by KMeans (the project's torch KMeans,
   ``init_n_init`` restarts) on the pretrained embeddings; the soft assignment is the Student-t kernel
   (DEC), the target distribution ``P`` sharpens it and is recomputed from the whole graph every
   ``update_interval`` epochs (before epochs 0, u, 2u, ... as the paper's code), and

       q_ij = (1 + ||z_i - mu_j||^2 / v)^(-(v+1)/2) / sum_l (...),     p_ij = (q_ij^2 / f_j) / sum_l (q_il^2 / f_l),
       f_j = sum_i q_ij,      L = L_r + gamma KL(P || Q) = L_r + gamma / n sum_i sum_j p_ij log(p_ij / q_ij).

With ``normalize`` (the paper's code) ``z`` is L2-normalised before the decoder, the kernel and the
KMeans initialisation. Clusters are read from the head: ``argmax_j q_ij``, confidence ``max_j q_ij``
(:class:`~.joint.JointMethod`); the centres are stored with the assignments.

Defaults are PyAGC's benchmark defaults (GAT 2 x 256, ELU, no activation after the last layer; pretrain
lr 0.01 for 200 epochs, joint lr 0.001 for 200 epochs, early stopping with patience 50 on each phase's
loss restoring the best epoch, ``gamma`` 10, ``update_interval`` 5); PyAGC's Cora settings (GAT 2 x 64
with 4 heads, 100 joint epochs) are in ``flows/configs/cora_daegc.yaml``.

Training paths (``train.mode``):

* **full batch**: ``Z`` of the whole graph per epoch, every stored edge a positive, fresh negatives each
  epoch; ``P`` from a full forward. Memory ~ ``4 N (d + widths + 3 k)`` + the GAT's per-edge attention
  ``~ 4 (nnz + N) heads (3 + width / heads)`` + ``40 nnz`` for the edges.
* **mini-batch**: GAE's pair batches (:class:`~.gae._PairBatches`): every seed, one sampled
  neighbour as its positive and in-batch negatives, all embedded from fan-out neighbourhoods; the KL term
  uses the batch rows' ``P`` rows. ``P`` (``N x k``, checkpointed with the model) is recomputed every
  ``update_interval`` epochs from the exact embeddings of all nodes
  (:meth:`~.trainable.TrainableMethod.embed_model`: layer-wise inference above
  ``train.max_full_batch_nodes`` nodes). Memory: ``4 N (h + 2 k)``
  (the inference output, Q and P) + the layer-wise inference's blocks (:mod:`agcpipe.nn.encoders`) + per
  step ``~4 S (d + widths)`` for ``S`` sampled nodes (``S <= 2 B prod(1 + fanout)``) plus the sampled
  edges' attention; never ``N x N``.

KMeans initialisation of the centres (both modes): the embeddings of all nodes from
:meth:`~.trainable.TrainableMethod.embed_model` (a full forward up to ``train.max_full_batch_nodes``
nodes, else exact layer-wise inference), KMeans fitted on at most ``init_sample`` of them (a uniform
seeded sample above that). Memory ``4 N h`` + KMeans on ``min(N, init_sample)`` rows.

:class:`SelfTrainingJoint` (pretraining -> KMeans centres -> joint phase) is shared with Dink-Net
(:mod:`.dinknet`).
"""
from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from .joint import JOINT_CODE, JointMethod
from .registry import register
from .trainable import EncoderParams, TrainableParams, TrainRun, encode_batch


# ------------------------------------------------------------------------------------------ shared base
class SelfTrainingJoint(JointMethod):
    """Pretraining, then KMeans centres, then the joint objective (DAEGC, Dink-Net).

    Subclasses give ``build_model`` (with ``model.encoder`` and ``model.centers``, a ``k x h`` parameter),
    ``pretrain_loss`` and ``loss`` (joint), optionally ``pretrain_batches`` (default :meth:`batches`),
    ``joint_module`` (what the engine trains in the joint phase; default the model) and
    ``on_joint_epoch_end``. Parameters used here: ``pretrain_epochs``, ``pretrain_patience``,
    ``pretrain_lr``, ``lr``, ``weight_decay``, ``normalize``, ``init_n_init``, ``init_sample``.

    ``train.epochs`` / ``train.patience`` override the *joint* phase (``epochs`` and the method's patience);
    the pretraining phase takes ``pretrain_epochs`` / ``pretrain_patience``. Both phases share the resolved
    mode, batch size, fan-out and amp.
    """

    train_defaults: ClassVar[dict[str, Any]] = {"batch_size": 2048, "fanout": [10, 10], "patience": 50}

    # ------------------------------------------------------------------------------ hooks
    def pretrain_loss(self, model, batch, run: TrainRun):
        raise NotImplementedError

    def pretrain_batches(self, run: TrainRun):
        return self.batches(run)

    def pretrain_optimizers(self, model):
        import torch

        return [torch.optim.Adam(model.parameters(), lr=self.params["pretrain_lr"], weight_decay=self.params.get("weight_decay", 0.0))]

    def joint_module(self, model, run: TrainRun):
        """The module the engine trains in the joint phase (its state is checkpointed); default the model."""
        return model

    def on_joint_epoch_end(self, module, run: TrainRun, epoch: int) -> None:
        """Called after each joint epoch (``epoch`` = epochs done), before the engine's checkpoint."""

    # ------------------------------------------------------------------------------ plans
    def pretrain_plan(self, plan):
        import dataclasses

        return dataclasses.replace(plan, epochs=int(self.params["pretrain_epochs"]), patience=int(self.params["pretrain_patience"]))

    # ------------------------------------------------------------------------------ centres
    def init_centers(self, model, ctx) -> dict[str, Any]:
        """KMeans on the pretrained embeddings (at most ``init_sample`` rows) -> ``model.centers``."""
        import torch

        from ..cluster.kmeans import KMeans

        model.eval()
        z = self.embed_model(model, ctx)  # exact: full forward, or layer-wise inference on large graphs
        n = z.shape[0]
        sample = int(self.params["init_sample"])
        if n > sample:
            idx = np.sort(np.random.default_rng(ctx.seed).choice(n, size=sample, replace=False))
            z = z[idx]
        km = KMeans(
            ctx.n_clusters, n_init=int(self.params["init_n_init"]), normalize=bool(self.params["normalize"]), seed=ctx.seed, device=ctx.device
        ).fit(z)
        with torch.no_grad():
            model.centers.copy_(torch.from_numpy(km.cluster_centers_).to(model.centers.device, model.centers.dtype))
        return {"init_rows": int(z.shape[0]), "init_inertia": float(km.inertia_)}

    def head_centers(self, model) -> np.ndarray | None:
        return model.centers.detach().float().cpu().numpy()

    def head_probs(self, model, z):
        """Student-t soft assignment of the (normalised) embedding rows to the centres."""
        return student_t(self.prepare(z), model.centers, float(self.params.get("dof", 1.0)))

    def prepare(self, z):
        """The embedding the head compares with the centres: L2-normalised when ``normalize``."""
        import torch.nn.functional as F

        return F.normalize(z, p=2, dim=-1) if self.params["normalize"] else z

    # ------------------------------------------------------------------------------ fit
    def fit(self, ctx) -> dict[str, Any]:
        from ..train.engine import seed_everything
        from ..train.history import History

        plan = self.plan(ctx.train, ctx.graph.n_nodes)
        pre_plan = self.pretrain_plan(plan)
        seed_everything(ctx.seed)
        in_dim = self.input_dim(ctx)
        model = self.build_model(in_dim, ctx)

        # phase 1: pretraining (skipped when a resumed run finished it before)
        done = self.load_phase(ctx, "pretrain", model)
        if done is None:
            engine = self.phase_engine(ctx, pre_plan, "pretrain", prefix="pretrain_")
            run = TrainRun(self, ctx, pre_plan, engine, model)
            res = engine.fit(
                model, self.pretrain_optimizers(model), self.pretrain_batches(run), lambda b: self.pretrain_loss(model, b, run), generators=run.generators
            )
            rows, pre = self.phase_history(res, prefix="pretrain_"), res.summary()
            self.save_phase(ctx, "pretrain", model, rows, pre)
        else:
            rows, pre = done

        # centres from the pretrained embeddings; the joint phase starts from a fixed RNG state, so a run
        # that resumed after the pretraining phase continues exactly as an uninterrupted one
        seed_everything(ctx.seed + 1)
        t0 = time.perf_counter()
        init = self.init_centers(model, ctx)
        init["init_seconds"] = time.perf_counter() - t0

        # phase 2: the joint objective
        offset = int(pre["epochs_run"])
        engine = self.phase_engine(ctx, plan, "joint", epoch_offset=offset)
        run = TrainRun(self, ctx, plan, engine, model)
        module = self.joint_module(model, run)
        res = engine.fit(
            module,
            self.configure_optimizers(model),
            self.batches(run),
            lambda b: self.loss(model, b, run),
            generators=run.generators,
            on_epoch_end=lambda epoch, _: self.on_joint_epoch_end(module, run, epoch),
        )
        history = History(rows + self.phase_history(res, epoch_offset=offset))
        if ctx.history_path is not None:
            history.write(ctx.history_path)
        self.save_model(ctx.state_dir, model, self.model_spec(in_dim, ctx), plan)
        return {
            "trained": True,
            "plan": plan.to_dict(),
            "pretrain_plan": pre_plan.to_dict(),
            "n_parameters": int(sum(p.numel() for p in model.parameters())),
            "device": str(engine.device),
            **res.summary(),
            **{f"pretrain_{k}": v for k, v in pre.items()},
            **init,
        }

    def model_spec(self, in_dim: int, ctx) -> dict[str, Any]:
        return {"in_dim": int(in_dim), "n_clusters": int(ctx.n_clusters)}


def student_t(z, centers, dof: float = 1.0):
    """DEC's soft assignment ``q_ij ~ (1 + ||z_i - mu_j||^2 / v)^(-(v+1)/2)``, rows normalised (n x k)."""
    q = (1.0 + sq_dist(z.float(), centers.float()) / dof).pow(-(dof + 1.0) / 2.0)
    return q / q.sum(dim=1, keepdim=True)


def sq_dist(a, b):
    """Squared Euclidean distances ``||a_i - b_j||^2`` (n x m; differentiable at 0, unlike ``cdist``)."""
    return ((a * a).sum(1, keepdim=True) - 2.0 * (a @ b.t()) + (b * b).sum(1)).clamp_min(0.0)


def target_distribution(q, freq=None):
    """DEC's target ``p_ij = (q_ij^2 / f_j) / sum_l (q_il^2 / f_l)``; ``f_j = sum_i q_ij`` (or ``freq``)."""
    f = q.sum(dim=0) if freq is None else freq
    w = q.pow(2) / f
    return w / w.sum(dim=1, keepdim=True)


# ------------------------------------------------------------------------------------------ DAEGC
def _daegc_encoder() -> EncoderParams:
    return EncoderParams(type="gat", hidden=256, layers=2, activation="elu", last_activation=False, heads=1)


class DAEGCParams(TrainableParams):
    encoder: EncoderParams = Field(default_factory=_daegc_encoder)
    pretrain_lr: float = Field(0.01, gt=0, description="learning rate of the pretraining phase")
    pretrain_epochs: int = Field(200, ge=1, description="epochs of the pretraining phase (auto-encoder)")
    pretrain_patience: int = Field(50, ge=0, description="early stopping of the pretraining phase (0 = off)")
    lr: float = Field(0.001, gt=0, description="learning rate of the joint (self-training) phase")
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(200, ge=1, description="epochs of the joint phase (train.epochs overrides)")
    gamma: float = Field(10.0, ge=0, description="weight of the clustering loss KL(P || Q)")
    update_interval: int = Field(5, ge=1, description="epochs between updates of the target distribution P")
    neg_ratio: int = Field(1, ge=1, description="negative pairs per positive in the reconstruction loss")
    normalize: bool = Field(True, description="L2-normalise Z (decoder, Student-t kernel, KMeans), as the paper's code")
    dof: float = Field(1.0, gt=0, description="degrees of freedom v of the Student-t kernel")
    init_n_init: int = Field(10, ge=1, description="KMeans restarts of the centre initialisation")
    init_sample: int = Field(200_000, ge=2, description="KMeans initialisation on at most this many (sampled) nodes")


@register(
    "daegc",
    family="joint",
    params=DAEGCParams,
    description="DAEGC: graph attention auto-encoder + self-training clustering head, KL(P||Q) (Wang et al., 2019)",
    code=(*JOINT_CODE, "agcpipe.methods.gae"),
)
class DAEGC(SelfTrainingJoint):
    def build_model(self, in_dim: int, ctx):
        import torch

        from .trainable import build_encoder

        class DAEGCModel(torch.nn.Module):
            def __init__(self, encoder, k: int):
                super().__init__()
                self.encoder = encoder
                self.centers = torch.nn.Parameter(torch.empty(k, encoder.out_dim))
                torch.nn.init.xavier_normal_(self.centers)

        return DAEGCModel(build_encoder(in_dim, self.params["encoder"]), int(ctx.n_clusters))

    # ------------------------------------------------------------------------------ batches and losses
    def batches(self, run: TrainRun):
        """GAE's batches: the full graph with every edge as a positive, or pair mini-batches (seeds, one
        sampled neighbour each, in-batch negatives; :class:`~.gae._PairBatches`)."""
        from .gae import GAE

        return GAE.batches(self, run)  # reads only run and params["neg_ratio"]

    def _recon(self, z, batch, run: TrainRun):
        from .gae import recon_loss

        pos, neg = recon_loss(z, batch, self.params["neg_ratio"], run.generator)
        return pos + neg

    def pretrain_loss(self, model, batch, run: TrainRun):
        from ..train.engine import LossOutput

        z = self.prepare(encode_batch(model.encoder, batch))
        recon = self._recon(z, batch, run)
        return LossOutput(recon)

    def loss(self, model, batch, run: TrainRun):
        from ..train.engine import LossOutput

        z = self.prepare(encode_batch(model.encoder, batch))
        recon = self._recon(z, batch, run)
        rows = int(batch.batch_size)  # full graph: all; mini-batch: the seeds and their positives
        q = student_t(z[:rows], model.centers, float(self.params["dof"]))
        ids = batch.n_id[:rows] if "n_id" in batch else slice(None)
        p = run.target_holder.target[ids].to(q.device)
        kl = (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(1).mean()  # KL(P||Q), batchmean
        total = recon + self.params["gamma"] * kl
        return LossOutput(total, {"loss_recon": recon.detach(), "loss_kl": kl.detach()})

    # ------------------------------------------------------------------------------ target distribution
    def joint_module(self, model, run: TrainRun):
        """The model plus the target distribution ``P`` as a buffer (so checkpoints carry it)."""
        import torch

        class WithTarget(torch.nn.Module):
            def __init__(self, inner, n: int, k: int):
                super().__init__()
                self.model = inner
                self.register_buffer("target", torch.zeros(n, k))

        module = WithTarget(model, run.ctx.graph.n_nodes, int(run.ctx.n_clusters))
        run.target_holder = module  # type: ignore[attr-defined]  (the loss reads its P)
        self.update_target(module, run)  # P for epochs 0 .. update_interval - 1
        return module

    def on_joint_epoch_end(self, module, run: TrainRun, epoch: int) -> None:
        if epoch % int(self.params["update_interval"]) == 0 and epoch < run.plan.epochs:
            self.update_target(module, run)

    def update_target(self, module, run: TrainRun) -> None:
        """``P`` from the soft assignment ``Q`` of every node (exact embeddings, head in row chunks)."""
        import torch

        from .joint import HEAD_CHUNK

        model = module.model
        was = model.training
        model.eval()
        z = self.embed_model(model, run.ctx)
        n = z.shape[0]
        with torch.no_grad():
            q = torch.empty(n, model.centers.size(0))
            for s in range(0, n, HEAD_CHUNK):
                zz = torch.from_numpy(np.ascontiguousarray(z[s : s + HEAD_CHUNK])).to(model.centers.device)
                q[s : s + HEAD_CHUNK] = self.head_probs(model, zz).float().cpu()
            del z
            module.target.copy_(target_distribution(q).to(module.target.device))
        model.train(was)
