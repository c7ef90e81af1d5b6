"""Training engine, encoders and the trainable methods (GAE, DGI, Node2Vec) on tiny graphs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from agcpipe.config import TrainConfig
from agcpipe.methods import registry
from agcpipe.methods.base import MethodContext
from agcpipe.nn.encoders import Encoder
from agcpipe.train import checkpoint as ckpt
from agcpipe.train.engine import Engine, LossOutput, TrainPlan
from agcpipe.train.history import read_history
from method_support import method_context, one_torch_thread, planted_sbm  # noqa: F401 (autouse fixture)


def _sbm(tmp_path, n_per=40, k=3, d=12, seed=0, weights=False):
    return planted_sbm(tmp_path, n_per, k, d, seed, weights)[0]


def _ctx(graph, tmp_path: Path, name="run", seed=0, history=True, checkpoint=False, **train) -> MethodContext:
    return method_context(graph, tmp_path, name, seed, checkpoint=checkpoint, history=history, **train)


SMALL = {
    "gae": {"encoder": {"type": "gcn", "hidden": 16, "layers": 2, "out": 8, "activation": "relu", "last_activation": False}},
    "dgi": {"encoder": {"type": "gcn", "hidden": 16, "layers": 1}, "lr": 0.01},
    "node2vec": {"dim": 8, "walk_length": 6, "context_size": 3, "walks_per_node": 2},
}


# ------------------------------------------------------------------------------------------- encoders
@pytest.mark.parametrize("kind", ["gcn", "sage", "gat", "mlp"])
def test_layerwise_inference_equals_full_forward(tmp_path, kind):
    g = _sbm(tmp_path, weights=kind == "gcn")
    torch.manual_seed(0)
    enc = Encoder(12, type=kind, hidden=8, layers=2, heads=2 if kind == "gat" else 1, norm="layer", activation="prelu").eval()
    ip = np.asarray(g.indptr)
    rows = torch.repeat_interleave(torch.arange(g.n_nodes), torch.from_numpy(np.diff(ip)))
    ei = torch.stack([torch.from_numpy(np.asarray(g.indices, dtype=np.int64)), rows])
    ew = torch.from_numpy(np.asarray(g.weights)) if g.weights is not None else None
    with torch.no_grad():
        full = enc(torch.from_numpy(np.asarray(g.features)), ei, ew).numpy()
    layerwise = enc.inference(g.features, g.indptr, g.indices, g.weights, block_edges=37)
    np.testing.assert_allclose(layerwise, full, atol=1e-5)
    assert enc.num_hops == (0 if kind == "mlp" else 2)


@pytest.mark.parametrize("kind", ["gcn", "sage", "gat", "mlp"])
def test_trimmed_minibatch_forward_equals_untrimmed_on_seeds(tmp_path, kind):
    from agcpipe.sampling.neighbor import CSRNeighborSampler, subgraph_batch

    g = _sbm(tmp_path)
    torch.manual_seed(0)
    enc = Encoder(12, type=kind, hidden=8, layers=2, heads=2 if kind == "gat" else 1).eval()
    hops = enc.num_hops
    data, _ = subgraph_batch(CSRNeighborSampler(g.indptr, g.indices, [3] * hops, seed=0), g.features, torch.arange(0, 120, 7))
    with torch.no_grad():
        trimmed = enc(data.x, data.edge_index, num_sampled_nodes=data.num_sampled_nodes)
        untrimmed = enc(data.x, data.edge_index)[: data.batch_size]
    assert trimmed.shape[0] == data.batch_size
    torch.testing.assert_close(trimmed, untrimmed, atol=1e-5, rtol=1e-5)


def test_encoder_config_errors():
    with pytest.raises(ValueError, match="divisible"):
        Encoder(4, type="gat", hidden=10, heads=3)
    with pytest.raises(ValueError, match="unknown encoder"):
        Encoder(4, type="gin")


# ------------------------------------------------------------------------------------------ methods
@pytest.mark.parametrize("name", ["gae", "dgi", "node2vec"])
@pytest.mark.parametrize("mode", ["full", "minibatch"])
def test_loss_is_finite_and_decreases(tmp_path, name, mode):
    g = _sbm(tmp_path)
    method = registry.get(name).build(SMALL[name])
    ctx = _ctx(g, tmp_path, mode=mode, epochs=12 if name != "node2vec" else 20, batch_size=32, fanout=[5, 3], patience=0)
    info = method.fit(ctx)
    assert info["plan"]["mode"] == mode and info["epochs_run"] == ctx.train.epochs
    hist = read_history(ctx.history_path)
    loss = hist.series("loss")
    assert len(loss) == ctx.train.epochs and all(math.isfinite(v) for v in loss)
    assert np.mean(loss[-3:]) < np.mean(loss[:3]), loss
    comps = {c for _, c, _ in hist.rows}
    assert len(comps) == 3  # the total and two parts per method
    emb = method.embed(ctx)
    assert emb.shape[0] == g.n_nodes and np.isfinite(emb).all()


def test_node2vec_sparse_gradients_train(tmp_path):
    g = _sbm(tmp_path)
    method = registry.get("node2vec").build({**SMALL["node2vec"], "sparse": True, "p": 0.5, "q": 2.0})
    ctx = _ctx(g, tmp_path, mode="minibatch", epochs=15, batch_size=32, patience=0)
    method.fit(ctx)
    loss = read_history(ctx.history_path).series("loss")
    assert np.mean(loss[-3:]) < np.mean(loss[:3]) and method.sparse(g.n_nodes)
    assert not registry.get("node2vec").build({}).sparse(1000) and registry.get("node2vec").build({}).sparse(10**6)


def test_training_is_deterministic_for_a_seed(tmp_path):
    g = _sbm(tmp_path)

    def train(seed, tag):
        method = registry.get("gae").build(SMALL["gae"])
        ctx = _ctx(g, tmp_path, name=tag, seed=seed, mode="minibatch", epochs=3, batch_size=32, fanout=[4, 4])
        method.fit(ctx)
        return method.embed(ctx)

    a, b, c = train(0, "a"), train(0, "b"), train(1, "c")
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("name", ["dgi", "node2vec"])
def test_checkpoint_resume_matches_uninterrupted_run(tmp_path, monkeypatch, name):
    g = _sbm(tmp_path)
    settings = dict(mode="minibatch", epochs=6, batch_size=40, fanout=[4], patience=0, checkpoint_every=2)
    full = registry.get(name).build(SMALL[name])
    ref_ctx = _ctx(g, tmp_path, name="ref", checkpoint=True, **settings)
    full.fit(ref_ctx)
    reference = full.embed(ref_ctx)

    method = registry.get(name).build(SMALL[name])
    ctx = _ctx(g, tmp_path, name="crash", checkpoint=True, **settings)
    calls = {"n": 0}
    original = type(method).loss

    def crashing(self, model, batch, run):
        calls["n"] += 1
        if calls["n"] == 3 * 5:  # in epoch 5 (3 batches per epoch): the last checkpoint is after epoch 4
            raise KeyboardInterrupt("killed")
        return original(self, model, batch, run)

    monkeypatch.setattr(type(method), "loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        method.fit(ctx)
    saved = ckpt.load_checkpoint(ctx.checkpoint_dir)
    assert saved is not None and saved["epoch"] == 4
    monkeypatch.setattr(type(method), "loss", original)
    info = registry.get(name).build(SMALL[name]).fit(ctx)
    assert info["resumed_from_epoch"] == 4 and info["epochs_run"] == 6
    np.testing.assert_array_equal(method.embed(ctx), reference)
    assert read_history(ctx.history_path).rows == read_history(ref_ctx.history_path).rows


def test_early_stopping_restores_the_best_epoch(tmp_path):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = iter([5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 3.8, 3.9])
    snapshots = {}

    def step(_):
        return LossOutput(model.weight.sum() * 0.01 + next(losses))

    def on_epoch(epoch, values):
        snapshots[epoch] = model.weight.detach().clone()

    plan = TrainPlan(mode="full", epochs=8, batch_size=1, fanout=[], patience=2, min_delta=0.1)
    res = Engine(plan, progress=False).fit(model, opt, [None], step, on_epoch_end=on_epoch)
    assert res.stopped_early and res.epochs_run == 5 and res.best_epoch == 3 and res.best_loss == pytest.approx(3.0, abs=0.1)
    assert torch.equal(model.weight, snapshots[3]) and not torch.equal(snapshots[5], snapshots[3])


def test_nan_loss_is_an_error():
    from agcpipe.errors import StageError

    model = torch.nn.Linear(1, 1)
    plan = TrainPlan(mode="full", epochs=3, batch_size=1, fanout=[], patience=0)
    with pytest.raises(StageError, match="became nan"):
        Engine(plan, progress=False).fit(model, torch.optim.SGD(model.parameters(), lr=0.1), [None], lambda _: LossOutput(model.weight.sum() * float("nan")))


def test_amp_on_cpu_trains(tmp_path):
    g = _sbm(tmp_path)
    method = registry.get("dgi").build(SMALL["dgi"])
    ctx = _ctx(g, tmp_path, mode="full", epochs=4, amp=True)
    info = method.fit(ctx)
    assert info["plan"]["amp"] and math.isfinite(info["final_loss"])


def test_weights_roundtrip_with_and_without_safetensors(tmp_path, monkeypatch):
    sd = {"a": torch.randn(3, 2), "b": torch.arange(4)}
    path = ckpt.save_weights(sd, tmp_path, "m")
    assert path.suffix == ".safetensors"
    got = ckpt.load_weights(tmp_path, "m")
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    monkeypatch.setattr(ckpt, "_has_safetensors", lambda: False)
    other = tmp_path / "pt"
    other.mkdir()
    assert ckpt.save_weights(sd, other, "m").suffix == ".pt"
    got = ckpt.load_weights(other, "m")
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_embed_large_graph_path_is_layerwise_and_exact(tmp_path):
    g = _sbm(tmp_path, weights=True)
    method = registry.get("gae").build(SMALL["gae"])
    ctx = _ctx(g, tmp_path, mode="full", epochs=2)
    method.fit(ctx)
    full = method.embed(ctx)
    ctx.train = TrainConfig(progress=False, max_full_batch_nodes=10)  # forces layer-wise inference
    np.testing.assert_allclose(method.embed(ctx), full, atol=1e-5)


def test_plan_resolution():
    gae, n2v, dgi = (registry.get(m).build({}) for m in ("gae", "node2vec", "dgi"))
    assert gae.plan(None, 1000).mode == "full" and gae.plan(None, 10**6).mode == "minibatch"
    assert n2v.plan(None, 1000).mode == "minibatch"  # SGD over walks unless asked
    assert n2v.plan(TrainConfig(mode="full"), 1000).mode == "full"
    p = dgi.plan(TrainConfig(epochs=7, batch_size=5000), 1000)
    assert p.epochs == 7 and p.patience == 20 and p.batch_size == 1000 and p.fanout == [10]
    assert gae.plan(TrainConfig(max_full_batch_nodes=10), 1000).mode == "minibatch"
    with pytest.raises(ValueError):
        TrainConfig(fanout=[0])
