"""The local service stack end to end: up, deploy, runs through a worker (second one cached), a served
cron schedule in UTC, and down with every process gone. ~1-2 min on 2 cores."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

SMALL = ["source.n_nodes=2000", "source.n_communities=4", "cluster.n_clusters=4", "cluster.n_init=3", "name=infra-test"]


def _alive(pid: int) -> bool:
    from agcpipe.infra import process_alive

    return process_alive(pid)


def _stage_statuses(run) -> dict[str, str]:
    return {k.split(".")[2]: v for k, v in run.data.tags.items() if k.startswith("agcpipe.stage.") and k.endswith(".status")}


def test_local_stack_schedules_and_runs_flows(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from agcpipe import infra

    monkeypatch.setenv("AGCPIPE_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    ports = {k: infra.free_port() for k in infra.DEFAULT_PORTS}
    pids: list[int] = []
    serve_proc = None
    try:
        env = infra.up(ports=ports, timeout=240)
        pids = [int(p.read_text()) for p in infra.infra_dir().glob("*.pid")]
        assert len(pids) == 5 and all(r["healthy"] for r in infra.status())
        assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{ports['prefect']}/api"
        infra.deploy(names=["nightly-default"])

        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):  # not the session's test harness
            states = [run_deployment("agcpipe/nightly-default", parameters={"overrides": SMALL}, timeout=400).state for _ in range(2)]
            assert [s.name for s in states] == ["Completed", "Completed"], states

            client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
            exp = client.get_experiment_by_name("agcpipe")
            runs = client.search_runs([exp.experiment_id], "tags.`agcpipe.config` = 'infra-test'", order_by=["start_time ASC"])
            parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
            assert [r.info.status for r in parents] == ["FINISHED", "FINISHED"]
            assert set(_stage_statuses(parents[0]).values()) == {"computed"}
            assert set(_stage_statuses(parents[1]).values()) == {"cached"}
            assert parents[1].data.tags["agcpipe.model_status"] == "reused"
            assert client.get_registered_model("agcpipe-infra-test").name == "agcpipe-infra-test"

            # a served cron schedule (UTC): the server creates the upcoming runs at 02:00 UTC
            serve_env = {**os.environ, **env, "AGCPIPE_HOME": str(tmp_path / "home")}
            serve_proc = subprocess.Popen(
                [sys.executable, "-m", "agcpipe", "serve", "--cron", "0 2 * * *", "--name", "served-test", *sum((["--set", s] for s in SMALL), [])],
                env=serve_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
            times = _scheduled_times(get_client, "agcpipe/served-test", deadline=time.monotonic() + 120)
            assert len(times) >= 2 and all(t.hour == 2 and t.minute == 0 and t.utcoffset().total_seconds() == 0 for t in times)
            assert (times[1] - times[0]).total_seconds() == 24 * 3600
    finally:
        if serve_proc is not None:
            os.killpg(serve_proc.pid, signal.SIGTERM)
            serve_proc.wait(timeout=60)
        stopped = infra.down()
    assert set(stopped) == set(infra.SERVICES)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [p for p in pids if _alive(p)], "a service outlived `infra down`"
    assert not list(infra.infra_dir().glob("*.pid"))
    for port in (ports["prefect"], ports["mlflow"], ports["dask"]):
        assert not infra._port_open(port)


def _scheduled_times(get_client, name: str, deadline: float):
    import asyncio

    async def read():
        async with get_client() as c:
            d = await c.read_deployment_by_name(name)
            assert [(s.schedule.cron, s.schedule.timezone) for s in d.schedules] == [("0 2 * * *", "UTC")]
            runs = await c.get_scheduled_flow_runs_for_deployments([d.id])
            return sorted(r.expected_start_time for r in runs)

    while True:
        try:
            times = asyncio.run(read())
            if len(times) >= 2:
                return times
        except Exception:  # the deployment is not registered yet
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            return []
        time.sleep(2)
