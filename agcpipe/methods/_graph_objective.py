r"""Shared machinery of the joint methods with a graph objective on a soft assignment (DMoN, MinCut,
Neuromap, GCSBM): model, head, whole-graph statistics, full-batch and mini-batch loss inputs.

**Model.** ``Z = encoder(X, A)`` (any :class:`~agcpipe.nn.encoders.Encoder`), and a centroid head
``S = softmax(Z W^T / tau)`` with ``W`` (k x h) Xavier-initialised and no bias (PyAGC's cluster heads:
``softmax(Z C^T)`` with learnable "cluster centres" ``C``). Clusters are ``argmax S`` with confidence
``max S`` (:class:`~agcpipe.methods.joint.JointMethod` reads the head at cluster and assign time).

**Whole-graph statistics** (:class:`GraphStats`, computed once per training run, O(N + E)): the weighted
out-degrees ``d`` of the stored adjacency ``A`` (canonical CSR: no self-loops unless kept; undirected graphs
store both directions), ``2m = sum_i d_i``, the stored entries per row ``cnt`` and ``N``.

**What a loss sees** (:class:`Rows`): the assignment of a set of rows of the graph and the means to form
``(A S)`` for those rows.

* full batch: all ``N`` rows; ``A S`` is one sparse CSR x dense product over the whole adjacency
  (:func:`agcpipe.nn.pooling.to_sparse_adj`, built once; the backward reuses ``A`` when it is symmetric).
* mini-batch (:class:`RowBatches`): an epoch visits every node once as a seed (``train.batch_size`` uniform
  seeds per step). Each seed ``i`` draws ``neighbors`` entries of its *whole-graph* adjacency row with
  replacement (weight ``A_ij cnt_i / k``: an unbiased estimate of its row of ``A S``,
  :func:`agcpipe.nn.pooling.sampled_adj_rows`); the encoder embeds seeds and drawn partners together from
  their fan-out neighbourhoods (:func:`agcpipe.sampling.neighbor.subgraph_batch`). Losses scale node sums
  by ``N / b`` and use whole-graph degrees, ``2m`` and (Neuromap) PageRank flow, so each batch loss
  estimates the full-graph loss (module docstring of :mod:`agcpipe.nn.pooling`, "Row estimator").

Peak memory (bytes), ``h`` = widest encoder layer, ``k`` clusters:

* full batch: the encoder's (``4 N d`` features, ``~20 (nnz + N)`` GCN adjacency, ``~8 N h`` activations and
  gradients) ``+ 12 nnz + 8 N`` (loss adjacency) ``+ ~20 N k`` (S, A S, gradients);
* mini-batch: ``~28 N`` (degrees, row counts, sampler offsets) plus, per step with ``b`` seeds and ``k_d``
  draws each, ``U <= b (1 + k_d)`` embedded nodes: ``4 S_U (d + 2 h)`` for their ``S_U`` sampled
  neighbourhood nodes and ``~12 b k_d k`` for the draws; never ``N x k`` or ``N x N``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from .joint import JointMethod
from .trainable import TrainRun, build_encoder, encode_batch

#: extra train-stage code of every method built on this module (pass with JOINT_CODE)
GRAPH_OBJECTIVE_CODE = ("agcpipe.methods._graph_objective",)


def neighbors_field(default: int = 10):
    return Field(default, ge=1, description="mini-batch: adjacency entries drawn per seed node (with replacement) to estimate its row of A S")


# ------------------------------------------------------------------------------------------- statistics
@dataclass
class GraphStats:
    """Whole-graph statistics the losses use (torch tensors on the training device)."""

    n_nodes: int
    degree: Any  # float32 N: weighted out-degree (row sums of A; entry counts when unweighted)
    two_m: float  # sum of all entries of A
    count: Any  # int64 N: stored entries per row
    nnz: int
    symmetric: bool  # undirected graph (A symmetric)

    @classmethod
    def of(cls, graph, *, weighted: bool = True, device=None) -> "GraphStats":
        import torch

        cnt = np.diff(np.asarray(graph.indptr, dtype=np.int64))
        deg = graph.degrees() if weighted else cnt.astype(np.float64)  # O(N + E)
        return cls(
            n_nodes=graph.n_nodes,
            degree=torch.from_numpy(deg.astype(np.float32)).to(device),
            two_m=float(deg.sum()),
            count=torch.from_numpy(cnt).to(device),
            nnz=graph.nnz,
            symmetric=not graph.directed,
        )


# ------------------------------------------------------------------------------------------- loss inputs
@dataclass
class Rows:
    """The rows a loss is computed on: all N (full batch) or a uniform node batch (mini-batch).

    ``s``: their soft assignment (n x k); ``stats``: whole-graph statistics; ``ids``: their global node ids
    (None = all N in order); ``scale``: ``N / n``. Full batch: ``adj`` (the sparse CSR A). Mini-batch: the
    drawn entries, ``row`` (index into ``s``), ``s_partner`` (assignment of the drawn column node),
    ``partner_ids`` (its global id) and ``weight`` (``A_ij cnt_i / draws``).
    """

    s: Any
    stats: GraphStats
    ids: Any = None
    scale: float = 1.0
    adj: Any = None
    row: Any = None
    s_partner: Any = None
    partner_ids: Any = None
    weight: Any = None

    @property
    def full(self) -> bool:
        return self.ids is None

    @property
    def n(self) -> int:
        return int(self.s.size(0))

    def take(self, values):
        """Per-node whole-graph ``values`` (N) for these rows."""
        return values if self.full else values[self.ids]

    @property
    def degree(self):
        return self.take(self.stats.degree)

    def adj_rows(self, row_factor=None):
        """``(A S)`` for these rows, exact (full batch) or estimated (mini-batch), optionally scaled per row
        by ``row_factor`` (N values, e.g. Neuromap's flow factor)."""
        from ..nn.pooling import _spmm, sampled_adj_rows

        if self.full:
            out = _spmm(self.adj, self.s, self.stats.symmetric)
        else:
            out = sampled_adj_rows(self.s_partner, self.row, self.weight, self.n)
        if row_factor is not None:
            out = out * self.take(row_factor).to(out.dtype).unsqueeze(-1)
        return out

    def node_sum(self, values=None):
        """Estimate of ``sum_i values_i S_i`` over all N nodes (``values`` N, default 1): k."""
        s = self.s if values is None else self.s * self.take(values).to(self.s.dtype).unsqueeze(-1)
        return self.scale * s.sum(0)

    def pairs(self):
        """The adjacency entries as ``(s_i, s_j, w, i, j)`` (``i``, ``j``: global node ids). Full batch: every
        stored entry, ``w = None`` (weight 1 each). Mini-batch: the drawn entries with ``w = cnt_i``, so that
        a ``w``-weighted mean over the draws estimates the mean over all stored entries."""
        import torch

        if self.full:
            crow = self.adj.crow_indices()
            i = torch.repeat_interleave(torch.arange(self.n, device=crow.device), crow[1:] - crow[:-1])
            j = self.adj.col_indices().long()
            return self.s[i], self.s[j], None, i, j
        i = self.ids[self.row]
        return self.s[self.row], self.s_partner, self.stats.count[i].to(self.s.dtype), i, self.partner_ids

    def random_pairs(self, m: int, generator):
        """``m`` uniform random node pairs among these rows as ``(s_i, s_j, i, j)`` (global ids); in a
        mini-batch, pairs of distinct seeds (the seeds are a uniform sample, so these are uniform pairs)."""
        import torch

        n = self.n
        a = torch.randint(n, (m,), generator=generator)
        b = (a + torch.randint(1, max(n, 2), (m,), generator=generator)) % n
        a, b = a.to(self.s.device), b.to(self.s.device)
        ia, ib = (a, b) if self.full else (self.ids[a], self.ids[b])
        return self.s[a], self.s[b], ia, ib


# ------------------------------------------------------------------------------------------- batches
class RowBatches:
    """Mini-batches of uniform seeds with ``draws`` adjacency entries each (see the module docstring).

    Each batch is the PyG ``Data`` of :func:`~agcpipe.sampling.neighbor.subgraph_batch` over seeds and
    partners (seeds first, rows ``0..b-1``), plus ``seed_ids`` (global ids of the seeds), ``pair_row``
    (seed row of each draw), ``pair_col`` (local row of the drawn partner) and ``pair_weight``
    (``A_ij cnt_i / draws``; ``A_ij = 1`` when ``weighted`` is false).
    """

    def __init__(self, run: TrainRun, draws: int, stats: GraphStats, *, weighted: bool = True):
        import torch

        from ..sampling.neighbor import as_tensor

        self.run, self.draws, self.stats = run, draws, stats
        g = run.ctx.graph
        self.sampler = run.neighbor_sampler()
        self.nodes = run.node_batches()
        self.indptr = torch.from_numpy(np.asarray(g.indptr, dtype=np.int64))
        self.count = self.indptr[1:] - self.indptr[:-1]
        self.indices = as_tensor(g.indices)
        self.weights = as_tensor(g.weights) if (g.weights is not None and weighted) else None

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self):
        import torch

        from ..sampling.neighbor import sample_neighbors, single_thread, subgraph_batch

        run, k = self.run, self.draws
        g = run.ctx.graph
        for seeds in self.nodes:
            with single_thread():
                has, pos = sample_neighbors(self.indptr, self.count, seeds, k, run.generator, replace=True)
                partner = self.indices[pos].long()
                w = self.count[seeds[has]].to(torch.float32) / k
                if self.weights is not None:
                    w = w * self.weights[pos].float()
            data, local = subgraph_batch(self.sampler, run.x, torch.cat([seeds, partner]), g.weights)
            b = seeds.numel()
            data.seed_ids = seeds
            data.pair_row = local[has]  # seeds are distinct and come first: local[i] == i
            data.pair_col = local[b:]
            data.pair_weight = w
            yield data


