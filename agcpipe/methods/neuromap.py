r"""Neuromap: the map equation as a differentiable loss (Blöcker, Tan & Scholtes, "The Map Equation Goes
Neural: Mapping Network Flows with Graph Neural Networks", NeurIPS 2024). Joint: clusters are the head's
argmax.

A GNN encoder embeds the nodes, ``Z = E(X, A)``; a centroid head gives ``S = softmax(Z W^T)``. The loss is the
two-level map equation (expected description length, in bits, of a random walk coded with the soft
modules ``S``) plus, as in PyAGC, DMoN's collapse regulariser.

**Flow** (computed once per graph, O(E) per power iteration, never dense): PageRank with "smart"
teleportation to links, ``T = D_out^-1 A``, ``e = A^T 1 / W`` (``W = sum_ij A_ij``),

    p <- alpha e + (1 - alpha) (T^T p + (sum of p over nodes without out-links) e),   from p = e,

for ``n_iters`` iterations at most (stopping once the L1 change is below 1e-12; on an undirected graph
``p = d / 2m`` is the fixed point and the first iterate). The edge flow is
``F_uv = alpha A_uv / W + (1 - alpha) p_u A_uv / d_u = r_u A_uv`` with the per-node factor
``r_u = alpha / W + (1 - alpha) p_u / d_u``: ``F`` is ``A`` with rows rescaled, so ``F S = r * (A S)`` and
only ``r`` (N floats) is stored.

**Map equation** of the module flow matrix ``C = S^T F S`` (k x k): ``enter_m = sum_{n != m} C_nm``,
``exit_m = sum_{n != m} C_mn``, ``q = sum_m enter_m``, module flow ``p_m = sum_n C_nm``, and

    L_map = q log q - sum_m enter_m log enter_m - sum_m exit_m log exit_m - sum_u p_u log p_u
            + sum_m (exit_m + p_m) log(exit_m + p_m)          (log base 2; 0 log 0 = 0)
    L     = L_map + lam (sqrt(k) / N ||sum_i S_i||_F - 1)

Settings (PyAGC's benchmark, whose Cora figures are the published ones here: NMI 46.98, ARI 36.69): a
1-layer GCN with 64 outputs and no activation after it, alpha 0.15, n_iters 100, Adam lr 0.001, weight
decay 1e-5, at most 1000 epochs with early stopping (patience 50) on the training loss; PyAGC's default
lam is 1 (5 for Cora).

* **full batch**: ``C = S^T (r * (A S))``, one sparse product over the whole adjacency. Memory: the
  encoder's (``4 N d + ~20 (nnz + N) + ~8 N h``) ``+ 12 nnz + 8 N`` (adjacency, ``r``, ``p``) ``+ ~20 N k``.
* **mini-batch** (PyAGC has none): uniform seed batches; each seed's row of ``F S`` is estimated from
  ``neighbors`` draws of its whole-graph adjacency row times its *whole-graph* flow factor ``r_u``, and
  ``C ~ N / b * S_B^T (F S)_B`` enters the map equation (a plug-in estimate; ``sum p log p`` is the whole
  graph's). Memory ``~36 N`` plus per step ``4 S_U (d + 2 h) + ~12 b k_d k``.
"""
from __future__ import annotations

import numpy as np
from pydantic import Field

from ._graph_objective import GRAPH_OBJECTIVE_CODE, GraphObjectiveMethod, GraphStats, Rows, neighbors_field, xlog2x
from .dmon import pyagc_linear_gcn
from .joint import JOINT_CODE
from .registry import register
from .trainable import EncoderParams, TrainableParams, TrainRun


