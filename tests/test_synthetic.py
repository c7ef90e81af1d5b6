"""Attributed SBM generator: determinism, edge statistics, feature signal, ingest output."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agcpipe.config import GraphOptions, SyntheticSource, load_config
from agcpipe.data.graph import Graph
from agcpipe.data.ingest import ingest
from agcpipe.data.synthetic import generate_sbm, within_fraction
from agcpipe.errors import ConfigError


def _source(**kw) -> SyntheticSource:
    params = dict(n_nodes=4000, n_communities=4, avg_degree=12.0, within_between=9.0, n_features=16, feature_signal=3.0)
    return SyntheticSource(type="synthetic", **(params | kw))


def _ingest(tmp_path: Path, source: SyntheticSource) -> Graph:
    out = tmp_path / f"g{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    ingest(source, GraphOptions(), out)
    return Graph.open(out)


def test_deterministic_and_independent_of_chunking(tmp_path: Path):
    a = _ingest(tmp_path, _source(n_nodes=1500, chunk_nodes=1_000_000))
    b = _ingest(tmp_path, _source(n_nodes=1500, chunk_nodes=333))  # chunks cut across random-stream blocks
    c = _ingest(tmp_path, _source(n_nodes=1500, seed=1))
    assert a.fingerprint == b.fingerprint
    assert c.fingerprint != a.fingerprint


def test_edges_follow_the_model(tmp_path: Path):
    src = _source()
    g = _ingest(tmp_path, src)
    labels = g.labels
    sizes = np.bincount(labels)
    assert sizes.tolist() == [src.n_nodes // src.n_communities] * src.n_communities
    assert g.manifest["stats"]["self_loops_dropped"] == 0  # none generated
    rows = np.repeat(np.arange(g.n_nodes), np.diff(g.indptr))
    within = np.mean(labels[rows] == labels[np.asarray(g.indices)])
    f_in = within_fraction(src)
    assert f_in == pytest.approx(9 / 12)
    assert within == pytest.approx(f_in, abs=0.015)  # binomial std ~0.003
    assert 2 * g.n_edges / g.n_nodes == pytest.approx(src.avg_degree, rel=0.02)  # a few duplicates merged
    deg = np.diff(g.indptr)
    assert [deg[labels == c].mean() for c in range(4)] == pytest.approx([src.avg_degree] * 4, rel=0.05)


def test_feature_means_separate_by_community(tmp_path: Path):
    src = _source()
    raw = generate_sbm(src, tmp_path)
    x, labels, k, d = np.asarray(raw.features), raw.labels, src.n_communities, src.n_features
    assert raw.features.filename is not None and Path(raw.features.filename) == tmp_path / "features.npy"
    means = np.stack([x[labels == c].mean(axis=0) for c in range(k)])
    noise = x - means[labels]
    assert noise.std() == pytest.approx(1.0, abs=0.02)
    dist2 = [np.sum((means[a] - means[b]) ** 2) for a in range(k) for b in range(a + 1, k)]
    # E ||mean_a - mean_b||^2 = s^2 + d (1/n_a + 1/n_b): the signal plus the noise of the empirical means
    expected = src.feature_signal**2 + 2 * d / (src.n_nodes / k)
    assert np.sqrt(np.mean(dist2)) == pytest.approx(np.sqrt(expected), abs=0.05)
    # each node is closer to its own community's mean than to the others, for most nodes at s = 3
    nearest = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(nearest == labels) > 0.8


def test_parameters_checked(tmp_path: Path):
    with pytest.raises(ConfigError, match="n_communities"):
        generate_sbm(_source(n_nodes=3, n_communities=5), tmp_path)
    with pytest.raises(ConfigError, match="source.seed"):  # numpy refuses negative seeds: caught in the config
        load_config(None, ["source.seed=-1"])


def test_single_community_and_zero_signal(tmp_path: Path):
    g = _ingest(tmp_path, _source(n_nodes=500, n_communities=1, feature_signal=0.0))
    assert g.manifest["n_classes"] == 1 and g.n_edges > 0
    assert np.abs(np.asarray(g.features).mean(axis=0)).max() < 0.25  # mean 0, noise only
