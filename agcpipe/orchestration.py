"""Prefect orchestration: the only module of the library that imports Prefect.

Each stage runs as a Prefect task whose cache key *is* the stage's content-addressed key
(:class:`StageCachePolicy`), so a re-run shows the stages as ``Cached`` in Prefect and does no work. The
cached result Prefect returns is only the small :class:`~agcpipe.stages.StageResult` dict; before
trusting it the policy checks that the artifact it points to is still complete in the store, and drops
Prefect's record when it is not (deleted or truncated artifacts are recomputed, never returned stale).
Prefect results are persisted as JSON under ``<store>/.prefect-results``.

**Dask task runner** (``dask.enabled`` and ``dask.task_runner``): the flow runs with
``prefect_dask.DaskTaskRunner`` and each stage is submitted to it, so it runs on a Dask worker of the
cluster at ``dask.address`` / ``DASK_SCHEDULER_ADDRESS`` (or of a local cluster of ``dask.n_workers`` processes on loopback that the
runner starts and stops). The blocked work inside a stage then runs as nested tasks on the same
cluster (``distributed.worker_client``). Stages exchange only their small result dicts (paths), never
arrays. It needs a Prefect server (``PREFECT_API_URL``): with Prefect's ephemeral API every Dask worker
would start a server of its own. Without ``task_runner``, stages run in the flow's process and only their
blocked work goes to Dask.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.context import TaskRunContext

from .config import Config, load_config, validate_config
from .pipeline import RunSummary, run_pipeline
from .settings import apply_stack_env, store_root
from .stages import StageResult, get_stage
from .store import Store

RESULTS_DIR = ".prefect-results"


@dataclass
class StageCachePolicy(CachePolicy):
    """Prefect cache key = the agcpipe stage key; invalid artifacts invalidate Prefect's record."""

    stage: str = ""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        cfg = validate_config(inputs["config"])
        upstream = [StageResult.from_dict(u) for u in inputs["upstream"]]
        key = get_stage(self.stage).key(cfg, *upstream)
        prefect_key = f"{self.stage}-{key}"
        store = Store(store_root(cfg.store))
        if store.get(self.stage, key) is None:  # get() also marks a valid artifact as used (cache gc)
            (store.root / RESULTS_DIR / prefect_key).unlink(missing_ok=True)
        return prefect_key


def _run_stage(stage: str, config: dict[str, Any], upstream: list[dict[str, Any]]) -> dict[str, Any]:
    cfg = validate_config(config)
    return get_stage(stage).run(cfg, *(StageResult.from_dict(u) for u in upstream)).to_dict()


def _stage_task(stage: str):
    def fn(config: dict[str, Any], upstream: list[dict[str, Any]]) -> dict[str, Any]:
        return _run_stage(stage, config, upstream)

    fn.__name__ = fn.__qualname__ = stage
    return task(
        fn,
        name=stage,
        cache_policy=StageCachePolicy(stage=stage),
        persist_result=True,
        result_serializer="json",
    )


STAGE_TASKS = {s: _stage_task(s) for s in ("ingest", "precompute", "train", "cluster", "evaluate")}


