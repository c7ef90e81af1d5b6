"""Fixtures for whole-flow tests: one Prefect harness per session, a pre-migrated MLflow DB per test."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_TABLES = REPO / "flows" / "examples" / "transactions"


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """Prefect's test harness (a temporary API + DB): ~12 s, so once per session (NOTES-stack.md)."""
    from agcpipe.settings import apply_stack_env

    apply_stack_env()
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An MLflow SQLite DB with migrations applied (a fresh DB costs ~4 s); tests copy it."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def home(tmp_path, monkeypatch, mlflow_template) -> Path:
    """An isolated agcpipe home: store, MLflow DB (copied template) and artifacts under tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(mlflow_template, home / "mlflow.db")
    monkeypatch.setenv("AGCPIPE_HOME", str(home))
    for var in ("AGCPIPE_STORE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    return home


def statuses(summary) -> dict[str, str]:
    return {s.stage: s.status for s in summary.stages}


def small_synthetic(**overrides) -> list[str]:
    """--set overrides for a small, quick synthetic job."""
    base = {
        "name": "small",
        "source.n_nodes": 1500,
        "source.n_communities": 4,
        "source.avg_degree": 8,
        "source.n_features": 16,
        "cluster.n_clusters": 4,
        "cluster.n_init": 3,
        "method.params.K": 4,
        "tracking.gate": "['modularity >= 0.2']",
    }
    base.update(overrides)
    return [f"{k}={v}" for k, v in base.items()]
