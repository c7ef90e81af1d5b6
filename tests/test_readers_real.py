"""Source readers (Planetoid, npz) on the real datasets, and on crafted, hostile or damaged files."""
from __future__ import annotations

import builtins
import io
import os
import pickle
import shutil
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp

from agcpipe.config import NpzSource, PlanetoidSource
from agcpipe.data.npz import read_npz
from agcpipe.data.planetoid import read_planetoid
from agcpipe.data.raw import RawGraph
from agcpipe.errors import InputError

NPZ = {
    "coauthor_cs": "coauthor_cs/coauthor_cs.npz",
    "amazon_computers": "amazon_computers/amazon_cs.npz",
    "tolokers": "heterophilous/tolokers/raw/tolokers.npz",
}
#: datasets README: nodes, undirected edges (no self-loops, no duplicates), features, classes
EXPECTED = {
    "Cora": (2708, 5278, 1433, 7),
    "CiteSeer": (3327, 4552, 3703, 6),
    "coauthor_cs": (18333, 81894, 6805, 15),
    "amazon_computers": (13752, 245861, 767, 10),
    "tolokers": (11758, 519000, 10, 2),
}


def undirected(src: np.ndarray, dst: np.ndarray, n: int) -> np.ndarray:
    """The undirected edge set as sorted unique keys lo * n + hi, self-loops dropped."""
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    keep = lo != hi
    return np.unique(lo[keep] * n + hi[keep])


def planetoid(root: Path, name: str) -> RawGraph:
    return read_planetoid(PlanetoidSource(type="planetoid", name=name, root=str(root)))


def npz(path: Path, trust: bool = False) -> RawGraph:
    return read_npz(NpzSource(type="npz", path=str(path), trust_pickle=trust))


@pytest.fixture(scope="module")
def coauthor(datasets: Path) -> RawGraph:
    """Coauthor CS, loaded once: its dense features take 500 MB."""
    return npz(datasets / NPZ["coauthor_cs"], trust=True)


@pytest.fixture
def cora_copy(datasets: Path, tmp_path: Path) -> Path:
    """A writable copy of the Cora Planetoid folder; returns its root."""
    root = tmp_path / "planetoid"
    shutil.copytree(datasets / "planetoid" / "Cora", root / "Cora")
    return root


# ----------------------------------------------------------------------------------- real datasets
@pytest.mark.parametrize("name", ["Cora", "CiteSeer"])
def test_planetoid_matches_pyg(datasets: Path, name: str) -> None:
    from torch_geometric.io import read_planetoid_data

    raw = datasets / "planetoid" / name / "raw"
    ref = read_planetoid_data(str(raw), name.lower())
    g = planetoid(datasets / "planetoid", name)
    n = g.n_nodes
    assert n == ref.num_nodes and g.keys is None
    assert g.features.dtype == np.float32 and g.labels.dtype == np.int64
    assert g.src.dtype == np.int64 and g.dst.dtype == np.int64
    np.testing.assert_array_equal(g.features, ref.x.numpy())
    y = ref.y.numpy()
    labelled = g.labels >= 0
    np.testing.assert_array_equal(g.labels[labelled], y[labelled])
    assert g.label_classes == list(range(int(y.max()) + 1))
    ei = ref.edge_index.numpy()
    np.testing.assert_array_equal(undirected(g.src, g.dst, n), undirected(ei[0], ei[1], n))

    test_index = np.loadtxt(raw / f"ind.{name.lower()}.test.index", dtype=np.int64)
    gaps = np.setdiff1d(np.arange(test_index.min(), test_index.max() + 1), test_index)
    np.testing.assert_array_equal(np.flatnonzero(~labelled), gaps)
    assert g.info == {"label_less_nodes": gaps.size}
    assert gaps.size == (15 if name == "CiteSeer" else 0)
    assert not g.features[gaps].any()
    assert (y[gaps] == 0).all()  # what PyG gives them


@pytest.mark.parametrize("name", list(EXPECTED))
def test_counts_match_datasets_readme(datasets: Path, request: pytest.FixtureRequest, name: str) -> None:
    if name == "coauthor_cs":
        g = request.getfixturevalue("coauthor")
    elif name in NPZ:
        g = npz(datasets / NPZ[name], trust=True)
    else:
        g = planetoid(datasets / "planetoid", name)
    nodes, edges, features, classes = EXPECTED[name]
    assert g.n_nodes == nodes
    assert g.features.shape == (nodes, features) and g.features.dtype == np.float32
    assert g.src.shape == g.dst.shape and g.src.dtype == np.int64
    assert 0 <= min(g.src.min(), g.dst.min()) and max(g.src.max(), g.dst.max()) < nodes
    assert undirected(g.src, g.dst, nodes).size == edges
    assert g.weight is None
    assert len(g.label_classes) == classes
    assert np.unique(g.labels[g.labels >= 0]).size == classes
    assert g.labels.shape == (nodes,) and g.labels.dtype == np.int64


