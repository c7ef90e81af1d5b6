"""Shared fixtures. Real datasets come from AGCPIPE_DATASETS (CI: ../shared/datasets); never downloaded."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _datasets_root() -> Path | None:
    env = os.environ.get("AGCPIPE_DATASETS")
    cand = Path(env) if env else REPO.parent / "shared" / "datasets"
    return cand.resolve() if cand.is_dir() else None


@pytest.fixture(scope="session")
def datasets() -> Path:
    root = _datasets_root()
    if root is None:
        pytest.skip("real datasets not found: set AGCPIPE_DATASETS to the shared datasets folder")
    return root


from integration_support import home, mlflow_template, prefect_harness  # noqa: E402,F401  (fixtures)


@pytest.fixture(autouse=True)
def restore_mlflow_uris(monkeypatch):
    """Restore MLflow's process-global tracking / registry URIs (and the MLFLOW_*_URI variables that
    ``mlflow.set_*_uri`` export) after every test, so that no later test talks to this test's (deleted)
    database: a leaked registry URI once sent the infra test's registry lookups to a stale SQLite file."""
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        old = os.environ.get(var)
        monkeypatch.setenv(var, "placeholder")  # records the old value (or its absence) for teardown
        if old is None:
            monkeypatch.delenv(var)
        else:
            monkeypatch.setenv(var, old)
