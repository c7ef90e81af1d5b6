"""ARGA, S3GC and MAGI on tiny graphs, and the random-walk pieces they use (self-loop walks, visit
counts, MAGI's two-stage positives, its contrastive loss)."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from agcpipe.config import ClusterConfig, TrainConfig
from agcpipe.errors import ConfigError, InputError
from agcpipe.methods import registry
from agcpipe.methods.base import MethodContext
from agcpipe.methods.magi import contrastive_loss, expand_seeds, positive_pairs
from agcpipe.ops.features import compute_features
from agcpipe.sampling.walks import RandomWalkSampler, visit_counts
from agcpipe.train import checkpoint as ckpt
from agcpipe.train.history import read_history
from graph_factory import make_graph
from method_support import method_context, one_torch_thread, sbm_edges  # noqa: F401 (autouse fixture)


def _sbm(tmp_path, n_per=40, k=3, d=12, seed=0):
    rng = np.random.default_rng(seed)
    comm = np.repeat(np.arange(k), n_per)
    x = rng.standard_normal((comm.size, d)) + 1.5 * np.eye(k, d)[comm]
    return make_graph(tmp_path, sbm_edges(rng, comm, comm.size * 4, p_in=0.9), features=x, labels=comm), comm, x


def _ctx(graph, tmp_path: Path, method, name="run", seed=0, checkpoint=False, **train) -> MethodContext:
    feats_dir = tmp_path / f"{name}-{seed}" / "feats"
    feats_dir.mkdir(parents=True, exist_ok=True)
    feats, _ = compute_features(graph, method.precompute_ops(), "none", feats_dir)
    return method_context(graph, tmp_path, name, seed, features=feats, checkpoint=checkpoint, train_config=False, **train)


SMALL = {
    "arga": {"encoder": {"type": "gcn", "hidden": 16, "layers": 2, "out": 8, "activation": "relu", "last_activation": False}, "lr": 0.01, "reg_weight": 0.1},
    "s3gc": {"hidden": 16, "K": 2, "walks_per_node": 4},
    "magi": {"encoder": {"type": "gcn", "hidden": 16, "layers": 1, "last_activation": False}, "num_walks": 20, "lr": 0.01},
}
COMPONENTS = {"arga": {"loss", "loss_pos", "loss_neg", "loss_reg", "loss_disc"}, "s3gc": {"loss", "pos", "neg"}, "magi": {"loss"}}


# ------------------------------------------------------------------------------------------- walks
def test_self_loop_walks_stay_with_probability_one_over_degree_plus_one():
    a = sp.random(60, 60, density=0.1, random_state=1, format="csr")
    a = ((a + a.T) > 0).astype(np.float32).tolil()
    a.setdiag(0)
    a[5, :] = 0
    a[:, 5] = 0
    a = a.tocsr()
    a.eliminate_zeros()
    a.sort_indices()
    ip, ind = a.indptr.astype(np.int64), a.indices.astype(np.int32)
    w = RandomWalkSampler(ip, ind, self_loops=True, seed=0)
    walks = w.walks(torch.arange(60).repeat(400), 3).numpy()
    for t in range(3):
        u, v = walks[:, t], walks[:, t + 1]
        moved = u != v
        assert np.asarray(a[u[moved], v[moved]]).all()  # every move follows an edge
    deg = np.diff(ip)
    stay = (walks[:, 1] == walks[:, 0]).reshape(400, 60).mean(0)
    expected = np.where(deg > 0, 1 / (deg + 1), 1.0)
    assert np.abs(stay - expected).max() < 0.08, (stay, expected)
    assert not (RandomWalkSampler(ip, ind, seed=0).walks(torch.arange(60), 3)[:, 1] == torch.arange(60))[deg > 0].any()


def test_visit_counts_match_a_counter():
    walks = torch.tensor([[0, 1, 2, 1], [0, 3, 3, 1], [2, 2, 0, 4], [5, 1, 1, 1]])
    source = torch.tensor([0, 0, 1, 2])
    row, node, count = visit_counts(walks, source, 6)
    expected = Counter()
    for s, wk in zip(source.tolist(), walks.tolist()):
        for v in wk[1:]:
            expected[(s, v)] += 1
    assert dict(zip(zip(row.tolist(), node.tolist()), count.tolist())) == dict(expected)
    assert row.tolist() == sorted(row.tolist())


class _FixedWalks:
    """A walker returning given walks (MAGI's positive rules tested on known visit counts)."""

    def __init__(self, steps):
        self.steps = torch.tensor(steps)

    def walks(self, start, walk_length):
        assert self.steps.shape == (start.numel(), walk_length)
        return torch.cat([start.view(-1, 1), self.steps], dim=1)


def test_magi_positives_follow_the_authors_rule():
    # sources 0 and 7, two walks each (rows: source 0, source 7, source 0, source 7), 3 steps
    steps = [[1, 1, 0], [7, 8, 9], [2, 1, 3], [8, 8, 8]]
    rows, cols = positive_pairs(_FixedWalks(steps), torch.tensor([0, 7]), 10, num_walks=2, walk_length=3)
    got = set(zip(rows.tolist(), cols.tolist()))
    # source 0 visits 1 x3, 2 x1, 3 x1 (itself: removed, counted 0): mean = 5 / 4 -> 1 is the only positive
    # source 7 visits 8 x4, 9 x1 (itself: removed): mean = 5 / 3 -> 8
    assert got == {(0, 1), (1, 8)}
    # restricted to a member set: visits outside it do not count, columns index the set
    members = torch.tensor([0, 2, 3, 7, 9])
    rows, cols = positive_pairs(_FixedWalks(steps), torch.tensor([0, 7]), 10, 2, 3, members=members)
    # source 0: 2 x1, 3 x1 -> mean 2 / 3 -> both; source 7: 9 x1 -> mean 1 / 2 -> 9
    assert set(zip(rows.tolist(), members[cols].tolist())) == {(0, 2), (0, 3), (1, 9)}
    # stage one: nodes visited more often than the mean over the distinct visited nodes (self included)
    batch = expand_seeds(_FixedWalks(steps), torch.tensor([0, 7]), 10, 2, 3)
    # source 0: 1 x3, 0 x1, 2 x1, 3 x1 (mean 1.5) -> 1; source 7: 7 x1, 8 x4, 9 x1 (mean 2) -> 8
    assert batch.tolist() == [0, 1, 7, 8]


def test_magi_loss_equals_the_reference_formula():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(9, 5), dim=1)
    pairs = torch.tensor([[0, 0, 2, 5, 5, 5], [1, 3, 4, 0, 6, 8]])
    tau = 0.3
    got = contrastive_loss(z, pairs, tau)
    dot = z @ z.t() / tau
    ref = []
    for i in (0, 2, 5):
        others = [j for j in range(9) if j != i]
        denom = torch.logsumexp(dot[i, others], 0)
        pos = pairs[1][pairs[0] == i]
        ref.append(-(dot[i, pos] - denom).mean())
    assert torch.allclose(got, torch.stack(ref).mean() * tau, atol=1e-6)


