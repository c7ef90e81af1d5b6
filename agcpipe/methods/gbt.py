"""G-BT: Graph Barlow Twins (Bielak et al., Knowledge-Based Systems 2022), then KMeans.

Two augmented views (feature-column masking + edge dropping, :mod:`agcpipe.nn.augment`) go through one
shared GCN encoder; each output is batch-normalised over the ``n`` nodes of the batch (no affine
parameters), ``z^ = (z - mean) / std``, and the cross-correlation matrix of the views is
``C = Z^1^T Z^2 / n`` (``h x h``). The objective pushes ``C`` to the identity:

    L = sum_i (1 - C_ii)^2 + lam sum_{i != j} C_ij^2          (lam = 1/h by default, as the paper)

logged as ``loss_inv`` (the diagonal term) and ``loss_red`` (the redundancy term, unweighted).
Embeddings for clustering are the encoder's output on the unaugmented graph (batch norm in eval mode, with
its running statistics); clustering is post-hoc KMeans (the default ``cluster``).

Paper settings (transductive, full batch): 2-layer GCN ``d -> 2e -> e`` with batch norm and PReLU after the
first layer and nothing after the last, ``e = 256``, AdamW with lr 5e-4 (WikiCS, Amazon-CS) and weight
decay 1e-5, ``lam = 1/e``, augmentation rates tuned per dataset. Differences here: a constant learning rate
and 100 epochs (the paper warms up for 100 epochs, then decays with a cosine schedule over 1,000 epochs; a
constant rate over 300 epochs measured NMI 49.9 on Cora against ~56 at 100), and PyTorch's batch-norm
momentum (0.1; the paper 0.01). The paper reports no Cora clustering figure; the default rates (feature
masking 0.1 / 0.3, edge dropping 0.4 / 0.6 in views 1 / 2) are the best measured on Cora
(flows/configs/cora_gbt.yaml).

* **full batch**: both views of the whole graph per step. Memory ~ ``4 N d`` (features; ``12 nnz(x)``
  sparse) + per view ``~21 nnz`` (kept edges) + ``12 (nnz + N)`` (its normalised adjacency) +
  ``~4 N (3 * 2e + 2 e)`` (layer outputs, norm and activation kept for backward, normalised copy) plus
  ``4 e^2`` for ``C``.
* **mini-batch**: ``NodeLoader`` batches of ``B`` seeds with ``train.fanout`` neighbours per layer; each
  view augments the sampled subgraph; the batch statistics and ``C`` are over the ``B`` seeds. Memory per
  step ~ ``4 S (d + 4 e)`` per view for ``S`` sampled nodes (``S <= B prod(1 + fanout)``) + ``4 e^2``;
  never ``N x N`` or ``E x e``.
"""
from __future__ import annotations

from pydantic import Field

from ._two_view import TWO_VIEW_CODE, Rate, TwoViewMethod, TwoViewParams, encoder_model
from .registry import register
from .trainable import EncoderParams, TrainRun, build_encoder

#: added to the standard deviations (the paper's code: 1e-15)
EPS = 1e-15


def _gbt_encoder() -> EncoderParams:
    return EncoderParams(type="gcn", hidden=512, layers=2, out=256, activation="prelu", norm="batch", last_activation=False)


class GBTParams(TwoViewParams):
    encoder: EncoderParams = Field(default_factory=_gbt_encoder)
    lam: float | None = Field(None, ge=0, description="weight of the redundancy-reduction term; None = 1 / embedding size")
    feature_mask: tuple[Rate, Rate] = Field((0.1, 0.3), description="feature-column masking rate of view 1 and view 2")
    edge_drop: tuple[Rate, Rate] = Field((0.4, 0.6), description="edge dropping rate of view 1 and view 2")
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0, description="AdamW (decoupled) weight decay")
    epochs: int = Field(100, ge=1)


def cross_correlation(z1, z2, eps: float = EPS):
    """``C = Z^1^T Z^2 / n`` of the batch-normalised (unbiased std) views: ``h x h``."""
    n = z1.size(0)
    a = (z1 - z1.mean(0)) / (z1.std(0) + eps)
    b = (z2 - z2.mean(0)) / (z2.std(0) + eps)
    return a.T @ b / n


@register(
    "gbt",
    family="decoupled",
    params=GBTParams,
    description="Graph Barlow Twins (two augmented views, cross-correlation to identity), then KMeans (Bielak et al., 2022)",
    code=TWO_VIEW_CODE,
)
class GBT(TwoViewMethod):
    train_defaults = {"batch_size": 2048, "fanout": [10, 10], "patience": 0}

    def build_model(self, in_dim: int, ctx):
        return encoder_model(build_encoder(in_dim, self.params["encoder"]))

    def configure_optimizers(self, model):
        import torch

        return [torch.optim.AdamW(model.parameters(), lr=self.params["lr"], weight_decay=self.params["weight_decay"])]

    def loss(self, model, batch, run: TrainRun):
        from ..train.engine import LossOutput

        z1, z2 = self.encode_views(model, batch, run)
        if z1.size(0) < 2:
            from ..errors import StageError

            raise StageError("gbt: a batch needs at least 2 seed nodes (batch statistics); raise train.batch_size")
        c = cross_correlation(z1.float(), z2.float())
        diag = c.diagonal()
        inv = (1 - diag).pow(2).sum()
        red = c.pow(2).sum() - diag.pow(2).sum()
        lam = self.params["lam"] if self.params["lam"] is not None else 1.0 / c.size(0)
        return LossOutput(inv + lam * red, {"loss_inv": inv.detach(), "loss_red": red.detach()})
