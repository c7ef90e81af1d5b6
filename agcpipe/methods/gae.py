"""GAE: graph auto-encoder (Kipf & Welling, "Variational Graph Auto-Encoders", NeurIPS-W 2016), then KMeans.

A GCN encoder maps features to ``Z``; an inner-product decoder scores node pairs, ``sigma(z_i . z_j)``;
the loss is the binary cross-entropy of observed edges against as many uniformly drawn node pairs
(negative sampling, PyG's ``GAE.recon_loss``; a drawn pair that happens to be an edge is kept as a
negative, a vanishing fraction on sparse graphs):

    L = mean_{(i,j) in E} -log sigma(z_i . z_j) + mean_{(i,k) random} -log(1 - sigma(z_i . z_k))

* **full batch**: ``Z`` for the whole graph per epoch, every stored edge a positive, fresh negatives each
  epoch. Memory ~ ``4 N (d + widths) + 40 nnz``.
* **mini-batch**: an epoch visits every node once as a seed (batches of ``train.batch_size``): each seed
  gets one uniformly drawn neighbour as its positive, and ``neg_ratio`` other seeds of the batch as its
  negatives (the seeds are a uniform sample, so these are uniform pairs needing no extra nodes); seeds and
  positives are sampled together (fan-out neighbourhoods, :mod:`agcpipe.sampling.neighbor`), so every
  scored node has its complete sampled receptive field. Memory per step ~ ``4 S (d + widths)`` for
  ``S`` sampled nodes, ``S <= 2 B prod(1 + fanout)``; never ``N x N`` or ``E x hidden``.

Embeddings are the encoder's output ``Z``; clustering is post-hoc KMeans (the default ``cluster``).
"""
from __future__ import annotations

from pydantic import Field

from .registry import register
from .trainable import TRAINABLE_CODE, EncoderParams, TrainableMethod, TrainableParams, TrainRun, build_encoder, encode_batch


def _gae_encoder() -> EncoderParams:
    return EncoderParams(type="gcn", hidden=256, layers=2, out=64, activation="relu", last_activation=False)


class GAEParams(TrainableParams):
    encoder: EncoderParams = Field(default_factory=_gae_encoder)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(200, ge=1)
    neg_ratio: int = Field(1, ge=1, description="negative pairs per positive")


@register(
    "gae",
    family="decoupled",
    params=GAEParams,
    description="graph auto-encoder (GCN encoder, inner-product decoder), then KMeans (Kipf & Welling, 2016)",
    code=TRAINABLE_CODE,
)
class GAE(TrainableMethod):
    train_defaults = {"batch_size": 1024, "fanout": [10, 10], "patience": 0}

    def build_model(self, in_dim: int, ctx):
        import torch

        class GAEModel(torch.nn.Module):
            def __init__(self, encoder):
                super().__init__()
                self.encoder = encoder

        return GAEModel(build_encoder(in_dim, self.params["encoder"]))

    def batches(self, run: TrainRun):
        import numpy as np
        import torch

        if run.plan.mode == "full":
            data = run.full_data
            g = run.ctx.graph
            ip = np.asarray(g.indptr, dtype=np.int64)
            rows = torch.repeat_interleave(torch.arange(g.n_nodes), torch.from_numpy(np.diff(ip)))
            data.pos_edge_index = torch.stack([rows, torch.from_numpy(np.asarray(g.indices, dtype=np.int64))]).to(run.device)
            return [data]
        return _PairBatches(run, self.params["neg_ratio"])

    def loss(self, model, batch, run: TrainRun):
        from ..train.engine import LossOutput

        z = encode_batch(model.encoder, batch)
        loss_pos, loss_neg = recon_loss(z, batch, self.params["neg_ratio"], run.generator)
        return LossOutput(loss_pos + loss_neg, {"loss_pos": loss_pos.detach(), "loss_neg": loss_neg.detach()})


def recon_loss(z, batch, neg_ratio: int, generator):
    """GAE's edge reconstruction loss of a batch from :meth:`GAE.batches`: ``(loss_pos, loss_neg)``.

    ``z``: the encoder's rows of the batch (full graph, or the seed rows of a :class:`_PairBatches` batch).
    Full batch: every edge (``batch.pos_edge_index``) against ``neg_ratio`` times as many uniform pairs;
    mini-batch: the batch's ``pos_pairs`` / ``neg_pairs``.
    """
    import torch
    import torch.nn.functional as F

    if "pos_edge_index" in batch:  # full batch: every edge, fresh uniform negatives
        pos = batch.pos_edge_index
        m = pos.size(1) * neg_ratio
        neg = torch.randint(batch.num_nodes, (2, m), generator=generator).to(z.device)
    else:
        pos, neg = batch.pos_pairs, batch.neg_pairs
    pos_score = (z[pos[0]] * z[pos[1]]).sum(-1)
    neg_score = (z[neg[0]] * z[neg[1]]).sum(-1)
    return F.softplus(-pos_score.float()).mean(), F.softplus(neg_score.float()).mean()  # -log sigma(s), -log(1 - sigma(s))


class _PairBatches:
    """Mini-batches for link objectives: seeds + one sampled neighbour each + random negatives, one subgraph.

    Each batch is a ``Data`` (see :func:`agcpipe.sampling.neighbor.subgraph_batch`) with ``pos_pairs`` and
    ``neg_pairs`` (2 x m local ids, all among the first ``batch_size`` rows).
    """

    def __init__(self, run: TrainRun, neg_ratio: int):
        self.run, self.neg_ratio = run, neg_ratio
        self.sampler = run.neighbor_sampler()
        self.nodes = run.node_batches()

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self):
        import torch

        from ..sampling.neighbor import sample_neighbors, single_thread, subgraph_batch

        run, sampler = self.run, self.sampler
        g = run.ctx.graph
        for seeds in self.nodes:
            with single_thread():
                has, pos = sample_neighbors(sampler.indptr, sampler.deg, seeds, 1, run.generator, replace=True)
                partner = sampler.indices[pos].long()
                b = seeds.numel()
                # negatives within the batch: seed i with seed i + r (mod B), r uniform in 1..B-1 per round;
                # the seeds are a uniform random sample, so these are uniform random pairs, and they need
                # no neighbourhoods of their own
                shifts = torch.randint(1, max(b, 2), (self.neg_ratio,), generator=run.generator)
                first = torch.arange(b).repeat(self.neg_ratio)
                second = (first + shifts.repeat_interleave(b)) % b
            data, local = subgraph_batch(sampler, run.x, torch.cat([seeds, partner]), g.weights)
            data.pos_pairs = torch.stack([local[has], local[b:]])
            data.neg_pairs = torch.stack([local[first], local[second]])
            yield data
