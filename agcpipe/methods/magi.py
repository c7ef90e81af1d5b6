"""MAGI: modularity-aware graph clustering via contrastive learning (Liu et al., KDD 2024), then KMeans.

MAGI reads modularity maximisation as contrastive learning: node pairs with a positive modularity
coefficient ``B_vu`` are positives, the others negatives. ``B`` is estimated from random walks on
``A + I`` (:class:`~agcpipe.sampling.walks.RandomWalkSampler` with ``self_loops``): from each node ``v``,
``num_walks`` walks of ``walk_length`` steps; ``c_vu`` = visits of ``u`` (:func:`~agcpipe.sampling.walks.
visit_counts`). ``u != v`` is a positive of ``v`` when ``c_vu`` is at least the mean of ``v``'s row --
the mean over its distinct visited nodes plus ``v`` itself counted as 0, as the authors' code (their
``set_diag(0)`` + row mean); a node is never its own positive. Loss (InfoNCE / supervised-contrastive form,
temperature ``tau``, over the embeddings ``z`` of a batch, L2-normalised, min-max scaled per row first
when ``scale_embeddings``):

    L = tau * mean_{v with positives} -1/|P_v| sum_{u in P_v} log( exp(z_v.z_u / tau) / sum_{w != v} exp(z_v.z_w / tau) )

Encoder: a GNN (default 1 GCN layer, 512 units) whose output goes through LeakyReLU with slope
``negative_slope`` (as do its inner layers when ``encoder.activation`` is ``leaky_relu``); input features
dropped out with rate ``dropout`` (the authors' encoder; ``encoder.dropout`` between layers). Embeddings
for clustering: that output, min-max scaled per row when ``scale_embeddings`` (KMeans L2-normalises).

Authors' Cora settings (the defaults; EdisonLeeeee/MAGI ``train_gcn.py``): hidden 512, ``num_walks``
(wt) 100, ``walk_length`` (wl) 2, tau 0.3, negative slope 0.5, dropout 0.1, Adam lr 0.0005, weight decay
0.001, 400 epochs, min-max scaling. PyAGC adds early stopping (patience 50, best epoch kept), also used here.

* **full batch** (``train.mode: auto`` up to 10,000 nodes, the ``N x N`` logits being dense): positives
  from walks from every node, computed once before training; every epoch one step over all nodes.
  Memory ~ ``12 N^2`` bytes (logits, their log-softmax and its gradient) ``+ 4 N (d + 3 h)`` ``+ 24 P``
  for the ``P`` positive pairs, plus the walks once: ``~100 N num_walks walk_length``.
* **mini-batch** (the authors' ``train_sage.py``): ``train.batch_size`` seed nodes; stage one: walks
  from the seeds, and every node a seed visited more often than its mean visit count joins the batch;
  stage two: walks from every node of the expanded batch ``B'``, positives as above among the batch's
  nodes only (visit counts restricted to ``B'``); the GNN embeds ``B'`` over sampled neighbourhoods
  (:mod:`agcpipe.sampling.neighbor`, ``train.fanout``). Memory per step ~ ``12 B'^2`` (logits) ``+ 4 S (d +
  widths)`` for ``S <= B' prod(1 + fanout)`` sampled nodes ``+ ~100 B' num_walks walk_length`` (walks and
  their visit counts). ``B'`` grows with ``num_walks x walk_length``: measured ~10 B with 20 walks of 4
  steps on a synthetic SBM of average degree 20 (B = 1024 -> B' ~ 10,300; 2048 -> ~20,200), so pick
  ``B`` by ``12 B'^2``: 512 seeds keep the logits near 0.3 GB (bench/bench_training.py).
"""
from __future__ import annotations

import numpy as np
from pydantic import Field

from .base import MethodContext
from .registry import register
from .trainable import TRAINABLE_CODE, EncoderParams, TrainableMethod, TrainableParams, TrainRun, build_encoder, encode_batch

#: ``train.mode: auto`` trains full-batch (dense N x N logits) only up to this many nodes
FULL_BATCH_MAX_NODES = 10_000


def _magi_encoder() -> EncoderParams:
    return EncoderParams(type="gcn", hidden=512, layers=1, activation="leaky_relu", last_activation=False)


