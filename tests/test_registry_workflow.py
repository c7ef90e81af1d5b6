"""Registry workflow: champion-relative gate, alias history (gate / promote / rollback), the `models`
CLI, lineage tags, and `assign` refusing a graph whose feature schema differs from the model's."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import yaml
from mlflow import MlflowClient

from agcpipe import registry
from agcpipe.cli import main as cli
from agcpipe.config import load_config
from agcpipe.errors import ConfigError
from agcpipe.pipeline import run_pipeline
from agcpipe.registry import Champion
from agcpipe.tracking import evaluate_gate
from integration_support import small_synthetic


def _client(home: Path) -> MlflowClient:
    uri = f"sqlite:///{home / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# ------------------------------------------------------------------------------------------ gate (unit)
def test_gate_syntax_validated_with_the_config():
    ok = load_config(None, ["tracking.gate=['nmi >= champion - 0.01', 'acc > champion*0.98', 'modularity>=champion', 'ari >= 0.1']"])
    assert len(ok.tracking.gate) == 4
    for bad in ("nmi >= champ", "nmi >= champion ^ 2", "nmi >= champion - x", "nmi >= 1e", "champion >= nmi"):
        with pytest.raises(ConfigError, match="champion"):
            load_config(None, [f"tracking.gate=['{bad}']"])


def test_gate_champion_relative_conditions():
    metrics = {"nmi": 0.50, "acc": 0.70, "modularity": 0.6}
    holder = Champion("3", {"nmi": 0.505, "acc": 0.80})
    g = evaluate_gate(["nmi >= champion - 0.01", "modularity >= 0.5"], metrics, holder)
    assert g.passed and "champion v3 0.5050 - 0.01 = 0.4950 -> pass" in g.reason and "modularity=0.6000 >= 0.5 -> pass" in g.reason
    g = evaluate_gate(["nmi >= champion"], metrics, holder)
    assert not g.passed and "-> fail" in g.reason
    g = evaluate_gate(["acc >= champion * 0.9"], metrics, holder)  # 0.70 < 0.72
    assert not g.passed and "* 0.9 = 0.7200 -> fail" in g.reason
    g = evaluate_gate(["acc >= champion + -0.2"], metrics, holder)
    assert g.passed
    # no holder: passes, and says so
    g = evaluate_gate(["nmi >= champion - 0.01"], metrics, None)
    assert g.passed and "no version holds 'champion' yet" in g.reason
    # the holder lacks the metric: fails, and says so
    g = evaluate_gate(["modularity >= champion"], metrics, holder)
    assert not g.passed and "has no modularity" in g.reason
    # a candidate missing the metric fails as before
    assert not evaluate_gate(["ari >= champion"], metrics, holder).passed
    # compared at the registry's tag precision: a version equals itself
    exact = {"nmi": 0.123456789}
    assert evaluate_gate(["nmi >= champion"], exact, Champion("1", {"nmi": float(f"{0.123456789:.6g}")})).passed


# ------------------------------------------------------------------------------------------ workflow
def _run(**overrides):
    return run_pipeline(load_config(None, small_synthetic(name="reg", **overrides)))


def test_alias_history_promote_rollback_and_models_cli(home, monkeypatch, capsys):
    name = "agcpipe-reg"
    monkeypatch.setenv("AGCPIPE_USER", "ci-bot")
    first = _run(**{"tracking.gate": "['modularity >= 0.2', 'nmi >= champion - 0.01']"}).track
    assert first["model_version"] == "1" and first["alias_moved"] and first["gate_passed"]
    assert "no version holds 'champion' yet" in first["gate_reason"]

    # a stricter champion-relative gate: registered, alias stays
    second = _run(**{"seed": 5, "method.params.K": 2, "tracking.gate": "['nmi >= champion + 0.5']"}).track
    assert second["model_version"] == "2" and not second["gate_passed"] and not second["alias_moved"]
    assert "champion v1" in second["gate_reason"] and "-> fail" in second["gate_reason"]
    # a loose one: the alias moves to the new version
    third = _run(**{"seed": 6, "tracking.gate": "['nmi >= champion - 1']"}).track
    assert third["model_version"] == "3" and third["alias_moved"] and third["alias_previous"] == "1"

    client = _client(home)
    hist = registry.alias_history(client, name, "champion")
    assert [(m.source, m.from_version, m.to_version) for m in hist] == [("gate", None, "1"), ("gate", "1", "3")]
    assert hist[0].run_id == first["run_id"] and hist[1].run_id == third["run_id"] and hist[1].user == "ci-bot"
    assert "champion v1" in hist[1].reason

    # lineage tags on the version: the stage artifacts it was built from (cache gc protects them)
    v1 = client.get_model_version(name, "1")
    bundle = home / "store" / "model" / v1.tags["agcpipe.model_key"]
    keys = json.loads((bundle / "model.json").read_text())["training"]["keys"]
    assert {k: v1.tags[f"agcpipe.lineage.{k}"] for k in keys} == keys and set(keys) == {"ingest", "precompute", "train", "cluster"}

    # promote through the CLI
    monkeypatch.setenv("AGCPIPE_USER", "alice")
    assert cli(["models", "promote", name, "2", "--alias", "champion", "--reason", "v3 regressed on the new snapshot"]) == 0
    assert "3 -> 2" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert cli(["models", "promote", name, "2"]) == 0  # already there: nothing recorded
    assert "nothing to do" in capsys.readouterr().out

    # rollback: back to where it was before the latest move, recorded
    monkeypatch.setenv("AGCPIPE_USER", "bob")
    assert cli(["models", "rollback", name, "--alias", "champion", "--reason", "promote was a mistake"]) == 0
    assert "2 -> 3" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"
    hist = registry.alias_history(client, name, "champion")
    assert [(m.source, m.from_version, m.to_version, m.user) for m in hist[2:]] == [("promote", "3", "2", "alice"), ("rollback", "2", "3", "bob")]
    assert hist[2].reason == "v3 regressed on the new snapshot" and hist[3].reason == "promote was a mistake"
    assert all(a.seq < b.seq for a, b in zip(hist, hist[1:]))

    # the history is durable in the same backend: a fresh client sees the audit runs and their params
    fresh = _client(home)
    exp = fresh.get_experiment_by_name(registry.HISTORY_EXPERIMENT)
    runs = fresh.search_runs([exp.experiment_id], f"params.model = '{name}'")
    assert len(runs) == 4 and {r.data.params["source"] for r in runs} == {"gate", "promote", "rollback"}
    assert {r.data.tags["mlflow.user"] for r in runs} == {"ci-bot", "alice", "bob"}

    # list / show / history
    assert cli(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert name in out and "champion -> v3" in out
    assert cli(["models", "show", name]) == 0
    out = capsys.readouterr().out
    for text in ("versions", "nmi", "modularity", "champion", "alias history", "promote", "rollback", "alice", "bob", "ci-bot", "promote was a mistake"):
        assert text in out, text
    mets = registry.version_metrics(client.get_model_version(name, "3"))
    assert f"{mets['nmi']:.4f}" in out
    assert cli(["models", "history", name, "--alias", "champion"]) == 0
    assert capsys.readouterr().out.count("champion") >= 4

    # errors: exit 2 with one line
    assert cli(["models", "promote", name, "9"]) == 2
    assert "has no version '9' (versions: 1, 2, 3)" in capsys.readouterr().err
    assert cli(["models", "rollback", name, "--alias", "staging"]) == 2
    assert "no recorded moves" in capsys.readouterr().err
    assert cli(["models", "show", "agcpipe-nope"]) == 2
    assert "no registered model named 'agcpipe-nope'" in capsys.readouterr().err
    client.set_registered_model_alias(name, "champion", "1")  # moved outside agcpipe
    assert cli(["models", "rollback", name]) == 2
    assert "moved outside agcpipe" in capsys.readouterr().err
    # the first move of an alias has nothing before it
    client.delete_registered_model_alias(name, "champion")
    registry.promote(client, name, "1", "staging", reason="first staging")
    with pytest.raises(ConfigError, match="did not exist before"):
        registry.rollback(client, name, "staging")


# ------------------------------------------------------------------------------------------ assign schema
def _tables(d: Path, columns: list[str], n: int = 120, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    comm = np.arange(n) % 3
    base = {"a": comm * 2.0, "b": -comm * 1.0, "c": np.zeros(n), "d": comm * 0.5}
    nodes = {"id": [f"n{i}" for i in range(n)]}
    for col in columns:
        nodes[col] = base.get(col, np.zeros(n)) + rng.normal(0, 0.3, n)
    pacsv.write_csv(pa.table(nodes), d / "nodes.csv")
    src = [f"n{i}" for i in range(n) for j in (3, 6)]
    dst = [f"n{(i + j) % n}" for i in range(n) for j in (3, 6)]
    pacsv.write_csv(pa.table({"source": src, "target": dst}), d / "edges.csv")


def _source_yaml(d: Path) -> Path:
    p = d / "graph.yaml"
    p.write_text(yaml.safe_dump({"source": {"type": "tables", "edges": "edges.csv", "nodes": "nodes.csv"}}))  # features: every numeric column, in file order
    return p


def test_assign_refuses_a_graph_whose_feature_schema_differs(home, tmp_path, capsys):
    train = tmp_path / "train"
    train.mkdir()
    _tables(train, ["a", "b", "c", "d"])
    cfg = train / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "schema", "source": {"type": "tables", "edges": "edges.csv", "nodes": "nodes.csv"},
        "method": {"name": "sgc", "params": {"K": 2}}, "cluster": {"n_clusters": 3, "n_init": 2},
        "tracking": {"gate": ["modularity >= -1"]},
    }))
    assert run_pipeline(load_config(cfg)).track["alias_moved"]
    model = "models:/agcpipe-schema@champion"

    cases = {
        "same": (["a", "b", "c", "d"], None),
        "reordered": (["b", "a", "c", "d"], "in a different order: position 0: 'b' where the model has 'a'"),
        "missing": (["a", "b", "c"], "missing ['d']"),
        "renamed": (["a", "b", "c", "e"], "missing ['d']; not in the model ['e']"),
        "extra": (["a", "b", "c", "d", "e"], "not in the model ['e']"),
    }
    for case, (columns, message) in cases.items():
        d = tmp_path / case
        d.mkdir()
        _tables(d, columns, seed=1)
        out = d / "assigned.parquet"
        rc = cli(["assign", "--model", model, "--graph", str(_source_yaml(d)), "--out", str(out)])
        err = capsys.readouterr().err
        if message is None:
            assert rc == 0 and out.is_file(), err
            continue
        assert rc == 2, case
        line = err.strip()
        assert line.count("\n") == 0 and message in line, line
        assert str(d / "nodes.csv") in line  # names the user's file, not a temp folder
        assert "same order" in line and not out.exists()
