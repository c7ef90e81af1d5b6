"""Out-of-core paths: external CSR build, node reordering, column-blocked propagation, copy-free KMeans."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agcpipe.config import GraphOptions, SyntheticSource, TableSource
from agcpipe.data.canonical import CSRBuilder, canonicalize_edges
from agcpipe.data.graph import Graph
from agcpipe.data.ingest import ingest

OPTIONS = [
    GraphOptions(undirected=u, merge_duplicates=mode != "keep", duplicate_weight="max" if mode == "keep" else mode, drop_self_loops=drop)
    for u in (True, False)
    for mode in ("max", "sum", "first", "keep")
    for drop in (True, False)
]


def _edges(seed: int = 0, n: int = 30, m: int = 400):
    rng = np.random.default_rng(seed)
    src, dst = rng.integers(0, n, m), rng.integers(0, n, m)
    dst[:25] = src[:25]  # self-loops
    src[25:50], dst[25:50] = dst[50:75], src[50:75]  # reverse copies
    w = rng.standard_normal(m).astype(np.float32)  # float sums: the summation order must match too
    return src, dst, w, n


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: f"{'undir' if o.undirected else 'dir'}-{o.duplicate_weight if o.merge_duplicates else 'keep'}-{'drop' if o.drop_self_loops else 'loops'}")
def test_external_build_equals_in_memory(tmp_path: Path, opt: GraphOptions, weighted: bool):
    """Many runs on disk, many merge ranges, uneven chunks: bit for bit the in-memory CSR and stats."""
    src, dst, w, n = _edges()
    w = w if weighted else None
    ref = canonicalize_edges(src, dst, w, n, opt)
    b = CSRBuilder(n, opt, weighted=weighted, work_dir=tmp_path / "runs", run_entries=37, merge_entries=53)
    cuts = [0, 1, 9, 150, 151, 300, len(src)]
    for a, e in zip(cuts[:-1], cuts[1:]):
        b.add(src[a:e], dst[a:e], None if w is None else w[a:e])
    assert len(list((tmp_path / "runs").glob("*.keys.npy"))) >= 3  # really external
    paths = [tmp_path / f for f in ("p.npy", "i.npy", "w.npy")]
    stats = b.finish(*paths[:2], paths[2] if weighted else None)
    assert not (tmp_path / "runs").exists()  # runs removed
    np.testing.assert_array_equal(np.load(paths[0]), ref[0])
    got = np.load(paths[1])
    assert got.dtype == ref[1].dtype
    np.testing.assert_array_equal(got, ref[1])
    if weighted:
        np.testing.assert_array_equal(np.load(paths[2]), ref[2])  # exact: same merge order and policy
    assert stats == ref[3]


def _sbm(**kw) -> SyntheticSource:
    params = dict(n_nodes=3000, n_communities=6, avg_degree=10.0, within_between=30.0, n_features=8, feature_signal=2.0)
    return SyntheticSource(type="synthetic", **(params | kw))


def _ingested(tmp_path: Path, source, options: GraphOptions) -> Graph:
    out = tmp_path / f"g{len(list(tmp_path.glob('g*')))}"
    out.mkdir()
    ingest(source, options, out)
    return Graph.open(out)


def _entries(g: Graph, to_input: np.ndarray | None = None) -> list[tuple[int, int, float]]:
    rows = np.repeat(np.arange(g.n_nodes), np.diff(g.indptr))
    cols = np.asarray(g.indices, dtype=np.int64)
    if to_input is not None:
        rows, cols = to_input[rows], to_input[cols]
    w = np.ones(cols.size) if g.weights is None else np.asarray(g.weights, dtype=float)
    return sorted(zip(rows.tolist(), cols.tolist(), w.tolist()))


@pytest.mark.parametrize("method", ["rcm", "degree", "community"])
def test_reordered_graph_is_the_same_graph_in_another_order(tmp_path: Path, method: str):
    plain = _ingested(tmp_path, _sbm(), GraphOptions())
    g = _ingested(tmp_path, _sbm(), GraphOptions(reorder=method))
    order = g.order
    assert plain.order is None and g.manifest["order"]["method"] == method
    assert sorted(order.tolist()) == list(range(g.n_nodes))  # a permutation
    assert _entries(g, order) == _entries(plain)
    np.testing.assert_array_equal(g.features, np.asarray(plain.features)[order])
    np.testing.assert_array_equal(g.labels, plain.labels[order])
    assert g.keys().to_pylist() == order.tolist()  # the user's ids: input rows of a keyless source
    assert g.manifest["stats"] == plain.manifest["stats"] and g.fingerprint != plain.fingerprint
    for r in range(0, g.n_nodes, 97):  # CSR invariants: sorted columns within rows
        assert np.all(np.diff(g.indices[g.indptr[r] : g.indptr[r + 1]]) > 0)
    if method == "degree":
        assert np.all(np.diff(np.diff(g.indptr)) <= 0)


def test_community_order_groups_communities_and_narrows_the_band(tmp_path: Path):
    plain = _ingested(tmp_path, _sbm(n_nodes=6000), GraphOptions())
    g = _ingested(tmp_path, _sbm(n_nodes=6000), GraphOptions(reorder="community"))
    same_next = np.mean(g.labels[1:] == g.labels[:-1])
    assert same_next > 0.85 and np.mean(plain.labels[1:] == plain.labels[:-1]) < 0.3

    def span(x: Graph) -> float:  # mean |row - col| of the stored entries
        rows = np.repeat(np.arange(x.n_nodes), np.diff(x.indptr))
        return float(np.abs(rows - np.asarray(x.indices)).mean())

    assert span(g) < 0.5 * span(plain)


def test_reordered_tables_keep_string_keys_and_weights(tmp_path: Path):
    rng = np.random.default_rng(3)
    n, m = 400, 3000
    ids = [f"acct-{i}" for i in rng.permutation(n)]
    s, t = rng.integers(0, n, m), rng.integers(0, n, m)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    pq.write_table(pa.table({"id": ids, "f": pa.array(list(x), pa.list_(pa.float32()))}), tmp_path / "nodes.parquet")
    for i, (a, b) in enumerate([(0, 1000), (1000, 2500), (2500, m)]):  # a folder of parts
        (tmp_path / "edges").mkdir(exist_ok=True)
        pq.write_table(
            pa.table({"source": [ids[j] for j in s[a:b]], "target": [ids[j] for j in t[a:b]], "w": rng.random(b - a).astype(np.float32)}),
            tmp_path / "edges" / f"part-{i}.parquet",
        )
    src = TableSource(type="tables", nodes=str(tmp_path / "nodes.parquet"), edges=str(tmp_path / "edges"), features="f", weight_column="w")
    plain = _ingested(tmp_path, src, GraphOptions(duplicate_weight="sum"))
    g = _ingested(tmp_path, src, GraphOptions(duplicate_weight="sum", reorder="rcm"))
    keys_plain, keys = plain.keys().to_pylist(), g.keys().to_pylist()
    assert keys == [keys_plain[i] for i in g.order]
    by_key = lambda x, k: sorted((k[a], k[b], w) for a, b, w in _entries(x))  # noqa: E731
    assert by_key(g, keys) == by_key(plain, keys_plain)
    np.testing.assert_array_equal(g.features, np.asarray(plain.features)[g.order])


def test_column_panels_and_feature_blocks_equal_the_plain_product(tmp_path: Path):
    """Panels (the columns of A split so that Y's rows stay cached) and feature blocks only reorder sums."""
    from agcpipe.ops.propagate import NormalizedAdjacency, panel_count, propagate

    rng = np.random.default_rng(7)
    n, m = 2000, 30000
    src, dst = rng.integers(0, n, m), rng.integers(0, n - 100, m)  # the last 100 nodes: only in-edges / none
    indptr, indices, weights, _ = canonicalize_edges(src, dst, rng.random(m).astype(np.float32) + 0.1, n, GraphOptions())
    X = rng.standard_normal((n, 13)).astype(np.float32)
    most = indices.size // n // 4  # a quarter of the average degree
    assert most >= 6 and panel_count(n, indices.size, 13, 4 * n * 13 // 6) == 6 and panel_count(n, indices.size, 13, 1) == most
    assert panel_count(n, indices.size, 13, 0) == 1 and panel_count(n, indices.size, 13, 10**12) == 1
    for spec in ({"op": "ssgc", "K": 4, "alpha": 0.1}, {"op": "ppr", "K": 3, "alpha": 0.2}):
        for w in (None, weights):
            propagate(spec, indptr, indices, w, X, tmp_path / "plain.npy", panel_bytes=0)
            plain = np.load(tmp_path / "plain.npy")
            for kw in ({"panel_bytes": 4 * n * 13 // 6}, {"panel_bytes": 1, "feature_block": 5}):
                info = propagate(spec, indptr, indices, w, X, tmp_path / "p.npy", **kw)
                assert info["panels"] > 1
                np.testing.assert_allclose(np.load(tmp_path / "p.npy"), plain, rtol=1e-5, atol=1e-6)
    adj = NormalizedAdjacency(indptr, indices, weights, n)
    adj.panel_bytes = 1
    parts = adj.blocks_for(13)[0][2]
    assert len(parts) == most and sum(p._nnz() for _, _, p in parts) == indices.size


def test_reorder_of_an_in_memory_source_and_weights(tmp_path: Path):
    """Array readers (Planetoid, npz) take the in-memory CSR path; reordering works the same there."""
    from agcpipe.data.canonical import write_graph
    from agcpipe.data.raw import RawGraph

    src, dst, w, n = _edges(seed=3, n=60, m=500)
    rng = np.random.default_rng(5)
    raw = RawGraph(n_nodes=n, src=src, dst=dst, weight=w, features=rng.standard_normal((n, 3)).astype(np.float32),
                   labels=rng.integers(-1, 2, n), label_classes=["a", "b"], keys=pa.array([f"k{i}" for i in range(n)]))
    graphs = {}
    for method in ("none", "degree"):
        out = tmp_path / method
        out.mkdir()
        write_graph(raw, GraphOptions(duplicate_weight="sum", reorder=method), out, {"type": "test"})
        graphs[method] = Graph.open(out)
    plain, g = graphs["none"], graphs["degree"]
    order = g.order
    assert _entries(g, order) == _entries(plain)
    assert g.keys().to_pylist() == [f"k{i}" for i in order] and np.all(np.diff(np.diff(g.indptr)) <= 0)
    np.testing.assert_array_equal(g.labels, plain.labels[order])
    assert not list(tmp_path.glob("*/.input-*")) and not list(tmp_path.glob("*/.*csr-runs"))  # no leftovers
