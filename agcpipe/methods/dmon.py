r"""DMoN: Deep Modularity Networks (Tsitsulin, Palowitch, Perozzi & Müller, "Graph Clustering with Graph
Neural Networks", JMLR 2023). Joint: clusters are the head's argmax.

A GNN encoder embeds the nodes, ``Z = E(X, A)``; a centroid head gives the soft assignment
``S = softmax(Z W^T)`` (k x h centres ``W``, PyAGC's ``DMoNClusterHead``). The loss is the spectral
modularity loss plus the collapse regulariser (:mod:`agcpipe.nn.pooling`):

    L_s = -1/(2m) Tr(S^T B S),   B = A - d d^T / (2m)          (= -Q of the soft partition)
    L_c = sqrt(k) / N || sum_i S_i ||_F - 1
    L   = L_s + lam L_c

Settings (PyAGC's benchmark, whose Cora figures are the published ones here: NMI 43.84, ARI 33.35): a
1-layer GCN with 64 outputs and no activation after it, Xavier-initialised centres, lam 1, Adam lr 0.001,
weight decay 1e-5, at most 1000 epochs with early stopping (patience 50) on the training loss. (The
original DMoN code adds SeLU after the GCN and dropout 0.5 on the cluster logits; PyAGC's reproduction,
which these defaults follow, does not.)

* **full batch**: ``A S`` is one sparse product over the whole adjacency (``dmon_loss_sparse``, which
  never forms ``B``: ``Tr(S^T B S) = Tr(S^T A S) - ||S^T d||^2 / 2m``). Memory: the encoder's
  (``4 N d + ~20 (nnz + N) + ~8 N h``) ``+ 12 nnz`` (loss adjacency) ``+ ~20 N k``.
* **mini-batch** (PyAGC has none): uniform seed batches, each seed's row of ``A S`` estimated from
  ``neighbors`` draws of its whole-graph adjacency row, and the loss ``dmon_loss_rows`` with the seeds'
  *whole-graph* degrees, the whole graph's ``2m`` and node sums scaled by ``N / b`` -- an estimate of
  the full-graph loss, not the modularity of the sampled subgraph. Memory ``~28 N`` plus per step
  ``4 S_U (d + 2 h) + ~12 b k_d k`` (see :mod:`agcpipe.methods._graph_objective`).
"""
from __future__ import annotations

from pydantic import Field

from ._graph_objective import GRAPH_OBJECTIVE_CODE, GraphObjectiveMethod, Rows, neighbors_field
from .joint import JOINT_CODE
from .registry import register
from .trainable import EncoderParams, TrainableParams, TrainRun


def pyagc_linear_gcn(out: int = 64) -> EncoderParams:
    """PyAGC's Cora encoder for DMoN / Neuromap: one GCN layer, no activation after it."""
    return EncoderParams(type="gcn", hidden=out, layers=1, activation="identity", last_activation=False)


class DMoNParams(TrainableParams):
    encoder: EncoderParams = Field(default_factory=pyagc_linear_gcn)
    lam: float = Field(1.0, ge=0, description="weight of the collapse regulariser")
    lr: float = Field(0.001, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    epochs: int = Field(1000, ge=1, description="at most this many epochs (early stopping, patience 50)")
    neighbors: int = neighbors_field()


@register(
    "dmon",
    family="joint",
    params=DMoNParams,
    description="DMoN: GNN + soft assignment trained on spectral modularity + collapse regularisation (Tsitsulin et al., 2023)",
    code=(*JOINT_CODE, *GRAPH_OBJECTIVE_CODE),
)
class DMoN(GraphObjectiveMethod):
    def objective(self, rows: Rows, run: TrainRun):
        from ..nn.pooling import dmon_loss_rows, dmon_loss_sparse
        from ..train.engine import LossOutput

        st = rows.stats
        if rows.full:
            spectral, _, collapse = dmon_loss_sparse(rows.s, rows.adj, st.degree, st.two_m, symmetric=st.symmetric)
        else:
            spectral, _, collapse = dmon_loss_rows(rows.s, rows.adj_rows(), rows.degree, st.two_m, num_nodes_total=st.n_nodes)
        total = spectral + self.params["lam"] * collapse
        return LossOutput(total, {"loss_spectral": spectral.detach(), "loss_collapse": collapse.detach()})
