"""Table reader: Parquet / CSV, files / folders / globs, id mapping, features, labels, weights, validation."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from agcpipe.config import GraphOptions, TableSource
from agcpipe.data.graph import Graph
from agcpipe.data.ingest import ingest
from agcpipe.errors import InputError

#: keeps every input row as one CSR entry, so the stored adjacency can be compared row by row
EXACT = GraphOptions(undirected=False, merge_duplicates=False, drop_self_loops=False)
N, E, D = 60, 240, 5


def _data(seed: int = 0, string_ids: bool = True) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    ids = [f"user-{i:03d}" for i in rng.permutation(N)] if string_ids else (rng.permutation(N) * 7 + 1000).tolist()
    s, t = rng.integers(0, N, E), rng.integers(0, N, E)
    x = rng.standard_normal((N, D)).astype(np.float32)
    labels = rng.choice(["cat", "dog", "eel", None], N).tolist()
    return {
        "ids": ids, "s": s, "t": t, "x": x, "labels": labels,
        "w": rng.integers(1, 10, E).astype(np.float32),
        "nodes": {"id": ids, **{f"f_{j}": x[:, j] for j in range(D)}, "label": labels},
        "edges": {"source": [ids[i] for i in s], "target": [ids[i] for i in t], "weight": rng.integers(1, 10, E).astype(np.float32)},
    }


def _write(path: Path, columns: dict[str, Any]) -> Path:
    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        pcsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


def _ingest(tmp_path: Path, options: GraphOptions = EXACT, **source: Any) -> Graph:
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    out.mkdir()
    src = TableSource(type="tables", **source)
    ingest(src, options, out)
    return Graph.open(out)


def _check_graph(g: Graph, d: dict[str, Any], weighted: bool, features: np.ndarray | None = None) -> None:
    """Adjacency entries = input rows mapped to node-table positions; features and labels in row order."""
    rows = np.repeat(np.arange(N), np.diff(g.indptr))
    got = sorted(zip(rows.tolist(), g.indices.tolist(), (g.weights if weighted else np.ones(g.nnz)).tolist()))
    w = d["edges"]["weight"] if weighted else np.ones(E)
    assert got == sorted(zip(d["s"].tolist(), d["t"].tolist(), np.asarray(w, dtype=float).tolist()))
    np.testing.assert_array_equal(g.features, d["x"] if features is None else features)
    assert g.keys().to_pylist() == d["ids"]


def _check_labels(g: Graph, labels: list[Any]) -> None:
    classes = sorted({v for v in labels if v is not None})
    assert g.label_classes == classes
    expected = [-1 if v is None else classes.index(v) for v in labels]
    assert g.labels.tolist() == expected
    assert g.manifest["n_labelled"] == sum(v is not None for v in labels)


# ------------------------------------------------------------------------------------------ reading
def test_parquet_string_ids_columns_weights_labels(tmp_path: Path):
    d = _data()
    nodes, edges = _write(tmp_path / "nodes.parquet", d["nodes"]), _write(tmp_path / "edges.parquet", d["edges"])
    g = _ingest(tmp_path, nodes=str(nodes), edges=str(edges), weight_column="weight", label_column="label",
                features=[f"f_{j}" for j in range(D)])
    _check_graph(g, d, weighted=True)
    _check_labels(g, d["labels"])
    m = g.manifest
    assert m["key_type"] == "string" and m["feature_names"] == [f"f_{j}" for j in range(D)] and m["weighted"]


def test_csv_int_ids_glob_features(tmp_path: Path):
    d = _data(1, string_ids=False)
    nodes = dict(d["nodes"], name=[f"n{i}" for i in range(N)], year=np.arange(N))
    g = _ingest(tmp_path, nodes=str(_write(tmp_path / "nodes.csv", nodes)), edges=str(_write(tmp_path / "edges.csv", d["edges"])),
                features="f_*", label_column="label")
    _check_graph(g, d, weighted=False)
    _check_labels(g, d["labels"])
    assert g.manifest["key_type"] == "int64" and g.keys().type == pa.int64()
    assert g.manifest["feature_names"] == [f"f_{j}" for j in range(D)]


def test_auto_features_every_numeric_column_but_id_and_label(tmp_path: Path):
    d = _data(2, string_ids=False)
    nodes = {"id": d["ids"], "name": [f"n{i}" for i in range(N)], "a": d["x"][:, 0], "year": np.arange(N), "label": np.arange(N) % 3}
    g = _ingest(tmp_path, nodes=str(_write(tmp_path / "n.parquet", nodes)), edges=str(_write(tmp_path / "e.parquet", d["edges"])),
                label_column="label")
    assert g.manifest["feature_names"] == ["a", "year"]
    np.testing.assert_array_equal(g.features, np.stack([d["x"][:, 0], np.arange(N)], axis=1).astype(np.float32))
    assert g.label_classes == [0, 1, 2] and g.labels.tolist() == (np.arange(N) % 3).tolist()


@pytest.mark.parametrize("list_type", [pa.list_(pa.float32()), pa.large_list(pa.float64()), pa.list_(pa.float32(), D)])
def test_list_column_features(tmp_path: Path, list_type: pa.DataType):
    d = _data(3)
    nodes = pa.table({"id": d["ids"], "emb": pa.array(d["x"].tolist(), type=list_type)})
    pq.write_table(nodes, tmp_path / "n.parquet")
    g = _ingest(tmp_path, nodes=str(tmp_path / "n.parquet"), edges=str(_write(tmp_path / "e.parquet", d["edges"])), features="emb")
    _check_graph(g, d, weighted=False)
    assert g.n_features == D and not g.manifest["has_labels"]


def test_folder_of_parts_equals_single_file(tmp_path: Path):
    d = _data(4)
    nodes, edges = pa.table(d["nodes"]), pa.table(d["edges"])
    single = _ingest(tmp_path, GraphOptions(), nodes=str(_write(tmp_path / "n.parquet", d["nodes"])),
                     edges=str(_write(tmp_path / "e.parquet", d["edges"])), label_column="label", weight_column="weight")
    for i, (a, b) in enumerate([(0, 17), (17, 40), (40, N)]):
        (tmp_path / "nodes" / "sub").mkdir(parents=True, exist_ok=True)
        pq.write_table(nodes.slice(a, b - a), tmp_path / "nodes" / ("sub" if i == 2 else "") / f"part-{i}.parquet")
    for i, (a, b) in enumerate([(0, 100), (100, E)]):
        (tmp_path / "edges").mkdir(exist_ok=True)
        pq.write_table(edges.slice(a, b - a), tmp_path / "edges" / f"part-{i}.parquet")
    (tmp_path / "edges" / "_SUCCESS").write_text("")
    (tmp_path / "edges" / ".part-0.parquet.crc").write_text("junk")
    parts = _ingest(tmp_path, GraphOptions(), nodes=str(tmp_path / "nodes"), edges=str(tmp_path / "edges"),
                    label_column="label", weight_column="weight")
    assert parts.fingerprint == single.fingerprint
    assert parts.manifest["info"]["nodes_files"] == 3 and parts.manifest["info"]["edges_files"] == 2


def test_csv_glob_tables_equal_parquet(tmp_path: Path):
    d = _data(5, string_ids=False)
    pq_graph = _ingest(tmp_path, GraphOptions(), nodes=str(_write(tmp_path / "n.parquet", d["nodes"])),
                       edges=str(_write(tmp_path / "e.parquet", d["edges"])), weight_column="weight", label_column="label")
    edges = pa.table(d["edges"])
    _write(tmp_path / "csv" / "edges_a.csv", edges.slice(0, 120).to_pydict())
    _write(tmp_path / "csv" / "edges_b.csv", edges.slice(120).to_pydict())
    csv_graph = _ingest(tmp_path, GraphOptions(), nodes=str(_write(tmp_path / "csv" / "nodes.csv", d["nodes"])),
                        edges=str(tmp_path / "csv" / "edges_*.csv"), weight_column="weight", label_column="label")
    assert csv_graph.fingerprint == pq_graph.fingerprint
    assert csv_graph.label_classes == pq_graph.label_classes == ["cat", "dog", "eel"]


def test_numeric_labels_with_nulls(tmp_path: Path):
    d = _data(6)
    labels = [None if i % 4 == 0 else float(i % 3) * 10 for i in range(N)]  # pandas-style float64 + NaN
    nodes = dict(d["nodes"], label=pa.array([np.nan if v is None else v for v in labels]))
    g = _ingest(tmp_path, nodes=str(_write(tmp_path / "n.parquet", nodes)), edges=str(_write(tmp_path / "e.parquet", d["edges"])),
                label_column="label")
    _check_labels(g, [None if v is None else int(v) for v in labels])
    text = dict(d["nodes"], label=[None if v is None else str(int(v)) for v in labels])  # numbers written as text
    g = _ingest(tmp_path, nodes=str(_write(tmp_path / "n.csv", text)), edges=str(_write(tmp_path / "e.parquet", d["edges"])),
                label_column="label")
    assert g.label_classes == [0, 10, 20]


def test_integer_node_ids_with_string_endpoints(tmp_path: Path):
    d = _data(7, string_ids=False)
    edges = dict(d["edges"], source=[str(v) for v in d["edges"]["source"]])
    g = _ingest(tmp_path, nodes=str(_write(tmp_path / "n.parquet", d["nodes"])), edges=str(_write(tmp_path / "e.parquet", edges)))
    _check_graph(g, d, weighted=False)


# --------------------------------------------------------------------------------------- validation
def _error(tmp_path: Path, nodes: dict | Path | str, edges: dict | Path | str, **source: Any) -> InputError:
    if isinstance(nodes, dict):
        nodes = _write(tmp_path / "in" / "nodes.parquet", nodes)
    if isinstance(edges, dict):
        edges = _write(tmp_path / "in" / "edges.parquet", edges)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(InputError) as e:
        _ingest(tmp_path, nodes=str(nodes), edges=str(edges), **source)
    after = sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(tmp_path / f"out{len(list(tmp_path.glob('out*'))) - 1}"))
    assert after == before  # nothing written outside out_dir
    assert "Traceback" not in str(e.value)
    return e.value


def test_missing_file(tmp_path: Path):
    d = _data()
    err = _error(tmp_path, tmp_path / "nope.parquet", d["edges"])
    assert err.file == str(tmp_path / "nope.parquet") and "not found" in str(err)
    err = _error(tmp_path, d["nodes"], str(tmp_path / "edges-*.parquet"))
    assert "no file matches" in str(err)


@pytest.mark.parametrize("key, value, closest", [("source_column", "src", "source"), ("label_column", "lable", "label"), ("features", ["f_0", "f_9x"], None)])
def test_missing_column_lists_columns_and_suggests(tmp_path: Path, key: str, value: Any, closest: str | None):
    d = _data()
    err = _error(tmp_path, d["nodes"], d["edges"], **{key: value})
    missing = value if isinstance(value, str) else value[1]
    assert err.column == missing and err.file.endswith(("nodes.parquet", "edges.parquet"))
    assert "Columns in the file" in str(err)
    if closest:
        assert f"did you mean '{closest}'" in str(err)


def test_edge_endpoint_not_a_node(tmp_path: Path):
    d = _data()
    edges = dict(d["edges"])
    edges["target"] = list(edges["target"])
    edges["target"][3], edges["target"][7] = "ghost", None
    err = _error(tmp_path, d["nodes"], edges)
    assert err.column == "target" and err.rows == [3, 7] and err.values == ["ghost", None] and err.count == 2
    assert err.file.endswith("edges.parquet") and "0-based" in str(err)


def test_duplicate_node_ids(tmp_path: Path):
    d = _data()
    nodes = dict(d["nodes"], id=list(d["ids"]))
    nodes["id"][10], nodes["id"][31] = nodes["id"][2], nodes["id"][5]
    err = _error(tmp_path, nodes, d["edges"])
    assert err.column == "id" and err.rows == [10, 31] and err.values == [d["ids"][2], d["ids"][5]]


@pytest.mark.parametrize("bad", [np.nan, np.inf, None])
def test_nan_inf_or_missing_features_across_files(tmp_path: Path, bad):
    d = _data()
    x = d["x"].astype(object)
    x[45, 2] = bad
    nodes = pa.table(dict(d["nodes"], f_2=pa.array(x[:, 2].tolist(), pa.float64())))
    (tmp_path / "in" / "nodes").mkdir(parents=True)
    pq.write_table(nodes.slice(0, 30), tmp_path / "in" / "nodes" / "a.parquet")
    pq.write_table(nodes.slice(30), tmp_path / "in" / "nodes" / "b.parquet")
    err = _error(tmp_path, tmp_path / "in" / "nodes", d["edges"])
    assert err.column == "f_2" and err.rows == [45] and err.file == str(tmp_path / "in" / "nodes")


def test_non_numeric_feature_column(tmp_path: Path):
    d = _data()
    nodes = dict(d["nodes"], f_1=[str(v) for v in d["x"][:, 1]])
    nodes["f_1"][8], nodes["f_1"][50] = "n/a?", "abc"
    err = _error(tmp_path, nodes, d["edges"], features=["f_0", "f_1"])
    assert err.column == "f_1" and err.rows == [8, 50] and err.values == ["n/a?", "abc"]
    # CSV: numbers in the first block, text much later
    rows = 200_000
    csv = tmp_path / "in" / "big.csv"
    vals = np.arange(rows).astype(str)
    vals[150_001] = "oops"
    big = {"id": np.arange(rows), "f": vals}
    _write(csv, big)
    err = _error(tmp_path, csv, {"source": [0, 1], "target": [1, 2]}, features=["f"])
    assert err.column == "f" and err.rows == [150_001] and err.values == ["oops"] and err.file == str(csv)
    # a folder of CSV files, auto features: rows count across the files
    _write(tmp_path / "in" / "parts" / "a.csv", {"id": [0, 1, 2], "f": [0.5, 1.5, 2.5]})
    _write(tmp_path / "in" / "parts" / "b.csv", {"id": [3, 4], "f": ["4.5", "x"]})
    err = _error(tmp_path, tmp_path / "in" / "parts", {"source": [0, 1], "target": [1, 2]})
    assert err.column == "f" and err.rows == [4] and err.file == str(tmp_path / "in" / "parts")
    assert "across the 2 files" in str(err)


def test_label_column_mixing_numbers_and_text(tmp_path: Path):
    d = _data()
    labels = ["cat" if i % 2 else "dog" for i in range(N)]
    labels[4], labels[9] = "3", "7.5"
    nodes = _write(tmp_path / "in" / "nodes.csv", dict(d["nodes"], label=labels))
    err = _error(tmp_path, nodes, d["edges"], label_column="label")
    assert err.column == "label" and err.rows == [4, 9] and err.values == ["3", "7.5"] and "mixes" in str(err)


def test_empty_tables(tmp_path: Path):
    d = _data()
    empty_nodes = pa.table({"id": pa.array([], pa.string()), "f_0": pa.array([], pa.float32())})
    pq.write_table(empty_nodes, tmp_path / "empty_nodes.parquet")
    err = _error(tmp_path, tmp_path / "empty_nodes.parquet", d["edges"])
    assert "no rows" in str(err) and err.file == str(tmp_path / "empty_nodes.parquet")
    (tmp_path / "edges.csv").write_text("source,target\n")
    err = _error(tmp_path, d["nodes"], tmp_path / "edges.csv")
    assert "no rows" in str(err) and err.file == str(tmp_path / "edges.csv")


def test_corrupt_files(tmp_path: Path):
    d = _data()
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet at all" * 10)
    err = _error(tmp_path, bad, d["edges"])
    assert err.file == str(bad) and "not a readable Parquet file" in str(err)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("id,f\n1,2\n3,4,5\n")
    err = _error(tmp_path, ragged, d["edges"])
    assert err.file == str(ragged) and "not a readable CSV file" in str(err)


def test_non_finite_weight(tmp_path: Path):
    d = _data()
    edges = dict(d["edges"], weight=d["edges"]["weight"].copy())
    edges["weight"][17] = np.nan
    err = _error(tmp_path, d["nodes"], edges, weight_column="weight")
    assert err.column == "weight" and err.rows == [17] and err.file.endswith("edges.parquet")