class MAGIParams(TrainableParams):
    encoder: EncoderParams = Field(
        default_factory=_magi_encoder,
        description="the GNN; its last layer is linear here (last_activation false) and MAGI applies LeakyReLU(negative_slope)",
    )
    negative_slope: float = Field(0.5, ge=0, description="LeakyReLU slope after the encoder (authors' ns)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the input features")
    num_walks: int = Field(100, ge=1, description="random walks per node (wt)")
    walk_length: int = Field(2, ge=1, description="steps per walk (wl)")
    tau: float = Field(0.3, gt=0, description="temperature")
    scale_embeddings: bool = Field(True, description="min-max scale each embedding row before L2 normalisation")
    lr: float = Field(0.0005, gt=0)
    weight_decay: float = Field(0.001, ge=0)
    epochs: int = Field(400, ge=1)


@register(
    "magi",
    family="decoupled",
    params=MAGIParams,
    description="MAGI: modularity-guided contrastive learning with two-stage random walks, then KMeans (Liu et al., 2024)",
    code=TRAINABLE_CODE,
)
class MAGI(TrainableMethod):
    train_defaults = {"batch_size": 2048, "fanout": [10], "patience": 50}

    def plan(self, train_cfg, n_nodes: int):
        from ..config import TrainConfig

        cfg = train_cfg or TrainConfig()
        if cfg.mode == "auto" and n_nodes > min(FULL_BATCH_MAX_NODES, cfg.max_full_batch_nodes):
            cfg = cfg.model_copy(update={"mode": "minibatch"})
        return super().plan(cfg, n_nodes)

    def build_model(self, in_dim: int, ctx):
        import torch
        import torch.nn.functional as F

        p = self.params

        class MAGIModel(torch.nn.Module):
            def __init__(self, encoder):
                super().__init__()
                self.encoder = encoder

            def forward(self, batch) -> torch.Tensor:
                x = _feature_dropout(batch.x, p["dropout"], self.training)
                return F.leaky_relu(encode_batch(self.encoder, batch, x=x), p["negative_slope"])

        encoder = build_encoder(in_dim, p["encoder"])
        for i, act in enumerate(encoder.acts):  # the authors' LeakyReLU slope between layers too
            if isinstance(act, torch.nn.LeakyReLU):
                encoder.acts[i] = torch.nn.LeakyReLU(p["negative_slope"])
        return MAGIModel(encoder)

    # ------------------------------------------------------------------------------ training
    def walker(self, run: TrainRun):
        from ..sampling.walks import RandomWalkSampler

        g = run.ctx.graph
        return RandomWalkSampler(g.indptr, g.indices, self_loops=True, generator=run.generator)

    def batches(self, run: TrainRun):
        import torch

        if run.plan.mode == "full":
            n = run.ctx.graph.n_nodes
            rows, cols = positive_pairs(self.walker(run), torch.arange(n), n, self.params["num_walks"], self.params["walk_length"])
            data = run.full_data
            data.pos_pairs = torch.stack([rows, cols]).to(run.device)
            return [data]
        return _MAGIBatches(self, run)

    def loss(self, model, batch, run: TrainRun):
        from ..train.engine import LossOutput

        z = model(batch)[: int(batch.batch_size)]
        loss = contrastive_loss(self.normalized(z), batch.pos_pairs, self.params["tau"])
        return LossOutput(loss, {})

    def normalized(self, z):
        import torch.nn.functional as F

        if self.params["scale_embeddings"]:
            z = minmax_rows(z)
        return F.normalize(z.float(), p=2, dim=1)

    # ------------------------------------------------------------------------------ embedding
    def embed_model(self, model, ctx: MethodContext) -> np.ndarray:
        """The encoder's output (exact, full graph or layer-wise), LeakyReLU, min-max scaled per row."""
        import torch
        import torch.nn.functional as F

        z = super().embed_model(model, ctx)
        block = 1 << 16
        for s in range(0, z.shape[0], block):
            t = F.leaky_relu(torch.from_numpy(z[s : s + block]), self.params["negative_slope"])
            z[s : s + block] = (minmax_rows(t) if self.params["scale_embeddings"] else t).numpy()
        return z


def minmax_rows(z):
    """Each row scaled to [0, 1]: ``(z - min) / (max - min)`` (the authors' ``scale``)."""
    lo = z.min(dim=1, keepdim=True).values
    hi = z.max(dim=1, keepdim=True).values
    return (z - lo) / (hi - lo + 1e-20)


def _feature_dropout(x, p: float, training: bool):
    """Dropout on dense or sparse CSR features (the CSR keeps its pattern, values dropped and rescaled)."""
    import warnings

    import torch
    import torch.nn.functional as F

    if not training or p == 0:
        return x
    if x.layout == torch.strided:
        return F.dropout(x, p, True)
    if x.layout != torch.sparse_csr:
        x = x.to_sparse_csr()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(), F.dropout(x.values(), p, True), x.shape)


