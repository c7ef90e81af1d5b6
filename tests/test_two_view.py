"""Two-view self-supervised methods (CCA-SSG, G-BT, NS4GC) and the graph augmentations they share."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch_geometric.data import Data

from agcpipe.config import ClusterConfig, TrainConfig
from agcpipe.errors import ConfigError
from agcpipe.methods import registry
from agcpipe.methods.base import MethodContext
from agcpipe.methods.trainable import TrainRun
from agcpipe.nn.augment import augment_batch, drop_edges, mask_feature_columns, two_views
from agcpipe.nn.encoders import maybe_sparse
from agcpipe.train import checkpoint as ckpt
from agcpipe.train.engine import Engine
from agcpipe.train.history import read_history
from graph_factory import make_graph
from method_support import method_context, one_torch_thread, sbm_edges  # noqa: F401 (autouse fixture)

METHODS = ("ccassg", "gbt", "ns4gc")
#: small encoders (CCA-SSG: lam scaled up for 16 dimensions); the published augmentation defaults
SMALL = {
    "ccassg": {"encoder": {"type": "gcn", "hidden": 16, "layers": 2, "activation": "relu", "last_activation": False}, "lr": 0.01, "lam": 0.01},
    "gbt": {"encoder": {"type": "gcn", "hidden": 16, "layers": 2, "out": 8, "activation": "prelu", "norm": "batch", "last_activation": False}, "lr": 0.01},
    "ns4gc": {"encoder": {"type": "gcn", "hidden": 16, "layers": 2, "out": 8, "activation": "elu", "last_activation": False}, "lr": 0.01},
}


def _sbm(tmp_path, n_per=40, k=3, d=12, seed=0, signal=1.0):
    """Planted partition: k communities, 90% of edges inside, features = noise + a weak class signal."""
    rng = np.random.default_rng(seed)
    comm = np.repeat(np.arange(k), n_per)
    x = rng.standard_normal((comm.size, d)) + signal * np.eye(k, d)[comm]
    return make_graph(tmp_path, sbm_edges(rng, comm, comm.size * 4, p_in=0.9), features=x, labels=comm)


def _ctx(graph, tmp_path: Path, name="run", seed=0, checkpoint=False, **train) -> MethodContext:
    return method_context(graph, tmp_path, name, seed, checkpoint=checkpoint, **train)


def _run(method, ctx) -> TrainRun:
    """What ``fit`` hands to ``batches`` / ``loss``, without training."""
    plan = method.plan(ctx.train, ctx.graph.n_nodes)
    model = method.build_model(method.input_dim(ctx), ctx)
    return TrainRun(method, ctx, plan, Engine.from_context(ctx, plan), model)


# ---------------------------------------------------------------------------------------- augmentations
def test_feature_masking_zeroes_whole_columns_dense_and_sparse():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 400) + 0.1
    masked = mask_feature_columns(x, 0.3, g)
    zero_cols = (masked == 0).all(0)
    assert torch.equal(masked[:, ~zero_cols], x[:, ~zero_cols])  # kept columns untouched
    assert 0.2 < zero_cols.float().mean() < 0.4 and not (x == 0).any()  # x itself unchanged
    # sparse CSR input (bag-of-words features): the same columns are masked for the same stream
    xs = torch.where(torch.rand(50, 400) < 0.05, x, torch.zeros(()))
    sp = maybe_sparse(xs)
    assert sp.layout == torch.sparse_csr
    a = mask_feature_columns(sp, 0.3, torch.Generator().manual_seed(1))
    b = mask_feature_columns(xs, 0.3, torch.Generator().manual_seed(1))
    assert a.layout == torch.sparse_csr
    torch.testing.assert_close(a.to_dense(), b)
    assert mask_feature_columns(x, 0.0, g) is x
    with pytest.raises(ValueError, match="masking rate"):
        mask_feature_columns(x, 1.0, g)


def test_edge_dropping_keeps_order_and_weights_and_is_seeded():
    ei = torch.stack([torch.arange(2000), torch.arange(2000).flip(0)])
    w = torch.arange(2000, dtype=torch.float32)
    kept, kw = drop_edges(ei, w, 0.4, torch.Generator().manual_seed(0))
    assert 0.55 < kept.size(1) / 2000 < 0.65
    assert bool((kept[0][1:] > kept[0][:-1]).all())  # order kept (hop order of sampled subgraphs)
    torch.testing.assert_close(kw, kept[0].float())  # each weight stays with its edge
    again, _ = drop_edges(ei, w, 0.4, torch.Generator().manual_seed(0))
    other, _ = drop_edges(ei, w, 0.4, torch.Generator().manual_seed(1))
    assert torch.equal(kept, again) and not torch.equal(kept, other)
    with pytest.raises(ValueError, match="dropping rate"):
        drop_edges(ei, w, -0.1)


def test_augment_batch_keeps_the_batch_layout_and_refuses_prepared_graphs():
    x = torch.rand(10, 6)
    batch = Data(x=x, edge_index=torch.randint(10, (2, 40)), num_nodes=10)
    batch.edge_weight = torch.rand(40)
    batch.batch_size, batch.num_sampled_nodes, batch.n_id = 3, [3, 7], torch.arange(10)
    v1, v2 = two_views(batch, (0.0, 0.5), (0.5, 0.0), torch.Generator().manual_seed(0))
    assert v1.batch_size == 3 and v1.num_sampled_nodes == [3, 7] and not v1.prepared
    assert torch.equal(v1.x, x) and v1.edge_index.size(1) < 40 and v1.edge_weight.numel() == v1.edge_index.size(1)
    assert torch.equal(v2.edge_index, batch.edge_index) and not torch.equal(v2.x, x)
    batch.prepared = True
    with pytest.raises(ValueError, match="raw edge_index"):
        augment_batch(batch, 0.1, 0.1)


# ---------------------------------------------------------------------------------------------- losses
def test_ccassg_invariance_is_the_papers_frobenius_term_up_to_a_constant():
    from agcpipe.methods.ccassg import standardize

    torch.manual_seed(0)
    z1, z2 = torch.randn(64, 8) * 3 + 1, torch.randn(64, 8)
    h1, h2 = standardize(z1), standardize(z2)
    n, dim = z1.shape
    # columns standardised: ||Z~||_F^2 = h (n-1)/n, so -tr(Z~1^T Z~2) = ||Z~1 - Z~2||^2 / 2 - h (n-1)/n
    torch.testing.assert_close((h1 * h1).sum(), torch.tensor(dim * (n - 1) / n), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(-(h1 * h2).sum(), 0.5 * (h1 - h2).pow(2).sum() - dim * (n - 1) / n, rtol=1e-5, atol=1e-5)


def test_gbt_cross_correlation_of_a_view_with_itself():
    from agcpipe.methods.gbt import cross_correlation

    torch.manual_seed(0)
    z = torch.randn(500, 6) * torch.tensor([1.0, 5, 0.1, 2, 3, 1]) + 7
    c = cross_correlation(z, z)
    torch.testing.assert_close(c.diagonal(), torch.full((6,), 499 / 500))  # unbiased std, divided by n
    assert c.abs().sub(torch.eye(6) * c.diagonal()).max() < 0.2  # independent columns: small off-diagonal


def test_ns4gc_blockwise_sparsity_sum_is_exact_with_gradients():
    from agcpipe.methods.ns4gc import sigmoid_sum

    torch.manual_seed(0)
    z1 = torch.nn.functional.normalize(torch.randn(37, 5), dim=1).requires_grad_()
    z2 = torch.nn.functional.normalize(torch.randn(37, 5), dim=1).requires_grad_()
    direct = torch.sigmoid((z1 @ z2.T - 0.6) / 0.1).sum()
    g_direct = torch.autograd.grad(direct, (z1, z2))
    blocked = sigmoid_sum(z1, z2, 0.6, 0.1, block_elements=37 * 4)  # 4 rows per block, checkpointed
    g_blocked = torch.autograd.grad(blocked, (z1, z2))
    torch.testing.assert_close(blocked, direct)
    for a, b in zip(g_blocked, g_direct):
        torch.testing.assert_close(a, b)


def test_ns4gc_minibatch_terms_equal_the_exact_ones_on_a_whole_graph_batch(tmp_path):
    """One batch with every node as a seed and complete neighbourhoods, no augmentation: L_ali and L_spa
    are the full-batch values (the seed pairs that are edges are excluded exactly), and the batch's
    seed_edges / partner pairs are edges of the graph."""
    g = _sbm(tmp_path)
    params = {**SMALL["ns4gc"], "feature_mask": [0.0, 0.0], "edge_drop": [0.0, 0.0]}
    method = registry.get("ns4gc").build(params)
    torch.manual_seed(0)
    full_run = _run(method, _ctx(g, tmp_path, name="full", mode="full"))
    mini_run = _run(method, _ctx(g, tmp_path, name="mini", mode="minibatch", batch_size=g.n_nodes, fanout=[-1]))
    mini_run.model.load_state_dict(full_run.model.state_dict())
    full = method.loss(full_run.model, full_run.method.batches(full_run)[0], full_run)
    (batch,) = list(method.batches(mini_run))
    mini = method.loss(mini_run.model, batch, mini_run)
    for part in ("loss_ali", "loss_spa"):
        torch.testing.assert_close(mini.components[part], full.components[part], rtol=1e-5, atol=1e-6)
    ip, ind = np.asarray(g.indptr), np.asarray(g.indices)
    edges = {(i, int(j)) for i in range(g.n_nodes) for j in ind[ip[i] : ip[i + 1]]}
    nid = batch.n_id.numpy()
    seed_pairs = {(int(nid[u]), int(nid[v])) for u, v in batch.seed_edges.T.tolist()}
    assert seed_pairs == edges  # every edge among the seeds, nothing else
    assert all((int(nid[u]), int(nid[v])) in edges for u, v in batch.partner_pairs.T.tolist())


# -------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("mode", ["full", "minibatch"])
def test_loss_is_finite_and_decreases(tmp_path, name, mode):
    g = _sbm(tmp_path)
    method = registry.get(name).build(SMALL[name])
    ctx = _ctx(g, tmp_path, mode=mode, epochs=30, batch_size=40, fanout=[5, 3])
    info = method.fit(ctx)
    assert info["plan"]["mode"] == mode and info["epochs_run"] == 30
    hist = read_history(ctx.history_path)
    loss = hist.series("loss")
    assert all(math.isfinite(v) for v in loss)
    assert np.mean(loss[-5:]) < np.mean(loss[:5]), loss  # augmentations make single epochs noisy
    assert len({c for _, c, _ in hist.rows}) == (4 if name == "ns4gc" else 3)  # total + the method's terms
    emb = method.embed(ctx)
    assert emb.shape[0] == g.n_nodes and np.isfinite(emb).all()


@pytest.mark.parametrize("name", METHODS)
def test_planted_partition_is_recovered(tmp_path, name):
    """Weak features (signal 1 sd), 90% of edges inside communities: the embeddings cluster the planted
    communities far better than KMeans on the raw features does."""
    g = _sbm(tmp_path, n_per=60, signal=1.0, seed=1)
    method = registry.get(name).build(SMALL[name])
    ctx = _ctx(g, tmp_path, mode="full", epochs=100)
    method.fit(ctx)
    emb = method.embed(ctx)
    cl = method.cluster(ctx, emb, ClusterConfig(n_clusters=3, n_init=5))
    labels = np.repeat(np.arange(3), 60)
    raw = method.cluster(ctx, np.asarray(g.features), ClusterConfig(n_clusters=3, n_init=5))
    nmi, nmi_raw = normalized_mutual_info_score(labels, cl.labels), normalized_mutual_info_score(labels, raw.labels)
    assert nmi > 0.8 and nmi > nmi_raw + 0.2, (nmi, nmi_raw)


@pytest.mark.parametrize("name", METHODS)
def test_assign_on_a_graph_with_new_nodes(tmp_path, name):
    """The trained state embeds a later graph (the old nodes + 30 new ones wired into communities);
    old nodes keep their clusters, new nodes join their community's cluster."""
    g = _sbm(tmp_path, n_per=60, seed=1)
    method = registry.get(name).build(SMALL[name])
    ctx = _ctx(g, tmp_path, mode="full", epochs=60)
    method.fit(ctx)
    trained = method.cluster(ctx, method.embed(ctx), ClusterConfig(n_clusters=3, n_init=5))

    rng = np.random.default_rng(5)
    n = g.n_nodes
    comm = np.repeat(np.arange(3), 60)
    new_comm = rng.integers(3, size=30)
    ip, ind = np.asarray(g.indptr), np.asarray(g.indices)
    old = [(i, int(j)) for i in range(n) for j in ind[ip[i] : ip[i + 1]] if i < j]
    new = [(n + t, int(rng.choice(np.flatnonzero(comm == c)))) for t, c in enumerate(new_comm) for _ in range(4)]
    x_new = rng.standard_normal((30, 12)) + np.eye(3, 12)[new_comm]
    g2 = make_graph(tmp_path, old + new, features=np.vstack([np.asarray(g.features), x_new]))
    actx = _ctx(g2, tmp_path, name="assign")
    actx.state_dir = ctx.state_dir  # the registered model's state
    actx.train = None  # assign: no train section
    got = method.assign(actx, method.embed(actx), trained.centers, ClusterConfig(n_clusters=3))
    assert got.labels.shape == (n + 30,)
    assert adjusted_rand_score(trained.labels, got.labels[:n]) > 0.9
    # map each community to the cluster most of its old nodes got, then check the new nodes
    majority = np.array([np.bincount(trained.labels[comm == c], minlength=3).argmax() for c in range(3)])
    assert (got.labels[n:] == majority[new_comm]).mean() > 0.8


