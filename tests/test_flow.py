"""Whole flows through Prefect and MLflow: caching rules, tracking, registry, gate, assignment."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from sklearn.metrics import adjusted_rand_score

from agcpipe.cli import main as cli
from agcpipe.config import load_config
from agcpipe.pipeline import run_pipeline
from agcpipe.store import Store
from integration_support import EXAMPLE_TABLES, REPO, small_synthetic, statuses

pytestmark = pytest.mark.integration
ALL = ("ingest", "precompute", "train", "cluster", "evaluate")


def _client(home: Path) -> MlflowClient:
    uri = f"sqlite:///{home / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _flow(cfg):
    from agcpipe.orchestration import run_flow

    return run_flow(cfg)


# ------------------------------------------------------------------------------------ Prefect + MLflow
def test_flow_tracks_registers_and_rerun_is_cached(prefect_harness, home):
    cfg = load_config(None, small_synthetic())
    first = _flow(cfg)
    assert statuses(first) == {**{s: "computed" for s in ALL}, "track": "computed"}
    assert first.metrics["nmi"] > 0.3 and 0 < first.metrics["modularity"] < 1
    t = first.track
    assert t["model_version"] == "1" and t["model_status"] == "registered"
    assert t["gate_passed"] and t["alias_moved"]

    client = _client(home)
    run = client.get_run(t["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "ssgc" and run.data.params["source.n_nodes"] == "1500"
    assert run.data.tags["prefect.flow_run_id"] == first.flow_run_id
    assert run.data.tags["agcpipe.gate.passed"] == "True"
    assert "modularity=" in run.data.tags["agcpipe.gate.reason"]
    assert abs(run.data.metrics["nmi"] - first.metrics["nmi"]) < 1e-9
    for s in first.stages[:-1]:
        assert run.data.tags[f"agcpipe.stage.{s.stage}.key"] == s.key
        assert run.data.tags[f"agcpipe.stage.{s.stage}.status"] == "computed"
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert sorted(c.data.tags["agcpipe.stage"] for c in children) == sorted(ALL)
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "manifest.json", "metrics.json", "clusters", "model"} <= arts
    cluster_arts = {a.path for a in client.list_artifacts(run.info.run_id, "clusters")}
    assert {f"clusters/{n}.parquet" for n in ("assignments", "cluster_graph", "cluster_features", "representatives")} <= cluster_arts
    assignments = pq.read_table(client.download_artifacts(run.info.run_id, "clusters/assignments.parquet", str(home))).to_pandas()
    assert list(assignments.columns) == ["key", "node_id", "cluster", "confidence"] and len(assignments) == 1500
    assert assignments.confidence.between(0, 1).all()
    mv = client.get_model_version_by_alias(cfg.model_name, "champion")
    assert str(mv.version) == "1" and mv.run_id == run.info.run_id

    second = _flow(cfg)
    assert statuses(second) == {**{s: "cached" for s in ALL}, "track": "cached"}
    assert second.track["model_version"] == "1" and second.track["model_status"] == "reused"
    assert not second.track["alias_moved"] and second.metrics == first.metrics
    assert second.track["run_id"] != first.track["run_id"]  # every flow run is tracked
    rerun = client.get_run(second.track["run_id"])
    assert rerun.data.tags["agcpipe.stage.cluster.status"] == "cached"


def test_prefect_cache_drops_record_of_deleted_artifact(prefect_harness, home):
    cfg = load_config(None, small_synthetic(name="deleted", **{"source.seed": 3}))
    first = _flow(cfg)
    pre = Path(first.stage("precompute").path)
    (pre / "x.npy").unlink()  # the Prefect record still points here
    second = _flow(cfg)
    st = statuses(second)
    assert st["precompute"] == "computed" and st["ingest"] == "cached"
    assert all(st[s] == "cached" for s in ("train", "cluster", "evaluate"))  # same keys, still valid
    assert (pre / "x.npy").is_file()
    np.testing.assert_array_equal(
        np.load(Path(second.stage("cluster").path) / "labels.npy"), np.load(Path(first.stage("cluster").path) / "labels.npy")
    )


def test_failed_stage_poisons_neither_cache_nor_registry(prefect_harness, home, monkeypatch):
    from agcpipe.cluster.kmeans import KMeans

    cfg = load_config(None, small_synthetic(name="failing", **{"source.seed": 4}))

    def boom(self, X):
        raise RuntimeError("simulated crash in the cluster stage")

    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="simulated crash"):
        m.setattr(KMeans, "fit", boom)
        _flow(cfg)
    store = Store(home / "store")
    assert not [p for p in (store.root / "cluster").iterdir() if not p.name.startswith(".")]
    client = _client(home)
    runs = client.search_runs([client.get_experiment_by_name("agcpipe").experiment_id], "tags.`agcpipe.config` = 'failing'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "simulated crash" in runs[0].data.tags["agcpipe.error"]
    assert client.search_model_versions(f"name='{cfg.model_name}'") == []

    ok = _flow(cfg)
    st = statuses(ok)
    assert (st["ingest"], st["precompute"], st["train"]) == ("cached", "cached", "cached")
    assert (st["cluster"], st["evaluate"]) == ("computed", "computed")
    assert ok.track["model_version"] == "1"


def test_gate_failure_registers_but_does_not_move_alias(prefect_harness, home):
    good = _flow(load_config(None, small_synthetic(name="gated")))
    assert good.track["alias_moved"]
    bad = _flow(load_config(None, small_synthetic(name="gated", **{"method.params.K": 2, "tracking.gate": "['modularity >= 0.99']"})))
    t = bad.track
    assert t["model_version"] == "2" and not t["gate_passed"] and not t["alias_moved"]
    assert "-> fail" in t["gate_reason"] and t["alias_previous"] == "1"
    client = _client(home)
    assert str(client.get_model_version_by_alias("agcpipe-gated", "champion").version) == "1"
    assert client.get_run(t["run_id"]).data.tags["agcpipe.alias.moved"] == "False"
    assert client.get_model_version("agcpipe-gated", "2").tags["agcpipe.gate.passed"] == "False"


def test_user_tables_flow_and_assign_on_updated_snapshot(prefect_harness, home, tmp_path):
    data = tmp_path / "tables"
    shutil.copytree(EXAMPLE_TABLES, data)
    cfg_path = tmp_path / "tables.yaml"
    cfg_text = (REPO / "flows" / "configs" / "user_tables.yaml").read_text().replace("../examples/transactions/", "tables/")
    cfg_path.write_text(cfg_text)
    summary = _flow(load_config(cfg_path))
    assert summary.metrics["n_labelled"] < 3000 and summary.metrics["n_unlabelled"] > 0  # 30% unlabelled
    assert summary.metrics["nmi"] > 0.5
    trained = pq.read_table(Path(summary.stage("cluster").path) / "assignments.parquet").to_pandas()
    assert trained.key.str.startswith("acct-").all()

    # a later snapshot: 200 new accounts with transfers into the existing graph
    accounts = pacsv.read_csv(data / "accounts.csv").to_pandas()
    edges = pacsv.read_csv(data / "edges.csv").to_pandas()
    rng = np.random.default_rng(0)
    new = accounts.sample(200, random_state=1).copy()
    new["account"] = [f"new-{i:04d}" for i in range(200)]
    new.loc[:, [c for c in new.columns if c.startswith("f_")]] += rng.normal(0, 0.1, size=(200, 8))
    partners = rng.choice(accounts.account.values, size=600)
    new_edges = edges.iloc[:0].copy()
    new_edges["from_account"] = np.repeat(new.account.values, 3)
    new_edges["to_account"] = partners
    new_edges["amount"] = 10.0
    snap = tmp_path / "snapshot"
    snap.mkdir()
    accounts_all = __import__("pandas").concat([accounts, new])
    edges_all = __import__("pandas").concat([edges, new_edges])
    accounts_all.to_csv(snap / "accounts.csv", index=False)
    edges_all.to_csv(snap / "edges.csv", index=False)
    snap_cfg = tmp_path / "snapshot.yaml"
    snap_cfg.write_text(cfg_text.replace("tables/", "snapshot/"))

    out = tmp_path / "assigned.parquet"
    assert cli(["assign", "--model", "models:/agcpipe-transactions@champion", "--graph", str(snap_cfg), "--out", str(out)]) == 0
    got = pq.read_table(out).to_pandas()
    assert len(got) == 3200 and set(got.key.str[:4]) == {"acct", "new-"}
    old = got[got.key.str.startswith("acct")].set_index("key").loc[trained.key]
    assert adjusted_rand_score(trained.cluster, old.cluster) > 0.8  # existing nodes keep their clusters
    # new nodes land in the cluster of the segment they were copied from, mostly
    src_cluster = trained.set_index("key").loc[accounts.sample(200, random_state=1).account].cluster.values
    assert (got[got.key.str.startswith("new-")].cluster.values == src_cluster).mean() > 0.6

    # the same model from Python through MLflow
    mlflow.set_registry_uri(f"sqlite:///{home / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/agcpipe-transactions@champion")
    df = model.predict(str(summary.stage("ingest").path))
    np.testing.assert_array_equal(df.cluster.values, trained.cluster.values)


# ------------------------------------------------------------------------------ cache rules (in-process)
def test_cache_rules_config_and_input_changes(home, tmp_path):
    data = tmp_path / "tables"
    shutil.copytree(EXAMPLE_TABLES, data)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text((REPO / "flows" / "configs" / "user_tables.yaml").read_text().replace("../examples/transactions/", "tables/"))
    no_track = ["tracking.enabled=false"]

    def run(*overrides):
        return statuses(run_pipeline(load_config(cfg_path, [*no_track, *overrides])))

    assert set(run().values()) == {"computed"}
    assert set(run().values()) == {"cached"}
    # a precompute setting: precompute and everything after it
    assert run("method.params.K=5") == {"ingest": "cached", "precompute": "computed", "train": "computed", "cluster": "computed", "evaluate": "computed"}
    # a cluster setting: cluster and evaluate only
    assert run("cluster.n_init=3") == {"ingest": "cached", "precompute": "cached", "train": "cached", "cluster": "computed", "evaluate": "computed"}
    # a seed: non-parametric training does not depend on it
    assert run("seed=7") == {"ingest": "cached", "precompute": "cached", "train": "cached", "cluster": "computed", "evaluate": "computed"}
    # an ingest option: everything
    assert set(run("graph.duplicate_weight=max").values()) == {"computed"}
    # the input file's content: everything
    accounts = (data / "accounts.csv").read_text().splitlines()
    head, first = accounts[0], accounts[1].split(",")
    first[1] = "9.9999"
    (data / "accounts.csv").write_text("\n".join([head, ",".join(first), *accounts[2:]]) + "\n")
    assert set(run().values()) == {"computed"}
    assert set(run().values()) == {"cached"}


def test_cache_rules_library_code_change(home, tmp_path):
    """Editing one library module recomputes exactly the stage that runs it (and those after it)."""
    pkg = tmp_path / "src"
    shutil.copytree(REPO / "agcpipe", pkg / "agcpipe", ignore=shutil.ignore_patterns("__pycache__"))
    script = (
        "import json, sys; from agcpipe.config import load_config; from agcpipe.pipeline import run_pipeline; "
        "s = run_pipeline(load_config(None, sys.argv[1:])); print(json.dumps({x.stage: x.status for x in s.stages}))"
    )
    env = {**os.environ, "PYTHONPATH": str(pkg), "AGCPIPE_HOME": str(home)}
    args = [sys.executable, "-c", script, *small_synthetic(name="code"), "tracking.enabled=false"]

    def run() -> dict[str, str]:
        out = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)  # cwd: not the repo, whose agcpipe/ would shadow the copy
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert set(run().values()) == {"computed"}
    with open(pkg / "agcpipe" / "metrics.py", "a") as f:
        f.write("\nEVALUATION_REVISION = 2  # a code change\n")
    assert run() == {"ingest": "cached", "precompute": "cached", "train": "cached", "cluster": "cached", "evaluate": "computed"}
    with open(pkg / "agcpipe" / "ops" / "propagate.py", "a") as f:
        f.write("\nPROPAGATION_REVISION = 2\n")
    assert run() == {"ingest": "cached", "precompute": "computed", "train": "computed", "cluster": "computed", "evaluate": "computed"}
