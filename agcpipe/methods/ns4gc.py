"""NS4GC: node-similarity-guided contrastive graph clustering (Liu et al., TKDE 2024), then KMeans.

Two augmented views (feature-column masking + edge dropping, :mod:`agcpipe.nn.augment`) go through one
shared GCN encoder whose outputs are L2-normalised, ``Z1``, ``Z2``; their similarity matrix is
``S = Z1 Z2^T``. The objective shapes ``S`` into a reliable node-similarity matrix:

    L = L_ali + lam L_nei + gam L_spa
    L_ali = -1/N sum_i S_ii                                   (the two views of a node agree)
    L_nei = -1/|E| sum_{(i,j) in E} S_ij                      (neighbours are similar)
    L_spa = mean_{i != j, (i,j) not in E} sigmoid((S_ij - s) / tau)   (other pairs fall below s)

``E`` = the stored edge entries of the (unaugmented) graph, self-loops excluded. Embeddings for
clustering are the L2-normalised encoder output on the unaugmented graph; post-hoc KMeans.

Settings (the authors' Cora parameters, github.com/Cloudy1225/NS4GC params.txt): 2-layer GCN 256-64 with no
activation after the last layer (``Z`` then L2-normalised), Adam lr 1e-3, weight decay 1e-5, 200 epochs,
``lam = gam = 1``, ``s = 0.6``, ``tau = 0.1``, edge dropping 0.3 and feature masking 0.2 in both views.
The authors use SELU between the layers, which :mod:`agcpipe.nn.encoders` does not offer: ELU here (SELU is
a scaled ELU).

* **full batch** (exact, as the paper): ``L_spa`` over all ``N^2 - N - |E|`` pairs, computed as the sum
  over all pairs minus the diagonal and the edges, over blocks of ``R = 2^24 / N`` rows of ``S`` with
  activation checkpointing (a block is recomputed in the backward pass), so memory stays
  ``O(R N)`` (~64 MB per block, a few blocks' worth at once) -- never ``N x N`` beyond one block -- but the
  time is ``O(N^2 h)`` per epoch. Memory ~ ``4 N d`` (features) + per view ``~21 nnz + 12 (nnz + N)``
  (kept edges, normalised adjacency) + ``4 N (256 + 2 * 64) * 2`` (layer outputs) + ``16 nnz`` (the edge
  list of ``L_nei``) + ``~3 * 4 R N`` (a block's ``S``, sigmoid and gradient). Hence ``train.mode: auto``
  trains full-batch only up to 50,000 nodes (``EXACT_MAX_NODES``), mini-batch above.
* **mini-batch**: an epoch visits every node once as a seed, in batches of ``B``; each seed also brings
  one uniformly drawn neighbour (its partner); seeds and partners are sampled together (``train.fanout``
  neighbours per layer) and both views augment that subgraph. ``L_ali`` is over the seeds; ``L_nei`` over
  the (seed, partner) pairs weighted by the seed's degree (so it estimates the mean over edges, not over
  nodes); ``L_spa`` over the ``B x B`` seed pairs minus the diagonal and the seed pairs that are edges of
  the graph (found in the CSR, so none is missed): the seeds are a uniform sample, so these are uniform
  non-neighbour pairs. Memory per step ~ ``4 S (d + 2 (256 + 64))`` per view for ``S`` sampled nodes
  (``S <= 2 B prod(1 + fanout)``) + ``12 B^2`` (``S``, sigmoid, gradient) + ``4 N`` (a global-to-seed id
  map); never ``N x N``.
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from ._two_view import TWO_VIEW_CODE, Rate, TwoViewMethod, TwoViewParams, encoder_model
from .base import MethodContext
from .registry import register
from .trainable import EncoderParams, TrainRun, build_encoder

#: ``train.mode: auto`` trains full-batch (exact O(N^2 h) sparsity term) up to this many nodes
EXACT_MAX_NODES = 50_000
#: elements of one block of rows of S in the full-batch sparsity term (64 MB of float32)
BLOCK_ELEMENTS = 1 << 24


def _ns4gc_encoder() -> EncoderParams:
    return EncoderParams(type="gcn", hidden=256, layers=2, out=64, activation="elu", last_activation=False)


class NS4GCParams(TwoViewParams):
    encoder: EncoderParams = Field(default_factory=_ns4gc_encoder)
    lam: float = Field(1.0, ge=0, description="weight of the neighbour term L_nei")
    gam: float = Field(1.0, ge=0, description="weight of the sparsity term L_spa")
    s: float = Field(0.6, ge=-1, le=1, description="similarity threshold of the sparsity term")
    tau: float = Field(0.1, gt=0, description="temperature of the sparsity term")
    feature_mask: tuple[Rate, Rate] = Field((0.2, 0.2), description="feature-column masking rate of view 1 and view 2")
    edge_drop: tuple[Rate, Rate] = Field((0.3, 0.3), description="edge dropping rate of view 1 and view 2")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    epochs: int = Field(200, ge=1)


def sigmoid_sum(z1, z2, s: float, tau: float, block_elements: int = BLOCK_ELEMENTS):
    """``sum_ij sigmoid((z1_i . z2_j - s) / tau)`` over all pairs, by blocks of rows (checkpointed)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    def block(a, b):
        return torch.sigmoid((a @ b.T - s) / tau).sum()

    rows = max(1, block_elements // max(z2.size(0), 1))
    if rows >= z1.size(0):
        return block(z1, z2)
    total = z1.new_zeros(())
    for start in range(0, z1.size(0), rows):
        total = total + checkpoint(block, z1[start : start + rows], z2, use_reentrant=False)
    return total


@register(
    "ns4gc",
    family="decoupled",
    params=NS4GCParams,
    description="NS4GC (two views, similarity alignment + neighbour + sparsity terms), then KMeans (Liu et al., 2024)",
    code=TWO_VIEW_CODE,
)
class NS4GC(TwoViewMethod):
    train_defaults = {"batch_size": 2048, "fanout": [10, 10], "patience": 0}
    exact_max_nodes: ClassVar[int] = EXACT_MAX_NODES

    def plan(self, train_cfg, n_nodes: int):
        from ..config import TrainConfig

        cfg = train_cfg or TrainConfig()
        if cfg.mode == "auto" and n_nodes > self.exact_max_nodes:
            cfg = cfg.model_copy(update={"mode": "minibatch"})
        return super().plan(cfg, n_nodes)

    def build_model(self, in_dim: int, ctx):
        return encoder_model(build_encoder(in_dim, self.params["encoder"]))

    def batches(self, run: TrainRun):
        import numpy as np
        import torch

        if run.plan.mode == "full":
            data = super().batches(run)[0]
            g = run.ctx.graph
            ip = np.asarray(g.indptr, dtype=np.int64)
            rows = torch.repeat_interleave(torch.arange(g.n_nodes), torch.from_numpy(np.diff(ip)))
            cols = torch.from_numpy(np.asarray(g.indices, dtype=np.int64))
            off = rows != cols
            data.pairs = torch.stack([rows[off], cols[off]]).to(run.device)
            return [data]
        return _SeedPartnerBatches(run)

    def loss(self, model, batch, run: TrainRun):
        import torch
        import torch.nn.functional as F

        from ..train.engine import LossOutput

        p = self.params
        z1, z2 = self.encode_views(model, batch, run)
        z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        if "pairs" in batch:  # full batch: every node, every edge, every other pair
            n = z1.size(0)
            ali = -(z1 * z2).sum(1).mean()
            src, dst = batch.pairs
            s_edges = (z1[src] * z2[dst]).sum(1)
            nei = -s_edges.mean() if s_edges.numel() else z1.new_zeros(())
            diag = (z1 * z2).sum(1)
            total = sigmoid_sum(z1, z2, p["s"], p["tau"])
            excluded = torch.sigmoid((diag - p["s"]) / p["tau"]).sum() + torch.sigmoid((s_edges - p["s"]) / p["tau"]).sum()
            count = n * n - n - s_edges.numel()
        else:  # mini-batch: seeds first, partners after
            b = int(batch.n_seeds)
            a, c = z1[:b], z2[:b]
            ali = -(a * c).sum(1).mean()
            i, j = batch.partner_pairs
            w = batch.partner_weight
            nei = -(w * (z1[i] * z2[j]).sum(1)).sum() / w.sum() if w.numel() else z1.new_zeros(())
            sig = torch.sigmoid((a @ c.T - p["s"]) / p["tau"])
            u, v = batch.seed_edges
            total = sig.sum()
            excluded = sig.diagonal().sum() + sig[u, v].sum()
            count = b * b - b - u.numel()
        spa = (total - excluded) / max(count, 1)
        loss = ali + p["lam"] * nei + p["gam"] * spa
        return LossOutput(loss, {"loss_ali": ali.detach(), "loss_nei": nei.detach(), "loss_spa": spa.detach()})

    def embed_model(self, model, ctx: MethodContext):
        """The encoder's output, L2-normalised (the paper's embedding)."""
        import numpy as np

        z = super().embed_model(model, ctx)
        norm = np.linalg.norm(z, axis=1, keepdims=True)
        return (z / np.maximum(norm, 1e-12)).astype(np.float32)


class _SeedPartnerBatches:
    """Mini-batches of seeds + one sampled neighbour each, sampled together as one subgraph.

    Each batch is a ``Data`` (:func:`agcpipe.sampling.neighbor.subgraph_batch`, seeds first) with
    ``n_seeds``; ``partner_pairs`` (2 x m local ids: seed, its partner) with ``partner_weight`` (the
    seed's degree); ``seed_edges`` (2 x m' local seed ids: every edge of the graph between two seeds,
    self-loops excluded, from the CSR).
    """

    def __init__(self, run: TrainRun):
        import torch

        self.run = run
        self.sampler = run.neighbor_sampler()
        self.nodes = run.node_batches()
        self.seed_id = torch.full((run.ctx.graph.n_nodes,), -1, dtype=torch.int32)

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self):
        import torch

        from ..sampling.neighbor import expand_ranges, sample_neighbors, single_thread, subgraph_batch

        run, sampler = self.run, self.sampler
        g = run.ctx.graph
        for seeds in self.nodes:
            b = seeds.numel()
            with single_thread():
                has, pos = sample_neighbors(sampler.indptr, sampler.deg, seeds, 1, run.generator, replace=True)
                partner = sampler.indices[pos].long()
                deg = sampler.deg[seeds]
                # edges among the seeds, from their complete CSR rows
                nbr = sampler.indices[expand_ranges(sampler.indptr[seeds], deg)].long()
                row = torch.repeat_interleave(torch.arange(b), deg)
                self.seed_id[seeds] = torch.arange(b, dtype=torch.int32)
                col = self.seed_id[nbr].long()
                self.seed_id[seeds] = -1
                inside = (col >= 0) & (col != row)
            data, local = subgraph_batch(sampler, run.x, torch.cat([seeds, partner]), g.weights)
            data.n_seeds = b
            data.partner_pairs = torch.stack([local[has], local[b:]])
            data.partner_weight = deg[has].float()
            data.seed_edges = torch.stack([row[inside], col[inside]])
            yield data
