"""Joint methods with a trained cluster head: DAEGC, Dink-Net (pretraining, KMeans centres, joint phase) and
DiffPool (assignment GNN), on tiny planted-partition graphs, plus their losses against independent
computations, resumable two-phase training and assignment of a later snapshot with new nodes."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from agcpipe.config import load_config
from agcpipe.methods import registry
from agcpipe.methods.base import MethodContext
from agcpipe.methods.daegc import student_t, target_distribution
from agcpipe.methods.diffpool import entropy, link_sq_estimate, link_sq_full
from agcpipe.methods.dinknet import shrink_dilation
from agcpipe.nn.pooling import dense_diff_pool, to_sparse_adj
from agcpipe.train.history import read_history
from method_support import method_context, one_torch_thread, planted_sbm  # noqa: F401 (autouse fixture)


def _sbm(tmp_path, n_per=40, k=3, d=12, seed=0, weights=False):
    return planted_sbm(tmp_path, n_per, k, d, seed, weights)


def _ctx(graph, tmp_path: Path, name="run", seed=0, checkpoint=False, **train) -> MethodContext:
    return method_context(graph, tmp_path, name, seed, checkpoint=checkpoint, **train)


GAT = {"type": "gat", "hidden": 16, "layers": 2, "heads": 2, "activation": "elu", "last_activation": False}
SMALL = {
    # update_interval > epochs: P stays fixed, so the joint loss must decrease
    "daegc": {"encoder": GAT, "pretrain_epochs": 12, "pretrain_patience": 0, "update_interval": 100, "init_n_init": 3},
    "dinknet": {"encoder": {"type": "gcn", "hidden": 32, "layers": 1}, "pretrain_epochs": 12, "pretrain_patience": 0,
                "pretrain_lr": 0.01, "lr": 0.01, "feature_drop": 0.1, "init_n_init": 3},
    "diffpool": {"encoder": {"type": "gcn", "hidden": 16, "layers": 2}, "link_weight": 300.0, "entropy_weight": 0.1, "lr": 0.02},
}
PARTS = {
    "daegc": {"loss", "loss_recon", "loss_kl", "pretrain_loss"},
    "dinknet": {"loss", "loss_dilation", "loss_shrink", "loss_discri", "pretrain_loss"},
    "diffpool": {"loss", "loss_link", "loss_entropy"},
}


# ------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["daegc", "dinknet", "diffpool"])
@pytest.mark.parametrize("mode", ["full", "minibatch"])
def test_each_phase_trains_and_the_head_finds_the_partition(tmp_path, name, mode):
    g, comm = _sbm(tmp_path)
    method = registry.get(name).build(SMALL[name])
    ctx = _ctx(g, tmp_path, mode=mode, epochs=15, batch_size=40, fanout=[5, 3], patience=0)
    info = method.fit(ctx)
    assert info["plan"]["mode"] == mode and info["epochs_run"] == 15
    hist = read_history(ctx.history_path)
    assert {c for _, c, _ in hist.rows} == PARTS[name]
    phases = ["loss"] + (["pretrain_loss"] if "pretrain_loss" in PARTS[name] else [])
    for comp in phases:
        loss = hist.series(comp)
        assert all(math.isfinite(v) for v in loss), (comp, loss)
        assert np.mean(loss[-3:]) < np.mean(loss[:3]), (comp, loss)
    if "pretrain_loss" in PARTS[name]:  # one history: the pretraining epochs first, the joint epochs after
        epochs = {c: [e for e, cc, _ in hist.rows if cc == c] for c in ("pretrain_loss", "loss")}
        assert epochs["pretrain_loss"] == list(range(1, 13)) and epochs["loss"] == list(range(13, 28))
        assert info["pretrain_epochs_run"] == 12 and info["init_rows"] == g.n_nodes
    emb = method.embed(ctx)
    assert emb.shape[0] == g.n_nodes and np.isfinite(emb).all()
    clustering = method.cluster(ctx, emb, None)
    assert clustering.info["head"] and clustering.labels.shape == (g.n_nodes,)
    assert ((clustering.confidence > 0) & (clustering.confidence <= 1 + 1e-6)).all()
    assert normalized_mutual_info_score(comm, clustering.labels) > 0.7, name
    if name != "diffpool":
        assert clustering.centers.shape == (3, emb.shape[1])


def test_daegc_target_distribution_is_refreshed_every_update_interval(tmp_path, monkeypatch):
    from agcpipe.methods.daegc import DAEGC

    g, _ = _sbm(tmp_path)
    calls = []
    original = DAEGC.update_target
    monkeypatch.setattr(DAEGC, "update_target", lambda self, module, run: (calls.append(1), original(self, module, run)))
    method = registry.get("daegc").build({**SMALL["daegc"], "pretrain_epochs": 2, "update_interval": 3})
    method.fit(_ctx(g, tmp_path, mode="full", epochs=10, patience=0))
    assert len(calls) == 1 + 3  # before epoch 1, and after epochs 3, 6, 9
    kl = read_history(tmp_path / "run-0" / "history.parquet").series("loss_kl")
    assert kl[3] > kl[2]  # a fresh, sharper P raises the KL term


def test_resume_after_the_pretraining_phase_skips_it_and_matches(tmp_path, monkeypatch):
    from agcpipe.methods.daegc import DAEGC

    g, _ = _sbm(tmp_path)
    params = {**SMALL["daegc"], "pretrain_epochs": 4, "update_interval": 2}

    def train(tag, **kw):
        method = registry.get("daegc").build(params)
        ctx = _ctx(g, tmp_path, name=tag, mode="full", epochs=6, patience=0, checkpoint_every=1, checkpoint=True, **kw)
        method.fit(ctx)
        return method, ctx

    reference, ref_ctx = train("reference")
    calls = {"joint": 0, "pretrain": 0}
    joint, pre = DAEGC.loss, DAEGC.pretrain_loss

    def killed(self, model, batch, run):
        calls["joint"] += 1
        if calls["joint"] == 4:  # during joint epoch 4: checkpoint after epoch 3
            raise KeyboardInterrupt("killed")
        return joint(self, model, batch, run)

    def counted(self, model, batch, run):
        calls["pretrain"] += 1
        return pre(self, model, batch, run)

    monkeypatch.setattr(DAEGC, "loss", killed)
    monkeypatch.setattr(DAEGC, "pretrain_loss", counted)
    with pytest.raises(KeyboardInterrupt):
        train("resumed")
    ckpt = tmp_path / "resumed-0" / "ckpt"
    assert (ckpt / "pretrain-done" / "checkpoint.pt").is_file() and (ckpt / "joint" / "checkpoint.pt").is_file()
    monkeypatch.setattr(DAEGC, "loss", joint)
    calls["pretrain"] = 0
    method, ctx = train("resumed")
    assert calls["pretrain"] == 0  # the finished phase is not run again
    np.testing.assert_allclose(method.embed(ctx), reference.embed(ref_ctx), rtol=1e-5, atol=1e-6)
    a, b = read_history(ctx.history_path), read_history(ref_ctx.history_path)
    assert [(e, c) for e, c, _ in a.rows] == [(e, c) for e, c, _ in b.rows]
    np.testing.assert_allclose([v for *_, v in a.rows], [v for *_, v in b.rows], rtol=1e-5)


# ------------------------------------------------------------------------------------------- losses
def test_student_t_and_target_distribution_against_numpy():
    rng = np.random.default_rng(0)
    z, c = rng.standard_normal((50, 4)), rng.standard_normal((3, 4))
    for dof in (1.0, 2.5):
        q = student_t(torch.tensor(z), torch.tensor(c), dof).numpy()
        d2 = ((z[:, None, :] - c[None]) ** 2).sum(-1)
        ref = (1 + d2 / dof) ** (-(dof + 1) / 2)
        np.testing.assert_allclose(q, ref / ref.sum(1, keepdims=True), rtol=1e-5)
    q = student_t(torch.tensor(z), torch.tensor(c)).double()
    p = target_distribution(q).numpy()
    qn = q.numpy()
    w = qn**2 / qn.sum(0)
    np.testing.assert_allclose(p, w / w.sum(1, keepdims=True), rtol=1e-10)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-12)
    assert (p >= 0).all()
    # P sharpens Q: with equal cluster frequencies every row's entropy drops and its argmax stays
    q_bal = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.3, 0.2, 0.5]], dtype=torch.float64)
    p_bal = target_distribution(q_bal)
    assert torch.equal(p_bal.argmax(1), q_bal.argmax(1))
    assert ((-(p_bal * p_bal.log()).sum(1)) < (-(q_bal * q_bal.log()).sum(1))).all()
    # a large cluster is penalised: frequencies divide
    q_big = torch.tensor([[0.5, 0.5]] + [[0.9, 0.1]] * 8, dtype=torch.float64)
    assert target_distribution(q_big)[0, 1] > 0.5


def test_dink_dilation_and_shrink_against_loops():
    rng = np.random.default_rng(1)
    h, c = rng.standard_normal((20, 5)), rng.standard_normal((4, 5))
    shrink, dilation = shrink_dilation(torch.tensor(h, dtype=torch.float64), torch.tensor(c, dtype=torch.float64))
    ref_shrink = sum(((h[i] - c[j]) ** 2).sum() for i in range(20) for j in range(4)) / (20 * 4)
    ref_dil = -sum(((c[j] - c[m]) ** 2).sum() for j in range(4) for m in range(4) if j != m) / (4 * 3)
    assert float(shrink) == pytest.approx(ref_shrink, rel=1e-6)
    assert float(dilation) == pytest.approx(ref_dil, rel=1e-6)
    cc = torch.tensor(c, requires_grad=True)
    _, d = shrink_dilation(torch.tensor(h), cc)
    d.backward()
    assert torch.isfinite(cc.grad).all()  # no NaN from the zero diagonal


@pytest.mark.parametrize("weighted", [False, True])
def test_diffpool_sparse_link_loss_equals_the_dense_formula(tmp_path, weighted):
    g, _ = _sbm(tmp_path, n_per=15, weights=weighted)
    n = g.n_nodes
    ip = torch.from_numpy(np.asarray(g.indptr, dtype=np.int64))
    ind = torch.from_numpy(np.asarray(g.indices, dtype=np.int64))
    val = torch.ones(ind.numel(), dtype=torch.float64) if not weighted else torch.from_numpy(np.asarray(g.weights, dtype=np.float64))
    adj = to_sparse_adj(torch.sparse_csr_tensor(ip, ind, val, (n, n)), dtype=torch.float64)
    dense = adj.to_dense()
    logits = torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    s = logits.softmax(-1)
    sparse_link = link_sq_full(s, adj, float((val * val).sum())).sqrt() / n**2
    _, _, _, dense_link, dense_ent = dense_diff_pool(torch.zeros(n, 1, dtype=torch.float64), dense, logits)
    assert float(sparse_link.detach()) == pytest.approx(float(dense_link.detach()), rel=1e-9)
    assert float(entropy(s).detach()) == pytest.approx(float(dense_ent.detach()), rel=1e-9)
    (g1,) = torch.autograd.grad(sparse_link, logits)
    (g2,) = torch.autograd.grad(dense_diff_pool(torch.zeros(n, 1, dtype=torch.float64), dense, logits)[3], logits)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-12)


def test_diffpool_minibatch_estimate_is_unbiased(tmp_path):
    g, _ = _sbm(tmp_path, n_per=20, weights=True)
    n = g.n_nodes
    ip, ind, w = np.asarray(g.indptr), np.asarray(g.indices), np.asarray(g.weights, dtype=np.float64)
    s = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).softmax(-1)
    a = torch.sparse_csr_tensor(torch.from_numpy(ip), torch.from_numpy(ind.astype(np.int64)), torch.from_numpy(w), (n, n))
    exact = float(link_sq_full(s, a, float((w * w).sum())))
    rng = np.random.default_rng(0)
    b, draws = 12, 4000
    est = np.empty(draws)
    for t in range(draws):
        seeds = rng.choice(n, size=b, replace=False)
        deg = np.diff(ip)[seeds]
        pos = ip[seeds] + (rng.random(b) * deg).astype(np.int64)  # every node has a neighbour here
        est[t] = float(link_sq_estimate(s[seeds], s[seeds], s[ind[pos]], torch.from_numpy(deg * w[pos]), n, float((w * w).sum())))
    assert (np.diff(ip) > 0).all()
    assert abs(est.mean() - exact) < 4 * est.std() / math.sqrt(draws), (est.mean(), exact)
    assert abs(est.mean() - exact) < 0.02 * exact


# ------------------------------------------------------------------------------ assign with new nodes
@pytest.mark.parametrize("name", ["daegc", "dinknet", "diffpool"])
def test_assign_a_later_snapshot_with_new_nodes(home, tmp_path, name):
    from agcpipe.model import ModelBundle, build_bundle
    from agcpipe.pipeline import run_pipeline
    from test_decoupled import _snapshot, _tables_config

    params = {
        "daegc": "{encoder: {type: gat, hidden: 32, layers: 2, heads: 2, activation: elu, last_activation: false}, pretrain_epochs: 40, init_n_init: 3}",
        "dinknet": "{encoder: {type: gcn, hidden: 64, layers: 1}, pretrain_epochs: 40, pretrain_lr: 0.005, lr: 0.001, init_n_init: 3}",
        "diffpool": "{encoder: {type: gcn, hidden: 32, layers: 2}, link_weight: 3000.0, entropy_weight: 0.1, epochs: 60}",
    }[name]
    block = f"method:\n  name: {name}\n  params: {params}\n"
    cfg_path, cfg_text = _tables_config(tmp_path, f"txn-{name}", block, "train:\n  epochs: 20\n  threads: 1\n")
    cfg = load_config(cfg_path, ["tracking.enabled=false"])
    s = run_pipeline(cfg)
    assert s.metrics["nmi"] > 0.4, s.metrics
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    build_bundle(cfg, *(s.stage(x) for x in ("ingest", "precompute", "train", "cluster")), bundle)
    trained = pq.read_table(Path(s.stage("cluster").path) / "assignments.parquet").to_pandas()

    snap_cfg, src, accounts = _snapshot(tmp_path, cfg_text)
    got = ModelBundle(bundle).assign(load_config(snap_cfg).source, base_dir=tmp_path).to_pandas().set_index("key")
    assert len(got) == len(accounts) + 202
    old = got.loc[trained.key]
    assert adjusted_rand_score(trained.cluster, old.cluster) > 0.8  # existing nodes keep their clusters
    src_cluster = trained.set_index("key").loc[src.account].cluster.values
    new_cluster = got.loc[[f"new-{i:04d}" for i in range(len(src))]].cluster.values
    assert (new_cluster == src_cluster).mean() > 0.6  # new nodes join their community's cluster
    assert np.isfinite(got.confidence).all() and (got.confidence <= 1 + 1e-6).all()


def test_bad_parameters_are_config_errors():
    from agcpipe.errors import ConfigError

    for name, bad in (("daegc", {"update_interval": 0}), ("daegc", {"pretrain_epochs": 0}), ("dinknet", {"feature_drop": 1.0}),
                      ("dinknet", {"alpha": -1}), ("diffpool", {"link_weight": -1}), ("diffpool", {"bogus": 1})):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            registry.get(name).build(bad)
