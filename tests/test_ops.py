"""Propagation operators and feature preprocessing against independent references (scipy, PyG)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from agcpipe.errors import ConfigError, StageError
from agcpipe.ops.preprocess import preprocess_features
from agcpipe.ops.propagate import OPS, NormalizedAdjacency, propagate, sym_norm_scale, validate_op

SPECS = [
    {"op": "identity"},
    {"op": "ax"},
    {"op": "sgc", "K": 1},
    {"op": "sgc", "K": 3},
    {"op": "ssgc", "K": 4, "alpha": 0.2},
    {"op": "ssgc", "K": 1, "alpha": 0.0},
    {"op": "ppr", "K": 5, "alpha": 0.15},
    {"op": "ppr", "K": 2, "alpha": 1.0},
]


# ---------------------------------------------------------------------------------------------- helpers
def random_graph(n: int, edges: int, *, weighted: bool, isolated: int = 0, seed: int = 0) -> sp.csr_matrix:
    """Symmetric float32 CSR without self-loops; the last ``isolated`` nodes have no edges."""
    rng = np.random.default_rng(seed)
    m = n - isolated
    u, v = rng.integers(0, m, edges), rng.integers(0, m, edges)
    keep = u != v
    u, v = u[keep], v[keep]
    w = rng.uniform(0.1, 3.0, u.size) if weighted else np.ones(u.size)
    A = sp.coo_matrix((w, (u, v)), shape=(n, n)).tocsr()
    A.sum_duplicates()
    A = (A + A.T).tocsr().astype(np.float32)
    if not weighted:
        A.data[:] = 1.0  # duplicates / both directions drawn summed to 2
    A.sort_indices()
    return A


def csr_arrays(A: sp.csr_matrix, weighted: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    return A.indptr.astype(np.int64), A.indices.astype(np.int32), A.data.copy() if weighted else None


def reference(spec: dict, A: sp.csr_matrix, X: np.ndarray) -> np.ndarray:
    """The op in float64 with an explicit S = D^-1/2 (A + I) D^-1/2."""
    n = A.shape[0]
    A = A.astype(np.float64)
    dm = sp.diags(1.0 / np.sqrt(np.asarray(A.sum(axis=1)).ravel() + 1.0))
    S = (dm @ (A + sp.eye(n)) @ dm).tocsr()
    X = X.astype(np.float64)
    op = spec["op"]
    if op == "identity":
        return X
    if op == "ax":
        return S @ X
    K = spec["K"]
    if op == "sgc":
        Z = X
        for _ in range(K):
            Z = S @ Z
        return Z
    alpha = spec["alpha"]
    if op == "ssgc":
        Z, total = X, np.zeros_like(X)
        for _ in range(K):
            Z = S @ Z
            total += (1 - alpha) * Z + alpha * X
        return total / K
    Z = X
    for _ in range(K):
        Z = (1 - alpha) * (S @ Z) + alpha * X
    return Z


def run(spec: dict, indptr, indices, weights, X, tmp_path, **kw) -> np.ndarray:
    path = tmp_path / f"out_{len(list(tmp_path.iterdir()))}.npy"
    propagate(spec, indptr, indices, weights, X, path, **kw)
    return np.load(path)


def pyg_edges(A: sp.csr_matrix, weighted: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    coo = A.tocoo()
    ei = torch.from_numpy(np.stack([coo.row, coo.col]).astype(np.int64))
    return ei, torch.from_numpy(coo.data.astype(np.float32)) if weighted else None


# ---------------------------------------------------------------------------------------------- scipy reference
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_ops_match_scipy_reference(spec, weighted, tmp_path):
    A = random_graph(400, 2500, weighted=weighted, isolated=25, seed=1)
    X = np.random.default_rng(2).standard_normal((400, 6)).astype(np.float32)
    got = run(spec, *csr_arrays(A, weighted), X, tmp_path)
    assert got.dtype == np.float32 and got.shape == X.shape
    np.testing.assert_allclose(got, reference(spec, A, X), rtol=1e-5, atol=1e-6)


def test_isolated_nodes_keep_their_features(tmp_path):
    A = random_graph(200, 800, weighted=True, isolated=10, seed=3)
    X = np.random.default_rng(4).standard_normal((200, 3)).astype(np.float32)
    for spec in [{"op": "ax"}, {"op": "sgc", "K": 5}, {"op": "ssgc"}, {"op": "ppr"}]:
        got = run(spec, *csr_arrays(A, True), X, tmp_path)
        np.testing.assert_allclose(got[-10:], X[-10:], rtol=1e-6)  # S_ii = 1 on an isolated node
        assert not np.allclose(got[:-10], X[:-10])


def test_blocked_equals_unblocked(tmp_path):
    A = random_graph(150, 800, weighted=True, isolated=5, seed=5)
    X = np.random.default_rng(6).standard_normal((150, 5)).astype(np.float32)
    arrays = csr_arrays(A, True)
    assert NormalizedAdjacency(*arrays, 150).n_blocks == 1
    assert NormalizedAdjacency(*arrays, 150, block_nnz=7).n_blocks > 100
    for spec in [{"op": "ssgc", "K": 6, "alpha": 0.1}, {"op": "ppr", "K": 3}, {"op": "sgc", "K": 2}]:
        whole = run(spec, *arrays, X, tmp_path)
        for block_nnz in (1, 3, 50):
            np.testing.assert_allclose(run(spec, *arrays, X, tmp_path, block_nnz=block_nnz), whole, rtol=1e-6, atol=1e-7)


def test_int64_indices_give_the_same_result(tmp_path):
    A = random_graph(250, 1500, weighted=False, seed=7)
    X = np.random.default_rng(8).standard_normal((250, 4)).astype(np.float32)
    indptr, indices, _ = csr_arrays(A, False)
    spec = {"op": "ssgc", "K": 5, "alpha": 0.05}
    a = run(spec, indptr, indices, None, X, tmp_path)
    b = run(spec, indptr, indices.astype(np.int64), None, X, tmp_path, block_nnz=64)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_memmap_input_is_used_read_only(tmp_path):
    A = random_graph(300, 1500, weighted=True, seed=9)
    X = np.random.default_rng(10).standard_normal((300, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    Xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    arrays = [np.load(p, mmap_mode="r") for p in _save_all(tmp_path, csr_arrays(A, True))]
    for spec in [{"op": "identity"}, {"op": "ssgc", "K": 3}, {"op": "ppr", "K": 3}]:
        got = run(spec, *arrays, Xm, tmp_path)
        np.testing.assert_allclose(got, reference(validate_op(spec), A, X), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), X)


def _save_all(tmp_path, arrays):
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"csr{i}.npy")
        np.save(paths[-1], a)
    return paths


def test_matmul_and_its_checks():
    A = random_graph(120, 500, weighted=True, isolated=3, seed=11)
    adj = NormalizedAdjacency(*csr_arrays(A, True), 120, block_nnz=40)
    X = torch.randn(120, 3)
    out = torch.empty_like(X)
    assert adj.matmul(X, out) is out
    np.testing.assert_allclose(out.numpy(), reference({"op": "ax"}, A, X.numpy()), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="alias"):
        adj.matmul(X, X)
    with pytest.raises(ValueError):
        adj.matmul(X, torch.empty(119, 3))


def test_sym_norm_scale_and_negative_degree():
    A = random_graph(50, 200, weighted=True, isolated=2, seed=12)
    indptr, _, w = csr_arrays(A, True)
    expected = 1.0 / np.sqrt(np.asarray(A.sum(axis=1)).ravel() + 1.0)
    np.testing.assert_allclose(sym_norm_scale(indptr, w, 50), expected, rtol=1e-6)
    np.testing.assert_allclose(sym_norm_scale(indptr, None, 50) ** -2.0, np.diff(indptr) + 1.0, rtol=1e-6)
    w = w.copy()
    row = int(np.argmax(np.diff(indptr)))
    w[indptr[row] : indptr[row + 1]] = -5.0
    with pytest.raises(StageError, match=rf"first offending nodes: \[{row}\]"):
        sym_norm_scale(indptr, w, 50)


def test_progress_is_reported_per_hop(tmp_path):
    A = random_graph(60, 200, weighted=False, seed=13)
    calls = []
    run({"op": "ppr", "K": 4}, *csr_arrays(A, False), np.ones((60, 2), np.float32), tmp_path,
        progress=lambda hop, K: calls.append((hop, K)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


# ---------------------------------------------------------------------------------------------- PyG reference
def _pyg_propagation(spec: dict, x: torch.Tensor, ei: torch.Tensor, ew: torch.Tensor | None) -> np.ndarray:
    from torch_geometric.nn import APPNP, SGConv, SSGConv

    d = x.shape[1]
    if spec["op"] == "sgc":
        conv = SGConv(d, d, K=spec["K"])
    elif spec["op"] == "ssgc":
        conv = SSGConv(d, d, alpha=spec["alpha"], K=spec["K"])
    else:
        conv = APPNP(K=spec["K"], alpha=spec["alpha"])
    if hasattr(conv, "lin"):
        conv.lin = torch.nn.Identity()  # keep only the propagation
    with torch.no_grad():
        return conv(x, ei, ew).numpy()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("weighted", [False, True])
def test_ops_match_pyg_convs(weighted, tmp_path):
    A = random_graph(500, 3000, weighted=weighted, isolated=10, seed=14)
    X = np.random.default_rng(15).standard_normal((500, 8)).astype(np.float32)
    ei, ew = pyg_edges(A, weighted)
    for spec in [{"op": "sgc", "K": 3}, {"op": "ssgc", "K": 8, "alpha": 0.05}, {"op": "ppr", "K": 10, "alpha": 0.1}]:
        got = run(spec, *csr_arrays(A, weighted), X, tmp_path, block_nnz=256)
        np.testing.assert_allclose(got, _pyg_propagation(spec, torch.from_numpy(X), ei, ew), rtol=1e-4, atol=1e-5)


def test_ssgc_on_cora_matches_pyg(datasets, tmp_path):
    from torch_geometric.io import read_planetoid_data
    from torch_geometric.transforms import NormalizeFeatures
    from torch_geometric.utils import coalesce, remove_self_loops, to_undirected

    raw = datasets / "planetoid" / "Cora" / "raw"
    if not raw.is_dir():
        pytest.skip(f"{raw} not found")
    data = read_planetoid_data(str(raw), "cora")
    n = data.num_nodes
    ei, _ = remove_self_loops(to_undirected(data.edge_index, num_nodes=n))
    ei = coalesce(ei, num_nodes=n)  # sorted by row, then column: the canonical CSR order
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(ei[0].numpy(), minlength=n), out=indptr[1:])
    indices = ei[1].numpy().astype(np.int32)

    x, stats = preprocess_features(data.x.numpy(), "l1")
    assert stats == {"method": "l1"}
    x_pyg = NormalizeFeatures()(data.clone()).x
    np.testing.assert_allclose(x, x_pyg.numpy(), rtol=1e-6, atol=1e-7)

    spec = {"op": "ssgc", "K": 16, "alpha": 0.05}
    got = run(spec, indptr, indices, None, x, tmp_path, block_nnz=1000)
    want = _pyg_propagation(spec, x_pyg, ei, None)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert np.abs(got - x).max() > 1e-3  # propagation did something


# ---------------------------------------------------------------------------------------------- op specs
def test_validate_op_fills_defaults_and_keeps_name():
    assert validate_op({"op": "ssgc"}) == {"op": "ssgc", "K": 16, "alpha": 0.05}
    assert validate_op({"name": "x", "op": "sgc", "K": np.int64(3)}) == {"name": "x", "op": "sgc", "K": 3}
    assert validate_op({"op": "ppr", "alpha": 1}) == {"op": "ppr", "alpha": 1.0, "K": 10}
    assert validate_op({"op": "identity"}) == {"op": "identity"}
    for op, info in OPS.items():
        assert validate_op({"op": op}) == {"op": op, **{k: p.default for k, p in info.params.items()}}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"op": "sgcc"}, "known ops: identity, ax, sgc, ssgc, ppr"),
        ({"K": 2}, "has no 'op'; known ops: identity"),
        ({"op": ["sgc"]}, r"unknown propagation op \['sgc'\]"),
        ({"op": "sgc", "k": 2}, r"unknown parameter\(s\) \['k'\]"),
        ({"op": "identity", "K": 2}, "its parameters: none"),
        ({"op": "sgc", "K": 0}, r"K must be in \[1, inf\]"),
        ({"op": "sgc", "K": 2.5}, "K must be an integer"),
        ({"op": "sgc", "K": True}, "K must be a number"),
        ({"op": "sgc", "K": "3"}, "K must be a number"),
        ({"op": "ssgc", "alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"op": "ssgc", "alpha": math.nan}, "alpha must be in"),
        ({"op": "ppr", "alpha": 0.0}, r"alpha must be in \(0, 1\]"),
    ],
)
def test_validate_op_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        validate_op(spec)


def test_propagate_rejects_bad_specs_and_shapes(tmp_path):
    A = random_graph(30, 60, weighted=False, seed=16)
    with pytest.raises(ConfigError):
        propagate({"op": "gcn"}, *csr_arrays(A, False), np.ones((30, 2), np.float32), tmp_path / "o.npy")
    with pytest.raises(ValueError, match="29 rows"):
        propagate({"op": "ax"}, *csr_arrays(A, False), np.ones((29, 2), np.float32), tmp_path / "o.npy")


# ---------------------------------------------------------------------------------------------- preprocessing
def _features(n: int = 103, d: int = 9, seed: int = 17) -> np.ndarray:
    X = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32) * 3 + 1
    X[[4, n // 2]] = 0.0
    return X


@pytest.mark.parametrize("chunk_rows", [None, 1, 10])
def test_l1_rows_sum_to_one_and_zero_rows_stay_zero(chunk_rows):
    X = _features()
    zero = np.flatnonzero(~X.any(axis=1))
    assert zero.size == 2
    out, stats = preprocess_features(X, "l1", chunk_rows=chunk_rows)
    assert out.dtype == np.float32 and stats == {"method": "l1"}
    sums = np.abs(out).sum(axis=1)
    np.testing.assert_allclose(np.delete(sums, zero), 1.0, rtol=1e-5)
    assert not out[zero].any()
    np.testing.assert_allclose(out[0], X[0] / np.abs(X[0]).sum(), rtol=1e-6)


@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_standardize_gives_zero_mean_unit_std(chunk_rows):
    X = _features().astype(np.float64) * 100 + 1e4  # large offset: a naive E[x^2] - E[x]^2 would lose digits
    X[:, 3] = 2.5  # constant column: std 0 -> 1
    out, stats = preprocess_features(X, "standardize", chunk_rows=chunk_rows)
    assert stats["method"] == "standardize" and len(stats["mean"]) == len(stats["std"]) == 9
    np.testing.assert_allclose(stats["mean"], X.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(np.delete(stats["std"], 3), np.delete(X.std(axis=0), 3), rtol=1e-10)
    assert stats["std"][3] == 1.0 and not out[:, 3].any()
    np.testing.assert_allclose(np.delete(out.mean(axis=0), 3), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.delete(out.std(axis=0), 3), 1.0, rtol=1e-5)


def test_standardize_applies_given_stats_to_another_matrix():
    X1, X2 = _features(seed=18), _features(n=40, seed=19) * 2
    _, stats = preprocess_features(X1, "standardize")
    out, same = preprocess_features(X2, "standardize", stats, chunk_rows=6)
    assert same == stats
    want = (X2 - np.asarray(stats["mean"])) / np.asarray(stats["std"])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    assert abs(out.mean()) > 0.05  # not re-standardised on X2
    with pytest.raises(StageError, match="9 features but the feature matrix has 4 columns"):
        preprocess_features(X2[:, :4], "standardize", stats)
    with pytest.raises(ConfigError):
        preprocess_features(X2, "l1", stats)


def test_none_copies_to_float32_and_out_memmap(tmp_path):
    X = _features().astype(np.float64)
    out, stats = preprocess_features(X, "none")
    assert stats == {"method": "none"} and out.dtype == np.float32 and not np.shares_memory(out, X)
    np.testing.assert_array_equal(out, X.astype(np.float32))
    mm = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float32, shape=X.shape)
    got, _ = preprocess_features(X, "l1", out=mm, chunk_rows=8)
    assert got is mm
    mm.flush()
    np.testing.assert_allclose(np.load(tmp_path / "f.npy")[1], X[1] / np.abs(X[1]).sum(), rtol=1e-6)


@pytest.mark.parametrize("method", ["l1", "standardize", "none"])
def test_nan_and_inf_are_rejected_with_rows(method):
    X = _features()
    X[13, 2], X[60, 0], X[61, 5] = np.nan, np.inf, -np.inf
    with pytest.raises(StageError, match=r"in 3 rows; first offending rows: \[13, 60, 61\]"):
        preprocess_features(X, method, chunk_rows=20)


def test_unknown_method():
    with pytest.raises(ConfigError, match="known: l1, standardize, none"):
        preprocess_features(_features(), "l2")
