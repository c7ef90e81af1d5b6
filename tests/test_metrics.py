"""Clustering metrics against scikit-learn / networkx on random graphs and labelings, and on Cora."""
from __future__ import annotations

import itertools
import json

import networkx as nx
import numpy as np
import pytest
from graph_factory import make_graph
from networkx.algorithms.community import modularity as nx_modularity
from sklearn.metrics import adjusted_rand_score, f1_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix
from scipy.optimize import linear_sum_assignment

from agcpipe import metrics
from agcpipe.errors import StageError

LABEL_KEYS = {"acc", "nmi", "ari", "f1_macro", "n_labelled", "n_unlabelled"}
GRAPH_KEYS = {"modularity", "conductance", "mean_cluster_conductance"}


# ------------------------------------------------------------------------------------------ helpers
def random_labels(rng, n: int, k: int) -> np.ndarray:
    """k distinct non-contiguous label values (every one used), randomly spread over n nodes."""
    values = np.sort(rng.choice(1000, size=k, replace=False))
    lab = values[rng.integers(0, k, n)]
    lab[:k] = values
    return rng.permutation(lab)


def random_nx(rng, n: int, m: int, *, weighted: bool, loops: bool, directed: bool = False) -> nx.Graph:
    """Random (di)graph on nodes 0..n-1; directed graphs get a Hamiltonian cycle so every node has arcs
    in and out; weights are multiples of 1/4 (exact in float32)."""
    G = nx.DiGraph() if directed else nx.Graph()
    G.add_nodes_from(range(n))
    u, v = rng.integers(0, n, m), rng.integers(0, n, m)
    if directed:
        u, v = np.concatenate([u, np.arange(n)]), np.concatenate([v, (np.arange(n) + 1) % n])
    keep = (u != v) | loops
    w = rng.integers(1, 13, u.size) / 4
    for a, b, x in zip(u[keep].tolist(), v[keep].tolist(), w[keep].tolist()):
        G.add_edge(a, b, weight=x if weighted else 1.0)
    return G


def csr(G: nx.Graph, weighted: bool):
    A = nx.to_scipy_sparse_array(G, nodelist=range(G.number_of_nodes()), format="csr")
    A.sort_indices()
    return A.indptr.astype(np.int64), A.indices.astype(np.int32), A.data.astype(np.float32) if weighted else None


def communities(labels: np.ndarray) -> list[set[int]]:
    return [set(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)]


def nx_conductance(G: nx.Graph, labels: np.ndarray) -> dict[str, float]:
    """networkx reference; phi(S) := 0 where networkx divides by a zero volume (documented convention)."""
    lab = dict(enumerate(labels.tolist()))
    crossing = sum(w for a, b, w in G.edges(data="weight") if lab[a] != lab[b])
    phis = []
    for S in communities(labels):
        try:
            phis.append(nx.conductance(G, S, weight="weight"))
        except ZeroDivisionError:
            phis.append(0.0)
    return {"conductance": crossing / G.size(weight="weight"), "mean_cluster_conductance": float(np.mean(phis))}


