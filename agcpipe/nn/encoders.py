"""Node encoders built from PyG layers: GCN, GraphSAGE, GAT and MLP, configured by one parameter set.

``Encoder(in_dim, type="gcn", hidden=512, layers=1, ...)`` stacks ``layers`` layers
(``conv -> norm -> activation -> dropout``; norm and activation also after the last layer when
``last_activation``). The layers take a plain ``edge_index`` (no torch-sparse needed):

* ``gcn``: :class:`~torch_geometric.nn.GCNConv` with the normalisation of :mod:`agcpipe.ops.propagate`,
  ``S = D^-1/2 (A + I) D^-1/2`` with ``D`` = weighted degree + 1 (edge weights used when the graph has
  them), built once per forward as a sparse CSR matrix (:func:`gcn_adjacency`) that every layer multiplies
  with -- no ``E x hidden`` message tensor;
* ``sage``: :class:`~torch_geometric.nn.SAGEConv` (mean aggregation, root weight);
* ``gat``: :class:`~torch_geometric.nn.GATConv` with ``heads`` concatenated heads (``hidden % heads == 0``);
* ``mlp``: linear layers, no graph (``num_hops == 0``: mini-batches need no neighbour sampling).

The input ``x`` may be a sparse CSR tensor (bag-of-words features, see :func:`maybe_sparse`): GCN and MLP
then start with a sparse x dense product (Cora: 1.3% non-zeros, ~50x fewer operations in the first
layer); SAGE and GAT densify it.

Message direction follows :mod:`agcpipe.sampling`: an ``edge_index`` column ``(j, i)`` sends ``j``'s state
to ``i``; from the canonical CSR, ``j`` is an entry of row ``i``.

:meth:`Encoder.inference` computes the embeddings of every node of a graph of any size layer by layer
over blocks of target nodes with their *complete* neighbourhoods, so it is exact (the same numbers as a
full-graph forward, up to float summation order) without holding the graph's edges or an ``E x hidden``
tensor. Peak memory (bytes) of layer-wise inference: ``4 N (d_in + d_out)`` for one layer's input and
output (the first input is the memory-mapped feature matrix, read block by block) plus, per block of
``B`` target rows with ``E_B`` CSR entries, ``4 (B + E_B) d_in`` (the block's input rows), ``~60 E_B``
for its edges and, for SAGE / GAT only, ``4 E_B width`` of messages; ``E_B`` is bounded by
``block_edges`` (chosen so that the SAGE / GAT messages stay near 256 MB).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ENCODER_TYPES = ("gcn", "sage", "gat", "mlp")


def activation(name: str, dim: int) -> nn.Module:
    if name == "prelu":
        return nn.PReLU()
    return {
        "relu": nn.ReLU,
        "elu": nn.ELU,
        "selu": nn.SELU,
        "leaky_relu": nn.LeakyReLU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "identity": nn.Identity,
    }[name]()


def sparse_csr(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A torch sparse CSR matrix from COO triplets (duplicates summed)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape).coalesce()
        return coo.to_sparse_csr()


def gcn_adjacency(edge_index: Tensor, edge_weight: Tensor | None, num_nodes: int) -> Tensor:
    """``S = D^-1/2 (A + I) D^-1/2`` as a sparse CSR ``adj_t`` (row = receiving node), for ``GCNConv``.

    One sparse x dense product per layer instead of PyG's gather / scatter, so no ``E x hidden`` message
    tensor is built; 12 bytes per entry.
    """
    src, dst = edge_index[0], edge_index[1]
    if dst.numel() > 1 and not bool((dst[1:] >= dst[:-1]).all()):  # CSR wants rows in order
        order = torch.argsort(dst, stable=True)
        src, dst = src[order], dst[order]
        edge_weight = edge_weight[order] if edge_weight is not None else None
    dev = src.device
    w = torch.ones(src.numel(), dtype=torch.float32, device=dev) if edge_weight is None else edge_weight.float()
    deg = torch.ones(num_nodes, dtype=torch.float32, device=dev).index_add_(0, dst, w)
    dinv = deg.rsqrt()
    # sorted by row: edge e of row r moves to e + r (each earlier row gains its self-loop slot); the
    # self-loop takes the last slot of its row -- no sort, O(E + N)
    counts = torch.bincount(dst, minlength=num_nodes)
    crow = torch.zeros(num_nodes + 1, dtype=torch.long, device=dev)
    torch.cumsum(counts + 1, 0, out=crow[1:])
    nodes = torch.arange(num_nodes, device=dev)
    col = torch.empty(src.numel() + num_nodes, dtype=torch.long, device=dev)
    val = torch.empty(src.numel() + num_nodes, dtype=torch.float32, device=dev)
    at = torch.arange(src.numel(), device=dev) + dst
    col[at], val[at] = src, dinv[dst] * w * dinv[src]
    col[crow[1:] - 1], val[crow[1:] - 1] = nodes, dinv * dinv
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow, col, val, (num_nodes, num_nodes))


def gcn_normalize(edge_index: Tensor, edge_weight: Tensor | None, num_nodes: int) -> tuple[Tensor, Tensor]:
    """Append one self-loop per node and weight every edge ``j -> i`` by ``w_ji / sqrt(deg_i deg_j)``.

    ``deg_i`` = weighted in-degree of ``i`` + 1 (the self-loop), as in :mod:`agcpipe.ops.propagate`.
    """
    src, dst = edge_index[0], edge_index[1]
    w = torch.ones(src.numel(), dtype=torch.float32, device=src.device) if edge_weight is None else edge_weight.float()
    deg = torch.ones(num_nodes, dtype=torch.float32, device=src.device)
    deg.index_add_(0, dst, w)
    dinv = deg.rsqrt()
    loop = torch.arange(num_nodes, device=src.device)
    ei = torch.cat([edge_index, torch.stack([loop, loop])], dim=1)
    ew = torch.cat([dinv[dst] * w * dinv[src], dinv * dinv])
    return ei, ew


class Encoder(nn.Module):
    """A stack of PyG layers (see the module docstring)."""

    def __init__(
        self,
        in_dim: int,
        *,
        type: str = "gcn",
        hidden: int = 512,
        layers: int = 1,
        out: int | None = None,
        activation: str = "prelu",
        last_activation: bool = True,
        norm: str = "none",
        dropout: float = 0.0,
        heads: int = 1,
    ):
        super().__init__()
        from torch_geometric.nn import GATConv, GCNConv, SAGEConv

        if type not in ENCODER_TYPES:
            raise ValueError(f"unknown encoder type {type!r}; known: {ENCODER_TYPES}")
        self.type, self.in_dim, self.layers = type, in_dim, layers
        dims = [in_dim] + [hidden] * (layers - 1) + [out or hidden]
        self.out_dim = dims[-1]
        self.last_activation, self.dropout = last_activation, dropout
        self.convs, self.norms, self.acts = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for a, b in zip(dims[:-1], dims[1:]):
            if type == "gcn":
                conv = GCNConv(a, b, normalize=False, add_self_loops=False)
            elif type == "sage":
                conv = SAGEConv(a, b, aggr="mean")
            elif type == "gat":
                if b % heads:
                    raise ValueError(f"gat: layer width {b} is not divisible by heads={heads}")
                conv = GATConv(a, b // heads, heads=heads, concat=True, add_self_loops=True)
            else:
                conv = nn.Linear(a, b)
            self.convs.append(conv)
            self.norms.append({"none": nn.Identity, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}[norm](b) if norm != "none" else nn.Identity())
            self.acts.append(globals()["activation"](activation, b))

    @property
    def num_hops(self) -> int:
        """Neighbourhood radius the encoder reads (0 for an MLP)."""
        return 0 if self.type == "mlp" else self.layers

    def prepare(self, edge_index: Tensor | None, edge_weight: Tensor | None, num_nodes: int) -> tuple[Tensor | None, Tensor | None]:
        """The graph the layers consume: for ``gcn`` the normalised sparse CSR adjacency
        (:func:`gcn_adjacency`, returned in place of ``edge_index``, weights folded in); as given otherwise.

        Full-batch training calls this once and passes ``prepared=True`` to :meth:`forward`.
        """
        if self.type == "gcn" and edge_index is not None:
            return gcn_adjacency(edge_index, edge_weight, num_nodes), None
        return edge_index, edge_weight

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor | None = None,
        edge_weight: Tensor | None = None,
        *,
        prepared: bool = False,
        num_sampled_nodes: list[int] | None = None,
    ) -> Tensor:
        """Embeddings of the rows of ``x``.

        ``num_sampled_nodes`` (a sampled mini-batch: nodes per hop, seeds first, as PyG's loaders and
        :mod:`agcpipe.sampling.neighbor` give them): layer ``i`` of ``L`` computes only the rows within
        ``L - 1 - i`` hops of the seeds -- the only ones later layers read (PyG's ``trim_to_layer``) -- so
        the output holds the seed rows alone.
        """
        if not prepared:
            edge_index, edge_weight = self.prepare(edge_index, edge_weight, x.size(0))
        last = len(self.convs) - 1
        for i, conv in enumerate(self.convs):
            rows = None
            if num_sampled_nodes is not None:
                rows = int(sum(num_sampled_nodes[: last + 1 - i]))
                rows = None if rows >= x.size(0) else rows
            x = self._conv(conv, x, edge_index, edge_weight, rows)
            if i < last or self.last_activation:
                x = self.acts[i](self.norms[i](x))
            if i < last and self.dropout:
                x = nn.functional.dropout(x, self.dropout, self.training)
        return x

    def _conv(self, conv: nn.Module, x: Tensor, edge_index: Tensor | None, edge_weight: Tensor | None, rows: int | None = None) -> Tensor:
        """One layer; ``rows``: compute only the first ``rows`` output rows (their inputs: all rows of ``x``)."""
        sparse_x = x.layout != torch.strided  # sparse input features (bag-of-words)
        amp = torch.is_autocast_enabled(x.device.type)
        if sparse_x and (amp or self.type not in ("gcn", "mlp")):  # no bfloat16 sparse kernels
            x = x.to_dense()
            sparse_x = False
        n_out = x.size(0) if rows is None else rows
        if self.type == "mlp":
            x = x if rows is None else _first_rows(x, rows)
            if not sparse_x:
                return conv(x)
            h = torch.sparse.mm(x, conv.weight.t())
            return h + conv.bias if conv.bias is not None else h
        if self.type != "gcn":
            if rows is None:
                return conv(x, edge_index)
            keep = edge_index[1] < rows  # bipartite: every source row -> the first ``rows`` rows
            return conv((x, x[:rows]), edge_index[:, keep])
        # GCNConv(normalize=False) unrolled: S (X W) + b, or (S X) W + b, whichever costs fewer multiply-adds;
        # S is the prepared sparse CSR adjacency, cut to the output rows. With the rows cut (a trimmed
        # mini-batch layer) S-first wins even for in == out: X W would transform every sampled input row
        # while only n_out of them are kept (measured: 20 CCA-SSG steps of a 512-512 GCN, 55 s -> 26 s).
        adj = _first_rows(edge_index, n_out, ncols=x.size(0))
        weight = conv.lin.weight
        d_out, d_in = weight.shape
        nnz = adj._nnz()
        s_first = nnz * d_in + n_out * d_in * d_out < x.size(0) * d_in * d_out + nnz * d_out
        if not sparse_x and s_first:
            h = conv.lin(_spmm(adj, x, amp))
        else:
            h = torch.sparse.mm(x, weight.t()) if sparse_x else conv.lin(x)
            h = _spmm(adj, h, amp)
        return h + conv.bias if conv.bias is not None else h

    # ---------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def inference(
        self,
        x: np.ndarray | Tensor,
        indptr: np.ndarray,
        indices: np.ndarray,
        weights: np.ndarray | None = None,
        *,
        device: str | torch.device = "cpu",
        block_edges: int | None = None,
        amp: bool = False,
    ) -> np.ndarray:
        """Embeddings of all N nodes, layer by layer over row blocks (exact; see the module docstring).

        ``x``: N x d_in features (a memory-mapped array is read block by block). Returns float32 N x out.
        ``block_edges`` default: ``2**20`` CSR entries for GCN / MLP (sparse products), and for SAGE / GAT
        (PyG gathers one message per edge) as many as keep a block's ``E_B x width`` messages near 256 MB.
        """
        if block_edges is None:
            widest = max(self.in_dim, *(self._width(i) for i in range(len(self.convs))))
            block_edges = 1 << 20 if self.type in ("gcn", "mlp") else max(4096, (256 << 20) // (4 * widest))
        was_training = self.training
        self.eval()
        try:
            n = int(indptr.shape[0]) - 1
            ip = np.asarray(indptr, dtype=np.int64)
            dinv = None
            if self.type == "gcn":
                if weights is None:
                    deg = np.diff(ip).astype(np.float64)
                else:
                    cs = np.concatenate([[0.0], np.cumsum(weights, dtype=np.float64)])
                    deg = cs[ip[1:]] - cs[ip[:-1]]
                dinv = torch.from_numpy((deg + 1.0) ** -0.5).float()
            h: np.ndarray | Tensor = x
            last = len(self.convs) - 1
            for i, conv in enumerate(self.convs):
                out = np.empty((n, self._width(i)), dtype=np.float32)
                for s, e in _row_blocks(ip, block_edges):
                    y = self._block(conv, h, ip, indices, weights, dinv, s, e, device, amp)
                    if i < last or self.last_activation:
                        y = self.acts[i](self.norms[i](y))
                    out[s:e] = y.float().cpu().numpy()
                h = out
            return h if isinstance(h, np.ndarray) else h.numpy()
        finally:
            self.train(was_training)

    def _width(self, i: int) -> int:
        conv = self.convs[i]
        if self.type == "mlp":
            return conv.out_features
        return conv.heads * conv.out_channels if self.type == "gat" else conv.out_channels

    def _block(self, conv, h, ip, indices, weights, dinv, s: int, e: int, device, amp: bool) -> Tensor:
        """Layer output for target rows s:e from their complete 1-hop neighbourhoods."""
        from ..sampling.neighbor import gather_rows

        dev = torch.device(device)
        if self.type == "mlp":
            xb = _rows(h, s, e).to(dev)
            with _autocast(dev, amp):
                return conv(xb)
        a, b = int(ip[s]), int(ip[e])
        nbr = torch.from_numpy(np.asarray(indices[a:b], dtype=np.int64))
        tgt = torch.repeat_interleave(torch.arange(e - s), torch.from_numpy(np.diff(ip[s : e + 1])))
        inside = (nbr >= s) & (nbr < e)
        outside, inv = torch.unique(nbr[~inside], return_inverse=True)
        src = torch.empty_like(nbr)
        src[inside] = nbr[inside] - s
        src[~inside] = (e - s) + inv
        xb = torch.cat([_rows(h, s, e), gather_rows(h, outside)]) if outside.numel() else _rows(h, s, e)
        edge_index = torch.stack([src, tgt])
        if self.type == "gcn":  # exact S rows s:e (full-graph degrees) as a (e - s) x |U| sparse matrix
            w = torch.ones(nbr.numel()) if weights is None else torch.from_numpy(np.asarray(weights[a:b], dtype=np.float32))
            loop = torch.arange(e - s)
            vals = torch.cat([dinv[s:e][tgt] * w * dinv[nbr], dinv[s:e] ** 2])
            edge_index = sparse_csr(torch.cat([tgt, loop]), torch.cat([src, loop]), vals, (e - s, xb.size(0)))
        with _autocast(dev, amp):
            y = self._conv(conv, xb.to(dev), edge_index.to(dev), None, rows=e - s)
        return y[: e - s]


def _spmm(adj: Tensor, h: Tensor, amp: bool) -> Tensor:
    """``adj @ h`` (sparse CSR x dense); in float32 under autocast (CPU sparse kernels have no bfloat16)."""
    if amp:
        with torch.autocast(h.device.type, enabled=False):
            return torch.sparse.mm(adj, h.float())
    return torch.sparse.mm(adj, h)


def _first_rows(a: Tensor, k: int, ncols: int | None = None) -> Tensor:
    """The first ``k`` rows of a dense or sparse CSR matrix (CSR: a view of its arrays, ``ncols`` columns)."""
    if a.layout == torch.strided:
        return a[:k]
    ncols = a.size(1) if ncols is None else ncols
    if k == a.size(0) and ncols == a.size(1):
        return a
    crow = a.crow_indices()
    e = int(crow[k])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow[: k + 1], a.col_indices()[:e], a.values()[:e], (k, ncols))


def _rows(h: np.ndarray | Tensor, s: int, e: int) -> Tensor:
    if isinstance(h, Tensor):
        return h[s:e]
    return torch.from_numpy(np.ascontiguousarray(h[s:e], dtype=np.float32))


def _row_blocks(indptr: np.ndarray, block_edges: int) -> Iterator[tuple[int, int]]:
    """Contiguous row ranges holding ~block_edges CSR entries (plus one per row) each."""
    n = indptr.shape[0] - 1
    s = 0
    while s < n:
        target = indptr[s] + block_edges
        e = int(np.searchsorted(indptr, target, side="right")) - 1
        e = max(s + 1, min(n, e, s + block_edges))
        yield s, e
        s = e


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        import contextlib

        return contextlib.nullcontext()
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def maybe_sparse(x: Tensor, max_density: float = 0.1) -> Tensor:
    """``x`` as a sparse CSR tensor when at most ``max_density`` of its entries are non-zero, else as is.

    CSR because torch's CSR x dense product (MKL) is ~4x faster here than dense or COO for Cora's features.
    """
    if x.layout != torch.strided or x.dim() != 2 or x.numel() == 0:
        return x
    nnz = int(torch.count_nonzero(x))
    if nnz > max_density * x.numel():
        return x
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return x.to_sparse_csr()


def permute_rows(x: Tensor, perm: Tensor) -> Tensor:
    """``x[perm]`` for a dense or sparse CSR ``x`` (feature-shuffling corruptions)."""
    if x.layout == torch.strided:
        return x[perm]
    if x.layout != torch.sparse_csr:
        return torch.index_select(x, 0, perm)
    from ..sampling.neighbor import expand_ranges

    crow, col, val = x.crow_indices(), x.col_indices(), x.values()
    counts = (crow[1:] - crow[:-1])[perm]
    pos = expand_ranges(crow[:-1][perm].cpu(), counts.cpu()).to(x.device)
    new_crow = torch.cat([crow.new_zeros(1), torch.cumsum(counts, 0)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(new_crow, col[pos], val[pos], size=x.shape)


def build_encoder(in_dim: int, params: dict[str, Any]) -> Encoder:
    """An :class:`Encoder` from an encoder parameter mapping (``type``, ``hidden``, ``layers``, ...)."""
    return Encoder(in_dim, **params)
