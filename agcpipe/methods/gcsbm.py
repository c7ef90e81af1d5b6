r"""GCSBM: community detection by a stochastic block model likelihood on GNN assignments (Arliss & Mueller,
"Differentiable Community Detection with Graph Neural Networks and Stochastic Block Models", LoG 2025).
Joint: clusters are the head's argmax.

A GNN encoder embeds the nodes, ``Z = E(X, A)``; a centroid head gives the soft partition
``P = softmax(Z W^T)``. The block matrix is its maximum-likelihood estimate given ``P`` (not a parameter):
community sizes ``n = P^T 1``, edge counts ``M = P^T A P`` (``A`` binary: stored entries, both directions
of an undirected edge), ``Theta = M / (n n^T)``. Edge probabilities ``pi_uv = P_u Theta P_v^T`` (degree
corrected: ``phi_u phi_v P_u Theta P_v^T`` with ``phi_u = (P_u . n) d_u / (P_u . delta)``,
``delta = P^T d``, clipped to 1 for the Bernoulli model). With ``E`` the stored entries and ``N_eta``
``eta |E|`` uniformly drawn node pairs (negative sampling), the variants are

    bernoulli(-dc):  L_SBM = mean_E -ln pi_uv     + 1/eta mean_{N_eta} -ln(1 - pi_uv)
    poisson(-dc):    L_SBM = mean_E -(ln pi_uv - pi_uv) + 1/eta mean_{N_eta} pi_uv
    match:           L_SBM = -Tr(P^T A P Theta) / |E|        (graph matching; no sampling)

and ``L = L_SBM + alpha ||1 - diag(Theta)||_2`` (PyAGC's implementation of the paper's
``m^-1 L_SBM + alpha ||1_k - diag(Theta)||``; probabilities are clipped to ``[1e-7, 1 - 1e-7]``). Drawn
negatives are uniform pairs of distinct nodes and may be edges (a vanishing fraction on sparse graphs;
PyAGC rejects them with PyG's ``negative_sampling``). Edge weights are ignored (a binary SBM).

Settings: the paper's defaults as in PyAGC (variant bernoulli, eta 3, alpha 1); PyAGC publishes no
benchmark configuration for GCSBM, so the encoder and optimiser default to the DMoN / Neuromap ones
(1-layer GCN with 64 outputs, Adam lr 0.001, weight decay 1e-5, at most 1000 epochs, patience 50).
Measured on Cora (seeds 0-4): these defaults end in a degenerate partition (NMI 0.5, negative modularity;
every variant below 10 NMI with alpha 1), because ``||1 - diag(Theta)||`` rewards tiny dense blocks and
the likelihood alone ranks degree groups above the classes; degree-corrected Poisson with alpha 0.01 and
lr 0.01 reaches 24.2 (``flows/configs/cora_gcsbm.yaml`` lists every variant).

* **full batch**: ``M`` from one sparse product ``A P``; the likelihood gathers ``P`` at both ends of every
  stored entry and of ``eta nnz`` pairs. Memory: the encoder's ``+ 12 nnz + ~20 N k + 8 (1 + eta) nnz k``.
* **mini-batch**: uniform seed batches with ``neighbors`` drawn entries each: ``M ~ N / b P_B^T (A P)_B``
  and ``n``, ``delta`` scaled node sums over the seeds (whole-graph degrees), positives = the drawn
  entries weighted by ``cnt_u`` (a weighted mean estimating the mean over all entries), negatives = pairs
  of seeds. Memory ``~28 N`` plus per step ``4 S_U (d + 2 h) + ~12 (1 + eta) b k_d k``.
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from ._graph_objective import GRAPH_OBJECTIVE_CODE, GraphObjectiveMethod, Rows, neighbors_field
from .dmon import pyagc_linear_gcn
from .joint import JOINT_CODE
from .registry import register
from .trainable import EncoderParams, TrainableParams, TrainRun

#: clip of the edge probabilities (float32: 1 - 1e-15 would round to 1 and log(1 - pi) to -inf)
PI_EPS = 1e-7
EPS = 1e-15


class GCSBMParams(TrainableParams):
    encoder: EncoderParams = Field(default_factory=pyagc_linear_gcn)
    variant: Literal["bernoulli", "poisson", "bernoulli-dc", "poisson-dc", "match"] = "bernoulli"
    eta: float = Field(3.0, gt=0, description="negative sampling ratio: eta drawn node pairs per positive entry")
    alpha: float = Field(1.0, ge=0, description="weight of the regulariser ||1 - diag(Theta)||")
    lr: float = Field(0.001, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    epochs: int = Field(1000, ge=1, description="at most this many epochs (early stopping, patience 50)")
    neighbors: int = neighbors_field()


def _wmean(v, w):
    return v.mean() if w is None else (v * w).sum() / w.sum().clamp_min(EPS)


@register(
    "gcsbm",
    family="joint",
    params=GCSBMParams,
    description="GCSBM: GNN + soft partition trained on a stochastic block model likelihood (Arliss & Mueller, 2025)",
    code=(*JOINT_CODE, *GRAPH_OBJECTIVE_CODE),
)
class GCSBM(GraphObjectiveMethod):
    weighted_objective = False

    def objective(self, rows: Rows, run: TrainRun):
        import torch

        from ..train.engine import LossOutput

        p = self.params
        variant, eta = p["variant"], p["eta"]
        s = rows.s
        n = rows.node_sum().clamp_min(EPS)  # community sizes
        m = rows.scale * (s.t() @ rows.adj_rows())  # edge counts between communities
        theta = m / torch.outer(n, n).clamp_min(EPS)
        reg = torch.linalg.vector_norm(1.0 - torch.diagonal(theta))
        if variant == "match":
            likelihood = -(m * theta.t()).sum() / max(rows.stats.nnz, 1)
        else:
            dc = variant.endswith("-dc")
            phi = None
            if dc:
                deg = rows.stats.degree
                delta = rows.node_sum(deg).clamp_min(EPS)  # degree mass per community

                def phi(s_x, ids):
                    f = (s_x @ n) * deg[ids].to(s_x.dtype) / (s_x @ delta).clamp_min(EPS)
                    return f.clamp(max=1.0) if variant.startswith("bernoulli") else f

            def prob(s_a, s_b, ia, ib):
                pi = ((s_a @ theta) * s_b).sum(-1)
                if phi is not None:
                    pi = phi(s_a, ia) * pi * phi(s_b, ib)
                return pi.clamp(PI_EPS, 1 - PI_EPS)

            s_i, s_j, w, i, j = rows.pairs()
            pos = prob(s_i, s_j, i, j)
            n_neg = max(1, int(math.ceil(eta * pos.numel())))
            a_s, b_s, ia, ib = rows.random_pairs(n_neg, run.generator)
            neg = prob(a_s, b_s, ia, ib)
            if variant.startswith("bernoulli"):
                loss_pos = _wmean(-torch.log(pos), w)
                loss_neg = (-torch.log1p(-neg)).mean()
            else:
                loss_pos = _wmean(-(torch.log(pos) - pos), w)
                loss_neg = neg.mean()
            likelihood = loss_pos + loss_neg / eta
        total = likelihood + p["alpha"] * reg
        return LossOutput(total, {"loss_likelihood": likelihood.detach(), "loss_reg": reg.detach()})