@task(name="track", cache_policy=NO_CACHE, persist_result=False)
def track_task(finish: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    return finish()


class PrefectRunner:
    """Runs each stage as a Prefect task; reports Prefect's ``Cached`` state as ``cached``.

    ``submit=True`` submits each task to the flow's task runner (the Dask task runner) and waits for it,
    instead of running it in the flow's thread.
    """

    def __init__(self, cfg: Config, submit: bool = False):
        self.results_dir = store_root(cfg.store) / RESULTS_DIR
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.submit = submit

    def __call__(self, stage: str, cfg: Config, *upstream: StageResult) -> StageResult:
        t0 = time.perf_counter()
        t = STAGE_TASKS[stage].with_options(result_storage=Path(self.results_dir))
        args = (cfg.resolved() | {"base_dir": cfg.base_dir}, [u.to_dict() for u in upstream])
        if self.submit:
            future = t.submit(*args)
            future.wait()
            state = future.state
        else:
            state = t(*args, return_state=True)
        res = StageResult.from_dict(state.result())  # re-raises the stage's own exception on failure
        if state.name == "Cached":
            res.status, res.seconds = "cached", time.perf_counter() - t0
        return res

    @staticmethod
    def track(finish: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        out = track_task(finish)
        return out, time.perf_counter() - t0


@flow(name="agcpipe", log_prints=False, validate_parameters=False)
def agcpipe_flow(
    config: dict[str, Any] | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """The clustering flow: ingest, precompute, train, cluster, evaluate, track.

    Either ``config`` (a resolved config mapping, as the CLI passes it) or ``config_path`` (a YAML file,
    relative to the working directory; None = the built-in default job) with ``--set``-style
    ``overrides``: deployments and schedules use the latter.
    """
    from prefect.runtime import flow_run

    cfg = validate_config(config) if config is not None else load_config(config_path, overrides or [])
    submit = cfg.dask.enabled and cfg.dask.task_runner
    if submit:  # stages run in worker processes: resolve the locations here, not in their environment
        from .settings import datasets_root

        cfg.store = str(store_root(cfg.store))
        root = datasets_root(cfg.datasets_root)
        cfg.datasets_root = str(root) if root is not None else None
    runner = PrefectRunner(cfg, submit=submit)
    summary = run_pipeline(cfg, runner, track_runner=runner.track, flow_run_id=str(flow_run.id))
    get_run_logger().info("stages: %s", {s.stage: s.status for s in summary.stages})
    return summary.to_dict()


def run_flow(cfg: Config) -> RunSummary:
    """Run :func:`agcpipe_flow` (Prefect's ephemeral API unless ``PREFECT_API_URL`` is set); with
    ``dask.task_runner``, on Prefect's Dask task runner (:func:`dask_task_runner`)."""
    apply_stack_env()
    flow_fn = agcpipe_flow
    if cfg.dask.enabled and cfg.dask.task_runner:
        flow_fn = agcpipe_flow.with_options(task_runner=dask_task_runner(cfg))
    return RunSummary.from_dict(flow_fn(cfg.resolved() | {"base_dir": cfg.base_dir}))


def dask_task_runner(cfg: Config):
    """``prefect_dask.DaskTaskRunner`` for ``cfg.dask``: the scheduler at ``dask.address``, else a local
    cluster of ``dask.n_workers`` single-process workers on loopback (started and stopped by the runner).

    Raises :class:`ConfigError` without a Prefect server: the workers must report to the flow's API
    (its URL is exported to them through ``PREFECT_API_URL``).
    """
    import os

    from prefect.settings import PREFECT_API_URL
    from prefect_dask import DaskTaskRunner

    from .errors import ConfigError

    api = PREFECT_API_URL.value()
    if not api:
        raise ConfigError(
            "dask.task_runner needs a Prefect server: with Prefect's ephemeral API every Dask worker would start "
            "one of its own. Start the local services (`agcpipe infra up`, then `source data/infra/env.sh`) or set "
            "PREFECT_API_URL; or keep dask.task_runner: false (stages then only send their blocked work to Dask)"
        )
    os.environ["PREFECT_API_URL"] = str(api)  # local cluster workers inherit the environment
    from .distributed import scheduler_address

    d = cfg.dask
    address = scheduler_address(d)
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": d.n_workers, "threads_per_worker": d.threads_per_worker, "processes": True,
            "host": "127.0.0.1", "dashboard_address": None,
            "memory_limit": 0 if d.memory_limit == "0" else d.memory_limit,
        },
    )


def serve(config_path: str | None, overrides: list[str], cron: str, name: str | None = None) -> None:
    """Serve the flow on a cron schedule (UTC) from this process; needs a Prefect server.

    Prefect's ephemeral API never runs schedules (``flow.serve`` only warns), so this refuses to start
    without ``PREFECT_API_URL``.
    """
    import os

    from prefect.schedules import Cron

    from .errors import ConfigError

    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(
            "scheduled runs need a Prefect server: start the local services with `agcpipe infra up` and "
            "`source data/infra/env.sh`, or set PREFECT_API_URL to your server"
        )
    cfg = load_config(config_path, overrides)  # validate now, not at 02:00
    path = str(Path(config_path).resolve()) if config_path else None
    apply_stack_env()
    agcpipe_flow.serve(
        name=name or f"{cfg.name}-scheduled",
        schedule=Cron(cron, timezone="UTC"),
        parameters={"config_path": path, "overrides": overrides},
        print_starting_message=True,
    )