# ------------------------------------------------------------------------------------------- the base
class GraphObjectiveMethod(JointMethod):
    """Encoder + centroid head trained on a graph objective of ``S`` (subclasses implement :meth:`objective`)."""

    train_defaults = {"batch_size": 2048, "fanout": [10], "patience": 50}
    #: whether the objective reads edge weights (False: every stored entry counts 1, e.g. a binary SBM)
    weighted_objective: ClassVar[bool] = True

    # ---------------------------------------------------------------- to implement
    def objective(self, rows: Rows, run: TrainRun):
        """The loss (:class:`~agcpipe.train.engine.LossOutput`) of ``rows``."""
        raise NotImplementedError

    def prepare(self, stats: GraphStats, run: TrainRun) -> None:
        """Once per training run, before the first batch (e.g. Neuromap's PageRank flow)."""

    # ---------------------------------------------------------------- model
    @property
    def temperature(self) -> float:
        return float(self.params.get("temperature", 1.0))

    def build_model(self, in_dim: int, ctx):
        import torch

        encoder = build_encoder(in_dim, self.params["encoder"])
        head = torch.nn.Linear(encoder.out_dim, int(ctx.n_clusters), bias=False)
        torch.nn.init.xavier_uniform_(head.weight)

        class GraphObjectiveModel(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.encoder, self.head = encoder, head

        return GraphObjectiveModel()

    def model_spec(self, in_dim: int, ctx) -> dict[str, Any]:
        return {**super().model_spec(in_dim, ctx), "n_clusters": int(ctx.n_clusters)}

    def head_probs(self, model, z):
        logits = model.head(z)
        t = self.temperature
        return (logits / t if t != 1.0 else logits).softmax(dim=-1)

    # ---------------------------------------------------------------- training
    def batches(self, run: TrainRun):
        import torch

        from ..nn.pooling import to_sparse_adj

        g = run.ctx.graph
        weighted = self.weighted_objective
        stats = GraphStats.of(g, weighted=weighted, device=run.device)
        self._stats = stats
        self.prepare(stats, run)
        if run.plan.mode == "full":
            data = run.full_data
            adj = to_sparse_adj(g.to_scipy().copy(), device=run.device)  # a writable copy (the CSR is memory-mapped)
            if not weighted and g.weights is not None:
                adj = torch.sparse_csr_tensor(adj.crow_indices(), adj.col_indices(), torch.ones_like(adj.values()), adj.shape)
            data.loss_adj = adj
            return [data]
        return RowBatches(run, int(self.params["neighbors"]), stats, weighted=weighted)

    def loss(self, model, batch, run: TrainRun):
        z = encode_batch(model.encoder, batch)
        s = self.head_probs(model, z)
        stats = self._stats
        if "seed_ids" not in batch:  # full batch
            rows = Rows(s=s, stats=stats, adj=batch.loss_adj)
        else:
            b = int(batch.seed_ids.numel())
            rows = Rows(
                s=s[:b],
                stats=stats,
                ids=batch.seed_ids,
                scale=stats.n_nodes / b,
                row=batch.pair_row,
                s_partner=s[batch.pair_col],
                partner_ids=batch.n_id[batch.pair_col],
                weight=batch.pair_weight,
            )
        return self.objective(rows, run)


def xlog2x(x):
    """``x log2 x`` with ``0 log 0 = 0`` and a finite gradient near 0."""
    import torch

    return x * torch.log2(x.clamp_min(1e-30))
