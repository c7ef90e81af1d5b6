r"""Global readouts per graph (batch vector) and per cluster (hard labels or a soft assignment S).

* :func:`global_readout` — sum / mean / max per graph: PyG's ``global_add_pool`` / ``global_mean_pool`` /
  ``global_max_pool`` (``batch=None``: the whole input is one graph).
* :func:`dense_readout` — the same over a padded dense batch (B x N x F with a mask), e.g. the output of a
  dense pooling layer.
* :func:`cluster_readout` — sum / mean / max of node features per cluster. Hard labels go through the PyG
  pools with the labels as the batch vector. A soft S (N x C) gives the weighted forms
  ``sum_c = S[:, c]^T X`` and ``mean_c = S[:, c]^T X / sum_i S_ic``; ``max`` has no soft analogue and uses
  the hard ``argmax`` labels. Empty clusters read out zeros.
* :class:`GatedAttentionReadout` — gated attention, per graph or per cluster, in two forms:
  ``gate='sigmoid'`` (the reference, Spektral's ``GlobalAttentionPool`` after Li et al.:
  ``X' = sum_i sigmoid(X W_1 + b_1)_i * (X W_2 + b_2)_i``) and ``gate='softmax'`` (PyG's
  ``AttentionalAggregation``: ``X' = sum_i softmax_i(gate(X))_i * nn(X)_i``, the softmax over the nodes of
  each graph / cluster; reused as is for a batch vector or hard labels). With a soft S the softmax form
  weighs node i in cluster c by ``S_ic exp(g_i) / sum_j S_jc exp(g_j)`` and the sigmoid form by ``S_ic``;
  both reduce to the hard forms when S is one-hot.

All soft-assignment readouts are matrix products ``S^T (...)``: time O(N C F), memory ``v (N F + C F)``
(never N x C x F). Hard-label readouts: O(N F) time, ``v C F`` memory beyond the inputs.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["global_readout", "dense_readout", "cluster_readout", "GatedAttentionReadout"]

_REDUCES = ("sum", "mean", "max")


def _check_reduce(reduce: str) -> str:
    reduce = "sum" if reduce == "add" else reduce
    if reduce not in _REDUCES:
        raise ValueError(f"reduce must be one of {_REDUCES}, got {reduce!r}")
    return reduce


def global_readout(x: Tensor, batch: Tensor | None = None, reduce: str = "sum", size: int | None = None) -> Tensor:
    """Per-graph ``sum`` / ``mean`` / ``max`` of node features (N x F) -> B x F (1 x F when ``batch`` is None).

    Thin dispatch to PyG's ``global_add_pool`` / ``global_mean_pool`` / ``global_max_pool``.
    """
    from torch_geometric.nn import global_add_pool, global_max_pool, global_mean_pool

    fn = {"sum": global_add_pool, "mean": global_mean_pool, "max": global_max_pool}[_check_reduce(reduce)]
    return fn(x, batch, size)


def dense_readout(x: Tensor, mask: Tensor | None = None, reduce: str = "sum") -> Tensor:
    """Per-graph readout of a padded batch ``x`` (B x N x F, optional boolean mask B x N) -> B x F.

    Padded nodes are ignored whatever they hold; a graph without valid nodes reads out zeros.
    """
    reduce = _check_reduce(reduce)
    if mask is None:
        return {"sum": x.sum, "mean": x.mean}[reduce](1) if reduce != "max" else x.max(1).values
    m = mask.to(torch.bool).unsqueeze(-1)
    if reduce == "max":
        out = torch.where(m, x, torch.full_like(x, float("-inf"))).max(1).values
        return torch.where(m.any(1), out, torch.zeros_like(out))
    total = torch.where(m, x, torch.zeros_like(x)).sum(1)
    if reduce == "sum":
        return total
    return total / m.sum(1).clamp_min(1).to(x.dtype)


def _num_clusters(assignment: Tensor, num_clusters: int | None) -> int:
    if assignment.is_floating_point():
        return assignment.size(1)
    if num_clusters is not None:
        return num_clusters
    return int(assignment.max()) + 1 if assignment.numel() else 0


def cluster_readout(
    x: Tensor, assignment: Tensor, reduce: str = "sum", num_clusters: int | None = None
) -> Tensor:
    """Per-cluster ``sum`` / ``mean`` / ``max`` of node features -> C x F.

    ``assignment``: hard labels (N, integer; ``num_clusters`` defaults to max + 1) or a soft S (N x C,
    weighted sum / mean; ``max`` over the nodes whose argmax is c).
    """
    reduce = _check_reduce(reduce)
    c = _num_clusters(assignment, num_clusters)
    if assignment.is_floating_point():
        if assignment.dim() != 2 or assignment.size(0) != x.size(0):
            raise ValueError(f"S must be N x C with N = {x.size(0)}, got {tuple(assignment.shape)}")
        if reduce == "max":
            return global_readout(x, assignment.argmax(-1), "max", c)
        s = assignment.to(x.dtype)
        out = s.t() @ x
        if reduce == "mean":
            out = out / s.sum(0).clamp_min(1e-12).unsqueeze(-1)
        return out
    return global_readout(x, assignment.view(-1).long(), reduce, c)


class GatedAttentionReadout(nn.Module):
    r"""Gated-attention readout per graph or per cluster (see the module docstring for both gate forms).

    Args:
        in_channels: node feature size F.
        out_channels: output size (default F). The value network is ``Linear(F, out_channels)``.
        gate: ``'sigmoid'`` (Spektral / Li et al.: a per-channel sigmoid gate ``Linear(F, out_channels)``)
            or ``'softmax'`` (PyG ``AttentionalAggregation`` with a scalar gate ``Linear(F, 1)``).
        gate_nn, nn: optional modules replacing the default gate / value networks.

    ``forward(x, batch=None, size=None)``: per graph (B x out). ``clusters(x, assignment, num_clusters=None)``:
    per cluster, hard labels or soft S (C x out). Memory ``v N (out + gate width) + v C out``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        gate: str = "sigmoid",
        gate_nn: nn.Module | None = None,
        nn: nn.Module | None = None,  # noqa: A002 - PyG's name for the value network
    ):
        super().__init__()
        import torch.nn as tnn
        from torch_geometric.nn.aggr import AttentionalAggregation

        if gate not in ("sigmoid", "softmax"):
            raise ValueError(f"gate must be 'sigmoid' or 'softmax', got {gate!r}")
        out_channels = out_channels or in_channels
        self.gate = gate
        self.gate_nn = gate_nn or tnn.Linear(in_channels, out_channels if gate == "sigmoid" else 1)
        self.nn = nn if nn is not None else tnn.Linear(in_channels, out_channels)
        # the softmax form with an index is PyG's aggregation, sharing these parameters
        self.aggr = AttentionalAggregation(self.gate_nn, self.nn) if gate == "softmax" else None

    def reset_parameters(self) -> None:
        for mod in (self.gate_nn, self.nn):
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()

    def _by_index(self, x: Tensor, index: Tensor | None, size: int | None) -> Tensor:
        if index is None:
            index = x.new_zeros(x.size(0), dtype=torch.long)
            size = 1
        elif size is None:
            size = int(index.max()) + 1 if index.numel() else 0
        if self.aggr is not None:
            return self.aggr(x, index, dim_size=size)
        from torch_geometric.utils import scatter

        return scatter(torch.sigmoid(self.gate_nn(x)) * self.nn(x), index, dim=0, dim_size=size, reduce="sum")

    def forward(self, x: Tensor, batch: Tensor | None = None, size: int | None = None) -> Tensor:
        return self._by_index(x, batch, size)

    def clusters(self, x: Tensor, assignment: Tensor, num_clusters: int | None = None) -> Tensor:
        c = _num_clusters(assignment, num_clusters)
        if not assignment.is_floating_point():
            return self._by_index(x, assignment.view(-1).long(), c)
        s = assignment.to(x.dtype)
        g, h = self.gate_nn(x), self.nn(x)
        if self.gate == "sigmoid":
            return s.t() @ (torch.sigmoid(g) * h)
        # soft softmax: sum_i S_ic e^{g_i} h_i / sum_i S_ic e^{g_i}, shifted by the gates' global max (a
        # per-cluster max would need N x C x gate-width memory); a cluster whose gates all lie > ~700 (float64)
        # / ~80 (float32) below that max underflows and reads out zeros
        e = torch.exp(g - g.max(0, keepdim=True).values.detach())
        num = s.t() @ (e * h)
        den = s.t() @ e
        return num / den.clamp_min(1e-16)
