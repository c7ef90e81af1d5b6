r"""Graph pooling layers (DMoN, MinCut, DiffPool), dense and sparse, in PyTorch Geometric style.

Notation: ``S`` (N x C) is the soft cluster assignment (rows on the simplex, ``softmax(logits / tau)``),
``A`` the adjacency, ``d = A 1`` the (weighted) degrees, ``2m = sum_i d_i``, ``n`` the number of (valid)
nodes, ``C`` the number of clusters. The formulas are those of the reference texts (PyG's
``DMoNPooling`` documentation, Spektral's ``MinCutPool`` / ``DiffPool``, PyAGC's DMoN / MinCut models):

* DMoN (Tsitsulin et al.):   ``X' = S^T X``, ``A' = S^T A S`` (returned with its diagonal removed and
  symmetrically normalised, ``D'^-1/2 A' D'^-1/2``, as PyG does), and
  spectral loss  ``L_s = -1/(2m) Tr(S^T B S)`` with ``B = A - d d^T / 2m``,
  orthogonality  ``L_o = || S^T S / ||S^T S||_F - I_C / sqrt(C) ||_F``,
  collapse       ``L_c = sqrt(C) / n || sum_i S_i ||_F - 1``.
* MinCut (Bianchi et al.):   ``X' = S^T X``, ``A' = S^T A S`` (diagonal removed, normalised), and
  cut loss ``L_cut = - Tr(S^T A S) / Tr(S^T D S)``, orthogonality ``L_o`` as above.
* DiffPool (Ying et al.):    ``X' = S^T Z`` (Z: node embeddings), ``A' = S^T A S`` (not normalised), and
  link loss ``L_lp = ||A - S S^T||_F`` (divided by ``n^2`` when ``normalize``), entropy loss
  ``L_e = 1/n sum_i H(S_i)``.

Dense forms take a batch of graphs padded to N nodes (``x`` B x N x F, ``adj`` B x N x N, optional boolean
``mask`` B x N, as made by :func:`torch_geometric.utils.to_dense_batch` / ``to_dense_adj``) and return
``(s, out, out_adj, *losses)`` like ``torch_geometric.nn.DMoNPooling``. Padded nodes change nothing: their
features, assignment rows and adjacency rows *and columns* are zeroed (with ``torch.where``, so even NaN
padding is harmless), and every per-graph normaliser uses that graph's own node count and edge mass.

Why the dense losses are computed here rather than by PyG's functions (each is checked against PyG in
``tests/test_pooling.py`` wherever PyG's definition coincides):

* ``torch_geometric.nn.DMoNPooling`` builds S inside the module with its own MLP, so there is no
  functional form taking given logits; it applies ``selu`` to ``S^T X`` (the reference formula is
  ``X' = softmax(S)^T X``; ``act='selu'`` reproduces PyG); and with a mask its cluster (collapse) loss
  divides the B per-graph norms by a B x 1 tensor of sizes, averaging a B x B matrix: wrong for graphs of
  different sizes (open bug pyg-team/pytorch_geometric#10148, still in PyG 2.8.1). Everything else agrees
  with PyG to rounding (tested).
* ``torch_geometric.nn.dense.dense_mincut_pool`` matches the formulas (temperature included) but does not
  return S, only returns the batch mean of the losses, trusts padded adjacency entries to be zero, and forms
  the B x N x N degree matrix for ``Tr(S^T D S)`` (here ``sum_i d_i ||S_i||^2``, O(B N C)).
* ``torch_geometric.nn.dense.dense_diff_pool`` is not mask-invariant: its link loss is one Frobenius norm
  over the whole padded batch divided by ``adj.numel() = B N^2`` and its entropy is averaged over all
  ``B N`` slots, padded ones included. Here both are per graph (Spektral's definition: mean over graphs of
  ``||A_g - S_g S_g^T||_F``, and of each graph's mean node entropy), with ``normalize`` dividing graph g's
  link loss by ``n_g^2`` (identical to PyG for a single unpadded graph).

All losses take ``reduction`` = ``'mean'`` (over graphs, PyG's choice), ``'sum'`` or ``'none'`` (shape B).

Sparse single-graph forms (:func:`sparse_dmon_pool`, :func:`sparse_mincut_pool`, :func:`sparse_pool`,
:func:`dmon_loss_sparse`, :func:`mincut_loss_sparse`) take the adjacency as ``edge_index`` (2 x E, optional
``edge_weight``), a torch sparse COO / CSR tensor or a scipy sparse matrix, and never form an N x N dense
matrix: ``A S`` is one CSR x dense product (O(E C)), then ``S^T (A S)``, ``S^T X``, ``S^T S`` and
``S^T d`` are dense products (O(N C^2 + N C F)). Convert the adjacency once with :func:`to_sparse_adj` when
calling them every epoch (an ``edge_index`` is sorted into CSR, O(E log E), on every call), and pass
``symmetric=True`` for undirected graphs (the backward pass then reuses A instead of transposing the CSR
in every step). Measured on this 2-core machine, N = 1M, E = 10M, C = 16, F = 64, float32: edge_index ->
CSR 4-8 s once; ``sparse_dmon_pool`` forward 0.6-0.9 s, backward 2.5 s (0.8-0.9 s with
``symmetric=True``); peak RSS 1.75 GB for the whole script (edge_index, CSR, X, S and gradients).

Mini-batch estimator with global statistics (for DMoN / MinCut trained on node batches). Let ``B`` be a
batch of ``b`` nodes of a graph with ``N`` nodes, ``S_B`` their assignments, ``A_BB`` the adjacency
induced on the batch (local indices), ``d_B`` the batch nodes' degrees *in the whole graph* and ``2m`` the
whole graph's degree sum. The losses use exactly the full-graph formulas restricted to the batch's pairs::

    L_s(B)   = -c_s / (2m) * ( Tr(S_B^T A_BB S_B) - ||S_B^T d_B||^2 / (2m) ),     c_s = (N / b)^2
    L_cut(B) = -c_cut * Tr(S_B^T A_BB S_B) / Tr(S_B^T D_B S_B),                   c_cut = N / b
    L_c(B)   = sqrt(C) / b * ||sum_{i in B} S_i||_F - 1,   L_o(B) = L_o(S_B)

The factors ``c`` apply only when ``num_nodes_total=N`` is given (else ``c = 1``). Under uniform node
sampling a pair (i, j) lies in the batch with probability ~(b/N)^2 and a node with probability b/N, so
``c_s`` makes the two pair sums of ``L_s`` estimates of the full-graph sums (approximately unbiased: the
exact pair probability is b(b-1) / (N(N-1)), and the null model's i = j terms scale by b/N), and
``c_cut`` corrects the ratio's ~b/N shrinkage (a ratio estimator: consistent, not unbiased). The
collapse and orthogonality terms are scale-free averages over the batch and need no correction. With
``B = V`` every estimator equals the full-graph loss exactly. For batches that are not uniform node samples
(clusters, neighbourhoods) leave ``num_nodes_total`` unset: the factors only rescale the gradient anyway.
Usage::

    adj = to_sparse_adj(edge_index, N)                 # once per graph
    deg = sparse_degree(adj); two_m = deg.sum()         # whole-graph statistics
    idx = ...                                           # a batch of node ids
    sub, _ = torch_geometric.utils.subgraph(idx, edge_index, relabel_nodes=True, num_nodes=N)  # ids in idx order
    s = torch.softmax(logits[idx], -1)
    spectral, ortho, collapse = dmon_loss_sparse(s, sub, deg[idx], two_m, symmetric=True)
    mincut, ortho = mincut_loss_sparse(s, sub, deg[idx], symmetric=True)

Row estimator (node batches with their neighbourhoods; :func:`dmon_loss_rows`, :func:`mincut_loss_rows`,
:func:`sampled_adj_rows`). Induced subgraphs of uniform node batches hold few edges on large sparse graphs
(``~E (b / N)^2``: ~10 of 10M edges for b = 1024, N = 1M), so their pair sums are mostly noise. Instead,
write every pair sum as a sum over rows, ``Tr(S^T A S) = sum_i S_i . (A S)_i``, and estimate the rows
``(A S)_i`` of the ``b`` uniformly drawn batch nodes from ``k`` neighbours drawn (with replacement) from
each node's whole-graph adjacency row: ``(A S)_i ~ cnt_i / k * sum_{draws j} A_ij S_j`` (``cnt_i`` = stored
entries of row i), an unbiased estimate. With ``r = N / b``::

    L_s    = -1/(2m) * ( r sum_{i in B} S_i . (A S)_i - r^2 ||S_B^T d_B||^2 / (2m) )
    L_cut  = - sum_{i in B} S_i . (A S)_i / sum_{i in B} d_i ||S_i||^2
    L_c, L_o as above, over the batch rows

``d_B`` are whole-graph degrees and ``2m`` the whole graph's degree sum. The pair term is unbiased; the
null-model term and the ratio are plug-in estimators (bias O(1/b)). With ``B = V`` and exact rows
(``a_s = A S``) they equal the full-graph losses exactly (tested).

Peak memory (bytes; ``v`` = value size, 4 for float32, ``i`` = index size, 4 or 8):

* dense layers: ``v (2 B N^2 + 3 B N C + B N F + B C F + 2 B C^2)`` (the masked adjacency copy, S, A S,
  the outputs; DiffPool adds ``v B N^2`` for ``A - S S^T``); autograd keeps about as much again.
* sparse forms: the CSR adjacency ``i (N + 1) + (i + v) E`` (``+ 16 E`` transient while an ``edge_index``
  is sorted), plus ``v (3 N C + C F + 2 C^2 + N)`` (S, A S, S * A S, outputs, degrees); the backward pass
  adds ``v N C`` (the gradient of S) and, unless ``symmetric=True``, a transposed copy of the CSR,
  ``(i + v) E + i N``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "EPS",
    "DMoNPooling",
    "MinCutPooling",
    "DiffPooling",
    "dense_dmon_pool",
    "dense_mincut_pool",
    "dense_diff_pool",
    "normalize_coarsened_adj",
    "to_sparse_adj",
    "sparse_degree",
    "sparse_pool",
    "sparse_dmon_pool",
    "sparse_mincut_pool",
    "dmon_loss_sparse",
    "mincut_loss_sparse",
    "dmon_loss_rows",
    "mincut_loss_rows",
    "sampled_adj_rows",
    "collapse_loss",
    "orthogonality_loss",
    "NodeScore",
    "cluster_topk",
]

#: the epsilon PyG's dense pooling uses (guards divisions by an empty cluster's degree)
EPS = 1e-15

_REDUCTIONS = ("mean", "sum", "none")


# ------------------------------------------------------------------------------------------- helpers
def _reduce(value: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return value.mean()
    if reduction == "sum":
        return value.sum()
    if reduction == "none":
        return value
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _assignment(s: Tensor, temperature: float) -> Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(s / temperature if temperature != 1.0 else s, dim=-1)


def _dense_inputs(
    x: Tensor, adj: Tensor, s: Tensor, mask: Tensor | None, temperature: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batch dims, softmax, masking. Returns (x, adj, s, n) with n (B,) the valid node counts."""
    x = x.unsqueeze(0) if x.dim() == 2 else x
    adj = adj.unsqueeze(0) if adj.dim() == 2 else adj
    s = s.unsqueeze(0) if s.dim() == 2 else s
    b, n_max, _ = x.shape
    if adj.shape != (b, n_max, n_max) or s.shape[:2] != (b, n_max):
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, adj {tuple(adj.shape)}, s {tuple(s.shape)}")
    if mask is None:
        return x, adj, _assignment(s, temperature), x.new_full((b,), float(n_max))
    m = mask.view(b, n_max).to(torch.bool)
    # torch.where rather than a multiplication: padded rows may hold anything, even inf / NaN (their
    # logits are zeroed before the softmax too, so that no NaN reaches a gradient)
    x = torch.where(m.unsqueeze(-1), x, x.new_zeros(()))
    s = torch.where(m.unsqueeze(-1), s, s.new_zeros(()))
    s = torch.where(m.unsqueeze(-1), _assignment(s, temperature), s.new_zeros(()))
    adj = torch.where(m.unsqueeze(-1) & m.unsqueeze(-2), adj, adj.new_zeros(()))
    return x, adj, s, m.sum(-1).to(x.dtype)


