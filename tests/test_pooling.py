"""Pooling layers and readouts (agcpipe.nn.pooling, agcpipe.nn.readout).

The reference values are computed independently in numpy (float64) straight from the formulas of the
reference texts, graph by graph, without padding; the layers run on padded batches of graphs of different
sizes, on single graphs, and in their sparse forms, and must agree with them.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch_geometric.utils import to_dense_adj, to_dense_batch

from agcpipe.nn import pooling as P
from agcpipe.nn import readout as R

TOL = dict(rtol=1e-9, atol=1e-10)
SIZES = [5, 11, 8, 3, 14]
C, F = 4, 6


# ------------------------------------------------------------------------------------ fixtures / helpers
def _random_graph(rng: np.random.Generator, n: int, p: float = 0.4, weighted: bool = False) -> np.ndarray:
    a = np.triu((rng.random((n, n)) < p).astype(np.float64), 1)
    if weighted:
        a *= rng.uniform(0.5, 2.0, size=a.shape)
    a = a + a.T
    if a.sum() == 0:  # keep every graph with at least one edge (2m > 0)
        a[0, 1] = a[1, 0] = 1.0
    return a


@pytest.fixture(scope="module")
def graphs():
    """Graphs of different sizes: (A, X, logits) per graph, numpy float64."""
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate(SIZES):
        a = _random_graph(rng, n, weighted=i % 2 == 1)
        out.append((a, rng.normal(size=(n, F)), rng.normal(scale=2.0, size=(n, C))))
    return out


def _batch(graphs, pad_garbage: bool = False, extra_pad: int = 0, seed: int = 1):
    """Padded dense batch via PyG's to_dense_batch / to_dense_adj (+ optional garbage in padded slots)."""
    xs, ss, eis, ews, batch, off = [], [], [], [], [], 0
    for g, (a, x, s) in enumerate(graphs):
        r, c = np.nonzero(a)
        eis.append(torch.tensor(np.stack([r, c]) + off))
        ews.append(torch.tensor(a[r, c]))
        xs.append(torch.tensor(x))
        ss.append(torch.tensor(s))
        batch.append(torch.full((len(x),), g))
        off += len(x)
    batch = torch.cat(batch)
    n_max = max(len(x) for x in xs) + extra_pad
    x, mask = to_dense_batch(torch.cat(xs), batch, max_num_nodes=n_max)
    s, _ = to_dense_batch(torch.cat(ss), batch, max_num_nodes=n_max)
    adj = to_dense_adj(torch.cat(eis, 1), batch, torch.cat(ews), max_num_nodes=n_max)
    if pad_garbage:
        gen = torch.Generator().manual_seed(seed)
        pad = ~mask
        x = torch.where(pad.unsqueeze(-1), torch.randn(x.shape, generator=gen, dtype=x.dtype) * 1e3, x)
        s = torch.where(pad.unsqueeze(-1), torch.randn(s.shape, generator=gen, dtype=s.dtype) * 50, s)
        s[-1, -1, -1] = float("nan") if pad[-1, -1] else s[-1, -1, -1]
        pad2 = pad.unsqueeze(-1) | pad.unsqueeze(-2)
        adj = torch.where(pad2, torch.rand(adj.shape, generator=gen, dtype=adj.dtype) * 7, adj)
        x[0, -1, 0] = float("nan") if pad[0, -1] else x[0, -1, 0]  # even NaN padding is harmless
    return x, adj, s, mask


def _softmax(z: np.ndarray, tau: float = 1.0) -> np.ndarray:
    z = z / tau
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _ortho(s: np.ndarray) -> float:
    ss = s.T @ s
    k = s.shape[1]
    return float(np.linalg.norm(ss / np.linalg.norm(ss) - np.eye(k) / np.sqrt(k)))


def _norm_adj(a: np.ndarray) -> np.ndarray:
    a = a - np.diag(np.diag(a))
    d = np.sqrt(a.sum(1)) + 1e-15
    return a / d[:, None] / d[None, :]


