"""Graph samplers written for CPU machines without pyg-lib / torch-cluster: vectorised over nodes.

* :mod:`.neighbor` -- fan-out neighbour sampling on the canonical CSR, a PyG
  :class:`~torch_geometric.sampler.BaseSampler` (plugs into :class:`~torch_geometric.loader.NodeLoader`);
  :func:`~.neighbor.neighbor_sampler` picks pyg-lib's sampler instead when pyg-lib is installed.
* :mod:`.walks` -- uniform and node2vec (p, q) random walks, skip-gram context windows, negative walks.

Direction convention (the same as :mod:`agcpipe.ops.propagate`): node ``i`` aggregates from the entries
of CSR row ``i``, so a sampled entry ``j`` of row ``i`` is the message edge ``j -> i`` (PyG ``edge_index``
row 0 = ``j``, row 1 = ``i``). For undirected graphs (both directions stored) this is plain adjacency.

Import from the submodules; this file imports nothing heavy.
"""
