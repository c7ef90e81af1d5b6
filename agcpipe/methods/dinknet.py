r"""Dink-Net: neural clustering on large graphs (Liu et al., ICML 2023) -- a joint method.

A GCN encoder (1 x 512, PReLU) embeds the nodes, ``H = E(X, A)``; a projector ``g`` (``projector_layers``
linear layers) maps embeddings to discrimination scores. Training has two phases:

1. **discrimination pretraining** (node discriminate module): the features are augmented by dropping a
   random ``feature_drop`` fraction of their columns, ``X~``; the fake view shuffles the rows of ``X~``.
   Each node's logit is the sum of its projected embedding, ``l_i = 1^T g(E(X~, A))_i`` (real) and
   ``l'_i = 1^T g(E(X~[perm], A))_i`` (fake), and

       L_discri = 1/(2n) sum_i [ -log sigma(l_i) - log(1 - sigma(l'_i)) ].

2. **neural clustering**: the centres ``c_1..c_k`` are initialised by KMeans (the project's torch KMeans,
   ``init_n_init`` restarts) on the L2-normalised pretrained embeddings ``h_i = E(X, A)_i / ||.||``; then

       L_dilation = -1 / (k (k - 1)) sum_{j != l} ||c_j - c_l||^2      (push the centres apart)
       L_shrink   =  1 / (n k)       sum_i sum_j ||h_i - c_j||^2       (pull the nodes to the centres)
       L = L_dilation + L_shrink + alpha L_discri.

   As in the paper's code, ``h`` enters the clustering losses detached: those terms move the centres, the
   encoder keeps learning through ``alpha L_discri`` (without the detach, ``L_shrink`` would pull every
   node to the mean of the centres and collapse the embedding).

Clusters are read from the head: nearest centre ``argmin_j ||h_i - c_j||`` (the paper's rule), as
``argmax`` of the Student-t soft assignment ``q_ij ~ (1 + ||h_i - c_j||^2)^-1`` (rows normalised), whose
maximum is the confidence; the centres are stored with the assignments.

Defaults are PyAGC's benchmark defaults (GCN 1 x 512, PReLU, one projector layer; pretrain lr 0.001 and
joint lr 0.0001 for 200 epochs each, early stopping with patience 50 on each phase restoring the best
epoch, ``alpha`` 1) and the paper's ``feature_drop`` 0.2; PyAGC's Cora settings (pretrain lr 0.01, joint
lr 0.001 for 50 epochs, ``alpha`` 10) are in ``flows/configs/cora_dinknet.yaml``.

Training paths (``train.mode``):

* **full batch**: both encoder passes over the whole graph (plus a clean pass for ``h`` in the joint
  phase). Memory ~ ``4 N d`` (features; one augmented copy) ``+ 4 N h (3 + projector_layers)``
  ``+ 4 N k`` (distances) + the prepared edges (``~20 (nnz + N)`` bytes).
* **mini-batch**: PyG's ``NodeLoader`` with the CSR fan-out sampler (as DGI); the augmentation and the
  shuffle act on the sampled subgraph, the losses use the seed rows (mini-batch means of the same sums;
  ``L_dilation`` needs only the centres). Memory per step ~ ``4 S (d + 3 h)`` for ``S`` sampled nodes,
  ``S <= B prod(1 + fanout)``; never ``N x N``.

KMeans initialisation of the centres (both modes): as DAEGC (:class:`~.daegc.SelfTrainingJoint`): the
embeddings of all nodes from :meth:`~.trainable.TrainableMethod.embed_model` (full forward up to
``train.max_full_batch_nodes`` nodes, else exact layer-wise inference; ``4 N h`` bytes), KMeans on at
most ``init_sample`` of them (a uniform seeded sample above that).
"""
from __future__ import annotations

from pydantic import Field

from .daegc import SelfTrainingJoint, sq_dist
from .joint import JOINT_CODE
from .registry import register
from .trainable import EncoderParams, TrainableParams, TrainRun, encode_batch


def _dink_encoder() -> EncoderParams:
    return EncoderParams(type="gcn", hidden=512, layers=1, activation="prelu", last_activation=True)


