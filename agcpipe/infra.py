"""Local services on loopback for unattended runs: ``agcpipe infra up | down | status | deploy``.

``up`` starts, each in its own process group with a pid file and a log under ``<data>/infra/``:

* a Prefect server (schedules and workers need one: Prefect's ephemeral API runs no schedules),
* a Prefect *process* worker on the ``agcpipe-process`` work pool (runs deployed flows as subprocesses),
* an MLflow tracking server (SQLite backend store, proxied artifact store under ``<data>/infra/``),
* a Dask scheduler with two single-threaded workers.

It writes ``<data>/infra/env.sh`` (``PREFECT_API_URL``, ``MLFLOW_TRACKING_URI``,
``DASK_SCHEDULER_ADDRESS``): ``source`` it and every ``agcpipe`` command uses the services, with no code
or config change. ``up`` is idempotent (healthy services are kept); ``down`` stops the process groups
(SIGTERM, then SIGKILL after a grace period) and removes the pid files.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AgcError, ConfigError
from .settings import STACK_ENV, home

WORK_POOL = "agcpipe-process"
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000, "dask": 8786}
SERVICES = ("prefect", "mlflow", "dask-scheduler", "prefect-worker", "dask-workers")
REPO = Path(__file__).resolve().parents[1]


class InfraError(AgcError):
    """A local service did not start or stop as expected."""


def infra_dir() -> Path:
    return home() / "infra"


def _bin(name: str) -> str:
    """A console script of this environment (next to the running interpreter), else from PATH."""
    cand = Path(sys.executable).parent / name
    found = str(cand) if cand.exists() else shutil.which(name)
    if not found:
        raise InfraError(f"'{name}' is not installed in this environment")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return 200 <= r.status < 300
    except OSError:
        return False


@dataclass
class Service:
    name: str
    argv: list[str]
    healthy: Callable[[], bool]
    env: dict[str, str]

    @property
    def pid_file(self) -> Path:
        return infra_dir() / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return infra_dir() / f"{self.name}.log"


def _pid(path: Path) -> int | None:
    """The pid in ``path`` if that process is alive, else None."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if process_alive(pid) else None