def ref_dmon(a, x, logits, tau=1.0):
    s = _softmax(logits, tau)
    d = a.sum(1)
    two_m = d.sum()
    b = a - np.outer(d, d) / two_m  # modularity matrix
    spectral = -np.trace(s.T @ b @ s) / two_m
    cluster = np.sqrt(s.shape[1]) / len(s) * np.linalg.norm(s.sum(0)) - 1
    return s, s.T @ x, _norm_adj(s.T @ a @ s), spectral, _ortho(s), cluster


def ref_mincut(a, x, logits, tau=1.0):
    s = _softmax(logits, tau)
    cut = -np.trace(s.T @ a @ s) / np.trace(s.T @ np.diag(a.sum(1)) @ s)
    return s, s.T @ x, _norm_adj(s.T @ a @ s), cut, _ortho(s)


def ref_diff(a, x, logits, normalize=True):
    s = _softmax(logits)
    link = np.linalg.norm(a - s @ s.T, "fro") / (len(s) ** 2 if normalize else 1)
    ent = float(np.mean(-(s * np.log(s + 1e-15)).sum(1)))
    return s, s.T @ x, s.T @ a @ s, link, ent


def _close(t, ref, **kw):
    np.testing.assert_allclose(t.detach().cpu().numpy(), np.asarray(ref), **(kw or TOL))


def _check_batch(outs, refs_per_graph, mask):
    """outs: (s, out, out_adj, *losses with reduction='none'); compare graph by graph."""
    s, out, out_adj, *losses = outs
    for g, ref in enumerate(refs_per_graph):
        n = int(mask[g].sum())
        _close(s[g, :n], ref[0])
        assert torch.all(s[g, n:] == 0)
        _close(out[g], ref[1])
        _close(out_adj[g], ref[2])
        for li, lr in zip(losses, ref[3:]):
            _close(li[g], lr)


# --------------------------------------------------------------------------- dense layers vs the formulas
@pytest.mark.parametrize("garbage", [False, True])
def test_dense_dmon_matches_formulas_on_padded_batch(graphs, garbage):
    x, adj, s, mask = _batch(graphs, pad_garbage=garbage, extra_pad=2)
    outs = P.dense_dmon_pool(x, adj, s, mask, temperature=0.7, reduction="none")
    _check_batch(outs, [ref_dmon(a, xx, ll, 0.7) for a, xx, ll in graphs], mask)
    mean = P.dense_dmon_pool(x, adj, s, mask, temperature=0.7)
    for lm, ln in zip(mean[3:], outs[3:]):
        _close(lm, ln.mean())


@pytest.mark.parametrize("garbage", [False, True])
def test_dense_mincut_matches_formulas_on_padded_batch(graphs, garbage):
    x, adj, s, mask = _batch(graphs, pad_garbage=garbage, extra_pad=3)
    outs = P.dense_mincut_pool(x, adj, s, mask, temperature=1.5, reduction="none")
    _check_batch(outs, [ref_mincut(a, xx, ll, 1.5) for a, xx, ll in graphs], mask)