class DinkNetParams(TrainableParams):
    encoder: EncoderParams = Field(default_factory=_dink_encoder)
    projector_layers: int = Field(1, ge=1, description="linear layers of the discrimination projector")
    feature_drop: float = Field(0.0, ge=0, lt=1, description="fraction of feature columns dropped before encoding (the paper's code: 0.2)")
    alpha: float = Field(1.0, ge=0, description="weight of the discrimination loss in the joint phase")
    pretrain_lr: float = Field(0.001, gt=0, description="learning rate of the pretraining phase")
    pretrain_epochs: int = Field(200, ge=1, description="epochs of the discrimination pretraining")
    pretrain_patience: int = Field(50, ge=0, description="early stopping of the pretraining phase (0 = off)")
    lr: float = Field(0.0001, gt=0, description="learning rate of the joint (clustering) phase")
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(200, ge=1, description="epochs of the joint phase (train.epochs overrides)")
    init_n_init: int = Field(10, ge=1, description="KMeans restarts of the centre initialisation")
    init_sample: int = Field(200_000, ge=2, description="KMeans initialisation on at most this many (sampled) nodes")


@register(
    "dinknet",
    family="joint",
    params=DinkNetParams,
    description="Dink-Net: discrimination pretraining, then dilation + shrink clustering losses on learnable centres (Liu et al., 2023)",
    code=(*JOINT_CODE, "agcpipe.methods.daegc", "agcpipe.nn.augment"),
)
class DinkNet(SelfTrainingJoint):
    train_defaults = {"batch_size": 2048, "fanout": [10], "patience": 50}

    def __init__(self, params):
        super().__init__({**params, "normalize": True, "dof": 1.0})  # h is L2-normalised (the paper's embed)

    def build_model(self, in_dim: int, ctx):
        import torch

        from .trainable import build_encoder

        class DinkNetModel(torch.nn.Module):
            def __init__(self, encoder, k: int, layers: int):
                super().__init__()
                self.encoder = encoder
                h = encoder.out_dim
                self.projector = torch.nn.Sequential(*(torch.nn.Linear(h, h) for _ in range(layers)))
                self.centers = torch.nn.Parameter(torch.empty(k, h))
                torch.nn.init.xavier_normal_(self.centers)

        return DinkNetModel(build_encoder(in_dim, self.params["encoder"]), int(ctx.n_clusters), int(self.params["projector_layers"]))

    # ------------------------------------------------------------------------------ losses
    def _discrimination(self, model, batch, run: TrainRun):
        import torch
        import torch.nn.functional as F

        from ..nn.augment import mask_feature_columns
        from ..nn.encoders import permute_rows

        bs = int(batch.batch_size)
        x = mask_feature_columns(batch.x, float(self.params["feature_drop"]), run.generator)
        perm = torch.randperm(x.size(0), generator=run.generator).to(x.device)
        real = model.projector(encode_batch(model.encoder, batch, x=x)[:bs]).sum(1).float()
        fake = model.projector(encode_batch(model.encoder, batch, x=permute_rows(x, perm))[:bs]).sum(1).float()
        return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())  # BCE, real = 1, fake = 0

    def pretrain_loss(self, model, batch, run: TrainRun):
        from ..train.engine import LossOutput

        return LossOutput(self._discrimination(model, batch, run))

    def loss(self, model, batch, run: TrainRun):
        import torch

        from ..train.engine import LossOutput

        disc = self._discrimination(model, batch, run)
        with torch.no_grad():  # detached, as the paper's code: the clustering terms move the centres
            h = self.prepare(encode_batch(model.encoder, batch)[: int(batch.batch_size)]).float()
        shrink, dilation = shrink_dilation(h, model.centers)
        total = dilation + shrink + self.params["alpha"] * disc
        return LossOutput(total, {"loss_dilation": dilation.detach(), "loss_shrink": shrink.detach(), "loss_discri": disc.detach()})


def shrink_dilation(h, centers):
    """``(L_shrink, L_dilation)``: the mean squared node-centre distance over all pairs (i, j), and minus
    the mean squared distance over the distinct centre pairs (j != l). Memory ``4 k (n + k)``."""
    k = centers.size(0)
    c = centers.to(h.dtype)
    shrink = sq_dist(h, c).mean()
    dilation = -sq_dist(c, c).sum() / max(k * (k - 1), 1)  # the diagonal is zero
    return shrink, dilation