# ------------------------------------------------------------------------------------------ methods
@pytest.mark.parametrize("name", ["arga", "s3gc", "magi"])
@pytest.mark.parametrize("mode", ["full", "minibatch"])
def test_loss_decreases_and_clusters_a_planted_partition(tmp_path, name, mode):
    g, comm, _ = _sbm(tmp_path)
    method = registry.get(name).build(SMALL[name])
    ctx = _ctx(g, tmp_path, method, mode=mode, epochs=25, batch_size=32, fanout=[5, 3], patience=0)
    info = method.fit(ctx)
    assert info["plan"]["mode"] == mode and info["epochs_run"] == 25
    hist = read_history(ctx.history_path)
    loss = hist.series("loss")
    assert all(math.isfinite(v) for v in loss) and np.mean(loss[-3:]) < np.mean(loss[:3]), loss
    assert {c for _, c, _ in hist.rows} == COMPONENTS[name]
    emb = method.embed(ctx)
    assert emb.shape[0] == g.n_nodes and np.isfinite(emb).all()
    labels = method.cluster(ctx, emb, ClusterConfig(n_init=5)).labels
    assert normalized_mutual_info_score(comm, labels) > 0.7


def test_arga_steps_both_players_and_resumes_from_a_checkpoint(tmp_path, monkeypatch):
    g, _, _ = _sbm(tmp_path)
    settings = dict(mode="minibatch", epochs=6, batch_size=40, fanout=[4, 4], patience=0, checkpoint_every=2)
    ref = registry.get("arga").build(SMALL["arga"])
    ref_ctx = _ctx(g, tmp_path, ref, name="ref", checkpoint=True, **settings)
    torch.manual_seed(0)
    untrained = ref.build_model(12, ref_ctx).state_dict()
    ref.fit(ref_ctx)
    trained = ref.load_model(ref_ctx).state_dict()
    for part in ("encoder.", "discriminator."):  # both optimizers stepped
        assert any(not torch.equal(trained[k], untrained[k]) for k in trained if k.startswith(part))

    method = registry.get("arga").build(SMALL["arga"])
    ctx = _ctx(g, tmp_path, method, name="crash", checkpoint=True, **settings)
    calls = {"n": 0}
    original = type(method).loss

    def crashing(self, model, batch, run):
        calls["n"] += 1
        if calls["n"] == 3 * 5:  # epoch 5 of 3 batches: the last checkpoint is after epoch 4
            raise KeyboardInterrupt("killed")
        return original(self, model, batch, run)

    monkeypatch.setattr(type(method), "loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        method.fit(ctx)
    assert ckpt.load_checkpoint(ctx.checkpoint_dir)["epoch"] == 4
    monkeypatch.setattr(type(method), "loss", original)
    info = registry.get("arga").build(SMALL["arga"]).fit(ctx)
    assert info["resumed_from_epoch"] == 4
    np.testing.assert_array_equal(method.embed(ctx), ref.embed(ref_ctx))


def test_s3gc_sparse_node_table_and_scales(tmp_path):
    g, _, _ = _sbm(tmp_path)
    method = registry.get("s3gc").build({**SMALL["s3gc"], "sparse": True, "scale": "medium"})
    ctx = _ctx(g, tmp_path, method, mode="minibatch", epochs=15, batch_size=32, patience=0)
    method.fit(ctx)
    assert method.manual_optimization  # SparseAdam for the table + Adam for f, g
    loss = read_history(ctx.history_path).series("loss")
    assert np.mean(loss[-3:]) < np.mean(loss[:3])
    model = method.load_model(ctx)
    assert model.iden.sparse and len(model.f) == 3  # Linear -> PReLU -> Linear
    auto = registry.get("s3gc").build({})
    assert auto.scale(2_708) == "small" and auto.scale(500_000) == "medium" and auto.scale(5_000_000) == "large"
    assert not auto.sparse(2_708) and auto.sparse(500_000)
    assert auto.plan(TrainConfig(), 2_708).mode == "full" and auto.plan(TrainConfig(), 60_000).mode == "minibatch"
    magi = registry.get("magi").build({})
    assert magi.plan(TrainConfig(), 3_000).mode == "full" and magi.plan(TrainConfig(), 20_000).mode == "minibatch"


def test_s3gc_assigns_new_nodes_through_their_neighbours(tmp_path):
    g, comm, x = _sbm(tmp_path)
    method = registry.get("s3gc").build(SMALL["s3gc"])
    ctx = _ctx(g, tmp_path, method, mode="full", epochs=30, patience=0)
    method.fit(ctx)
    emb = method.embed(ctx)
    trained = method.cluster(ctx, emb, ClusterConfig(n_init=5))

    # later snapshot: the same graph, 30 new nodes wired into their community, one isolated new node
    rng = np.random.default_rng(1)
    n, m = g.n_nodes, 30
    new_comm = rng.integers(0, 3, m)
    ip, ind = np.asarray(g.indptr), np.asarray(g.indices)
    rows = np.repeat(np.arange(n), np.diff(ip))
    edges = [(int(a), int(b)) for a, b in zip(rows, ind) if a < b]
    for i, c in enumerate(new_comm):
        edges += [(n + i, int(v)) for v in rng.choice(np.flatnonzero(comm == c), 3, replace=False)]
    x2 = np.vstack([x, rng.standard_normal((m, x.shape[1])) + 1.5 * np.eye(3, x.shape[1])[new_comm], np.zeros((1, x.shape[1]))])
    g2 = make_graph(tmp_path, edges, features=x2, labels=np.concatenate([comm, new_comm, [0]]))
    ctx2 = _ctx(g2, tmp_path, method, name="snapshot")
    ctx2.state_dir = ctx.state_dir
    fresh = registry.get("s3gc").build(SMALL["s3gc"])
    got = fresh.assign(ctx2, fresh.embed(ctx2), trained.centers, ClusterConfig())
    assert adjusted_rand_score(trained.labels, got.labels[:n]) > 0.8
    majority = {c: Counter(trained.labels[comm == c].tolist()).most_common(1)[0][0] for c in range(3)}
    assert np.mean([got.labels[n + i] == majority[c] for i, c in enumerate(new_comm)]) > 0.8
    assert fresh._unreached is not None and fresh._unreached.sum() == 1 and fresh._unreached[-1]

    strict = registry.get("s3gc").build({**SMALL["s3gc"], "unseen": "error"})
    with pytest.raises(InputError, match="transductive"):
        strict.embed(ctx2)


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="context_size"):
        registry.get("s3gc").build({"walk_length": 2, "context_size": 4})
    with pytest.raises(ConfigError, match="tau"):
        registry.get("magi").build({"tau": 0})
    with pytest.raises(ConfigError, match="discriminator"):
        registry.get("arga").build({"discriminator": []})
