"""Canonical writer (canonicalisation, folder format, fingerprints) and ingest plumbing."""
from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from graph_factory import make_graph

from agcpipe.config import GraphOptions, NpzSource, PlanetoidSource, SyntheticSource, TableSource
from agcpipe.data import canonical
from agcpipe.data.canonical import canonicalize_edges, write_graph
from agcpipe.data.graph import Graph
from agcpipe.data.ingest import ingest, resolve_source, source_fingerprint
from agcpipe.data.raw import RawGraph
from agcpipe.errors import ConfigError, InputError


def _edges(seed: int = 0, n: int = 25, m: int = 300):
    """Random edges on few nodes: many duplicates, both directions, self-loops."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, n, m)
    dst = rng.integers(0, n, m)
    dst[:20] = src[:20]  # self-loops
    src[20:40], dst[20:40] = dst[40:60], src[40:60]  # reverse copies
    w = rng.integers(1, 9, m).astype(np.float32)  # small integers: sums are exact
    return src, dst, w, n


def _reference(src, dst, w, n, opt: GraphOptions):
    """Expected CSR entries as sorted (row, col, weight) triples, built with networkx."""
    pairs = [(int(u), int(v), float(x)) for u, v, x in zip(src, dst, w) if not (opt.drop_self_loops and u == v)]
    if opt.merge_duplicates:
        G = nx.Graph() if opt.undirected else nx.DiGraph()
        for u, v, x in pairs:
            if not G.has_edge(u, v):
                G.add_edge(u, v, weight=x)
            elif opt.duplicate_weight == "max":
                G[u][v]["weight"] = max(G[u][v]["weight"], x)
            elif opt.duplicate_weight == "sum":
                G[u][v]["weight"] += x
        edges = [(u, v, d["weight"]) for u, v, d in G.edges(data=True)]
    else:
        G = nx.MultiGraph() if opt.undirected else nx.MultiDiGraph()
        G.add_weighted_edges_from(pairs)
        edges = [(u, v, d["weight"]) for u, v, d in G.edges(data=True)]
    entries = list(edges)
    if opt.undirected:
        entries += [(v, u, x) for u, v, x in edges if u != v]
    return sorted(entries), G.number_of_edges()


def _triples(indptr, indices, weights):
    rows = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
    w = np.ones(indices.size) if weights is None else weights
    return sorted(zip(rows.tolist(), np.asarray(indices).tolist(), np.asarray(w, dtype=float).tolist()))


OPTIONS = [
    GraphOptions(undirected=u, merge_duplicates=mode != "keep", duplicate_weight="max" if mode == "keep" else mode, drop_self_loops=drop)
    for u in (True, False)
    for mode in ("max", "sum", "first", "keep")
    for drop in (True, False)
]


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: f"{'undir' if o.undirected else 'dir'}-{o.duplicate_weight if o.merge_duplicates else 'keep'}-{'drop' if o.drop_self_loops else 'loops'}")
def test_canonicalize_matches_networkx(opt: GraphOptions, weighted: bool):
    src, dst, w, n = _edges()
    indptr, indices, weights, stats = canonicalize_edges(src, dst, w if weighted else None, n, opt)
    expected, n_edges = _reference(src, dst, w if weighted else np.ones_like(w), n, opt)
    if not weighted and opt.merge_duplicates:  # unweighted graphs stay unweighted
        expected = [(u, v, 1.0) for u, v, _ in expected]
    assert (weights is None) == (not weighted)
    assert indptr.dtype == np.int64 and indices.dtype == np.int32
    assert _triples(indptr, indices, weights) == expected
    for r in range(n):  # columns sorted within rows
        assert np.all(np.diff(indices[indptr[r] : indptr[r + 1]]) >= 0)
    loops_in = int(np.count_nonzero(src == dst))
    assert stats["n_edges"] == n_edges
    assert stats["self_loops_dropped"] == (loops_in if opt.drop_self_loops else 0)
    assert stats["input_edges"] == src.size
    assert stats["duplicates_merged"] == src.size - stats["self_loops_dropped"] - n_edges


def test_undirected_edge_in_both_directions_is_one_edge():
    src, dst = np.array([0, 1, 1]), np.array([1, 0, 2])
    w = np.array([5, 7, 1], dtype=np.float32)
    opt = GraphOptions(duplicate_weight="first")
    indptr, indices, weights, stats = canonicalize_edges(src, dst, w, 3, opt)
    assert stats["n_edges"] == 2 and indices.size == 4
    assert _triples(indptr, indices, weights) == [(0, 1, 5.0), (1, 0, 5.0), (1, 2, 1.0), (2, 1, 1.0)]


def _raw(n: int = 40, d: int = 6, seed: int = 1, weighted: bool = True) -> RawGraph:
    rng = np.random.default_rng(seed)
    src, dst, w, _ = _edges(seed, n=n, m=200)
    labels = rng.integers(-1, 3, n)
    return RawGraph(
        n_nodes=n, src=src, dst=dst, weight=w if weighted else None,
        features=rng.standard_normal((n, d)).astype(np.float32),
        labels=labels, label_classes=["a", "b", "c"],
        keys=pa.array([f"node-{i}" for i in range(n)]),
        feature_names=[f"f{j}" for j in range(d)], info={"reader": "test"},
    )


@pytest.mark.parametrize("undirected", [True, False])
def test_write_graph_opens_and_matches(tmp_path: Path, monkeypatch, undirected: bool):
    monkeypatch.setattr(canonical, "EDGE_GROUP", 16)  # several row groups
    monkeypatch.setattr(canonical, "BLOCK_BYTES", 64)  # several feature / hash blocks
    raw, opt = _raw(), GraphOptions(undirected=undirected)
    indptr, indices, weights, stats = canonicalize_edges(raw.src, raw.dst, raw.weight, raw.n_nodes, opt)
    out = tmp_path / "g"
    out.mkdir()
    m = write_graph(raw, opt, out, {"type": "test"})
    g = Graph.open(out)
    assert json.loads((out / "manifest.json").read_text()) == m
    np.testing.assert_array_equal(g.indptr, indptr)
    np.testing.assert_array_equal(g.indices, indices)
    np.testing.assert_array_equal(g.weights, weights)
    np.testing.assert_array_equal(g.features, raw.features)
    np.testing.assert_array_equal(g.labels, raw.labels)
    assert g.keys().to_pylist() == raw.keys.to_pylist()
    assert g.n_edges == stats["n_edges"] and g.nnz == indices.size and g.directed is (not undirected)
    assert m["key_type"] == "string" and m["label_classes"] == ["a", "b", "c"] and m["n_classes"] == 3
    assert m["n_labelled"] == int(np.count_nonzero(raw.labels >= 0)) and m["feature_names"] == raw.feature_names
    assert m["info"] == {"reader": "test"} and m["options"] == opt.model_dump()
    assert m["fingerprint"]["algorithm"] == "sha256" and len(m["fingerprint"]["content"]) == 64

    edges = pq.ParquetFile(out / "edges.parquet")
    assert edges.metadata.num_row_groups > 1
    e = edges.read()
    assert e.num_rows == g.n_edges
    s, t, w = (e.column(c).to_numpy() for c in ("src", "dst", "weight"))
    A = g.to_scipy().toarray()
    if undirected:
        assert np.all(s < t)  # self-loops dropped by default
        B = np.zeros_like(A)
        B[s, t] = w
        np.testing.assert_array_equal(A, B + B.T)
    else:
        B = np.zeros_like(A)
        B[s, t] = w
        np.testing.assert_array_equal(A, B)


def test_fingerprint_same_arrays_same_content_and_memmap_path(tmp_path: Path):
    raw = _raw()
    (a := tmp_path / "a").mkdir()
    fa = write_graph(raw, GraphOptions(), a, {"type": "test"})["fingerprint"]["content"]
    # same arrays, features already written as out_dir/features.npy by a "reader"
    (b := tmp_path / "b").mkdir()
    mm = np.lib.format.open_memmap(b / "features.npy", mode="w+", dtype=np.float32, shape=raw.features.shape)
    mm[:] = raw.features
    mm.flush()
    raw_b = _raw()
    raw_b.features = np.load(b / "features.npy", mmap_mode="r")
    assert write_graph(raw_b, GraphOptions(), b, {"type": "other"})["fingerprint"]["content"] == fa
    raw_c = _raw()
    raw_c.features[3, 2] += 1e-3
    (c := tmp_path / "c").mkdir()
    assert write_graph(raw_c, GraphOptions(), c, {"type": "test"})["fingerprint"]["content"] != fa


@pytest.mark.parametrize("directed", [False, True])
def test_same_arrays_and_fingerprint_as_the_independent_test_writer(tmp_path: Path, directed: bool):
    """tests/graph_factory.py writes the format directly (duplicates: max weight, self-loops dropped)."""
    raw = _raw()
    ref = make_graph(tmp_path, np.stack([raw.src, raw.dst], 1), features=raw.features, labels=raw.labels,
                     weights=raw.weight, directed=directed)
    (out := tmp_path / "ours").mkdir()
    m = write_graph(raw, GraphOptions(undirected=not directed), out, {"type": "test"})
    g = Graph.open(out)
    for name in ("indptr", "indices", "weights", "features", "labels"):
        np.testing.assert_array_equal(getattr(g, name), getattr(ref, name))
    assert (g.n_edges, g.nnz) == (ref.n_edges, ref.nnz)
    assert m["fingerprint"]["content"] == ref.fingerprint


def test_nan_features_named_with_rows(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(canonical, "BLOCK_BYTES", 4 * 6 * 8)  # 8 rows per block: the NaN is in a later block
    raw = _raw()
    raw.features[13, 4] = np.nan
    raw.features[21, 1] = np.inf
    with pytest.raises(InputError) as e:
        write_graph(raw, GraphOptions(), tmp_path, {"type": "npz", "path": "/data/g.npz"})
    assert e.value.file == "/data/g.npz" and e.value.column == "f4" and e.value.rows == [13]
    assert "Rows are 0-based" in str(e.value)


@pytest.mark.parametrize("n_nodes, n_edges", [(0, 5), (5, 0)])
def test_empty_graph_is_an_error(tmp_path: Path, n_nodes: int, n_edges: int):
    raw = RawGraph(n_nodes=n_nodes, src=np.zeros(n_edges, np.int64), dst=np.zeros(n_edges, np.int64), features=np.zeros((n_nodes, 2), np.float32))
    with pytest.raises(InputError, match="no nodes" if n_nodes == 0 else "no edges"):
        write_graph(raw, GraphOptions(), tmp_path, {"type": "tables", "nodes": "n.csv", "edges": "e.csv"})


def test_edge_ids_out_of_range(tmp_path: Path):
    raw = _raw()
    raw.dst = raw.dst.copy()
    raw.dst[[5, 9]] = [40, -1]
    with pytest.raises(InputError) as e:
        write_graph(raw, GraphOptions(), tmp_path, {"type": "npz", "path": "g.npz"})
    assert e.value.rows == [5, 9] and e.value.values == [40, -1] and e.value.file == "g.npz"


# ------------------------------------------------------------------------------------ ingest plumbing
def test_resolve_source(tmp_path: Path, monkeypatch):
    ds = tmp_path / "datasets"
    p = resolve_source(PlanetoidSource(type="planetoid", name="cora"), datasets_root=ds, base_dir=None)
    assert p.root == str(ds / "planetoid") and p.name == "Cora"
    z = resolve_source(NpzSource(type="npz", path="x/g.npz"), datasets_root=ds, base_dir=None)
    assert z.path == str(ds / "x" / "g.npz")
    t = TableSource(type="tables", edges="e/*.parquet", nodes="/abs/nodes.csv")
    r = resolve_source(t, datasets_root=None, base_dir=tmp_path / "cfg")
    assert r.edges == str(tmp_path / "cfg" / "e" / "*.parquet") and r.nodes == "/abs/nodes.csv"
    monkeypatch.chdir(tmp_path)
    assert resolve_source(t, datasets_root=None, base_dir=None).edges == str(tmp_path / "e" / "*.parquet")
    assert t.edges == "e/*.parquet"  # a copy
    for src in (PlanetoidSource(type="planetoid", name="cora"), NpzSource(type="npz", path="g.npz")):
        with pytest.raises(ConfigError, match="AGCPIPE_DATASETS"):
            resolve_source(src, datasets_root=None, base_dir=tmp_path)


def _tables(tmp_path: Path, feature_value: float = 0.5) -> TableSource:
    pq.write_table(pa.table({"id": [10, 11, 12], "f": [0.1, 0.2, feature_value]}), tmp_path / "nodes.parquet")
    pq.write_table(pa.table({"source": [10, 11], "target": [11, 12]}), tmp_path / "edges.parquet")
    return TableSource(type="tables", edges=str(tmp_path / "edges.parquet"), nodes=str(tmp_path / "nodes.parquet"))


def test_source_fingerprint_files(tmp_path: Path):
    src = _tables(tmp_path)
    fp = source_fingerprint(src)
    assert fp["kind"] == "files" and [Path(f["path"]).name for f in fp["files"]] == ["edges.parquet", "nodes.parquet"]
    assert all(len(f["sha256"]) == 64 for f in fp["files"])
    assert source_fingerprint(src) == fp
    _tables(tmp_path, feature_value=0.7)
    assert source_fingerprint(src) != fp

    sampled = source_fingerprint(src, full_hash_limit=16)
    assert all(f["mode"] == "sampled" and "mtime_ns" in f and len(f["sampled_sha256"]) == 64 for f in sampled["files"])
    data = bytearray((tmp_path / "nodes.parquet").read_bytes())
    data[0] ^= 1  # first block is always sampled
    (tmp_path / "nodes.parquet").write_bytes(bytes(data))
    assert source_fingerprint(src, full_hash_limit=16)["files"][1]["sampled_sha256"] != sampled["files"][1]["sampled_sha256"]


def test_source_fingerprint_missing_file_and_generator(tmp_path: Path):
    with pytest.raises(InputError) as e:
        source_fingerprint(NpzSource(type="npz", path=str(tmp_path / "missing.npz")))
    assert e.value.file == str(tmp_path / "missing.npz")
    a = source_fingerprint(SyntheticSource(type="synthetic", seed=1, chunk_nodes=10))
    assert a == {"kind": "generator", "params": a["params"]} and a["params"]["seed"] == 1
    assert a == source_fingerprint(SyntheticSource(type="synthetic", seed=1))  # chunking does not change the graph
    assert a != source_fingerprint(SyntheticSource(type="synthetic", seed=2))


def test_ingest_tables_twice_same_content(tmp_path: Path):
    src = _tables(tmp_path)
    out = [tmp_path / "o1", tmp_path / "o2", tmp_path / "o3"]
    for o in out:
        o.mkdir()
    m1, m2 = ingest(src, GraphOptions(), out[0]), ingest(src, GraphOptions(), out[1])
    assert m1["fingerprint"] == m2["fingerprint"] and m1["source"]["nodes"] == src.nodes
    _tables(tmp_path, feature_value=0.25)
    assert ingest(src, GraphOptions(), out[2])["fingerprint"] != m1["fingerprint"]
    assert sorted(p.name for p in out[0].iterdir()) == sorted(
        ["manifest.json", "nodes.parquet", "edges.parquet", "features.npy", "csr_indptr.npy", "csr_indices.npy"]
    )


def test_ingest_planetoid_cora(datasets: Path, tmp_path: Path):
    src = resolve_source(PlanetoidSource(type="planetoid", name="cora"), datasets_root=datasets, base_dir=None)
    m = ingest(src, GraphOptions(), tmp_path)
    g = Graph.open(tmp_path)
    assert (g.n_nodes, g.n_edges, g.n_features, m["n_classes"]) == (2708, 5278, 1433, 7)
    A = g.to_scipy()
    assert (A != A.T).nnz == 0 and A.diagonal().sum() == 0
