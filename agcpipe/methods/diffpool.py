r"""DiffPool as a node clustering method (Ying et al., "Hierarchical Graph Representation Learning with
Differentiable Pooling", NeurIPS 2018) -- a joint method.

The assignment GNN (the encoder, then a linear head to ``k`` logits) gives the soft assignment of every
node, ``S = softmax(GNN_pool(X, A))`` (``N x k``), trained with DiffPool's two unsupervised losses only
(no pooled-graph task), the definitions of :func:`agcpipe.nn.pooling.dense_diff_pool` (Spektral's, and
PyG's for one graph):

    L_lp = ||A - S S^T||_F / N^2   (without the division when ``normalize`` is off)
    L_e  = 1/N sum_i H(S_i) = -1/N sum_i sum_c S_ic log S_ic
    L    = link_weight L_lp + entropy_weight L_e

Clusters: ``argmax_c S_ic``, confidence ``max_c S_ic`` (:class:`~.joint.JointMethod`).

``A - S S^T`` is never formed: ``||A - S S^T||_F^2 = ||A||_F^2 - 2 tr(S^T A S) + ||S^T S||_F^2``, with
``A S`` one sparse product (:func:`agcpipe.nn.pooling.sparse_pool`, which returns ``S^T S`` and
``S^T A S``).

* **full batch**: the exact loss above, ``A`` as a sparse CSR matrix built once. Memory ~ ``4 N (d +
  widths + 3 k)`` + the prepared GCN adjacency and ``A`` (``~12 nnz`` bytes each) + ``4 k^2``.
* **mini-batch**: ``B`` seeds drawn uniformly (a permutation per epoch) and, for every seed with a
  neighbour, one neighbour ``j_i`` drawn uniformly from its row; seeds and partners are embedded from
  their fan-out neighbourhoods (one sampled subgraph, the GAE pair batches' layout). The squared norm is
  estimated without bias, term by term:

      tr(S^T A S)      ~  N / B  sum_{i in seeds} deg_i a_{i j_i} S_i . S_{j_i}
      ||S^T S||_F^2    ~  N / B  sum_{i in B} ||S_i||^4 + N (N - 1) / (B (B - 1)) sum_{i != i' in B} (S_i . S_i')^2

  (``deg_i`` = stored neighbours of ``i``, ``a`` the edge weight; ``||A||_F^2`` is known exactly), then
  ``L_lp = sqrt(max(estimate, 0)) / N^2`` and ``L_e`` the mean entropy of the seeds. Memory per step
  ``~4 S (d + widths) + 4 B k`` for ``S`` sampled nodes (``S <= 2 B prod(1 + fanout)``) + ``4 k^2``; never
  ``N x N`` (nor ``N x k``).

Defaults: the paper's GraphSAGE-style assignment GNN is replaced by a GCN (the encoders of this package),
two layers of 64 with ReLU; ``link_weight`` = ``entropy_weight`` = 1 and ``normalize`` as DiffPool / PyG;
Adam, lr 0.01, 200 epochs. DiffPool has no published node-clustering figure; what was measured on Cora /
CiteSeer is in ``flows/configs/{cora,citeseer}_diffpool.yaml``.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from .joint import JOINT_CODE, JointMethod
from .registry import register
from .trainable import EncoderParams, TrainableParams, TrainRun, encode_batch


def _diffpool_encoder() -> EncoderParams:
    return EncoderParams(type="gcn", hidden=64, layers=2, activation="relu", last_activation=True)


class DiffPoolParams(TrainableParams):
    encoder: EncoderParams = Field(default_factory=_diffpool_encoder)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(200, ge=1)
    link_weight: float = Field(1.0, ge=0, description="weight of the link-prediction loss ||A - S S^T||_F")
    entropy_weight: float = Field(1.0, ge=0, description="weight of the assignment entropy loss")
    normalize: bool = Field(True, description="divide the link loss by N^2 (DiffPool / PyG)")


# ------------------------------------------------------------------------------------------- losses
def link_sq_full(s, adj, a_sq: float, symmetric: bool = True):
    """``||A - S S^T||_F^2`` of a whole graph from the sparse CSR adjacency ``adj`` (``a_sq = ||A||_F^2``;
    ``symmetric``: an undirected graph, the backward reuses ``A``)."""
    from ..nn.pooling import sparse_pool

    sts, stas = sparse_pool(s, adj, s, symmetric=symmetric)  # (S^T S, S^T A S)
    return a_sq - 2.0 * stas.diagonal().sum() + (sts * sts).sum()


def link_sq_estimate(s_seeds, s_i, s_j, pair_w, n_total: int, a_sq: float):
    """Unbiased estimate of ``||A - S S^T||_F^2`` from uniform seeds (rows ``s_seeds``, ``B x k``) and one
    uniformly drawn neighbour per seed (pairs ``(s_i, s_j)`` with weights ``pair_w = deg_i a_ij``); see the
    module docstring."""
    b = s_seeds.size(0)
    scale = n_total / max(b, 1)
    trace = scale * (pair_w * (s_i * s_j).sum(1)).sum()
    gram = s_seeds.t() @ s_seeds
    diag = (s_seeds * s_seeds).sum(1).pow(2).sum()
    off = (gram * gram).sum() - diag
    pairs = n_total * (n_total - 1) / max(b * (b - 1), 1)
    return a_sq - 2.0 * trace + scale * diag + pairs * off


def entropy(s):
    """Mean row entropy ``-1/n sum_i sum_c S_ic log S_ic`` (``log(S + EPS)`` as DiffPool / PyG)."""
    from ..nn.pooling import EPS

    return (-s * (s + EPS).log()).sum(1).mean()


@register(
    "diffpool",
    family="joint",
    params=DiffPoolParams,
    description="DiffPool as node clustering: assignment GNN trained with link-prediction + entropy losses (Ying et al., 2018)",
    code=JOINT_CODE,
)
class DiffPool(JointMethod):
    train_defaults: ClassVar[dict] = {"batch_size": 2048, "fanout": [10, 10], "patience": 0}

    def build_model(self, in_dim: int, ctx):
        import torch

        from .trainable import build_encoder

        class DiffPoolModel(torch.nn.Module):
            def __init__(self, encoder, k: int):
                super().__init__()
                self.encoder = encoder
                self.head = torch.nn.Linear(encoder.out_dim, k)

        return DiffPoolModel(build_encoder(in_dim, self.params["encoder"]), int(ctx.n_clusters))

    def batches(self, run: TrainRun):
        import torch

        from ..nn.pooling import to_sparse_adj
        from ..sampling.neighbor import as_tensor

        g = run.ctx.graph
        w = None if g.weights is None else np.asarray(g.weights, dtype=np.float64)
        run.a_sq = float(g.indices.shape[0]) if w is None else float((w * w).sum())  # type: ignore[attr-defined]
        if run.plan.mode == "full":
            data = run.full_data
            ip, ind = as_tensor(g.indptr).long(), as_tensor(g.indices).long()  # read-only views, never written
            val = torch.ones(ind.numel()) if w is None else torch.from_numpy(w.astype(np.float32))
            data.adj = to_sparse_adj(torch.sparse_csr_tensor(ip, ind, val, (g.n_nodes, g.n_nodes)), device=run.device)
            return [data]
        return _SeedPairBatches(run)

    def loss(self, model, batch, run: TrainRun):
        from ..train.engine import LossOutput

        z = encode_batch(model.encoder, batch)
        s = model.head(z).float().softmax(-1)
        n = run.ctx.graph.n_nodes
        if "adj" in batch:
            sq = link_sq_full(s, batch.adj, run.a_sq, symmetric=not run.ctx.graph.directed)
            ent = entropy(s)
        else:
            seeds = s[batch.seed_rows]
            sq = link_sq_estimate(seeds, s[batch.pair_rows[0]], s[batch.pair_rows[1]], batch.pair_w.to(s.device), n, run.a_sq)
            ent = entropy(seeds)
        link = sq.clamp_min(0.0).sqrt()
        if self.params["normalize"]:
            link = link / float(n) ** 2
        total = self.params["link_weight"] * link + self.params["entropy_weight"] * ent
        return LossOutput(total, {"loss_link": link.detach(), "loss_entropy": ent.detach()})


class _SeedPairBatches:
    """Uniform seeds + one uniformly drawn neighbour per seed, embedded together from one sampled subgraph.

    Each batch is a ``Data`` (:func:`agcpipe.sampling.neighbor.subgraph_batch`) with ``seed_rows`` (local
    rows of the B seeds), ``pair_rows`` (2 x m: seed row, partner row, for the seeds with a neighbour) and
    ``pair_w`` (m: ``deg_i * a_ij``). Memory ``~40 B`` besides the subgraph.
    """

    def __init__(self, run: TrainRun):
        self.run = run
        self.sampler = run.neighbor_sampler()
        self.nodes = run.node_batches()
        g = run.ctx.graph
        self.weights = None if g.weights is None else np.asarray(g.weights)

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self):
        import torch

        from ..sampling.neighbor import sample_neighbors, single_thread, subgraph_batch

        run, sampler = self.run, self.sampler
        for seeds in self.nodes:
            with single_thread():
                has, pos = sample_neighbors(sampler.indptr, sampler.deg, seeds, 1, run.generator, replace=True)
                partner = sampler.indices[pos].long()
                w = sampler.deg[seeds[has]].float()
                if self.weights is not None:
                    w = w * torch.from_numpy(np.asarray(self.weights[pos.numpy()], dtype=np.float32))
            b = seeds.numel()
            data, local = subgraph_batch(sampler, run.x, torch.cat([seeds, partner]), run.ctx.graph.weights)
            data.seed_rows = local[:b]
            data.pair_rows = torch.stack([local[has], local[b:]])
            data.pair_w = w
            yield data