def _mask_features(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero padded rows before a layer computes on them: a NaN / inf there would otherwise reach the
    gradient of its weights (0 * NaN), although the forward outputs ignore those rows."""
    if mask is None:
        return x
    x3 = x.unsqueeze(0) if x.dim() == 2 else x
    m = mask.view(x3.shape[:2]).to(torch.bool).unsqueeze(-1)
    return torch.where(m, x3, x3.new_zeros(())).view(x.shape)


def _safe_sqrt(v: Tensor) -> Tensor:
    """sqrt with a zero (not NaN) gradient at 0."""
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def normalize_coarsened_adj(out_adj: Tensor, remove_self_loops: bool = True) -> Tensor:
    r"""``D^-1/2 A' D^-1/2`` of a coarsened adjacency (C x C or B x C x C), as PyG's DMoN / MinCut pooling.

    With ``remove_self_loops`` (PyG's and Spektral's choice) the diagonal, i.e. each cluster's internal edge
    mass, is zeroed first. ``D`` = row sums; a row with zero sum stays zero (``+ EPS`` like PyG).
    """
    if remove_self_loops:
        out_adj = out_adj - torch.diag_embed(torch.diagonal(out_adj, dim1=-2, dim2=-1))
    d = _safe_sqrt(out_adj.sum(-1)) + EPS
    return out_adj / d.unsqueeze(-1) / d.unsqueeze(-2)


def orthogonality_loss(ss: Tensor) -> Tensor:
    r"""``|| S^T S / ||S^T S||_F - I_C / sqrt(C) ||_F`` from the Gram matrix ``ss = S^T S`` (C x C or B x C x C)."""
    c = ss.size(-1)
    eye = torch.eye(c, dtype=ss.dtype, device=ss.device)
    nrm = torch.linalg.matrix_norm(ss, keepdim=True).clamp_min(EPS)
    return torch.linalg.matrix_norm(ss / nrm - eye / math.sqrt(c))


def collapse_loss(s: Tensor) -> Tensor:
    r"""DMoN's collapse regulariser of one assignment (n x C): ``sqrt(C) / n ||sum_i S_i||_F - 1``.

    0 when the clusters have equal (soft) sizes, ``sqrt(C) - 1`` when everything is in one cluster.
    """
    n, c = s.shape
    return torch.linalg.vector_norm(s.sum(0)) / max(n, 1) * math.sqrt(c) - 1


def _trace(a: Tensor) -> Tensor:
    return torch.diagonal(a, dim1=-2, dim2=-1).sum(-1)


def _act(act: str | Callable[[Tensor], Tensor] | None) -> Callable[[Tensor], Tensor] | None:
    if act is None or callable(act):
        return act
    if act == "selu":
        return F.selu
    from torch_geometric.nn.resolver import activation_resolver

    return activation_resolver(act)


# ------------------------------------------------------------------------------------ dense functional
def dense_dmon_pool(
    x: Tensor,
    adj: Tensor,
    s: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    act: str | Callable[[Tensor], Tensor] | None = None,
    remove_self_loops: bool = True,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Dense DMoN pooling of a batch of graphs, given assignment logits.

    Args:
        x: node features, B x N x F (or N x F).
        adj: adjacency, B x N x N (or N x N); undirected graphs store both directions.
        s: assignment logits, B x N x C; ``S = softmax(s / temperature)``.
        mask: optional B x N boolean mask of valid nodes.
        act: optional activation on ``S^T X`` (``'selu'`` reproduces ``torch_geometric.nn.DMoNPooling``).
        remove_self_loops: zero the diagonal of ``S^T A S`` before normalising it (PyG).
        reduction: ``'mean'`` over graphs (PyG), ``'sum'`` or ``'none'`` (per-graph losses, shape B).

    Returns:
        ``(S, S^T X, normalised S^T A S, spectral_loss, ortho_loss, cluster_loss)``; S is B x N x C with zero
        rows for padded nodes.

    Peak memory: ``v (2 B N^2 + 3 B N C + B N F + 2 B C (F + C))`` bytes (``v`` bytes per value).
    """
    x, adj, s, n = _dense_inputs(x, adj, s, mask, temperature)
    st = s.transpose(1, 2)
    out = st @ x
    fn = _act(act)
    if fn is not None:
        out = fn(out)
    out_adj = st @ adj @ s
    deg = adj.sum(-1)  # B x N
    two_m = deg.sum(-1).clamp_min(EPS)  # B
    ca = (st @ deg.unsqueeze(-1)).squeeze(-1)  # B x C: S^T d
    spectral = -(_trace(out_adj) - (ca * ca).sum(-1) / two_m) / two_m
    ortho = orthogonality_loss(st @ s)
    c = s.size(-1)
    cluster = torch.linalg.vector_norm(s.sum(1), dim=-1) / n.clamp_min(1) * math.sqrt(c) - 1
    out_adj = normalize_coarsened_adj(out_adj, remove_self_loops)
    return (s, out, out_adj, _reduce(spectral, reduction), _reduce(ortho, reduction),
            _reduce(cluster, reduction))


def dense_mincut_pool(
    x: Tensor,
    adj: Tensor,
    s: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    remove_self_loops: bool = True,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Dense MinCut pooling of a batch of graphs, given assignment logits.

    Same as ``torch_geometric.nn.dense.dense_mincut_pool(x, adj, s, mask, temp)`` but returns S first,
    masks the adjacency too and offers per-graph losses (``reduction='none'``).

    Returns:
        ``(S, S^T X, normalised S^T A S (diagonal removed), mincut_loss, ortho_loss)``.

    Peak memory: ``v (2 B N^2 + 3 B N C + B N F + 2 B C (F + C))`` bytes.
    """
    x, adj, s, _ = _dense_inputs(x, adj, s, mask, temperature)
    st = s.transpose(1, 2)
    out = st @ x
    out_adj = st @ adj @ s
    deg = adj.sum(-1)
    den = (deg * (s * s).sum(-1)).sum(-1)  # Tr(S^T D S) = sum_i d_i ||S_i||^2
    mincut = -_trace(out_adj) / den.clamp_min(EPS)
    ortho = orthogonality_loss(st @ s)
    out_adj = normalize_coarsened_adj(out_adj, remove_self_loops)
    return s, out, out_adj, _reduce(mincut, reduction), _reduce(ortho, reduction)


def dense_diff_pool(
    x: Tensor,
    adj: Tensor,
    s: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    normalize: bool = True,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Dense DiffPool of a batch of graphs, given assignment logits (``x`` is the embedding Z to pool).

    Link loss of graph g: ``||A_g - S_g S_g^T||_F`` over its valid nodes, divided by ``n_g^2`` when
    ``normalize`` (PyG divides the norm of the whole padded batch by ``B N^2`` instead, which makes it
    depend on padding); entropy loss: mean over graph g's valid nodes of ``-sum_c S_ic log(S_ic + EPS)``.

    Returns:
        ``(S, S^T X, S^T A S, link_loss, entropy_loss)``; the coarsened adjacency is not normalised
        (DiffPool's definition, as PyG and Spektral).

    Peak memory: ``v (3 B N^2 + 2 B N C + B N F + B C (F + C))`` bytes.
    """
    x, adj, s, n = _dense_inputs(x, adj, s, mask, temperature)
    st = s.transpose(1, 2)
    out = st @ x
    out_adj = st @ adj @ s
    link = torch.linalg.matrix_norm(adj - s @ st)
    if normalize:
        link = link / (n * n).clamp_min(1)
    ent = (-s * torch.log(s + EPS)).sum(-1).sum(-1) / n.clamp_min(1)
    return s, out, out_adj, _reduce(link, reduction), _reduce(ent, reduction)


# --------------------------------------------------------------------------------------- dense modules
class DMoNPooling(nn.Module):
    r"""DMoN pooling layer (Tsitsulin et al.): ``S = softmax(MLP(X) / temperature)``, then
    :func:`dense_dmon_pool`.

    Same constructor and MLP as ``torch_geometric.nn.DMoNPooling`` (its state dict loads here), plus
    ``temperature``, ``act`` (PyG hard-codes ``selu``; the reference formula ``X' = S^T X`` has none, the
    default here) and ``reduction``.

    ``forward(x, adj, mask=None) -> (s, out, out_adj, spectral_loss, ortho_loss, cluster_loss)``.
    """

    def __init__(
        self,
        channels: int | list[int],
        k: int,
        dropout: float = 0.0,
        *,
        temperature: float = 1.0,
        act: str | Callable[[Tensor], Tensor] | None = None,
        remove_self_loops: bool = True,
        reduction: str = "mean",
    ):
        super().__init__()
        from torch_geometric.nn.models.mlp import MLP

        channels = [channels] if isinstance(channels, int) else list(channels)
        self.mlp = MLP(channels + [k], act=None, norm=None)
        self.k, self.dropout, self.temperature = k, dropout, temperature
        self.act, self.remove_self_loops, self.reduction = act, remove_self_loops, reduction

    def reset_parameters(self) -> None:
        self.mlp.reset_parameters()

    def forward(self, x: Tensor, adj: Tensor, mask: Tensor | None = None):
        x = _mask_features(x, mask)
        s = F.dropout(self.mlp(x), self.dropout, training=self.training)
        return dense_dmon_pool(x, adj, s, mask, temperature=self.temperature, act=self.act,
                               remove_self_loops=self.remove_self_loops, reduction=self.reduction)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.mlp.in_channels}, num_clusters={self.k})"