@pytest.mark.parametrize("garbage", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_dense_diff_matches_formulas_on_padded_batch(graphs, garbage, normalize):
    x, adj, s, mask = _batch(graphs, pad_garbage=garbage, extra_pad=1)
    outs = P.dense_diff_pool(x, adj, s, mask, normalize=normalize, reduction="none")
    _check_batch(outs, [ref_diff(a, xx, ll, normalize) for a, xx, ll in graphs], mask)


@pytest.mark.parametrize("fn", [P.dense_dmon_pool, P.dense_mincut_pool, P.dense_diff_pool])
def test_batch_equals_each_graph_alone(graphs, fn):
    """Same per-graph results in a padded batch of different sizes as each graph run alone (no mask)."""
    x, adj, s, mask = _batch(graphs, pad_garbage=True, extra_pad=2)
    batched = fn(x, adj, s, mask, reduction="none")
    for g, (a, xx, ll) in enumerate(graphs):
        alone = fn(torch.tensor(xx), torch.tensor(a), torch.tensor(ll))  # 2-D inputs: one graph, B = 1
        n = len(xx)
        _close(batched[0][g, :n], alone[0][0])
        for bt, at in zip(batched[1:3], alone[1:3]):
            _close(bt[g], at[0])
        for bl, al in zip(batched[3:], alone[3:]):
            _close(bl[g], al)


def test_padding_changes_nothing_float32(graphs):
    """float32 path too: more padding with arbitrary values gives the same outputs and losses."""
    x1, a1, s1, m1 = _batch(graphs)
    x2, a2, s2, m2 = _batch(graphs, pad_garbage=True, extra_pad=6, seed=5)
    n1 = x1.size(1)
    for fn in (P.dense_dmon_pool, P.dense_mincut_pool, P.dense_diff_pool):
        o1 = fn(x1.float(), a1.float(), s1.float(), m1)
        o2 = fn(x2.float(), a2.float(), s2.float(), m2)
        torch.testing.assert_close(o1[0], o2[0][:, :n1])
        for t1, t2 in zip(o1[1:], o2[1:]):
            torch.testing.assert_close(t1, t2, rtol=1e-5, atol=1e-6)


def test_reduction_validation(graphs):
    x, adj, s, mask = _batch(graphs[:2])
    with pytest.raises(ValueError):
        P.dense_mincut_pool(x, adj, s, mask, reduction="avg")
    with pytest.raises(ValueError):
        P.dense_dmon_pool(x, adj, s, mask, temperature=0.0)


# ------------------------------------------------------------------------------ agreement with PyG
def test_mincut_agrees_with_pyg(graphs):
    from torch_geometric.nn.dense import dense_mincut_pool as pyg_mincut

    x, adj, s, mask = _batch(graphs, extra_pad=2)  # PyG needs zero padded adjacency entries
    ours = P.dense_mincut_pool(x, adj, s, mask, temperature=0.5)
    theirs = pyg_mincut(x, adj, s, mask, temp=0.5)
    for a, b in zip(ours[1:], theirs):
        _close(a, b.detach().numpy())


def test_dmon_module_agrees_with_pyg_when_selu(graphs):
    from torch_geometric.nn import DMoNPooling as PygDMoN

    torch.manual_seed(0)
    x, adj, _, mask = _batch(graphs, extra_pad=1)
    theirs = PygDMoN([F, 8], C).double()
    ours = P.DMoNPooling([F, 8], C, act="selu").double()
    ours.load_state_dict(theirs.state_dict())
    o, t = ours(x, adj, mask), theirs(x, adj, mask)
    for a, b in zip(o[:5], t[:5]):
        _close(a, b.detach().numpy())
    # PyG's cluster loss divides the B norms by a B x 1 tensor of sizes (pyg-team/pytorch_geometric#10148):
    # wrong for graphs of different sizes. Ours = the mean of PyG's value on each graph alone.
    alone = [theirs(x[g, : int(mask[g].sum())], adj[g, : int(mask[g].sum()), : int(mask[g].sum())])[5]
             for g in range(len(graphs))]
    _close(o[5], torch.stack(alone).mean().detach().numpy())
    # default (reference formula X' = S^T X): no activation on the pooled features
    plain = P.DMoNPooling([F, 8], C).double()
    plain.load_state_dict(theirs.state_dict())
    s, out = plain(x, adj, mask)[:2]
    _close(out, (s.transpose(1, 2) @ torch.where(mask.unsqueeze(-1), x, 0)).detach().numpy())


def test_diffpool_agrees_with_pyg_on_one_unpadded_graph(graphs):
    from torch_geometric.nn.dense import dense_diff_pool as pyg_diff

    a, x, ll = (torch.tensor(v) for v in graphs[2])
    ours = P.dense_diff_pool(x, a, ll)
    theirs = pyg_diff(x, a, ll)
    for o, t in zip(ours[1:], theirs):
        _close(o, t.numpy())


# ------------------------------------------------------------------------------------- modules, gradients
def _finite_grads(module_or_tensors) -> None:
    for p in module_or_tensors:
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("cls,kw", [
    (P.DMoNPooling, dict(dropout=0.1)),
    (P.MinCutPooling, dict(hidden=[8])),
    (P.DiffPooling, dict(channels=5, act="relu")),
])
def test_modules_mask_invariant_and_backward(graphs, cls, kw):
    torch.manual_seed(0)
    layer = cls(F, C, **kw).double().eval()
    x1, a1, _, m1 = _batch(graphs)
    x2, a2, _, m2 = _batch(graphs, pad_garbage=True, extra_pad=4)
    o1, o2 = layer(x1, a1, m1), layer(x2, a2, m2)
    n1 = x1.size(1)
    _close(o1[0], o2[0][:, :n1].detach().numpy())
    assert torch.all(o2[0][:, n1:] == 0)
    for t1, t2 in zip(o1[1:], o2[1:]):
        _close(t1, t2.detach().numpy(), rtol=1e-8, atol=1e-10)
    out_ch = kw.get("channels", F)
    assert o1[1].shape == (len(SIZES), C, out_ch) and o1[2].shape == (len(SIZES), C, C)
    layer.train()
    o = layer(x2, a2, m2)
    loss = o[1].pow(2).mean() + o[2].sum() * 0.1 + sum(o[3:])
    loss.backward()
    assert torch.isfinite(loss)
    _finite_grads(list(layer.parameters()))


def test_dense_functional_gradients_reach_logits(graphs):
    x, adj, s, mask = _batch(graphs, pad_garbage=True, extra_pad=2)
    x = torch.where(mask.unsqueeze(-1), x, 0.0)  # (NaN padding in x would not reach the output anyway)
    for fn in (P.dense_dmon_pool, P.dense_mincut_pool, P.dense_diff_pool):
        logits = s.clone().requires_grad_(True)
        o = fn(x, adj, logits, mask)
        (sum(o[3:]) + o[2].sum()).backward()
        _finite_grads([logits])
        assert torch.all(logits.grad[~mask] == 0)  # padded nodes receive nothing


# --------------------------------------------------------------------------------------- sparse forms
def _sparse_inputs(a: np.ndarray):
    r, c = np.nonzero(a)
    return torch.tensor(np.stack([r, c])), torch.tensor(a[r, c])


@pytest.mark.parametrize("form", ["edge_index", "coo", "csr", "scipy"])
def test_sparse_pool_equals_dense(graphs, form):
    for a, x, ll in (graphs[4], graphs[3]):  # the largest graph (unweighted) and a weighted one
        ei, ew = _sparse_inputs(a)
        adj = {
            "edge_index": ei,
            "coo": torch.sparse_coo_tensor(ei, ew, a.shape),
            "csr": torch.tensor(a).to_sparse_csr(),
            "scipy": sp.csr_matrix(a),
        }[form]
        kw = dict(edge_weight=ew) if form == "edge_index" else {}
        xt, lt = torch.tensor(x), torch.tensor(ll)
        dense = P.dense_dmon_pool(xt, torch.tensor(a), lt, temperature=0.8, act="selu")
        sparse = P.sparse_dmon_pool(xt, adj, lt, temperature=0.8, act="selu", **kw)
        _close(sparse[0], dense[0][0])
        for st, dt in zip(sparse[1:3], dense[1:3]):
            _close(st, dt[0])
        for st, dt in zip(sparse[3:], dense[3:]):
            _close(st, dt)
        dense = P.dense_mincut_pool(xt, torch.tensor(a), lt)
        sparse = P.sparse_mincut_pool(xt, adj, lt, **kw)
        for st, dt in zip(sparse[1:3], dense[1:3]):
            _close(st, dt[0])
        for st, dt in zip(sparse[3:], dense[3:]):
            _close(st, dt)
        s = torch.softmax(lt, -1)
        out, out_adj = P.sparse_pool(xt, adj, s, **kw)
        _close(out, s.T @ xt)
        _close(out_adj, s.T @ torch.tensor(a) @ s)


def test_sparse_losses_with_global_statistics(graphs):
    """Mini-batch estimator: B = V (any order) gives the full loss; B subset follows the documented formula."""
    a, x, ll = graphs[4]
    n = len(a)
    s_full = torch.softmax(torch.tensor(ll), -1)
    ei, ew = _sparse_inputs(a)
    deg = torch.tensor(a.sum(1))
    two_m = float(a.sum())
    full_dmon = P.dmon_loss_sparse(s_full, ei, edge_weight=ew)
    full_cut = P.mincut_loss_sparse(s_full, ei, edge_weight=ew)
    ref = ref_dmon(a, x, ll)
    _close(full_dmon[0], ref[3]), _close(full_dmon[1], ref[4]), _close(full_dmon[2], ref[5])
    _close(full_cut[0], ref_mincut(a, x, ll)[3])

    def induced(nodes):
        sub = a[np.ix_(nodes, nodes)]
        return _sparse_inputs(sub)

    perm = np.random.default_rng(3).permutation(n)
    sei, sew = induced(perm)
    for total in (None, n):
        got = P.dmon_loss_sparse(s_full[perm], sei, deg[perm], two_m, edge_weight=sew, num_nodes_total=total)
        for g, f in zip(got, full_dmon):
            _close(g, f)
        got = P.mincut_loss_sparse(s_full[perm], sei, deg[perm], edge_weight=sew, num_nodes_total=total)
        for g, f in zip(got, full_cut):
            _close(g, f)

    nodes = np.sort(perm[:6])
    b = len(nodes)
    sb = s_full[nodes].numpy()
    ab, db = a[np.ix_(nodes, nodes)], a.sum(1)[nodes]
    sei, sew = induced(nodes)
    spectral_ref = -(np.trace(sb.T @ ab @ sb) - np.sum((sb.T @ db) ** 2) / two_m) / two_m * (n / b) ** 2
    cluster_ref = np.sqrt(C) / b * np.linalg.norm(sb.sum(0)) - 1
    cut_ref = -np.trace(sb.T @ ab @ sb) / np.sum(db * (sb ** 2).sum(1)) * (n / b)
    got = P.dmon_loss_sparse(s_full[nodes], sei, deg[nodes], two_m, edge_weight=sew, num_nodes_total=n)
    _close(got[0], spectral_ref), _close(got[1], _ortho(sb)), _close(got[2], cluster_ref)
    got = P.mincut_loss_sparse(s_full[nodes], sei, deg[nodes], edge_weight=sew, num_nodes_total=n)
    _close(got[0], cut_ref), _close(got[1], _ortho(sb))
    # without num_nodes_total: the same formulas unscaled
    got = P.dmon_loss_sparse(s_full[nodes], sei, deg[nodes], torch.tensor(two_m), edge_weight=sew)
    _close(got[0], spectral_ref / (n / b) ** 2)


def test_sparse_gradients_and_float32(graphs):
    a, x, ll = graphs[1]
    ei, ew = _sparse_inputs(a)
    adj = P.to_sparse_adj(ei, len(a), ew)  # converted once, float32 CSR
    assert adj.layout == torch.sparse_csr and adj.dtype == torch.float32
    assert P.to_sparse_adj(adj) is adj
    _close(P.sparse_degree(adj), a.sum(1), rtol=1e-6)
    logits = torch.tensor(ll, dtype=torch.float32, requires_grad=True)
    xt = torch.tensor(x, dtype=torch.float32)
    o = P.sparse_dmon_pool(xt, adj, logits)
    m = P.sparse_mincut_pool(xt, adj, logits)
    loss = sum(o[3:]) + sum(m[3:]) + o[1].pow(2).sum() + m[2].sum()
    loss.backward()
    _finite_grads([logits])
    # float32 sparse agrees with float64 dense
    ref = ref_dmon(a, x, ll)
    for got, r in zip(o[3:], ref[3:]):
        _close(got, r, rtol=1e-5, atol=1e-6)


def test_sparse_rejects_bad_shapes(graphs):
    a, _, ll = graphs[0]
    with pytest.raises(ValueError):
        P.dmon_loss_sparse(torch.tensor(ll)[None], torch.tensor(a))
    with pytest.raises(ValueError):
        P.dmon_loss_sparse(torch.tensor(ll)[:-1], torch.tensor(a).to_sparse_csr())


# --------------------------------------------------------------------------------------------- readouts
@pytest.fixture(scope="module")
def nodes():
    rng = np.random.default_rng(7)
    n = sum(SIZES)
    x = torch.tensor(rng.normal(size=(n, F)))
    batch = torch.cat([torch.full((k,), g) for g, k in enumerate(SIZES)])
    labels = torch.tensor(rng.integers(0, C + 1, size=n))  # C + 1 clusters; make one empty below
    labels[labels == 2] = 0
    return x, batch, labels


def test_global_readouts(nodes):
    x, batch, _ = nodes
    for reduce, fn in (("sum", np.sum), ("mean", np.mean), ("max", np.max)):
        got = R.global_readout(x, batch, reduce)
        ref = np.stack([fn(x[batch == g].numpy(), 0) for g in range(len(SIZES))])
        _close(got, ref)
        _close(R.global_readout(x, None, reduce), fn(x.numpy(), 0, keepdims=True))
        # dense (padded) batch form
        xd, mask = to_dense_batch(x, batch, max_num_nodes=max(SIZES) + 2, fill_value=123.0)
        _close(R.dense_readout(xd, mask, reduce), ref)
    _close(R.dense_readout(xd[:1, : SIZES[0]], None, "mean"), x[: SIZES[0]].mean(0, keepdim=True))


def test_cluster_readouts_hard_and_soft(nodes):
    x, _, labels = nodes
    k = C + 1
    onehot = torch.nn.functional.one_hot(labels, k).double()
    for reduce, fn in (("sum", np.sum), ("mean", np.mean), ("max", np.max)):
        ref = np.stack([fn(x[labels == c].numpy(), 0) if (labels == c).any() else np.zeros(F) for c in range(k)])
        _close(R.cluster_readout(x, labels, reduce, num_clusters=k), ref)
        _close(R.cluster_readout(x, onehot, reduce), ref)
    s = torch.softmax(torch.randn(len(x), k, dtype=torch.float64), -1)
    _close(R.cluster_readout(x, s, "sum"), np.einsum("ic,if->cf", s.numpy(), x.numpy()))
    _close(R.cluster_readout(x, s, "mean"),
           np.einsum("ic,if->cf", s.numpy(), x.numpy()) / s.sum(0).numpy()[:, None])
    with pytest.raises(ValueError):
        R.cluster_readout(x, labels, "median")


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_gated_attention_readout(nodes, gate):
    x, batch, labels = nodes
    torch.manual_seed(0)
    ro = R.GatedAttentionReadout(F, 5, gate=gate).double()
    g, h = ro.gate_nn(x).detach(), ro.nn(x).detach()

    def ref(index, size):
        rows = []
        for c in range(size):
            sel = index == c
            if not sel.any():
                rows.append(np.zeros(5))
            elif gate == "sigmoid":
                rows.append((torch.sigmoid(g[sel]) * h[sel]).sum(0).numpy())
            else:
                w = torch.softmax(g[sel].view(-1), 0)
                rows.append((w[:, None] * h[sel]).sum(0).numpy())
        return np.stack(rows)

    _close(ro(x, batch), ref(batch, len(SIZES)))
    _close(ro(x), ref(torch.zeros(len(x), dtype=torch.long), 1))
    k = C + 1
    hard = ro.clusters(x, labels, num_clusters=k)
    _close(hard, ref(labels, k))
    onehot = torch.nn.functional.one_hot(labels, k).double()
    _close(ro.clusters(x, onehot), ref(labels, k))
    s = torch.softmax(torch.randn(len(x), k, dtype=torch.float64), -1)
    soft = ro.clusters(x, s)
    if gate == "sigmoid":
        _close(soft, (s.T @ (torch.sigmoid(g) * h)).numpy())
    else:
        w = s * torch.exp(g)  # N x k: S_ic e^{g_i}
        _close(soft, ((w / w.sum(0)).T @ h).numpy())
    (soft.sum() + ro(x, batch).sum()).backward()
    _finite_grads(list(ro.parameters()))


# ------------------------------------------------------------------------------- node scores, top-k per cluster
def test_node_score_topk_and_sag(nodes):
    x, batch, _ = nodes
    torch.manual_seed(0)
    topk = P.NodeScore(F).double()
    w = topk.weight.detach()
    _close(topk(x), torch.tanh(x @ w.T / w.norm()).view(-1).detach().numpy())
    ei = torch.tensor(np.stack(np.nonzero(_random_graph(np.random.default_rng(1), len(x), 0.1))))
    for gnn in ("graph", "gcn", "sage"):
        sag = P.NodeScore(F, gnn=gnn, act="sigmoid").double()
        score = sag(x, ei)
        assert score.shape == (len(x),) and ((score > 0) & (score < 1)).all()
        score.sum().backward()
        _finite_grads([p for p in sag.parameters()])
    with pytest.raises(ValueError):
        P.NodeScore(F, gnn="gcn")(x)


def test_cluster_topk(nodes):
    x, _, labels = nodes
    k = C + 1
    score = torch.randn(len(x), dtype=torch.float64)
    idx, cl = P.cluster_topk(labels, 3, score)
    exp_idx, exp_cl = [], []
    for c in range(k):
        members = torch.nonzero(labels == c).view(-1)
        best = members[torch.argsort(score[members], descending=True)][:3]
        exp_idx += best.tolist()
        exp_cl += [c] * len(best)
    assert idx.tolist() == exp_idx and cl.tolist() == exp_cl
    # soft S: default score = assignment probability to the argmax cluster
    s = torch.softmax(3 * torch.randn(len(x), k, dtype=torch.float64), -1)
    idx, cl = P.cluster_topk(s, 2)
    conf, lab = s.max(-1)
    ref_idx, _ = P.cluster_topk(lab, 2, conf)
    assert idx.tolist() == ref_idx.tolist()
    assert torch.all(lab[idx] == cl)
    # non-exclusive: top-k per column
    idx, cl = P.cluster_topk(s, 2, exclusive=False)
    assert idx.tolist() == torch.topk(s, 2, dim=0).indices.T.reshape(-1).tolist()
    assert cl.tolist() == [c for c in range(k) for _ in range(2)]
    with pytest.raises(ValueError):
        P.cluster_topk(labels, 2)


def test_sparse_symmetric_backward_and_directed_graphs(graphs):
    """symmetric=True (backward by A) gives autograd's gradients; a directed A matches the dense form."""
    a, x, ll = graphs[3]
    ei, ew = _sparse_inputs(a)
    adj = P.to_sparse_adj(ei, len(a), ew, dtype=torch.float64)
    xt = torch.tensor(x)

    def grads(fn, adj_, **kw):
        logits = torch.tensor(ll, requires_grad=True)
        o = fn(xt, adj_, logits, **kw)
        (sum(o[3:]) + o[2].pow(2).sum()).backward()
        return logits.grad

    for fn in (P.sparse_dmon_pool, P.sparse_mincut_pool):
        _close(grads(fn, adj, symmetric=True), grads(fn, adj).numpy())
    rng = np.random.default_rng(11)
    directed = (rng.random(a.shape) < 0.3) * rng.uniform(0.5, 2, a.shape)
    np.fill_diagonal(directed, 0)
    d_adj = P.to_sparse_adj(torch.tensor(directed).to_sparse(), dtype=torch.float64)
    for sfn, dfn in ((P.sparse_dmon_pool, P.dense_dmon_pool), (P.sparse_mincut_pool, P.dense_mincut_pool)):
        _close(grads(sfn, d_adj), grads(dfn, torch.tensor(directed)).numpy())
