"""Every user error of the issue, through the CLI: exit status 2, one line naming the problem, no artifact."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import yaml

from agcpipe.cli import main as cli


def _write_tables(d: Path, *, ids=None, feats=None, labels=None, edges=None) -> None:
    n = 40
    ids = [f"n{i}" for i in range(n)] if ids is None else ids
    feats = np.random.default_rng(0).normal(size=(len(ids), 3)) if feats is None else feats
    cell = str if np.asarray(feats).dtype == object else float  # object = some non-numeric cells
    nodes = {"id": ids, **{f"f_{j}": [cell(row[j]) for row in feats] for j in range(3)}}
    if labels is not None:
        nodes["label"] = labels
    pacsv.write_csv(pa.table(nodes), d / "nodes.csv")
    if edges is None:
        edges = [(f"n{i}", f"n{(i + 1) % n}") for i in range(n)] + [(f"n{i}", f"n{(i + 7) % n}") for i in range(n)]
    pacsv.write_csv(pa.table({"source": [e[0] for e in edges], "target": [e[1] for e in edges]}), d / "edges.csv")


def _config(d: Path, **extra) -> Path:
    cfg = {
        "name": "err",
        "source": {"type": "tables", "edges": "edges.csv", "nodes": "nodes.csv", "features": "f_*", **extra.pop("source", {})},
        "method": {"name": "sgc"},
        "cluster": {"n_clusters": 3, "n_init": 2},
        "tracking": {"enabled": False},
        **extra,
    }
    path = d / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run_fails(cfg: Path, capsys, *fragments: str, sets: list[str] | None = None) -> str:
    code = cli(["run", str(cfg), "--no-prefect", *sum((["--set", s] for s in sets or []), [])])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("agcpipe: error: ") and "\n" not in err and "Traceback" not in err
    for f in fragments:
        assert f in err, f"{f!r} not in {err!r}"
    return err


def _artifacts(home: Path, stage: str) -> list[Path]:
    d = home / "store" / stage
    return [p for p in d.iterdir()] if d.exists() else []


@pytest.fixture
def tables(tmp_path, home):
    d = tmp_path / "t"
    d.mkdir()
    _write_tables(d)
    return d


def test_valid_tables_run(tables, capsys, home):
    assert cli(["run", str(_config(tables)), "--no-prefect"]) == 0
    assert len(_artifacts(home, "evaluate")) == 1


def test_missing_file(tables, capsys, home):
    (tables / "nodes.csv").unlink()
    _run_fails(_config(tables), capsys, "nodes.csv")
    assert _artifacts(home, "ingest") == []


def test_misnamed_column(tables, capsys, home):
    _run_fails(_config(tables, source={"id_column": "ident"}), capsys, "nodes.csv", "'ident'", "id")
    assert _artifacts(home, "ingest") == []


def test_dangling_edge(tables, capsys, home):
    _write_tables(tables, edges=[("n0", "n1"), ("n1", "ghost"), ("n2", "n3")])
    _run_fails(_config(tables), capsys, "edges.csv", "target", "ghost", "[1]")
    assert _artifacts(home, "ingest") == []


def test_duplicate_node_ids(tables, capsys, home):
    ids = [f"n{i}" for i in range(40)]
    ids[5] = "n3"
    _write_tables(tables, ids=ids)
    _run_fails(_config(tables), capsys, "nodes.csv", "'id'", "duplicate", "5")
    assert _artifacts(home, "ingest") == []


def test_nan_features(tables, capsys, home):
    feats = np.random.default_rng(0).normal(size=(40, 3))
    feats[7, 1] = np.nan
    _write_tables(tables, feats=feats)
    _run_fails(_config(tables), capsys, "nodes.csv", "f_1", "7")
    assert _artifacts(home, "ingest") == []


def test_non_numeric_features(tables, capsys, home):
    feats = np.random.default_rng(0).normal(size=(40, 3)).astype(object)
    feats[4, 2] = "high"
    _write_tables(tables, feats=feats)
    _run_fails(_config(tables), capsys, "nodes.csv", "f_2")
    assert _artifacts(home, "ingest") == []


def test_mixed_label_types(tables, capsys, home):
    labels = ["1", "2"] * 19 + ["spam", "3"]
    _write_tables(tables, labels=labels)
    _run_fails(_config(tables, source={"label_column": "label"}), capsys, "nodes.csv", "'label'", "38")
    assert _artifacts(home, "ingest") == []


def test_empty_graph(tables, capsys, home):
    (tables / "nodes.csv").write_text('"id","f_0","f_1","f_2"\n')
    _run_fails(_config(tables), capsys, "nodes.csv")
    assert _artifacts(home, "ingest") == []


def test_corrupt_parquet(tables, capsys, home):
    (tables / "edges.parquet").write_bytes(b"PAR1 this is not parquet")
    _run_fails(_config(tables, source={"edges": "edges.parquet"}), capsys, "edges.parquet")
    assert _artifacts(home, "ingest") == []


@pytest.mark.parametrize("k, msg", [(1, "greater than or equal to 2"), (41, "larger than the number of nodes (40)")])
def test_n_clusters_out_of_range(tables, capsys, home, k, msg):
    _run_fails(_config(tables), capsys, "n_clusters", msg, sets=[f"cluster.n_clusters={k}"])
    assert _artifacts(home, "precompute") == [] and _artifacts(home, "cluster") == []


def test_unknown_config_key_and_method(tables, capsys):
    _run_fails(_config(tables), capsys, "unknown config key 'cluster.n_clusterz'", sets=["cluster.n_clusterz=3"])
    from agcpipe.methods import registry

    _run_fails(_config(tables), capsys, "unknown method 'dmon2'", "known methods: " + ", ".join(registry.known()), sets=["method.name=dmon2"])


def test_graphdata_npz_needs_trust(datasets, tmp_path, capsys, home):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"source": {"type": "npz", "path": str(datasets / "coauthor_cs" / "coauthor_cs.npz")}, "tracking": {"enabled": False}}))
    _run_fails(cfg, capsys, "coauthor_cs.npz", "trust_pickle")
    assert _artifacts(home, "ingest") == []
