"""Decoupled (trainable) methods through the whole flow: Prefect + MLflow, loss history, cached re-run,
resumable checkpoints, and assignment with the registered model on a graph with new nodes."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from sklearn.metrics import adjusted_rand_score

from agcpipe.cli import main as cli
from agcpipe.config import load_config
from agcpipe.errors import InputError
from agcpipe.pipeline import run_pipeline
from agcpipe.train.history import read_history
from method_support import one_torch_thread  # noqa: F401 (autouse fixture)
from integration_support import EXAMPLE_TABLES, REPO, small_synthetic, statuses

ALL = ("ingest", "precompute", "train", "cluster", "evaluate")


def _tables_config(tmp_path: Path, name: str, method: str, extra: str = "") -> tuple[Path, str]:
    data = tmp_path / "tables"
    if not data.exists():
        shutil.copytree(EXAMPLE_TABLES, data)
    text = (REPO / "flows" / "configs" / "user_tables.yaml").read_text().replace("../examples/transactions/", "tables/")
    text = text.replace("name: transactions", f"name: {name}")
    text = text.replace("method:\n  name: ppr\n  params: {alpha: 0.15, K: 10}\n", method + extra)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path, text


def _snapshot(tmp_path: Path, cfg_text: str, n_new: int = 200) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """A later snapshot: ``n_new`` accounts copied (plus noise) from existing ones, 3 transfers each into the
    existing graph, one new account linked only to another new one, and one with no transfers at all."""
    data = tmp_path / "tables"
    accounts = pacsv.read_csv(data / "accounts.csv").to_pandas()
    edges = pacsv.read_csv(data / "edges.csv").to_pandas()
    rng = np.random.default_rng(0)
    src = accounts.sample(n_new, random_state=1)
    new = src.copy()
    new["account"] = [f"new-{i:04d}" for i in range(n_new)]
    fcols = [c for c in new.columns if c.startswith("f_")]
    new.loc[:, fcols] += rng.normal(0, 0.1, size=(n_new, len(fcols)))
    # each new account transfers with 3 neighbours of the account it was copied from (same community)
    nbrs = edges.groupby("from_account").to_account.apply(list).to_dict()
    partners = [rng.choice(nbrs.get(a, [a]), size=3) for a in src.account]
    new_edges = pd.DataFrame({"from_account": np.repeat(new.account.values, 3), "to_account": np.concatenate(partners), "amount": 10.0})
    extra = pd.DataFrame({"account": ["new-chain", "new-alone"], **{c: [0.0, 0.0] for c in fcols}, "segment": [None, None]})
    chain = pd.DataFrame({"from_account": ["new-chain"], "to_account": ["new-0000"], "amount": [5.0]})
    snap = tmp_path / "snapshot"
    snap.mkdir(exist_ok=True)
    pd.concat([accounts, new, extra]).to_csv(snap / "accounts.csv", index=False)
    pd.concat([edges, new_edges, chain]).to_csv(snap / "edges.csv", index=False)
    path = tmp_path / "snapshot.yaml"
    path.write_text(cfg_text.replace("tables/", "snapshot/"))
    return path, src, accounts


# --------------------------------------------------------------------------------- Prefect + MLflow
DGI_BLOCK = (
    "method:\n  name: dgi\n  params: {encoder: {type: gcn, hidden: 64, layers: 1}, lr: 0.01}\n"
    "train:\n  epochs: 60\n  patience: 15\n  threads: 1\n"
)


@pytest.mark.integration
def test_dgi_flow_logs_history_reruns_cached_and_assigns_new_nodes(prefect_harness, home, tmp_path):
    from agcpipe.orchestration import run_flow

    cfg_path, cfg_text = _tables_config(tmp_path, "txn-dgi", DGI_BLOCK)
    cfg = load_config(cfg_path)
    first = run_flow(cfg)
    assert statuses(first) == {**{s: "computed" for s in ALL}, "track": "computed"}
    assert first.metrics["nmi"] > 0.5, first.metrics
    train = first.stage("train")
    fit = train.summary["fit"]
    assert fit["plan"]["mode"] == "full" and fit["plan"]["patience"] == 15 and 0 < fit["epochs_run"] <= 60
    history = read_history(Path(train.path) / "history.parquet")
    assert len(history.series("loss")) == fit["epochs_run"]
    assert not (home / "store" / ".checkpoints" / "train" / train.key).exists()  # a finished run leaves none
    assert {"model.safetensors", "spec.json"} <= {p.name for p in (Path(train.path) / "state").iterdir()}

    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def train_run(parent_id):
        exp = client.get_run(parent_id).info.experiment_id
        (child,) = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}' and tags.`agcpipe.stage` = 'train'")
        return child.info.run_id

    curve = client.get_metric_history(train_run(first.track["run_id"]), "loss")
    assert [m.step for m in sorted(curve, key=lambda m: m.step)] == list(range(1, fit["epochs_run"] + 1))
    assert len(client.get_metric_history(train_run(first.track["run_id"]), "loss_real")) == fit["epochs_run"]

    second = run_flow(cfg)
    assert statuses(second) == {**{s: "cached" for s in ALL}, "track": "cached"}
    assert second.metrics == first.metrics
    assert len(client.get_metric_history(train_run(second.track["run_id"]), "loss")) == fit["epochs_run"]  # from the artifact

    # assign with the registered model on a later snapshot with new nodes
    snap_cfg, src, accounts = _snapshot(tmp_path, cfg_text)
    out = tmp_path / "assigned.parquet"
    assert cli(["assign", "--model", "models:/agcpipe-txn-dgi@champion", "--graph", str(snap_cfg), "--out", str(out)]) == 0
    got = pq.read_table(out).to_pandas().set_index("key")
    trained = pq.read_table(Path(first.stage("cluster").path) / "assignments.parquet").to_pandas()
    assert len(got) == len(accounts) + 202
    assert adjusted_rand_score(trained.cluster, got.loc[trained.key].cluster) > 0.8  # existing nodes keep their clusters
    src_cluster = trained.set_index("key").loc[src.account].cluster.values
    new_cluster = got.loc[[f"new-{i:04d}" for i in range(len(src))]].cluster.values
    assert (new_cluster == src_cluster).mean() > 0.6  # new nodes join their community's cluster


# ------------------------------------------------------------------------------ resumable checkpoints
def test_killed_training_resumes_from_its_checkpoint(home, tmp_path, monkeypatch):
    from agcpipe.methods.gae import GAE

    overrides = [
        *small_synthetic(name="resume", **{"source.n_nodes": 600}),
        "method.name=gae",
        "method.params={encoder: {type: gcn, hidden: 16, layers: 2, out: 8, activation: relu, last_activation: false}}",
        "train.mode=minibatch",
        "train.batch_size=200",
        "train.fanout=[5, 5]",
        "train.epochs=5",
        "train.checkpoint_every=1",
        "tracking.enabled=false",
    ]
    reference = run_pipeline(load_config(None, [*overrides, f"store={tmp_path / 'reference'}"]))

    calls = {"n": 0}
    original = GAE.loss

    def killed(self, model, batch, run):
        calls["n"] += 1
        if calls["n"] == 3 * 3 + 2:  # during epoch 4 (3 batches per epoch): checkpoint after epoch 3
            raise KeyboardInterrupt("killed")
        return original(self, model, batch, run)

    cfg = load_config(None, overrides)
    monkeypatch.setattr(GAE, "loss", killed)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg)
    ckpt_root = home / "store" / ".checkpoints" / "train"
    (kept,) = list(ckpt_root.iterdir())
    assert (kept / "checkpoint.pt").is_file()
    assert not [p for p in (home / "store" / "train").iterdir() if not p.name.startswith(".")]  # nothing published

    monkeypatch.setattr(GAE, "loss", original)
    resumed = run_pipeline(cfg)
    train = resumed.stage("train")
    assert train.status == "computed" and train.key == kept.name
    assert train.summary["fit"]["resumed_from_epoch"] == 3 and train.summary["fit"]["epochs_run"] == 5
    assert not kept.exists()  # removed once the artifact is published
    np.testing.assert_array_equal(
        np.load(Path(train.path) / "embeddings.npy"), np.load(Path(reference.stage("train").path) / "embeddings.npy")
    )
    assert statuses(run_pipeline(cfg))["train"] == "cached"


# ------------------------------------------------------------------------ node2vec on unseen nodes
def test_node2vec_assign_embeds_unseen_nodes_from_their_neighbours(home, tmp_path):
    from agcpipe.model import ModelBundle, build_bundle

    block = "method:\n  name: node2vec\n  params: {dim: 16, walk_length: 8, context_size: 4, walks_per_node: 2}\n"
    cfg_path, cfg_text = _tables_config(tmp_path, "txn-n2v", block, "train:\n  epochs: 3\n  batch_size: 256\n")
    cfg = load_config(cfg_path, ["tracking.enabled=false"])
    s = run_pipeline(cfg)
    assert s.stage("train").summary["fit"]["plan"]["mode"] == "minibatch"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    build_bundle(cfg, *(s.stage(x) for x in ("ingest", "precompute", "train", "cluster")), bundle)
    trained = pq.read_table(Path(s.stage("cluster").path) / "assignments.parquet").to_pandas()

    snap_cfg, src, accounts = _snapshot(tmp_path, cfg_text, n_new=50)
    source = load_config(snap_cfg).source
    got = ModelBundle(bundle).assign(source, base_dir=tmp_path).to_pandas().set_index("key")
    old = got.loc[trained.key]
    np.testing.assert_array_equal(old.cluster.values, trained.cluster.values)  # known nodes: their own embedding
    np.testing.assert_allclose(old.confidence.values, trained.confidence.values, atol=1e-6)
    new = got.loc[[f"new-{i:04d}" for i in range(50)]]
    assert (new.confidence > 0).all()  # reached: mean of their (known) neighbours
    assert got.loc["new-chain"].confidence > 0  # two hops away from known nodes
    assert got.loc["new-alone"].confidence == 0  # no path to a known node: flagged

    spec_path = bundle / "model.json"
    spec_path.write_text(spec_path.read_text().replace('"unseen": "neighbors"', '"unseen": "error"'))
    with pytest.raises(InputError, match="transductive"):
        ModelBundle(bundle).assign(source, base_dir=tmp_path)
