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
