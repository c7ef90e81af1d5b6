"""Where things live by default, and the process environment the stack needs.

Precedence for every location: explicit config value > environment variable > embedded default.

| what             | config key              | env var               | default                                  |
|------------------|-------------------------|-----------------------|------------------------------------------|
| data folder      | -                       | ``AGCPIPE_HOME``      | ``<repo>/data`` in a checkout, else ``./data`` |
| artifact store   | ``store``               | ``AGCPIPE_STORE``     | ``<data>/store``                          |
| datasets root    | ``datasets_root``       | ``AGCPIPE_DATASETS``  | none (sources with relative paths fail)   |
| MLflow tracking  | ``tracking.tracking_uri`` | ``MLFLOW_TRACKING_URI`` | ``sqlite:///<data>/mlflow.db`` (absolute) |
| MLflow artifacts | ``tracking.artifact_root`` | -                  | ``<data>/mlartifacts``                    |
| Prefect API      | -                       | ``PREFECT_API_URL``   | Prefect's ephemeral API                   |
"""
from __future__ import annotations

import os
from pathlib import Path

_PKG_DIR = Path(__file__).resolve().parent


def home() -> Path:
    """The project's data folder (absolute)."""
    env = os.environ.get("AGCPIPE_HOME")
    if env:
        return Path(env).expanduser().resolve()
    repo = _PKG_DIR.parent
    if (repo / "pyproject.toml").is_file() and (repo / "data").is_dir():
        return repo / "data"
    return (Path.cwd() / "data").resolve()


def store_root(configured: str | None = None) -> Path:
    if configured:
        return Path(configured).expanduser().resolve()
    env = os.environ.get("AGCPIPE_STORE")
    if env:
        return Path(env).expanduser().resolve()
    return home() / "store"


def datasets_root(configured: str | None = None) -> Path | None:
    value = configured or os.environ.get("AGCPIPE_DATASETS")
    return Path(value).expanduser().resolve() if value else None


def tracking_uri(configured: str | None = None) -> str:
    """An absolute tracking URI: MLflow's own default depends on the working directory."""
    if configured:
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{home() / 'mlflow.db'}"


def artifact_root(configured: str | None = None) -> Path:
    if configured:
        return Path(configured).expanduser().resolve()
    return home() / "mlartifacts"


# Environment the stack needs on an offline, loaded 2-core machine (NOTES-stack.md). ``setdefault`` so a
# user's explicit choice wins.
STACK_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # logging a pyfunc model must not try to reach PyPI or infer requirements
    "MLFLOW_REQUIREMENTS_INFERENCE_TIMEOUT": "5",
}


def apply_stack_env() -> None:
    for key, value in STACK_ENV.items():
        os.environ.setdefault(key, value)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; explicit CUDA without a GPU is an error."""
    import torch

    from .errors import ConfigError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} requested but no CUDA device is available (use auto or cpu)")
    return device