class MinCutPooling(nn.Module):
    r"""MinCut pooling layer (Bianchi et al.): ``S = softmax(MLP(X) / temperature)`` (Spektral's
    ``MinCutPool``: an MLP with hidden layers ``hidden`` and ReLU), then :func:`dense_mincut_pool`.

    ``forward(x, adj, mask=None) -> (s, out, out_adj, mincut_loss, ortho_loss)``.
    """

    def __init__(
        self,
        in_channels: int,
        k: int,
        hidden: list[int] | None = None,
        *,
        dropout: float = 0.0,
        temperature: float = 1.0,
        remove_self_loops: bool = True,
        reduction: str = "mean",
    ):
        super().__init__()
        from torch_geometric.nn.models.mlp import MLP

        self.mlp = MLP([in_channels, *(hidden or []), k], act="relu", norm=None, dropout=dropout)
        self.k, self.temperature = k, temperature
        self.remove_self_loops, self.reduction = remove_self_loops, reduction

    def reset_parameters(self) -> None:
        self.mlp.reset_parameters()

    def forward(self, x: Tensor, adj: Tensor, mask: Tensor | None = None):
        x = _mask_features(x, mask)
        return dense_mincut_pool(x, adj, self.mlp(x), mask, temperature=self.temperature,
                                 remove_self_loops=self.remove_self_loops, reduction=self.reduction)


