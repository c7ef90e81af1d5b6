"""Dask: precompute hops, KMeans steps and evaluation on a two-worker local cluster equal the single process."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agcpipe import distributed
from agcpipe.cluster.kmeans import KMeans
from agcpipe.config import DaskConfig, GraphOptions, SyntheticSource, load_config
from agcpipe.data.graph import Graph
from agcpipe.data.ingest import ingest
from agcpipe.errors import ConfigError
from agcpipe.metrics import evaluate
from agcpipe.ops.propagate import propagate

DASK = DaskConfig(enabled=True, n_workers=2, threads_per_worker=1)


@pytest.fixture(scope="module")
def client():
    """One local cluster for the module: 2 worker processes on loopback (~5-15 s to start here)."""
    c = distributed.get_client(DASK)
    assert distributed.n_workers(c) == 2
    yield c
    distributed.close_all()


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Graph:
    out = tmp_path_factory.mktemp("graph")
    src = SyntheticSource(type="synthetic", n_nodes=3000, n_communities=5, avg_degree=16.0, within_between=20.0, n_features=12, feature_signal=2.0)
    ingest(src, GraphOptions(), out)
    return Graph.open(out)


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dask.address=localhost:8786"], "scheduler address like tcp://"),
        (["dask.memory_limit=lots"], "dask.memory_limit must be"),
        (["dask.n_workers=0"], "dask.n_workers"),
        (["dask.task_runner=true"], "dask.task_runner needs dask.enabled"),
        (["dask.workers=2"], "unknown config key 'dask.workers' (did you mean 'n_workers'?)"),
    ],
)
def test_bad_dask_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load_config(None, overrides)


def test_dask_settings_and_defaults():
    cfg = load_config(None, ["dask.enabled=true", "dask.address=tcp://10.0.0.5:8786", "dask.memory_limit=4GiB"])
    assert cfg.dask.address == "tcp://10.0.0.5:8786" and cfg.dask.n_workers == 2 and not cfg.dask.task_runner
    assert not load_config(None).dask.enabled
    with distributed.session(load_config(None).dask):  # not enabled: no client, nothing started
        assert distributed.current_client() is None


def test_scheduler_address_from_config_else_environment(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    assert distributed.scheduler_address(DaskConfig(enabled=True)) is None  # a local cluster
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:8786")  # what `agcpipe infra up` exports
    assert distributed.scheduler_address(DaskConfig(enabled=True)) == "tcp://127.0.0.1:8786"
    assert distributed.scheduler_address(DaskConfig(enabled=True, address="tcp://10.1.2.3:9000")) == "tcp://10.1.2.3:9000"


def test_task_runner_refuses_the_ephemeral_api(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from agcpipe.orchestration import dask_task_runner

    cfg = load_config(None, ["dask.enabled=true", "dask.task_runner=true"])
    with temporary_settings({PREFECT_API_URL: None}), pytest.raises(ConfigError, match="needs a Prefect server"):
        dask_task_runner(cfg)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
        runner = dask_task_runner(cfg)
        assert type(runner).__name__ == "DaskTaskRunner"


# ------------------------------------------------------------------------------------------ stages
@pytest.mark.parametrize("spec", [{"op": "ssgc", "K": 5, "alpha": 0.1}, {"op": "ppr", "K": 4, "alpha": 0.2}, {"op": "ax"}])
def test_precompute_hops_on_dask_equal_single_process(client, graph: Graph, tmp_path: Path, spec):
    w = np.random.default_rng(0).random(graph.nnz).astype(np.float32) + 0.5  # weighted too
    X = graph.features
    for weights in (None, w):
        propagate(spec, graph.indptr, graph.indices, weights, X, tmp_path / "one.npy")
        info = propagate(spec, graph.indptr, graph.indices, weights, X, tmp_path / "dask.npy", client=client, tasks=5)
        assert info["distributed"] and info["feature_block"] == X.shape[1]
        np.testing.assert_allclose(np.load(tmp_path / "dask.npy"), np.load(tmp_path / "one.npy"), rtol=1e-5, atol=1e-6)
    # column blocks (4 + 4 + 4 columns) and column panels on Dask too (panel_bytes=1: as many panels as the
    # degree cap allows, a quarter of the average degree: 3 here); the scratch buffers are gone afterwards
    info = propagate(spec, graph.indptr, graph.indices, None, X, tmp_path / "blocks.npy", client=client, feature_block=4, panel_bytes=1)
    assert info["blocks"] == 3 and info["panels"] > 1
    propagate(spec, graph.indptr, graph.indices, None, X, tmp_path / "one.npy")
    np.testing.assert_allclose(np.load(tmp_path / "blocks.npy"), np.load(tmp_path / "one.npy"), rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocks.npy", "dask.npy", "one.npy"]


def test_kmeans_steps_on_dask_equal_single_process(client, graph: Graph, tmp_path: Path):
    emb = tmp_path / "emb.npy"
    propagate({"op": "ssgc", "K": 4, "alpha": 0.05}, graph.indptr, graph.indices, None, graph.features, emb)
    X = np.load(emb, mmap_mode="r")
    kw = dict(n_init=3, max_iter=100, normalize=True, seed=1, chunk_size=700, device="cpu")
    one = KMeans(5, **kw).fit(X)
    with distributed.session(DASK, scratch=tmp_path / "scratch"):
        km = KMeans(5, **kw).fit(X)
        pred, conf = km.predict(X), km.confidence(X)
    np.testing.assert_array_equal(km.labels_, one.labels_)
    np.testing.assert_allclose(km.cluster_centers_, one.cluster_centers_, rtol=1e-5, atol=1e-6)
    assert km.inertia_ == pytest.approx(one.inertia_, rel=1e-6) and km.n_iter_ == one.n_iter_
    np.testing.assert_array_equal(pred, one.predict(X))
    np.testing.assert_allclose(conf, one.confidence(X), atol=1e-6)
    assert not any((tmp_path / "scratch").iterdir())  # scratch files removed


def test_kmeans_relocation_on_dask(client, monkeypatch, tmp_path: Path):
    """An empty cluster takes the farthest point, as in the single-process fit (sklearn's rule)."""
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(0, 0.5, (60, 2)), rng.normal(8, 0.5, (60, 2)), [[30.0, 30.0]]]).astype(np.float32)
    init = np.array([[0.0, 0.0], [8.0, 8.0], [-500.0, -500.0]], np.float32)
    import torch

    monkeypatch.setattr(KMeans, "_init_centers", lambda self, *a: torch.from_numpy(init.copy()))
    one = KMeans(3, n_init=1, device="cpu", chunk_size=50).fit(x)
    with distributed.session(DASK, scratch=tmp_path):
        km = KMeans(3, n_init=1, device="cpu", chunk_size=50).fit(x)
    np.testing.assert_allclose(km.cluster_centers_[2], [30.0, 30.0])
    np.testing.assert_array_equal(km.labels_, one.labels_)
    np.testing.assert_allclose(km.cluster_centers_, one.cluster_centers_, atol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_evaluation_on_dask_equals_single_process(client, graph: Graph, weighted: bool, monkeypatch):
    labels = np.random.default_rng(2).integers(0, 7, graph.n_nodes)
    labels[labels == 6] = 9  # a gap in the cluster ids
    if weighted:
        w = np.random.default_rng(3).random(graph.nnz).astype(np.float32)
        monkeypatch.setattr(Graph, "weights", w)
    one = evaluate(graph, labels, 7, chunk_size=1000)
    many = evaluate(graph, labels, 7, chunk_size=1000, client=client)
    assert many.keys() == one.keys()
    for key, value in one.items():
        assert many[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_pipeline_with_dask_equals_without(client, tmp_path: Path):
    """The whole pipeline (no Prefect, no MLflow) with dask.enabled: same keys, same metrics."""
    from agcpipe.pipeline import run_pipeline

    base = [
        f"store={tmp_path / 'store'}", "tracking.enabled=false", "source.n_nodes=2000", "source.n_features=8",
        "source.n_communities=4", "cluster.n_clusters=4", "cluster.n_init=2", "method.params.K=4",
    ]
    plain = run_pipeline(load_config(None, base))
    with_dask = run_pipeline(load_config(None, base + ["dask.enabled=true"]))
    assert [s.key for s in with_dask.stages] == [s.key for s in plain.stages]  # Dask is not part of any key
    assert all(s.status == "cached" for s in with_dask.stages)
    store = tmp_path / "store2"
    fresh = run_pipeline(load_config(None, base + ["dask.enabled=true", f"store={store}"]))
    assert all(s.status == "computed" for s in fresh.stages)
    assert fresh.stage("precompute").summary["propagation"]["x"]["distributed"]
    assert fresh.metrics == pytest.approx(plain.metrics, rel=1e-6)


@pytest.mark.slow
@pytest.mark.integration
def test_flow_on_prefects_dask_task_runner(prefect_harness, home, client):
    """Prefect's DaskTaskRunner runs every stage on a worker of the cluster (the harness is a real API);
    the stages' own blocked work runs as nested tasks. Same keys and metrics as the in-process flow."""
    from agcpipe.orchestration import run_flow
    from agcpipe.pipeline import run_pipeline

    base = [
        "tracking.enabled=false", "source.n_nodes=1500", "source.n_features=8", "source.n_communities=4",
        "cluster.n_clusters=4", "cluster.n_init=2", "method.params.K=3", "name=dask-runner",
    ]
    scheduler = client.scheduler.address
    summary = run_flow(load_config(None, base + ["dask.enabled=true", "dask.task_runner=true", f"dask.address={scheduler}"]))
    assert {s.stage: s.status for s in summary.stages} == {s: "computed" for s in ("ingest", "precompute", "train", "cluster", "evaluate")}
    assert summary.stage("precompute").summary["propagation"]["x"]["distributed"]
    again = run_pipeline(load_config(None, base))  # in-process, same store: everything cached
    assert [s.status for s in again.stages] == ["cached"] * 5 and again.metrics == summary.metrics