class NeuromapParams(TrainableParams):
    encoder: EncoderParams = Field(default_factory=pyagc_linear_gcn)
    lam: float = Field(1.0, ge=0, description="weight of the collapse regulariser (PyAGC; 0 = the paper's plain map equation)")
    alpha: float = Field(0.15, gt=0, lt=1, description="teleportation probability of the PageRank flow")
    n_iters: int = Field(100, ge=1, description="power iterations (at most) for the PageRank flow")
    lr: float = Field(0.001, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    epochs: int = Field(1000, ge=1, description="at most this many epochs (early stopping, patience 50)")
    neighbors: int = neighbors_field()


def pagerank_flow(graph, alpha: float = 0.15, n_iters: int = 100, tol: float = 1e-12) -> tuple[np.ndarray, np.ndarray, int]:
    """PageRank with teleportation to links on the stored adjacency (see the module docstring).

    Returns ``(p, r, iterations)``: visit rates ``p`` (float64 N, sums to 1), the flow factor ``r``
    (float64 N, ``F_uv = r_u A_uv``; 0 for nodes without out-links) and the iterations run. One scipy CSR
    product per iteration (O(E)); memory ``~56 N`` besides the memory-mapped graph, plus ``8 nnz`` while
    weighted degrees are summed and, for a directed graph, a transposed copy of the CSR (``12 nnz``).
    """
    a = graph.to_scipy()
    w_out = np.asarray(graph.degrees(), dtype=np.float64)
    total = float(w_out.sum())
    if total <= 0:
        from ..errors import InputError

        raise InputError("neuromap: the graph has no edges, so there is no flow for the map equation")
    w_in = np.asarray(a.sum(axis=0), dtype=np.float64).ravel()
    e = w_in / total
    inv = np.divide(1.0, w_out, out=np.zeros_like(w_out), where=w_out > 0)
    dangling = w_out <= 0
    p = e.copy()
    at = a.T.tocsr() if graph.directed else a  # A^T (A itself when undirected)
    it = 0
    for it in range(1, n_iters + 1):
        nxt = alpha * e + (1 - alpha) * (np.asarray(at @ (p * inv), dtype=np.float64) + p[dangling].sum() * e)
        delta = float(np.abs(nxt - p).sum())
        p = nxt
        if delta < tol:
            break
    r = np.where(w_out > 0, alpha / total + (1 - alpha) * p * inv, 0.0)
    return p, r, it


def map_equation(c, p_log_p: float):
    """Two-level map equation (bits) of the module flow matrix ``c`` (k x k); ``p_log_p = sum_u p_u log2 p_u``."""
    import torch

    diag = torch.diagonal(c)
    col = c.sum(0)
    enter = col - diag
    exit_ = c.sum(1) - diag
    q = enter.sum()
    return xlog2x(q) - xlog2x(enter).sum() - xlog2x(exit_).sum() - p_log_p + xlog2x(exit_ + col).sum()


@register(
    "neuromap",
    family="joint",
    params=NeuromapParams,
    description="Neuromap: GNN + soft assignment trained on the differentiable map equation with PageRank flow (Blöcker et al., 2024)",
    code=(*JOINT_CODE, *GRAPH_OBJECTIVE_CODE),
)
class Neuromap(GraphObjectiveMethod):
    def prepare(self, stats: GraphStats, run: TrainRun) -> None:
        import torch

        p, r, _ = pagerank_flow(run.ctx.graph, self.params["alpha"], self.params["n_iters"])
        self._flow_factor = torch.from_numpy(r.astype(np.float32)).to(run.device)
        nz = p[p > 0]
        self._p_log_p = float((nz * np.log2(nz)).sum())

    def objective(self, rows: Rows, run: TrainRun):
        from ..nn.pooling import collapse_loss
        from ..train.engine import LossOutput

        fs = rows.adj_rows(self._flow_factor)  # rows of F S
        c = rows.scale * (rows.s.t() @ fs)
        codelength = map_equation(c, self._p_log_p)
        collapse = collapse_loss(rows.s)
        total = codelength + self.params["lam"] * collapse
        return LossOutput(total, {"loss_codelength": codelength.detach(), "loss_collapse": collapse.detach()})