class DiffPooling(nn.Module):
    r"""DiffPool layer (Ying et al.), as Spektral's ``DiffPool``: ``S = softmax(GCN_pool(A, X) / temperature)``,
    ``Z = act(GCN_embed(A, X))`` (one :class:`torch_geometric.nn.DenseGCNConv` each, self-loops added and
    symmetrically normalised), then :func:`dense_diff_pool` pools Z.

    ``forward(x, adj, mask=None) -> (s, out, out_adj, link_loss, entropy_loss)``; ``out`` is C x ``channels``.
    """

    def __init__(
        self,
        in_channels: int,
        k: int,
        channels: int | None = None,
        *,
        act: str | Callable[[Tensor], Tensor] | None = None,
        temperature: float = 1.0,
        normalize: bool = True,
        reduction: str = "mean",
    ):
        super().__init__()
        from torch_geometric.nn.dense import DenseGCNConv

        self.gnn_pool = DenseGCNConv(in_channels, k)
        self.gnn_embed = DenseGCNConv(in_channels, channels or in_channels)
        self.k, self.act, self.temperature = k, act, temperature
        self.normalize, self.reduction = normalize, reduction

    def reset_parameters(self) -> None:
        self.gnn_pool.reset_parameters()
        self.gnn_embed.reset_parameters()

    def forward(self, x: Tensor, adj: Tensor, mask: Tensor | None = None):
        x = x.unsqueeze(0) if x.dim() == 2 else x
        adj = adj.unsqueeze(0) if adj.dim() == 2 else adj
        if mask is not None:  # DenseGCNConv needs the padded entries zero (degrees of valid nodes)
            m = mask.view(x.shape[:2]).to(torch.bool)
            x = _mask_features(x, mask)
            adj = torch.where(m.unsqueeze(-1) & m.unsqueeze(-2), adj, adj.new_zeros(()))
        s = self.gnn_pool(x, adj, mask)
        z = self.gnn_embed(x, adj, mask)
        fn = _act(self.act)
        if fn is not None:
            z = fn(z)
        return dense_diff_pool(z, adj, s, mask, temperature=self.temperature, normalize=self.normalize,
                               reduction=self.reduction)


