"""Samplers: CSR fan-out neighbour sampling (also through PyG's NodeLoader) and uniform / node2vec walks."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from agcpipe.sampling import neighbor as nb
from agcpipe.sampling.neighbor import CSRNeighborSampler, NodeBatches, expand_ranges, floyd_sample, node_loader, subgraph_batch
from agcpipe.sampling.walks import RandomWalkSampler, context_windows


def _graph(n=400, density=0.02, seed=0, hub=True, isolated=(7,)):
    """Symmetric CSR with sorted rows: random edges, node 0 a hub (degree ~n/2), some isolated nodes."""
    a = sp.random(n, n, density=density, random_state=seed, format="csr")
    a = ((a + a.T) > 0).astype(np.float32).tolil()
    if hub:
        a[0, 1 : n // 2] = 1
        a[1 : n // 2, 0] = 1
    a.setdiag(0)
    for i in isolated:
        a[i, :] = 0
        a[:, i] = 0
    a = a.tocsr()
    a.eliminate_zeros()
    a.sort_indices()
    return a, a.indptr.astype(np.int64), a.indices.astype(np.int32)


def test_expand_ranges_and_floyd():
    got = expand_ranges(torch.tensor([5, 0, 9]), torch.tensor([2, 0, 3]))
    assert got.tolist() == [5, 6, 9, 10, 11]
    gen = torch.Generator().manual_seed(0)
    deg = torch.tensor([5] * 20000)
    s = floyd_sample(deg, 2, gen)
    assert (s[:, 0] != s[:, 1]).all() and s.min() >= 0 and s.max() <= 4
    counts = Counter(tuple(sorted(r)) for r in s.tolist())  # all 10 two-subsets, each ~2000 times
    assert len(counts) == 10 and max(abs(c - 2000) for c in counts.values()) < 200


def test_neighbor_sample_real_neighbours_fanout_and_order():
    a, ip, ind = _graph()
    deg = np.diff(ip)
    fanout = [5, 3]
    s = CSRNeighborSampler(ip, ind, fanout, seed=1)
    seeds = torch.tensor([0, 3, 7, 11, 250])
    out, seed_local = s.sample(seeds)
    node, row, col = out.node, out.row, out.col
    assert node[:5].tolist() == seeds.tolist() and seed_local.tolist() == list(range(5))  # seeds first, in order
    assert node.unique().numel() == node.numel() == sum(out.num_sampled_nodes)
    # every sampled edge is a real one: row's node is an entry of col's node's CSR row
    assert all(a[int(node[c]), int(node[r])] for r, c in zip(row, col))
    assert torch.equal(torch.from_numpy(ind.astype(np.int64))[out.edge], node[row])  # e_id = CSR position
    # fan-out: hop h gives each frontier node min(k, deg) distinct neighbours
    hop_start = np.cumsum([0, *out.num_sampled_nodes])
    edge_start = np.cumsum([0, *out.num_sampled_edges])
    for h, k in enumerate(fanout):
        cols = col[edge_start[h] : edge_start[h + 1]]
        rows = row[edge_start[h] : edge_start[h + 1]]
        frontier = range(hop_start[h], hop_start[h + 1])
        for f in frontier:
            mine = rows[cols == f]
            assert mine.numel() == min(k, deg[int(node[f])]) and mine.unique().numel() == mine.numel()
    assert out.num_sampled_edges[0] == sum(min(5, deg[i]) for i in seeds.tolist())
    # new nodes of hop h are neighbours reached at hop h only (not seeds)
    assert set(node[hop_start[1] : hop_start[2]].tolist()).isdisjoint(seeds.tolist())


def test_neighbor_sample_all_duplicates_and_reproducible():
    a, ip, ind = _graph()
    s = CSRNeighborSampler(ip, ind, [-1], seed=3)
    seeds = torch.tensor([5, 9, 5, 0, 9])
    out, seed_local = s.sample(seeds)
    assert torch.equal(out.node[seed_local], seeds)  # duplicates map to one row
    assert out.node[:3].tolist() == [5, 9, 0]
    assert out.num_sampled_edges[0] == int(np.diff(ip)[[5, 9, 0]].sum())  # -1: every neighbour
    o1, _ = CSRNeighborSampler(ip, ind, [4, 4], seed=7).sample(torch.arange(50))
    o2, _ = CSRNeighborSampler(ip, ind, [4, 4], seed=7).sample(torch.arange(50))
    assert torch.equal(o1.node, o2.node) and torch.equal(o1.row, o2.row) and torch.equal(o1.edge, o2.edge)
    # the local-id map is reset after each batch
    assert (s._local == -1).all()


def test_neighbor_sample_is_uniform_over_the_row():
    a, ip, ind = _graph()
    hub_deg = int(np.diff(ip)[0])
    s = CSRNeighborSampler(ip, ind, [5], seed=0)
    counts = np.zeros(a.shape[0])
    trials = 3000
    for _ in range(trials):
        out, _ = s.sample(torch.tensor([0]))
        np.add.at(counts, out.node[out.row].numpy(), 1)
    freq = counts[a[0].indices] / trials
    assert abs(freq.mean() - 5 / hub_deg) < 1e-9  # exactly 5 per draw
    assert np.abs(freq - 5 / hub_deg).max() < 0.05  # each neighbour ~ k / deg


def test_node_loader_plugs_in_with_features_and_weights():
    a, ip, ind = _graph(n=300)
    x = np.random.default_rng(0).standard_normal((300, 6)).astype(np.float32)
    w = np.random.default_rng(1).random(ind.size).astype(np.float32)
    sampler = nb.neighbor_sampler(ip, ind, [4, 2], seed=0, backend="agcpipe")
    loader = node_loader(sampler, x, batch_size=64, generator=torch.Generator().manual_seed(0), edge_weight=w)
    seen = []
    for batch in loader:
        bs = batch.batch_size
        seen.append(batch.n_id[:bs])
        assert torch.allclose(batch.x, torch.from_numpy(x[batch.n_id.numpy()]))
        src, dst = batch.n_id[batch.edge_index[0]], batch.n_id[batch.edge_index[1]]
        assert all(a[int(d), int(s_)] for s_, d in zip(src, dst))
        assert torch.allclose(batch.edge_weight, torch.from_numpy(w)[batch.e_id])
    assert len(loader) == 5 and sorted(torch.cat(seen).tolist()) == list(range(300))  # an epoch covers each node once
    # same generator seed, same batches
    l2 = node_loader(nb.neighbor_sampler(ip, ind, [4, 2], seed=0, backend="agcpipe"), x, batch_size=64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(next(iter(l2)).n_id, next(iter(node_loader(nb.neighbor_sampler(ip, ind, [4, 2], seed=0, backend="agcpipe"), x, batch_size=64, generator=torch.Generator().manual_seed(0)))).n_id)


def test_backend_auto_uses_ours_without_pyg_lib(monkeypatch):
    _, ip, ind = _graph(n=50)
    monkeypatch.setattr(nb, "pyg_lib_available", lambda: False)
    assert isinstance(nb.neighbor_sampler(ip, ind, [3]), CSRNeighborSampler)


def test_subgraph_batch_and_node_batches():
    a, ip, ind = _graph(n=200)
    x = np.arange(200 * 3, dtype=np.float32).reshape(200, 3)
    s = CSRNeighborSampler(ip, ind, [3], seed=0)
    data, seed_local = subgraph_batch(s, x, torch.tensor([4, 4, 8]))
    assert data.batch_size == 2 and torch.equal(data.n_id[seed_local], torch.tensor([4, 4, 8]))
    assert torch.equal(data.x, torch.from_numpy(x[data.n_id.numpy()]))
    nbs = NodeBatches(10, 4, torch.Generator().manual_seed(0))
    batches = list(nbs)
    assert len(nbs) == 3 and sorted(torch.cat(batches).tolist()) == list(range(10))


# ----------------------------------------------------------------------------------------------- walks
def test_uniform_walks_follow_edges_and_are_uniform():
    a, ip, ind = _graph()
    w = RandomWalkSampler(ip, ind, seed=0)
    walks = w.walks(torch.arange(a.shape[0]).repeat(3), 12)
    assert walks.shape == (3 * a.shape[0], 13)
    for t in range(12):
        u, v = walks[:, t].numpy(), walks[:, t + 1].numpy()
        stuck = np.diff(ip)[u] == 0
        assert (v[stuck] == u[stuck]).all() and np.asarray(a[u[~stuck], v[~stuck]]).all()
    assert (walks[walks[:, 0] == 7] == 7).all()  # an isolated node stays put
    # first step from the hub: uniform over its row
    first = w.walks(torch.zeros(40000, dtype=torch.long), 1)[:, 1].numpy()
    freq = np.bincount(first, minlength=a.shape[0])[a[0].indices] / 40000
    assert np.abs(freq - 1 / a[0].nnz).max() < 0.015
    assert torch.equal(RandomWalkSampler(ip, ind, seed=5).walks(torch.arange(20), 5), RandomWalkSampler(ip, ind, seed=5).walks(torch.arange(20), 5))


def test_node2vec_transition_frequencies_match_p_q():
    # a - b, a - c, b - c, b - d, b - e, d - e: from a -> b the next node is
    # a (return: 1/p), c (neighbour of a: 1), d or e (farther: 1/q)
    a_, b, c, d, e = range(5)
    edges = [(a_, b), (a_, c), (b, c), (b, d), (b, e), (d, e)]
    m = sp.coo_matrix((np.ones(len(edges)), tuple(np.array(edges).T)), shape=(5, 5))
    m = ((m + m.T) > 0).astype(np.float32).tocsr()
    m.sort_indices()
    ip, ind = m.indptr.astype(np.int64), m.indices.astype(np.int32)
    for p, q in [(0.5, 2.0), (4.0, 0.25), (1.0, 1.0)]:
        w = RandomWalkSampler(ip, ind, p=p, q=q, seed=0)
        walks = w.walks(torch.full((60000,), a_), 2)
        via_b = walks[walks[:, 1] == b][:, 2].numpy()
        weights = np.array([1 / p, 0, 1.0, 1 / q, 1 / q])  # a, (b itself impossible), c, d, e
        expected = weights / weights.sum()
        freq = np.bincount(via_b, minlength=5) / via_b.size
        assert via_b.size > 25000
        assert np.abs(freq - expected).max() < 0.015, (p, q, freq, expected)
    w = RandomWalkSampler(ip, ind, p=0.5, q=2.0, seed=0)
    u = torch.tensor([a_, a_, b, d, e, c])
    v = torch.tensor([b, d, e, e, b, d])
    assert w.is_neighbor(u, v).tolist() == [bool(m[i, j]) for i, j in zip(u.tolist(), v.tolist())]


def test_context_windows_and_negative_walks():
    walks = torch.arange(12).reshape(2, 6)
    win = context_windows(walks, 3)
    assert win.shape == (8, 3) and win[0].tolist() == [0, 1, 2] and win[4].tolist() == [6, 7, 8]
    with pytest.raises(ValueError):
        context_windows(walks, 7)
    _, ip, ind = _graph(n=30)
    neg = RandomWalkSampler(ip, ind, seed=0).negative_walks(torch.tensor([3, 4]), 5)
    assert neg.shape == (2, 6) and neg[:, 0].tolist() == [3, 4] and neg.max() < 30


@pytest.mark.parametrize("p, q", [(1.0, 1.0), (0.25, 4.0)])
def test_walks_on_graph_with_isolated_tail(p, q):
    # node 3 isolated and last: its CSR row starts at nnz
    m = sp.csr_matrix(np.array([[0, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=np.float32))
    w = RandomWalkSampler(m.indptr.astype(np.int64), m.indices.astype(np.int32), p=p, q=q, seed=0)
    walks = w.walks(torch.tensor([0, 3, 1]), 6)
    assert (walks[1] == 3).all() and set(itertools.chain(walks[0].tolist(), walks[2].tolist())) <= {0, 1, 2}