def test_graphdata_metadata(coauthor: RawGraph) -> None:
    assert coauthor.info == {"layout": "GraphData", "label_less_nodes": 0}
    assert len(coauthor.keys) == coauthor.n_nodes and coauthor.keys[0].as_py() == "0006BF12"
    assert coauthor.feature_names[:2] == ["1 dimensional", "16 qam"]
    assert coauthor.label_classes[:2] == ["bioinformatics", "machine_learning"]
    assert coauthor.features.max() == 105  # counts survive densification


def test_tolokers_each_edge_once(datasets: Path) -> None:
    g = npz(datasets / NPZ["tolokers"])  # pickle-free: no trust needed
    assert g.src.size == 519000 and g.info["layout"] == "heterophilous"
    assert g.label_classes == [0, 1]
    assert round(float((g.labels == 0).mean()), 2) == 0.78


@pytest.mark.parametrize("name", ["coauthor_cs", "amazon_computers"])
def test_graphdata_refused_without_trust(datasets: Path, name: str) -> None:
    path = datasets / NPZ[name]
    with pytest.raises(InputError) as e:
        npz(path)
    msg = str(e.value)
    assert e.value.file == str(path) and str(path) in msg
    assert "pickled Python objects" in msg
    assert "unpickling runs arbitrary code" in msg
    assert "`source.trust_pickle: true`" in msg


# --------------------------------------------------------------------------- hostile Planetoid pickles
class _Payload:
    """Pickles as a call of ``func(*args)``: what a hostile file would contain."""

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