def test_resume_replays_the_same_augmentations(tmp_path, monkeypatch):
    """The augmentations draw from the engine's checkpointed generator: a killed mini-batch run resumed
    from its checkpoint ends with the same weights as an uninterrupted one."""
    g = _sbm(tmp_path)
    settings = dict(mode="minibatch", epochs=4, batch_size=40, fanout=[4], patience=0, checkpoint_every=2)
    ref = registry.get("ccassg").build(SMALL["ccassg"])
    ref_ctx = _ctx(g, tmp_path, name="ref", checkpoint=True, **settings)
    ref.fit(ref_ctx)

    method = registry.get("ccassg").build(SMALL["ccassg"])
    ctx = _ctx(g, tmp_path, name="crash", checkpoint=True, **settings)
    calls = {"n": 0}
    original = type(method).loss

    def crashing(self, model, batch, run):
        calls["n"] += 1
        if calls["n"] == 3 * 3 + 1:  # first batch of epoch 4 (3 batches per epoch); checkpoint after epoch 2
            raise KeyboardInterrupt("killed")
        return original(self, model, batch, run)

    monkeypatch.setattr(type(method), "loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        method.fit(ctx)
    assert ckpt.load_checkpoint(ctx.checkpoint_dir)["epoch"] == 2
    monkeypatch.setattr(type(method), "loss", original)
    info = registry.get("ccassg").build(SMALL["ccassg"]).fit(ctx)
    assert info["resumed_from_epoch"] == 2
    np.testing.assert_array_equal(method.embed(ctx), ref.embed(ref_ctx))
    other = registry.get("ccassg").build(SMALL["ccassg"])
    other_ctx = _ctx(g, tmp_path, name="other", seed=1, **settings)
    other.fit(other_ctx)
    assert not np.allclose(other.embed(other_ctx), ref.embed(ref_ctx))  # another seed, other draws


# ------------------------------------------------------------------------------------------ parameters
def test_parameter_errors_and_defaults():
    for name in METHODS:
        with pytest.raises(ConfigError, match="feature_mask"):
            registry.get(name).build({"feature_mask": [0.1, 1.0]})
        with pytest.raises(ConfigError, match="edge_drop"):
            registry.get(name).build({"edge_drop": [0.1]})
    with pytest.raises(ConfigError, match="tau"):
        registry.get("ns4gc").build({"tau": 0})
    with pytest.raises(ConfigError, match="lam"):
        registry.get("ccassg").build({"lam": -1})
    cca, gbt, ns = (registry.get(m).build({}) for m in METHODS)
    assert cca.params["lam"] == 1e-3 and cca.params["edge_drop"] == [0.4, 0.4] and cca.params["epochs"] == 50
    assert gbt.params["lam"] is None and gbt.params["encoder"]["norm"] == "batch"
    assert ns.params["s"] == 0.6 and ns.params["encoder"]["out"] == 64
    # NS4GC's exact full-batch sparsity term is O(N^2 h): auto goes mini-batch above 50,000 nodes
    assert ns.plan(None, 50_000).mode == "full" and ns.plan(None, 50_001).mode == "minibatch"
    assert ns.plan(TrainConfig(mode="full"), 10**6).mode == "full" and cca.plan(None, 100_000).mode == "full"