def sklearn_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Reference label scores on the labelled nodes; ACC by brute force over all cluster -> class maps."""
    keep = y_true >= 0
    t, p = y_true[keep], y_pred[keep]
    classes, clusters = np.unique(t), np.unique(p)
    c = contingency_matrix(t, p)
    best = max(
        sum(c[i, j] for i, j in zip(rows, cols))
        for rows in itertools.permutations(range(len(classes)), min(c.shape))
        for cols in itertools.permutations(range(len(clusters)), min(c.shape))
    )
    r, s = linear_sum_assignment(c, maximize=True)
    to_class = dict(zip(clusters[s].tolist(), classes[r].tolist()))
    mapped = np.array([to_class.get(x, -1) for x in p.tolist()])
    return {
        "acc": best / t.size,
        "nmi": normalized_mutual_info_score(t, p),
        "ari": adjusted_rand_score(t, p),
        "f1_macro": f1_score(t, mapped, labels=classes, average="macro", zero_division=0),
    }


# ------------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k_true,k_pred", [(4, 4), (4, 2), (3, 5), (1, 3), (3, 1), (1, 1)])
def test_label_metrics_match_sklearn(seed, k_true, k_pred):
    rng = np.random.default_rng(seed)
    n = 200
    y_true = random_labels(rng, n, k_true)
    # predictions correlated with the truth so that scores are not all near 0
    y_pred = np.where(rng.random(n) < 0.6, y_true % max(k_pred, 1), rng.integers(0, k_pred, n)) * 7 + 3
    y_true[rng.random(n) < 0.2] = -1
    got = metrics.label_metrics(y_true, y_pred)
    want = sklearn_scores(y_true, y_pred)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["n_labelled"] == int((y_true >= 0).sum())
    assert got["n_unlabelled"] == int((y_true < 0).sum())


def test_contingency_counts_labelled_pairs():
    y_true = np.array([5, 5, 9, -1, 9, 2, 2, -1])
    y_pred = np.array([0, 4, 4, 4, 4, 0, 0, 7])
    keep = y_true >= 0
    np.testing.assert_array_equal(metrics.contingency(y_true, y_pred), contingency_matrix(y_true[keep], y_pred[keep]))


def test_permuted_perfect_labelling_scores_one():
    rng = np.random.default_rng(1)
    y_true = random_labels(rng, 300, 6)
    perm = dict(zip(np.unique(y_true).tolist(), rng.permutation(6).tolist()))
    y_pred = np.array([perm[x] for x in y_true.tolist()])
    y_true[::7] = -1
    got = metrics.label_metrics(y_true, y_pred)
    assert [got[k] for k in ("acc", "nmi", "ari", "f1_macro")] == pytest.approx([1.0] * 4)


def test_label_metrics_hand_case():
    # contingency [[2, 0], [1, 1]]: best map 0->0, 1->1 matches 3 of 4; F1 = (2*2/5 + 2*1/3) / 2
    got = metrics.label_metrics([0, 0, 1, 1], [0, 0, 0, 1])
    assert got["acc"] == pytest.approx(0.75)
    assert got["f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2)
    # extra cluster: the unmatched cluster's node is wrong
    assert metrics.label_metrics([0, 0, 1, 1], [3, 3, 5, 8])["acc"] == pytest.approx(0.75)


def test_scores_ignore_empty_rows_and_columns():
    rng = np.random.default_rng(2)
    table = rng.integers(0, 20, (3, 4))
    padded = np.zeros((5, 6), dtype=np.int64)
    padded[np.ix_([4, 0, 2], [1, 5, 3, 0])] = table  # rows / columns permuted and padded with zeros
    assert metrics.scores_from_contingency(padded) == pytest.approx(metrics.scores_from_contingency(table))


def test_label_metrics_errors():
    with pytest.raises(StageError, match="no labelled"):
        metrics.label_metrics([-1, -1], [0, 1])
    with pytest.raises(StageError, match="differ in length"):
        metrics.label_metrics([0, 1, 1], [0, 1])


# ------------------------------------------------------------------------------------------ graph
GRAPH_CASES = [
    # n, m, weighted, loops, directed, k
    (40, 80, False, False, False, 3),
    (60, 150, True, False, False, 5),
    (50, 120, True, True, False, 4),
    (30, 60, False, True, False, 2),
    (45, 110, True, True, True, 4),
    (35, 50, False, False, True, 3),
]


@pytest.mark.parametrize("n,m,weighted,loops,directed,k", GRAPH_CASES)
@pytest.mark.parametrize("seed", range(2))
def test_modularity_and_conductance_match_networkx(n, m, weighted, loops, directed, k, seed):
    rng = np.random.default_rng(seed)
    G = random_nx(rng, n, m, weighted=weighted, loops=loops, directed=directed)
    assert loops == (nx.number_of_selfloops(G) > 0)
    labels = random_labels(rng, n, k)
    indptr, indices, weights = csr(G, weighted)
    for resolution in (1.0, 0.5):
        got = metrics.modularity(indptr, indices, weights, labels, resolution, directed=directed)
        want = nx_modularity(G, communities(labels), weight="weight", resolution=resolution)
        assert got == pytest.approx(want, abs=1e-12)
    got = metrics.conductance(indptr, indices, weights, labels, directed=directed)
    assert got == pytest.approx(nx_conductance(G, labels), abs=1e-12)


def test_graph_metrics_hand_case():
    # two triangles joined by edge 2-3: m = 7, each side L = 3, vol = 7, cut = 1
    G = nx.Graph([(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5), (2, 3)])
    labels = np.array([0, 0, 0, 1, 1, 1])
    indptr, indices, _ = csr(G, False)
    assert metrics.modularity(indptr, indices, None, labels) == pytest.approx(6 / 7 - 2 * 0.5**2)
    got = metrics.conductance(indptr, indices, None, labels)
    assert got == pytest.approx({"conductance": 1 / 7, "mean_cluster_conductance": 1 / 7})
    # a self-loop of weight 2 on node 0 adds 2 to m and 4 to vol of cluster 0 (networkx convention)
    G.add_edge(0, 0, weight=2.0)
    indptr, indices, weights = csr(G, True)
    want = (3 + 2 + 3) / 9 - ((11 / 18) ** 2 + (7 / 18) ** 2)
    assert metrics.modularity(indptr, indices, weights, labels) == pytest.approx(want)
    assert want == pytest.approx(nx_modularity(G, communities(labels)))


def test_degenerate_clusterings():
    rng = np.random.default_rng(3)
    G = random_nx(rng, 30, 60, weighted=True, loops=True)
    G.add_nodes_from(range(30, 34))  # isolated nodes
    indptr, indices, weights = csr(G, True)
    one = np.zeros(34, dtype=np.int64)
    assert metrics.modularity(indptr, indices, weights, one) == pytest.approx(nx_modularity(G, communities(one)))
    assert metrics.conductance(indptr, indices, weights, one) == {"conductance": 0.0, "mean_cluster_conductance": 0.0}
    # a cluster of isolated nodes (vol 0) has phi 0; the others as networkx
    lab = np.where(np.arange(34) >= 30, 2, np.arange(34) % 2)
    got = metrics.conductance(indptr, indices, weights, lab)
    phis = [nx.conductance(G, S, weight="weight") for S in communities(lab)[:2]] + [0.0]
    assert got["mean_cluster_conductance"] == pytest.approx(np.mean(phis))
    # a graph without edges: everything 0
    empty = np.zeros(5, dtype=np.int64), np.zeros(0, dtype=np.int32)
    assert metrics.modularity(*empty, None, [0, 1, 1, 0]) == 0.0
    assert metrics.conductance(*empty, None, [0, 1, 1, 0])["mean_cluster_conductance"] == 0.0
    with pytest.raises(StageError, match="graph has 4 nodes"):
        metrics.modularity(*empty, None, [0, 1])
    # directed: arcs cross into a cluster without out-arcs (vol 0): phi := 1 for both sides of 0 -> 1
    path = np.array([0, 1, 1]), np.array([1], dtype=np.int32)
    got = metrics.conductance(*path, None, [0, 1], directed=True)
    assert got == {"conductance": 1.0, "mean_cluster_conductance": 1.0}
    with pytest.raises(StageError, match="empty labelling"):
        metrics.cluster_size_stats([], 3)


@pytest.mark.parametrize("directed", [False, True])
def test_chunked_equals_unchunked(directed):
    rng = np.random.default_rng(4)
    G = random_nx(rng, 50, 150, weighted=True, loops=True, directed=directed)
    G.add_edges_from((0, v, {"weight": 0.75}) for v in range(1, 50, 2))  # a hub spanning several chunks
    G.add_nodes_from(range(50, 60))  # empty rows
    indptr, indices, weights = csr(G, True)
    codes, sizes = metrics._dense_codes(random_labels(rng, 60, 4))
    k, nnz = sizes.size, int(indptr[-1])
    whole = metrics.edge_sums(indptr, indices, weights, codes, k, directed=directed, chunk_size=nnz)
    fields = ["internal", "out_cut", "in_cut" if directed else "loops"]
    for chunk in (1, 3, 17):
        part = metrics.edge_sums(indptr, indices, weights, codes, k, directed=directed, chunk_size=chunk)
        for f in fields:
            np.testing.assert_allclose(getattr(part, f), getattr(whole, f), rtol=1e-12)
    # partial sums over disjoint entry ranges add up
    split = nnz // 3
    args = indptr, indices, weights, codes, k
    halves = metrics.edge_sums(*args, directed=directed, stop=split, chunk_size=5) + metrics.edge_sums(
        *args, directed=directed, start=split, chunk_size=7
    )
    for f in fields:
        np.testing.assert_allclose(getattr(halves, f), getattr(whole, f), rtol=1e-12)
    assert whole.internal.sum() + whole.out_cut.sum() == pytest.approx(weights.sum())


# ------------------------------------------------------------------------------------------ sizes
def test_cluster_size_stats():
    rng = np.random.default_rng(5)
    labels = rng.choice([0, 1, 2, 4, 6], 500, p=[0.4, 0.3, 0.1, 0.1, 0.1])  # 3 and 5 empty
    got = metrics.cluster_size_stats(labels, 7)
    sizes = np.bincount(labels, minlength=7)
    p = sizes[sizes > 0] / 500
    assert got == pytest.approx(
        {
            "n_clusters_requested": 7,
            "n_clusters_found": 5,
            "n_empty": 2,
            "min": 0,
            "max": sizes.max(),
            "mean": 500 / 7,
            "median": np.median(sizes),
            "std": np.std(sizes),
            "largest_fraction": sizes.max() / 500,
            "balance": -(p * np.log(p)).sum() / np.log(7),
        }
    )
    assert 0 < got["balance"] < 1
    balanced = metrics.cluster_size_stats(np.repeat([3, 8, 9], 10), 3)
    assert balanced["balance"] == pytest.approx(1.0) and balanced["std"] == 0.0 and balanced["n_empty"] == 0
    assert metrics.cluster_size_stats(np.zeros(4, dtype=int), 1)["balance"] == 1.0


# ------------------------------------------------------------------------------------------ evaluate
def test_make_graph_matches_networkx(tmp_path):
    rng = np.random.default_rng(6)
    G = random_nx(rng, 25, 60, weighted=True, loops=True)
    edges = np.array([(a, b) for a, b in G.edges()])
    w = np.array([x for _, _, x in G.edges(data="weight")])
    # duplicates in reverse direction with a smaller weight are merged (max kept)
    graph = make_graph(
        tmp_path, np.vstack([edges, edges[:, ::-1]]), weights=np.concatenate([w, w / 2]), keep_self_loops=True,
        labels=np.where(np.arange(25) == 4, -1, np.arange(25) % 3 * 10 + 5),
    )
    indptr, indices, weights = csr(G, True)
    np.testing.assert_array_equal(graph.indptr, indptr)
    np.testing.assert_array_equal(graph.indices, indices)
    np.testing.assert_array_equal(graph.weights, weights)
    assert graph.indices.dtype == np.int32 and graph.n_edges == G.number_of_edges() and graph.nnz == indices.size
    assert graph.label_classes == [5, 15, 25] and graph.manifest["n_labelled"] == 24
    np.testing.assert_array_equal(graph.labels, np.where(np.arange(25) == 4, -1, np.arange(25) % 3))
    assert graph.features.shape == (25, 8) and graph.features.dtype == np.float32


@pytest.mark.parametrize("directed", [False, True])
def test_evaluate_on_graph(tmp_path, directed):
    rng = np.random.default_rng(7)
    G = random_nx(rng, 80, 200, weighted=True, loops=True, directed=directed)
    edges = np.array(G.edges())
    w = np.array([x for _, _, x in G.edges(data="weight")])
    truth = random_labels(rng, 80, 3)
    truth[rng.random(80) < 0.25] = -1
    graph = make_graph(tmp_path, edges, labels=truth, weights=w, directed=directed, keep_self_loops=True)
    pred = np.where(rng.random(80) < 0.7, truth % 4, rng.integers(0, 4, 80))
    pred[pred < 0] = 3
    got = metrics.evaluate(graph, pred, 5, chunk_size=64)

    assert set(got) == LABEL_KEYS | GRAPH_KEYS | {f"size_{k}" for k in metrics.cluster_size_stats(pred, 5)}
    assert all(type(v) in (int, float) for v in got.values())
    json.dumps(got, allow_nan=False)
    ref = sklearn_scores(graph.labels, pred)
    assert {k: got[k] for k in ref} == pytest.approx(ref, abs=1e-12)
    assert got["n_labelled"] == int((truth >= 0).sum())
    assert got["modularity"] == pytest.approx(nx_modularity(G, communities(pred), weight="weight"), abs=1e-12)
    assert {k: got[k] for k in ("conductance", "mean_cluster_conductance")} == pytest.approx(nx_conductance(G, pred))
    assert got["size_n_clusters_requested"] == 5 and got["size_n_empty"] == 1

    unlabelled = make_graph(tmp_path, edges, weights=w, directed=directed, keep_self_loops=True, n_nodes=80)
    plain = metrics.evaluate(unlabelled, pred, 5)
    assert not LABEL_KEYS & set(plain)
    assert plain == pytest.approx({k: v for k, v in got.items() if k not in LABEL_KEYS})
    with pytest.raises(StageError, match="80 nodes"):
        metrics.evaluate(graph, pred[:10], 5)


def test_evaluate_cora_true_labels(tmp_path, datasets):
    from torch_geometric.io import read_planetoid_data

    data = read_planetoid_data(str(datasets / "planetoid" / "Cora" / "raw"), "cora")
    ei = data.edge_index.numpy().T
    y = data.y.numpy().astype(np.int64)
    graph = make_graph(tmp_path, ei, features=data.x.numpy(), labels=y)  # symmetrised, self-loops dropped
    G = nx.Graph()
    G.add_nodes_from(range(data.num_nodes))
    G.add_edges_from(ei[ei[:, 0] != ei[:, 1]].tolist())
    assert graph.n_edges == G.number_of_edges() and graph.nnz == 2 * G.number_of_edges()

    got = metrics.evaluate(graph, y, int(y.max()) + 1, chunk_size=4096)
    assert [got[k] for k in ("acc", "nmi", "ari", "f1_macro")] == pytest.approx([1.0] * 4)
    assert got["n_labelled"] == data.num_nodes and got["n_unlabelled"] == 0
    nx.set_edge_attributes(G, 1.0, "weight")
    assert got["modularity"] == pytest.approx(nx_modularity(G, communities(y)), abs=1e-12)
    assert {k: got[k] for k in ("conductance", "mean_cluster_conductance")} == pytest.approx(nx_conductance(G, y))
    assert got["size_n_clusters_found"] == 7 and got["size_n_empty"] == 0
