"""CCA-SSG: canonical-correlation-inspired self-supervised GNN (Zhang et al., NeurIPS 2021), then KMeans.

Two augmented views of the graph (feature-column masking + edge dropping, :mod:`agcpipe.nn.augment`) go
through one shared GCN encoder, ``Z1 = f(A1, X1)``, ``Z2 = f(A2, X2)``; each is standardised per column
over the ``n`` nodes of the batch and scaled by ``1/sqrt(n)``, ``Z~ = (Z - mean) / (std sqrt(n))``, so
that ``Z~^T Z~`` is the correlation matrix of the view. The objective (paper eq. 6) is

    L = ||Z~1 - Z~2||_F^2 + lam (||Z~1^T Z~1 - I||_F^2 + ||Z~2^T Z~2 - I||_F^2)

implemented as in the authors' code: since ``||Z~v||_F^2`` is fixed by the standardisation, the invariance
term is ``-tr(Z~1^T Z~2)`` (= half of ``||Z~1 - Z~2||_F^2`` up to a constant; logged as ``loss_inv``); the
decorrelation term is logged as ``loss_dec``. Embeddings for clustering are the encoder's output ``Z`` on
the unaugmented graph; clustering is post-hoc KMeans (the default ``cluster``).

Settings (PyAGC's Cora configuration = the authors' Cora settings): 2-layer GCN 512-512, ReLU between the
layers and none after the last, Adam lr 1e-3, no weight decay, 50 epochs, ``lam = 1e-3``, feature masking
0.1 and edge dropping 0.4 in both views.

* **full batch**: both views of the whole graph per step. Memory ~ ``4 N d`` (features; ``12 nnz(x)``
  sparse) + per view ``~21 nnz`` (kept edges) + ``12 (nnz + N)`` (its normalised adjacency) + ``4 N h L``
  (layer outputs kept for backward) + ``8 N h`` (standardised copies), plus ``3 * 4 h^2`` for the three
  ``h x h`` products. With Cora (N 2,708, d 1,433, h 512): ~60 MB.
* **mini-batch**: ``NodeLoader`` batches of ``B`` seeds with ``train.fanout`` neighbours per layer; each
  view augments the sampled subgraph, and the statistics (standardisation, correlations) are over the
  ``B`` seeds. Memory per step ~ ``4 S (d + 2 h)`` per view for ``S`` sampled nodes
  (``S <= B prod(1 + fanout)``) + ``12 h^2``; never ``N x N`` or ``E x h``. ``B`` should stay well above
  ``h`` (the correlation estimates are over ``B`` rows): the default is 2048.
"""
from __future__ import annotations

from pydantic import Field

from ._two_view import TWO_VIEW_CODE, Rate, TwoViewMethod, TwoViewParams, encoder_model
from .registry import register
from .trainable import EncoderParams, TrainRun, build_encoder

#: added to the column standard deviations (a constant column would otherwise divide by zero)
EPS = 1e-8


def _ccassg_encoder() -> EncoderParams:
    return EncoderParams(type="gcn", hidden=512, layers=2, activation="relu", last_activation=False)


class CCASSGParams(TwoViewParams):
    encoder: EncoderParams = Field(default_factory=_ccassg_encoder)
    lam: float = Field(1e-3, ge=0, description="weight of the decorrelation term")
    feature_mask: tuple[Rate, Rate] = Field((0.1, 0.1), description="feature-column masking rate of view 1 and view 2")
    edge_drop: tuple[Rate, Rate] = Field((0.4, 0.4), description="edge dropping rate of view 1 and view 2")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(50, ge=1)


def standardize(z, eps: float = EPS):
    """Columns of ``z`` centred and scaled to unit (unbiased) standard deviation, then divided by ``sqrt(n)``."""
    n = z.size(0)
    return (z - z.mean(0)) / ((z.std(0) + eps) * n**0.5)


@register(
    "ccassg",
    family="decoupled",
    params=CCASSGParams,
    description="CCA-SSG (two augmented views, GCN encoder, invariance + decorrelation), then KMeans (Zhang et al., 2021)",
    code=TWO_VIEW_CODE,
)
class CCASSG(TwoViewMethod):
    train_defaults = {"batch_size": 2048, "fanout": [10, 10], "patience": 0}

    def build_model(self, in_dim: int, ctx):
        return encoder_model(build_encoder(in_dim, self.params["encoder"]))

    def loss(self, model, batch, run: TrainRun):
        import torch

        from ..train.engine import LossOutput

        z1, z2 = self.encode_views(model, batch, run)
        if z1.size(0) < 2:
            from ..errors import StageError

            raise StageError("ccassg: a batch needs at least 2 seed nodes (column statistics); raise train.batch_size")
        h1, h2 = standardize(z1.float()), standardize(z2.float())
        eye = torch.eye(h1.size(1), device=h1.device)
        inv = -(h1 * h2).sum()  # -tr(Z~1^T Z~2)
        dec = (eye - h1.T @ h1).pow(2).sum() + (eye - h2.T @ h2).pow(2).sum()
        return LossOutput(inv + self.params["lam"] * dec, {"loss_inv": inv.detach(), "loss_dec": dec.detach()})
