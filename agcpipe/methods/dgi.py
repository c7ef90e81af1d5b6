"""DGI: Deep Graph Infomax (Velickovic et al., ICLR 2019), then KMeans.

A GCN encoder (one layer, 512 units, PReLU in the paper) embeds the graph, ``H = E(X, A)``, and a corrupted
copy with rows of ``X`` shuffled, ``H~ = E(X[perm], A)``; the summary is ``s = sigmoid(mean_i h_i)``; a
bilinear discriminator ``D(h, s) = h^T W s`` is trained to tell real from corrupted patches:

    L = 1/2 [ mean_i -log sigma(D(h_i, s)) + mean_i -log(1 - sigma(D(h~_i, s))) ]

Paper settings: Adam, lr 0.001, early stopping with patience 20 on the training loss (restoring the best
epoch), which the engine's ``train.patience`` default implements here.

* **full batch**: both passes over the whole graph. Memory ~ ``4 N d + 8 N h`` (two embeddings) + the
  prepared edges (``~20 (nnz + N)`` bytes).
* **mini-batch** (as PyG's DGI example on Reddit): PyG's ``NodeLoader`` with the CSR fan-out sampler;
  the corruption shuffles the sampled subgraph's feature rows, the summary and the loss use the seed
  nodes. Memory per step ~ ``4 S (d + 2 h)`` for ``S`` sampled nodes, ``S <= B prod(1 + fanout)``.

Embeddings are the encoder's output ``H``; clustering is post-hoc KMeans (the default ``cluster``).
"""
from __future__ import annotations

from pydantic import Field

from .registry import register
from .trainable import TRAINABLE_CODE, EncoderParams, TrainableMethod, TrainableParams, TrainRun, build_encoder, encode_batch


def _dgi_encoder() -> EncoderParams:
    return EncoderParams(type="gcn", hidden=512, layers=1, activation="prelu", last_activation=True)


class DGIParams(TrainableParams):
    encoder: EncoderParams = Field(default_factory=_dgi_encoder)
    lr: float = Field(0.001, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(1000, ge=1, description="at most this many epochs (early stopping, patience 20)")


@register(
    "dgi",
    family="decoupled",
    params=DGIParams,
    description="Deep Graph Infomax (GCN encoder, bilinear discriminator, feature shuffling), then KMeans (Velickovic et al., 2019)",
    code=TRAINABLE_CODE,
)
class DGI(TrainableMethod):
    train_defaults = {"batch_size": 1024, "fanout": [10], "patience": 20}

    def build_model(self, in_dim: int, ctx):
        import torch

        class DGIModel(torch.nn.Module):
            def __init__(self, encoder):
                super().__init__()
                self.encoder = encoder
                h = encoder.out_dim
                self.weight = torch.nn.Parameter(torch.empty(h, h))
                torch.nn.init.xavier_uniform_(self.weight)

        return DGIModel(build_encoder(in_dim, self.params["encoder"]))

    def loss(self, model, batch, run: TrainRun):
        import torch
        import torch.nn.functional as F

        from ..train.engine import LossOutput

        bs = int(batch.batch_size)
        from ..nn.encoders import permute_rows

        perm = torch.randperm(batch.x.size(0), generator=run.generator).to(batch.x.device)
        pos = encode_batch(model.encoder, batch)[:bs]
        neg = encode_batch(model.encoder, batch, x=permute_rows(batch.x, perm))[:bs]
        summary = torch.sigmoid(pos.mean(0))
        ws = model.weight @ summary.to(model.weight.dtype)
        real = F.softplus(-(pos @ ws.to(pos.dtype)).float()).mean()
        corrupt = F.softplus((neg @ ws.to(neg.dtype)).float()).mean()
        return LossOutput(0.5 * (real + corrupt), {"loss_real": real.detach(), "loss_corrupt": corrupt.detach()})
