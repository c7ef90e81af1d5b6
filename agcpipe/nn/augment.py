"""Graph augmentations for two-view self-supervised methods (CCA-SSG, G-BT, NS4GC): feature masking by
columns and edge dropping, on a whole graph or on a sampled mini-batch subgraph.

* :func:`mask_feature_columns` -- each feature column is zeroed with probability ``p`` (the same columns
  for every node of the view, as in GRACE / CCA-SSG / G-BT / NS4GC); dense or sparse CSR ``x``.
* :func:`drop_edges` -- each stored (directed) edge entry is removed with probability ``p``, its weight
  with it; the encoder then normalises the remaining graph (for GCN: self-loops added after dropping,
  degrees of the dropped graph), as the papers' code does.
* :func:`augment_batch` -- both on a PyG ``Data`` (full graph, or a sampled subgraph with its seeds
  first): a new ``Data`` sharing everything else (``batch_size``, ``num_sampled_nodes``), with
  ``prepared = False`` so the encoder re-normalises the dropped graph.

Every draw comes from the ``generator`` passed in (the training engine's ``run.generator``, whose state is
checkpointed), on the CPU, then moves to the data's device: a run is deterministic for a seed and a resumed
run continues the same stream. Dropping never reorders edges, so a sampled subgraph keeps its hop order
and the encoder's per-hop trimming stays valid.

Memory per view: one copy of ``x`` (``4 S d`` dense, ``12 nnz(x)`` sparse; none when ``p = 0``) and of
the kept edges (``~21 E`` bytes: int64 indices, weights, the keep mask), for ``S`` nodes and ``E`` edges of
the (sub)graph.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(n, generator=generator).to(device)


def mask_feature_columns(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """``x`` with each column zeroed with probability ``p`` (dense or sparse CSR; ``x`` is not modified)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"feature masking rate must lie in [0, 1), got {p}")
    if p == 0.0:
        return x
    keep = _rand(x.size(1), generator, x.device) >= p
    if x.layout == torch.sparse_csr:
        vals = x.values() * keep[x.col_indices()].to(x.dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
            return torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(), vals, x.shape)
    if x.layout != torch.strided:
        x = x.to_dense()
    return x * keep.to(x.dtype)


def drop_edges(
    edge_index: Tensor, edge_weight: Tensor | None, p: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor | None]:
    """Keep each column of ``edge_index`` (and its weight) with probability ``1 - p``; order is kept."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"edge dropping rate must lie in [0, 1), got {p}")
    if p == 0.0 or edge_index.size(1) == 0:
        return edge_index, edge_weight
    keep = _rand(edge_index.size(1), generator, edge_index.device) >= p
    return edge_index[:, keep], (edge_weight[keep] if edge_weight is not None else None)


def augment_batch(batch, feature_mask: float, edge_drop: float, generator: torch.Generator | None = None):
    """One augmented view of ``batch`` (a PyG ``Data`` with raw ``edge_index``, not a prepared adjacency).

    Returns a new ``Data`` with the masked ``x``, the kept edges (and weights), ``prepared = False`` and the
    batch layout (``batch_size``, ``num_sampled_nodes``, ``n_id``) of ``batch``.
    """
    from torch_geometric.data import Data

    if getattr(batch, "prepared", False):
        raise ValueError("augment_batch needs the raw edge_index of the graph, not a prepared (normalised) adjacency")
    ew = batch.edge_weight if "edge_weight" in batch else None
    ei, ew = drop_edges(batch.edge_index, ew, edge_drop, generator)
    view = Data(x=mask_feature_columns(batch.x, feature_mask, generator), edge_index=ei, num_nodes=batch.num_nodes)
    if ew is not None:
        view.edge_weight = ew
    for key in ("batch_size", "num_sampled_nodes", "n_id"):
        if key in batch:
            view[key] = batch[key]
    view.prepared = False
    return view


def two_views(batch, feature_mask: tuple[float, float], edge_drop: tuple[float, float], generator: torch.Generator | None = None):
    """Two independently augmented views of ``batch`` (view ``v`` uses ``feature_mask[v]``, ``edge_drop[v]``)."""
    return tuple(augment_batch(batch, feature_mask[v], edge_drop[v], generator) for v in (0, 1))