PAYLOADS = {
    "os.system": lambda m: _Payload(os.system, (f"touch '{m}'",)),
    "subprocess.call": lambda m: _Payload(subprocess.call, (["touch", str(m)],)),
    "builtins.exec": lambda m: _Payload(builtins.exec, (f"open({str(m)!r}, 'w').close()",)),
    "numpy.save": lambda m: _Payload(np.save, (str(m), np.zeros(1))),  # allowed module, other name
}


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_restricted_unpickler_refuses_other_names(cora_copy: Path, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "executed.npy"
    blob = pickle.dumps(PAYLOADS[kind](marker), protocol=2)
    target = cora_copy / "Cora" / "raw" / "ind.cora.tx"
    target.write_bytes(blob)
    with pytest.raises(InputError, match="refusing to unpickle a reference to") as e:
        planetoid(cora_copy, "Cora")
    assert e.value.file == str(target)
    assert not marker.exists()
    # the payload is live: plain pickle would have run it
    pickle.loads(blob)
    assert marker.exists()


def test_hostile_reference_nested_in_allowed_container(cora_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    target = cora_copy / "Cora" / "raw" / "ind.cora.graph"
    target.write_bytes(pickle.dumps({0: [1, PAYLOADS["os.system"](marker)]}, protocol=2))
    with pytest.raises(InputError, match="posix.system|os.system"):
        planetoid(cora_copy, "Cora")
    assert not marker.exists()


# ------------------------------------------------------------------------- damaged Planetoid folders
def test_planetoid_missing_file(cora_copy: Path) -> None:
    missing = cora_copy / "Cora" / "raw" / "ind.cora.graph"
    missing.unlink()
    with pytest.raises(InputError, match="missing Planetoid file") as e:
        planetoid(cora_copy, "Cora")
    assert e.value.file == str(missing)
    assert "ind.cora.allx" in str(e.value) and "ind.cora.graph'" not in str(e.value).split("holds")[1]


def test_planetoid_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="Planetoid folder not found") as e:
        planetoid(tmp_path, "CiteSeer")
    assert e.value.file == str(tmp_path / "CiteSeer" / "raw")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_planetoid_corrupt_file(cora_copy: Path, damage: str) -> None:
    target = cora_copy / "Cora" / "raw" / "ind.cora.allx"
    data = target.read_bytes()
    target.write_bytes(b"\x80\x02not a pickle" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt Planetoid file") as e:
        planetoid(cora_copy, "Cora")
    assert e.value.file == str(target)


def test_planetoid_inconsistent_test_index(cora_copy: Path) -> None:
    target = cora_copy / "Cora" / "raw" / "ind.cora.test.index"
    target.write_text("\n".join(["5"] * 1000))
    with pytest.raises(InputError, match="test node ids must be distinct and start at 1708") as e:
        planetoid(cora_copy, "Cora")
    assert e.value.file == str(target)


# ------------------------------------------------------------------------------ gnn-benchmark layout
def _gnn_benchmark_file(path: Path, dense_attr: bool) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    n, d = 7, 5
    adj = sp.random_array((n, n), density=0.4, format="csr", rng=rng, dtype=np.float64)
    if dense_attr:
        adj.data[:] = 1.0
    attr = sp.random_array((n, d), density=0.5, format="csr", rng=rng, dtype=np.float64)
    labels = np.array([3, 0, 3, -1, 7, 0, 7])
    arrays: dict[str, Any] = dict(
        adj_data=adj.data, adj_indices=adj.indices, adj_indptr=adj.indptr, adj_shape=np.array(adj.shape),
        labels=labels,
    )
    if dense_attr:
        arrays["attr_matrix"] = attr.toarray()
    else:
        arrays.update(
            attr_data=attr.data, attr_indices=attr.indices, attr_indptr=attr.indptr,
            attr_shape=np.array(attr.shape), node_names=np.array([f"n{i}" for i in range(n)]),
            attr_names=np.array([f"w{j}" for j in range(d)]),
            class_names=np.array([f"c{k}" for k in range(8)]),
        )
    np.savez(path, **arrays)
    return {"adj": adj, "attr": attr, "labels": labels}


@pytest.mark.parametrize("dense_attr", [False, True], ids=["sparse-attr-named", "dense-attr-unweighted"])
def test_gnn_benchmark_round_trip(tmp_path: Path, dense_attr: bool) -> None:
    path = tmp_path / "graph.npz"
    made = _gnn_benchmark_file(path, dense_attr)
    g = npz(path)
    adj = made["adj"].tocoo()
    assert g.n_nodes == 7 and g.info == {"layout": "gnn-benchmark", "label_less_nodes": 1}
    np.testing.assert_array_equal(g.src, adj.row)
    np.testing.assert_array_equal(g.dst, adj.col)
    if dense_attr:
        assert g.weight is None
    else:
        assert g.weight.dtype == np.float32
        np.testing.assert_array_equal(g.weight, adj.data.astype(np.float32))
    assert g.features.dtype == np.float32
    np.testing.assert_array_equal(g.features, made["attr"].toarray().astype(np.float32))
    np.testing.assert_array_equal(g.labels, [1, 0, 1, -1, 2, 0, 2])
    if dense_attr:
        assert g.label_classes == [0, 3, 7] and g.keys is None and g.feature_names is None
    else:
        assert g.label_classes == ["c0", "c3", "c7"]
        assert g.keys.to_pylist() == [f"n{i}" for i in range(7)]
        assert g.feature_names == [f"w{j}" for j in range(5)]


def test_gnn_benchmark_invalid_csr(tmp_path: Path) -> None:
    path = tmp_path / "graph.npz"
    np.savez(
        path, adj_data=np.ones(2), adj_indices=np.array([0, 9]), adj_indptr=np.array([0, 1, 2]),
        adj_shape=np.array([2, 2]), attr_matrix=np.ones((2, 3)),
    )
    with pytest.raises(InputError, match="invalid CSR parts adj_data") as e:
        npz(path)
    assert e.value.file == str(path)


# ------------------------------------------------------------------------------- damaged npz files
def _tolokers_like(path: Path, **override: Any) -> None:
    arrays = dict(node_features=np.ones((3, 2), np.float32), node_labels=np.array([0, 1, 1]),
                  edges=np.array([[0, 1], [1, 2]]))
    np.savez(path, **{**arrays, **override})


def test_npz_edges_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "g.npz"
    _tolokers_like(path, edges=np.array([[0, 1], [1, 3], [2, 0], [-1, 2]]))
    with pytest.raises(InputError, match="node ids outside 0..2") as e:
        npz(path)
    assert e.value.rows == [1, 3] and e.value.count == 2 and e.value.column == "edges"


def test_npz_pickled_member_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.npz"
    _tolokers_like(path, edges=np.array([[0, 1], [1, 2]], dtype=object))
    with pytest.raises(InputError, match="key 'edges' holds pickled Python objects") as e:
        npz(path)
    assert "`source.trust_pickle: true`" in str(e.value) and e.value.file == str(path)
    with pytest.raises(InputError, match="expected an E x 2 integer array"):  # trusted: read, checked
        npz(path, trust=True)


def test_npz_unknown_layout(tmp_path: Path) -> None:
    path = tmp_path / "g.npz"
    np.savez(path, features=np.ones((2, 2)), adjacency=np.eye(2))
    found = r"unknown \.npz layout; keys found: \['adjacency', 'features'\]"
    with pytest.raises(InputError, match=found) as e:
        npz(path)
    for layout in ("heterophilous", "gnn-benchmark", "GraphData"):
        assert layout in str(e.value)


def test_npz_missing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="npz file not found") as e:
        npz(tmp_path / "absent.npz")
    assert e.value.file == str(tmp_path / "absent.npz")


@pytest.mark.parametrize("damage", ["text", "truncated"])
def test_npz_not_a_zip(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "g.npz"
    _tolokers_like(path)
    data = path.read_bytes()
    path.write_bytes(b"node,label\n0,1\n" if damage == "text" else data[: len(data) // 2])
    with pytest.raises(InputError, match="not an .npz file") as e:
        npz(path, trust=True)  # not even a trusted file is unpickled when it is no zip
    assert e.value.file == str(path)


@pytest.mark.parametrize("damage", ["no-npy-magic", "truncated"])
def test_npz_corrupt_member(tmp_path: Path, damage: str) -> None:
    def npy(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    labels = npy(np.arange(3))
    path = tmp_path / "g.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("node_features.npy", npy(np.ones((3, 2), np.float32)))
        zf.writestr("node_labels.npy", b"garbage" if damage == "no-npy-magic" else labels[:-8])
        zf.writestr("edges.npy", npy(np.array([[0, 1]])))
    with pytest.raises(InputError, match="cannot read key 'node_labels'") as e:
        npz(path)
    assert e.value.file == str(path)
