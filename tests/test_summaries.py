"""Cluster-level outputs against direct dense computations."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from agcpipe.summaries import cluster_features, cluster_graph, representatives, summary_stats
from graph_factory import make_graph


def _dense_quotient(g, labels, k):
    a = g.to_scipy().toarray()
    s = np.eye(k)[labels]
    return s.T @ a @ s


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_cluster_graph_is_s_t_a_s(tmp_path, weighted, chunk):
    rng = np.random.default_rng(0)
    edges = rng.integers(0, 60, size=(300, 2))
    edges = edges[edges[:, 0] != edges[:, 1]]
    w = rng.uniform(0.5, 2, size=len(edges)) if weighted else None
    g = make_graph(tmp_path, edges, weights=w, n_nodes=60)
    labels = rng.integers(0, 5, size=60)
    cg = cluster_graph(g.indptr, g.indices, g.weights, labels, 5, chunk=chunk).to_pandas()
    q = _dense_quotient(g, labels, 5)
    got = np.zeros((5, 5))
    got[cg.src, cg.dst] = cg.weight
    assert (cg.src <= cg.dst).all()
    # undirected: off-diagonal pairs listed once carry the weight of the edges between the clusters,
    # the diagonal carries each internal edge once (S^T A S counts it twice)
    np.testing.assert_allclose(np.triu(got, 1), np.triu(q, 1), rtol=1e-9)
    np.testing.assert_allclose(np.diag(got), np.diag(q) / 2, rtol=1e-9)
    assert cg.edges.sum() == g.n_edges
    stats = summary_stats(cluster_graph(g.indptr, g.indices, g.weights, labels, 5))
    assert 0 <= stats["cluster_graph_internal_weight_fraction"] <= 1


def test_cluster_features_match_groupby(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    labels = rng.integers(0, 4, size=200)
    x[labels == 2, 3] += 5.0  # feature 3 distinguishes cluster 2
    t = cluster_features(x, labels, 4, feature_names=[f"f{i}" for i in range(6)], top=2, chunk=37).to_pandas()
    for c in range(4):
        rows = x[labels == c].astype(np.float64)
        np.testing.assert_allclose(t["mean"][c], rows.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(t["std"][c], rows.std(0), rtol=1e-4, atol=1e-5)
        assert t["size"][c] == len(rows)
    assert t["top_features"][2][0] == "f3" and t["top_scores"][2][0] > 1


def test_representatives_are_top_scores_per_cluster():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=100)
    score = rng.random(100)
    keys = pa.array([f"n{i}" for i in range(100)])
    t = representatives(labels, score, keys, 3, top=4).to_pandas()
    for c in range(3):
        expect = np.flatnonzero(labels == c)[np.argsort(-score[labels == c])][:4]
        got = t[t.cluster == c].sort_values("rank")
        np.testing.assert_array_equal(got.node_id, expect)
        assert list(got.key) == [f"n{i}" for i in expect]
        assert list(got["rank"]) == list(range(len(expect)))