def process_alive(pid: int) -> bool:
    """True for a running process; False for a gone one or a zombie (which is reaped if it is our child)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our child and it has exited: reaped now
            return False
    except ChildProcessError:  # not our child (the usual case: `agcpipe infra up` has exited)
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _state() -> dict[str, Any]:
    try:
        return json.loads((infra_dir() / "infra.json").read_text())
    except (OSError, ValueError):
        return {}


def service_env(state: dict[str, Any]) -> dict[str, str]:
    """The variables that point agcpipe (and Prefect / MLflow / Dask clients) at the services."""
    return {
        "PREFECT_API_URL": f"http://127.0.0.1:{state['prefect']}/api",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{state['mlflow']}",
        "DASK_SCHEDULER_ADDRESS": f"tcp://127.0.0.1:{state['dask']}",
    }


def _services(state: dict[str, Any]) -> dict[str, Service]:
    d = infra_dir()
    base = {**os.environ, **STACK_ENV, "PREFECT_HOME": str(d / "prefect-home"), "AGCPIPE_HOME": str(home())}
    urls = service_env(state)
    p, m, k = state["prefect"], state["mlflow"], state["dask"]
    client_env = {**base, **urls, "AGCPIPE_REPO": str(REPO)}
    return {
        "prefect": Service(
            "prefect",
            [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(p)],
            lambda: _http_ok(f"http://127.0.0.1:{p}/api/health"),
            base,
        ),
        "mlflow": Service(
            "mlflow",
            [
                _bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(m), "--workers", "1",
                "--backend-store-uri", state["backend_store_uri"],
                "--artifacts-destination", str(d / "mlartifacts"),
            ],
            lambda: _http_ok(f"http://127.0.0.1:{m}/health"),
            base,
        ),
        "dask-scheduler": Service(
            "dask-scheduler",
            [_bin("dask"), "scheduler", "--host", "127.0.0.1", "--port", str(k), "--dashboard-address", f"127.0.0.1:{state['dask_dashboard']}"],
            lambda: _port_open(k),
            base,
        ),
        "prefect-worker": Service(
            "prefect-worker",
            [_bin("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process", "--limit", "1"],
            lambda: _pid(infra_dir() / "prefect-worker.pid") is not None,
            client_env,
        ),
        "dask-workers": Service(
            "dask-workers",
            [_bin("dask"), "worker", urls["DASK_SCHEDULER_ADDRESS"], "--nworkers", "2", "--nthreads", "1", "--no-dashboard", "--local-directory", str(d / "dask-workers")],
            lambda: _dask_workers(urls["DASK_SCHEDULER_ADDRESS"]) >= 2,
            client_env,
        ),
    }


def _dask_workers(address: str) -> int:
    try:
        from distributed import Client

        with Client(address, timeout=3) as c:
            return len(c.scheduler_info().get("workers", {}))
    except Exception:  # not up yet
        return 0


def _start(svc: Service) -> None:
    if _pid(svc.pid_file) is not None:
        return
    svc.log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(svc.log_file, "ab") as log:
        proc = subprocess.Popen(svc.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=svc.env, cwd=REPO, start_new_session=True)
    svc.pid_file.write_text(str(proc.pid))


def _wait(svcs: list[Service], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(svcs)
    while pending:
        for svc in list(pending):
            if _pid(svc.pid_file) is None:
                raise InfraError(f"{svc.name} exited during start-up; see {svc.log_file}: {_tail(svc.log_file)}")
            if svc.healthy():
                pending.remove(svc)
        if pending and time.monotonic() > deadline:
            raise InfraError(f"{', '.join(s.name for s in pending)} not healthy after {timeout:.0f} s; logs in {infra_dir()}")
        if pending:
            time.sleep(0.5)


def _tail(path: Path, n: int = 400) -> str:
    try:
        return path.read_text(errors="replace")[-n:].replace("\n", " | ")
    except OSError:
        return ""


def up(*, ports: dict[str, int] | None = None, backend_store_uri: str | None = None, timeout: float = 180) -> dict[str, str]:
    """Start (or keep) every service; return the environment that points clients at them."""
    d = infra_dir()
    d.mkdir(parents=True, exist_ok=True)
    state = _state()
    running = [n for n in SERVICES if _pid(d / f"{n}.pid") is not None]
    if not running:
        chosen = {**DEFAULT_PORTS, **(ports or {})}
        state = {
            **{k: (v if v and not _port_open(v) else free_port()) for k, v in chosen.items()},
            "dask_dashboard": free_port(),
            "backend_store_uri": backend_store_uri or f"sqlite:///{d / 'mlflow.db'}",
        }
        (d / "infra.json").write_text(json.dumps(state, indent=1))
    elif not state:
        raise InfraError(f"services are running but {d / 'infra.json'} is missing: run `agcpipe infra down` first")
    svcs = _services(state)
    first = [svcs[n] for n in ("prefect", "mlflow", "dask-scheduler")]
    for s in first:  # the three servers start in parallel
        _start(s)
    _wait(first, timeout)
    _ensure_work_pool(svcs["prefect"].env | service_env(state))
    second = [svcs["prefect-worker"], svcs["dask-workers"]]
    for s in second:
        _start(s)
    _wait(second, timeout)
    env = service_env(state)
    (d / "env.sh").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    return env


def _ensure_work_pool(env: dict[str, str]) -> None:
    out = subprocess.run(
        [_bin("prefect"), "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    if out.returncode != 0:
        raise InfraError(f"creating work pool {WORK_POOL} failed: {out.stdout[-500:]} {out.stderr[-500:]}")


def down(grace: float = 15.0) -> list[str]:
    """Stop every service (workers first); return the names that were running."""
    stopped = []
    for name in reversed(SERVICES):
        pid_file = infra_dir() / f"{name}.pid"
        pid = _pid(pid_file)
        if pid is not None:
            _stop_group(pid, grace)
            stopped.append(name)
        pid_file.unlink(missing_ok=True)
    return stopped


def _stop_group(pid: int, grace: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not process_alive(pid):
            try:
                os.killpg(pid, 0)  # the group leader is gone: are its children too?
            except ProcessLookupError:
                return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def status() -> list[dict[str, Any]]:
    state = _state()
    rows = []
    svcs = _services(state) if state else {}
    for name in SERVICES:
        pid = _pid(infra_dir() / f"{name}.pid")
        healthy = bool(pid) and name in svcs and svcs[name].healthy()
        rows.append({"service": name, "pid": pid, "running": pid is not None, "healthy": healthy, "log": str(infra_dir() / f"{name}.log")})
    return rows


def client_env() -> dict[str, str]:
    """The service URLs of a running stack (for subprocesses / tests)."""
    state = _state()
    if not state or _pid(infra_dir() / "prefect.pid") is None:
        raise ConfigError("no local services are running: start them with `agcpipe infra up`")
    return service_env(state)


def deploy(prefect_file: Path = REPO / "infra" / "prefect.yaml", names: list[str] | None = None) -> str:
    """``prefect deploy`` the deployments of ``prefect_file`` against the running server."""
    env = {**os.environ, **STACK_ENV, "PREFECT_HOME": str(infra_dir() / "prefect-home"), **client_env(), "AGCPIPE_REPO": str(REPO)}
    argv = [_bin("prefect"), "--no-prompt", "deploy", "--prefect-file", str(prefect_file)]
    argv += [a for n in names for a in ("--name", n)] if names else ["--all"]
    out = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise InfraError(f"prefect deploy failed: {out.stdout[-1500:]} {out.stderr[-1500:]}")
    return out.stdout