def contrastive_loss(z, pos_pairs, tau: float):
    """MAGI's loss (module docstring) of L2-normalised rows ``z`` (B x h) with positives ``pos_pairs`` (2 x P).

    Memory ~ ``12 B^2`` bytes: the logits, their log-normaliser's saved input and the gradient.
    """
    import torch

    b = z.size(0)
    logits = (z @ z.t()) / tau
    logits.fill_diagonal_(float("-inf"))  # the denominator runs over w != v
    lse = torch.logsumexp(logits, dim=1)
    rows, cols = pos_pairs[0], pos_pairs[1]
    log_prob = logits[rows, cols] - lse[rows]
    counts = torch.bincount(rows, minlength=b)
    has = counts > 0
    if not bool(has.any()):
        return (z.sum() * 0.0).float()  # no positives in this batch: nothing to learn, keep the graph
    per_row = torch.zeros(b, dtype=log_prob.dtype, device=z.device).index_add_(0, rows, log_prob)
    return -(per_row[has] / counts[has]).mean() * tau


def positive_pairs(walker, sources, num_nodes: int, num_walks: int, walk_length: int, members=None):
    """MAGI's modularity positives: ``(rows, cols)`` int64, ``rows`` index ``sources``.

    ``num_walks`` walks of ``walk_length`` steps from each source; ``u`` is a positive of source ``v`` when
    ``u != v`` and its visit count is at least the mean of ``v``'s row over its distinct visited nodes and
    ``v`` (counted 0). ``members``: a sorted node set (mini-batch stage two): only visits to its nodes
    count and ``cols`` index it; default: every node, ``cols`` are node ids.
    """
    import torch

    from ..sampling.walks import visit_counts

    sources = sources.long()
    m = sources.numel()
    walks = walker.walks(sources.repeat(num_walks), walk_length)
    row, node, count = visit_counts(walks, torch.arange(m).repeat(num_walks), num_nodes)
    keep = node != sources[row]
    if members is not None:
        pos = torch.searchsorted(members, node).clamp_max(max(members.numel() - 1, 0))
        keep &= members[pos] == node if members.numel() else torch.zeros_like(keep)
        node = pos
    row, node, count = row[keep], node[keep], count[keep]
    total = torch.zeros(m, dtype=torch.long).index_add_(0, row, count)
    entries = torch.bincount(row, minlength=m) + 1  # + the source's own (zero) entry
    chosen = count * entries[row] >= total[row]  # count >= mean, exactly in integers
    return row[chosen], node[chosen]


def expand_seeds(walker, seeds, num_nodes: int, num_walks: int, walk_length: int):
    """MAGI stage one: the seeds plus, for each seed, the nodes its walks visit more often than the mean
    count over its distinct visited nodes. Returns the sorted unique node ids."""
    import torch

    from ..sampling.walks import visit_counts

    seeds = seeds.long()
    m = seeds.numel()
    walks = walker.walks(seeds.repeat(num_walks), walk_length)
    row, node, count = visit_counts(walks, torch.arange(m).repeat(num_walks), num_nodes)
    total = torch.zeros(m, dtype=torch.long).index_add_(0, row, count)
    distinct = torch.bincount(row, minlength=m)
    frequent = node[count * distinct[row] > total[row]]  # count > mean, exactly in integers
    return torch.unique(torch.cat([seeds, frequent]))


class _MAGIBatches:
    """Mini-batches: seeds expanded by two-stage walks, positives among the expanded batch, one sampled
    subgraph (``Data`` with the expanded batch first, ``batch_size = B'``, ``pos_pairs`` local ids)."""

    def __init__(self, method: MAGI, run: TrainRun):
        self.method, self.run = method, run
        self.walker = method.walker(run)
        self.sampler = run.neighbor_sampler()
        self.nodes = run.node_batches()

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self):
        import torch

        from ..sampling.neighbor import subgraph_batch

        p, run = self.method.params, self.run
        g = run.ctx.graph
        n = g.n_nodes
        for seeds in self.nodes:
            batch = expand_seeds(self.walker, seeds, n, p["num_walks"], p["walk_length"])
            rows, cols = positive_pairs(self.walker, batch, n, p["num_walks"], p["walk_length"], members=batch)
            data, local = subgraph_batch(self.sampler, run.x, batch, g.weights)
            data.pos_pairs = torch.stack([local[rows], local[cols]])
            yield data