# --------------------------------------------------------------------------------------- sparse forms
def to_sparse_adj(
    adj: Any,
    num_nodes: int | None = None,
    edge_weight: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""The adjacency as a torch sparse CSR tensor with ``dtype`` values.

    ``adj`` is one of: an integer ``edge_index`` (2 x E; ``edge_weight`` E, default 1; duplicates are
    summed), a torch sparse COO / CSR tensor, a scipy sparse matrix (its int32 indices are kept, torch's
    CSR kernels take them), or a small dense float N x N tensor (tests). A CSR tensor of the right dtype is
    returned as is, so convert once and pass the result to the sparse functions every epoch.
    Memory: ``i (N + 1) + (i + v) E`` for the result, ``+ 16 E`` transient while an edge_index is sorted.
    """
    if isinstance(adj, Tensor):
        if adj.layout == torch.sparse_csr:
            out = adj
        elif adj.layout == torch.sparse_coo:
            out = adj.coalesce().to_sparse_csr()
        elif adj.layout == torch.strided and not adj.is_floating_point():
            from torch_geometric.utils import to_torch_csr_tensor

            if adj.dim() != 2 or adj.size(0) != 2:
                raise ValueError(f"edge_index must be 2 x E, got {tuple(adj.shape)}")
            if num_nodes is None:
                num_nodes = int(adj.max()) + 1 if adj.numel() else 0
            w = None if edge_weight is None else edge_weight.to(dtype)
            out = to_torch_csr_tensor(adj, w, size=num_nodes)
        elif adj.layout == torch.strided and adj.dim() == 2:
            out = adj.to_sparse_csr()
        else:
            raise TypeError(f"unsupported adjacency tensor: layout {adj.layout}, shape {tuple(adj.shape)}")
    elif hasattr(adj, "tocsr"):  # scipy.sparse
        import numpy as np

        a = adj.tocsr()
        indptr, indices = np.asarray(a.indptr), np.asarray(a.indices)
        if indptr.dtype != indices.dtype:
            indptr = indptr.astype(indices.dtype) if a.nnz < 2**31 else indptr
            indices = indices.astype(indptr.dtype)
        out = torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(indices),
                                      torch.from_numpy(np.asarray(a.data)), size=a.shape)
    else:
        raise TypeError(f"unsupported adjacency type {type(adj).__name__}")
    if out.dtype != dtype:
        out = out.to(dtype)
    if device is not None:
        out = out.to(device)
    return out


def sparse_degree(adj: Tensor) -> Tensor:
    """Row sums ``A 1`` (weighted degrees) of a sparse CSR adjacency (from :func:`to_sparse_adj`), O(E)."""
    return (adj @ torch.ones(adj.size(1), 1, dtype=adj.dtype, device=adj.device)).view(-1)


class _SymmetricSpMM(torch.autograd.Function):
    """``A @ S`` for a symmetric sparse A: the backward is ``A @ grad`` (no transpose of A needed)."""

    @staticmethod
    def forward(ctx, a: Tensor, s: Tensor) -> Tensor:  # type: ignore[override]
        ctx.a = a
        return a @ s

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return None, ctx.a @ grad


def _spmm(a: Tensor, s: Tensor, symmetric: bool) -> Tensor:
    """``A @ S``. Autograd's own backward multiplies by ``A^T``, which for a CSR tensor means transposing it
    (sorting E entries) on every backward pass: ~4x the forward's time at N = 1M, E = 10M. With
    ``symmetric=True`` (undirected graphs, both directions stored) the backward reuses A."""
    if symmetric and s.requires_grad:
        return _SymmetricSpMM.apply(a, s)
    return a @ s


def _sparse_inputs(s: Tensor, adj: Any, edge_weight: Tensor | None) -> Tensor:
    if s.dim() != 2:
        raise ValueError(f"sparse forms take one graph: s must be N x C, got {tuple(s.shape)}")
    a = to_sparse_adj(adj, s.size(0), edge_weight, s.dtype, s.device)
    if a.shape != (s.size(0), s.size(0)):
        raise ValueError(f"adjacency {tuple(a.shape)} does not match s {tuple(s.shape)}")
    return a


def _dmon_terms(
    s: Tensor, a_s: Tensor, degree: Tensor, two_m: Tensor | float | None, num_nodes_total: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    n = s.size(0)
    two_m = degree.sum() if two_m is None else torch.as_tensor(two_m, dtype=s.dtype, device=s.device)
    two_m = two_m.clamp_min(EPS)
    scale = 1.0 if num_nodes_total is None else (num_nodes_total / max(n, 1)) ** 2
    ca = degree.to(s.dtype) @ s  # C: S^T d
    spectral = -scale * ((s * a_s).sum() - (ca * ca).sum() / two_m) / two_m
    ortho = orthogonality_loss(s.t() @ s)
    return spectral, ortho, collapse_loss(s)


def _mincut_terms(
    s: Tensor, a_s: Tensor, degree: Tensor, num_nodes_total: int | None
) -> tuple[Tensor, Tensor]:
    n = s.size(0)
    scale = 1.0 if num_nodes_total is None else num_nodes_total / max(n, 1)
    den = (degree.to(s.dtype) * (s * s).sum(-1)).sum()
    mincut = -scale * (s * a_s).sum() / den.clamp_min(EPS)
    return mincut, orthogonality_loss(s.t() @ s)


def dmon_loss_sparse(
    s: Tensor,
    adj: Any,
    degree: Tensor | None = None,
    two_m: Tensor | float | None = None,
    *,
    edge_weight: Tensor | None = None,
    symmetric: bool = False,
    num_nodes_total: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""DMoN losses of one graph (or of a node batch, with global statistics), from a sparse adjacency.

    Args:
        s: soft assignment (probabilities, not logits), n x C, of the nodes indexing ``adj``.
        adj: adjacency among those nodes (see :func:`to_sparse_adj`): the whole graph, or the subgraph
            induced on a batch in local indices.
        degree: the nodes' degrees in the *whole* graph (n); default: row sums of ``adj``.
        two_m: the whole graph's degree sum ``2m = sum of all entries of A`` (for an unweighted undirected
            edge_index with both directions: its number of columns); default: ``degree.sum()``.
        num_nodes_total: the whole graph's N; when given, the spectral loss is scaled by ``(N / n)^2``
            (uniform-sampling estimator, see the module docstring).
        symmetric: ``adj`` is symmetric (undirected, both directions stored): the backward pass then
            multiplies by A instead of transposing it (~3x faster backward at N = 1M, E = 10M). Wrong
            gradients if set for a non-symmetric A.

    Returns:
        ``(spectral_loss, ortho_loss, cluster_loss)`` (scalars), as :func:`dense_dmon_pool`.

    Time O(E C + n C^2); memory ``v (3 n C + n + 2 C^2)`` plus the CSR (module docstring).
    """
    a = _sparse_inputs(s, adj, edge_weight)
    deg = sparse_degree(a) if degree is None else degree
    return _dmon_terms(s, _spmm(a, s, symmetric), deg, two_m, num_nodes_total)


def mincut_loss_sparse(
    s: Tensor,
    adj: Any,
    degree: Tensor | None = None,
    *,
    edge_weight: Tensor | None = None,
    symmetric: bool = False,
    num_nodes_total: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""MinCut losses ``(mincut_loss, ortho_loss)`` of one graph or node batch, from a sparse adjacency.

    ``-Tr(S^T A S) / Tr(S^T D S)`` with ``D`` = ``degree`` (the nodes' whole-graph degrees; default row sums
    of ``adj``), scaled by ``N / n`` when ``num_nodes_total`` is given (see the module docstring).
    Arguments (``symmetric`` included) as :func:`dmon_loss_sparse`.
    Time O(E C + n C^2); memory ``v (3 n C + n + 2 C^2)`` plus the CSR.
    """
    a = _sparse_inputs(s, adj, edge_weight)
    deg = sparse_degree(a) if degree is None else degree
    return _mincut_terms(s, _spmm(a, s, symmetric), deg, num_nodes_total)


def sampled_adj_rows(s_partner: Tensor, row: Tensor, weight: Tensor, n_rows: int) -> Tensor:
    r"""Estimate of rows of ``A S`` from sampled entries: ``out[row[e]] += weight[e] * s_partner[e]``.

    ``row`` (E_s): which output row each sampled entry belongs to; ``s_partner`` (E_s x C): the assignment of
    its column node; ``weight`` (E_s): ``A_ij * cnt_i / k`` for ``k`` uniform draws with replacement from
    row i's ``cnt_i`` stored entries (unbiased), or ``A_ij`` when row i's entries are all listed (exact).
    Differentiable in ``s_partner``. Memory ``v (n_rows + E_s) C``.
    """
    out = s_partner.new_zeros(n_rows, s_partner.size(-1))
    return out.index_add(0, row, s_partner * weight.to(s_partner.dtype).unsqueeze(-1))


def dmon_loss_rows(
    s: Tensor,
    a_s: Tensor,
    degree: Tensor,
    two_m: Tensor | float,
    *,
    num_nodes_total: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""DMoN losses from a uniform node batch and (estimates of) its rows of ``A S`` (module docstring).

    Args:
        s: soft assignment (probabilities) of the ``b`` batch nodes, b x C.
        a_s: their rows of ``A S`` over the *whole* graph, b x C (exact, or :func:`sampled_adj_rows`).
        degree: their whole-graph (weighted) degrees, b.
        two_m: the whole graph's degree sum.
        num_nodes_total: the whole graph's N (default: b, i.e. the batch is the whole graph).

    Returns ``(spectral_loss, ortho_loss, cluster_loss)``; equal to :func:`dmon_loss_sparse` when the batch
    is the whole graph and ``a_s = A S``. Time and memory O(b C^2).
    """
    n = s.size(0)
    r = 1.0 if num_nodes_total is None else num_nodes_total / max(n, 1)
    two_m = torch.as_tensor(two_m, dtype=s.dtype, device=s.device).clamp_min(EPS)
    ca = r * (degree.to(s.dtype) @ s)  # estimate of S^T d
    spectral = -(r * (s * a_s).sum() - (ca * ca).sum() / two_m) / two_m
    return spectral, orthogonality_loss(s.t() @ s), collapse_loss(s)


def mincut_loss_rows(s: Tensor, a_s: Tensor, degree: Tensor) -> tuple[Tensor, Tensor]:
    r"""MinCut losses ``(mincut_loss, ortho_loss)`` from a uniform node batch and its rows of ``A S``.

    ``-sum_B S_i . (A S)_i / sum_B d_i ||S_i||^2`` (whole-graph degrees ``degree``): numerator and
    denominator estimate ``Tr(S^T A S)`` and ``Tr(S^T D S)`` with the same factor ``N / b``, which cancels.
    Equal to :func:`mincut_loss_sparse` for the whole graph. Time and memory O(b C^2).
    """
    return _mincut_terms(s, a_s, degree, None)


def sparse_pool(
    x: Tensor, adj: Any, s: Tensor, *, edge_weight: Tensor | None = None, symmetric: bool = False
) -> tuple[Tensor, Tensor]:
    r"""``(S^T X, S^T A S)`` of one graph with a sparse adjacency; ``s`` is the soft assignment (n x C).

    Time O(E C + n C (C + F)); memory ``v (2 n C + C F + C^2)`` plus the CSR.
    """
    a = _sparse_inputs(s, adj, edge_weight)
    return s.t() @ x, s.t() @ _spmm(a, s, symmetric)


def sparse_dmon_pool(
    x: Tensor,
    adj: Any,
    s: Tensor,
    *,
    edge_weight: Tensor | None = None,
    symmetric: bool = False,
    temperature: float = 1.0,
    act: str | Callable[[Tensor], Tensor] | None = None,
    remove_self_loops: bool = True,
    degree: Tensor | None = None,
    two_m: Tensor | float | None = None,
    num_nodes_total: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Sparse single-graph :func:`dense_dmon_pool`: ``s`` are logits (N x C), ``adj`` as :func:`to_sparse_adj`.

    Returns ``(S, S^T X, normalised S^T A S, spectral_loss, ortho_loss, cluster_loss)``; equal to the dense
    form of the same graph. ``degree`` / ``two_m`` / ``num_nodes_total`` / ``symmetric`` as
    :func:`dmon_loss_sparse`.
    Time O(E C + N C (C + F)); memory ``v (3 N C + N + C F + 2 C^2)`` plus the CSR.
    """
    s = _assignment(s, temperature)
    a = _sparse_inputs(s, adj, edge_weight)
    deg = sparse_degree(a) if degree is None else degree
    a_s = _spmm(a, s, symmetric)
    spectral, ortho, cluster = _dmon_terms(s, a_s, deg, two_m, num_nodes_total)
    out = s.t() @ x
    fn = _act(act)
    if fn is not None:
        out = fn(out)
    out_adj = normalize_coarsened_adj(s.t() @ a_s, remove_self_loops)
    return s, out, out_adj, spectral, ortho, cluster


def sparse_mincut_pool(
    x: Tensor,
    adj: Any,
    s: Tensor,
    *,
    edge_weight: Tensor | None = None,
    symmetric: bool = False,
    temperature: float = 1.0,
    remove_self_loops: bool = True,
    degree: Tensor | None = None,
    num_nodes_total: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Sparse single-graph :func:`dense_mincut_pool`: ``s`` are logits (N x C).

    Returns ``(S, S^T X, normalised S^T A S, mincut_loss, ortho_loss)``; ``degree`` / ``num_nodes_total`` /
    ``symmetric`` as :func:`mincut_loss_sparse`. Time O(E C + N C (C + F));
    memory ``v (3 N C + N + C F + 2 C^2)`` plus the CSR.
    """
    s = _assignment(s, temperature)
    a = _sparse_inputs(s, adj, edge_weight)
    deg = sparse_degree(a) if degree is None else degree
    a_s = _spmm(a, s, symmetric)
    mincut, ortho = _mincut_terms(s, a_s, deg, num_nodes_total)
    out_adj = normalize_coarsened_adj(s.t() @ a_s, remove_self_loops)
    return s, s.t() @ x, out_adj, mincut, ortho


# ------------------------------------------------------------------------- learned scores, top-k per cluster
class NodeScore(nn.Module):
    r"""Learned node score for TopK / SAG-style selection, e.g. of each cluster's representative nodes.

    * ``gnn=None`` (TopK / gPool, Gao & Ji; Cangea et al.): ``score = act(X p / ||p||)`` with a learned
      vector ``p`` (PyG ``SelectTopK``'s score).
    * ``gnn='graph'`` / ``'gcn'`` / ``'sage'`` / a module (SAGPool, Lee et al.): ``score = act(GNN(X, A))``
      with a one-channel GNN layer (PyG ``SAGPooling``'s default is ``GraphConv``); a module is called as
      ``gnn(x, edge_index)`` (plus ``edge_weight`` when given) and must return N x 1 or N.

    ``act``: ``'tanh'`` (default, Cangea et al.), ``'sigmoid'`` (Gao & Ji's gate) or None.
    ``forward(x, edge_index=None, edge_weight=None) -> score`` (N). Memory ``v N`` besides the GNN's own.
    """

    def __init__(self, in_channels: int, gnn: str | nn.Module | None = None, act: str | None = "tanh"):
        super().__init__()
        self.in_channels = in_channels
        if gnn is None:
            self.weight = nn.Parameter(torch.empty(1, in_channels))
            self.gnn = None
        else:
            self.weight = None
            if isinstance(gnn, str):
                from torch_geometric.nn import GCNConv, GraphConv, SAGEConv

                table = {"graph": GraphConv, "graphconv": GraphConv, "gcn": GCNConv, "sage": SAGEConv}
                if gnn.lower() not in table:
                    raise ValueError(f"gnn must be one of {sorted(table)} or a module, got {gnn!r}")
                gnn = table[gnn.lower()](in_channels, 1)
            self.gnn = gnn
        if act not in (None, "tanh", "sigmoid"):
            raise ValueError(f"act must be 'tanh', 'sigmoid' or None, got {act!r}")
        self.act = act
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            from torch_geometric.nn.inits import uniform

            uniform(self.in_channels, self.weight)
        elif hasattr(self.gnn, "reset_parameters"):
            self.gnn.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor | None = None, edge_weight: Tensor | None = None) -> Tensor:
        if self.gnn is None:
            score = (x @ self.weight.t()).view(-1) / self.weight.norm(p=2, dim=-1)
        else:
            if edge_index is None:
                raise ValueError("a GNN (SAG) score needs edge_index")
            args = (x, edge_index) if edge_weight is None else (x, edge_index, edge_weight)
            score = self.gnn(*args).view(-1)
        if self.act == "tanh":
            return torch.tanh(score)
        if self.act == "sigmoid":
            return torch.sigmoid(score)
        return score


def cluster_topk(
    assignment: Tensor, k: int, score: Tensor | None = None, *, exclusive: bool = True
) -> tuple[Tensor, Tensor]:
    r"""The ``k`` highest-scoring nodes of each cluster (all of a cluster's nodes when it has fewer).

    Args:
        assignment: hard labels (N, integer) or a soft assignment S (N x C).
        score: node scores (N), e.g. from :class:`NodeScore`. Default (soft S only): the node's assignment
            probability to its cluster, ``S[i, argmax_c S_ic]`` (or ``S[i, c]`` when not exclusive).
        exclusive: nodes belong to their argmax cluster only (default). ``False`` (soft S, no ``score``):
            each cluster's top-k by its own column ``S[:, c]``, so a node may represent several clusters.

    Returns:
        ``(node_index, cluster)``: 1-D long tensors, grouped by cluster in increasing order, each group by
        decreasing score. Selection reuses PyG's ``topk`` (``torch_geometric.nn.pool.select.topk``).
        Time O(N log N), memory O(N).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if assignment.is_floating_point():
        if assignment.dim() != 2:
            raise ValueError("a soft assignment must be N x C")
        if not exclusive:
            if score is not None:
                raise ValueError("exclusive=False ranks each column of S; it takes no score")
            kk = min(k, assignment.size(0))
            idx = torch.topk(assignment, kk, dim=0).indices  # kk x C
            c = assignment.size(1)
            cl = torch.arange(c, device=assignment.device).repeat_interleave(kk)
            return idx.t().reshape(-1), cl
        conf, labels = assignment.max(dim=-1)
        if score is None:
            score = conf
    else:
        labels = assignment.view(-1).long()
        if score is None:
            raise ValueError("hard labels need a score to rank nodes by")
    if score.numel() != labels.numel():
        raise ValueError(f"score has {score.numel()} entries, assignment {labels.numel()} nodes")
    from torch_geometric.nn.pool.select.topk import topk

    perm = topk(score.detach().view(-1), k, labels)
    cl = labels[perm]
    # PyG's topk returns groups in cluster order, each sorted by decreasing score; keep it explicit
    order = torch.argsort(cl, stable=True)
    return perm[order], cl[order]
