"""Run the whole pipeline: ingest -> precompute -> train -> cluster -> evaluate -> track.

:func:`run_pipeline` is orchestrator-agnostic: it takes a *runner* that executes one stage. The default
:class:`LocalRunner` calls the stage in-process (notebooks, tests, ``agcpipe run --no-prefect``);
:mod:`agcpipe.orchestration` supplies a runner that executes each stage as a Prefect task with the same
cache key. Either way a stage whose artifact exists is reported as cached and does no work.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .config import Config
from .settings import apply_stack_env, store_root
from .stages import STAGE_ORDER, StageResult, get_stage
from .stages.common import resolve_n_clusters
from .store import Store


class StageRunner(Protocol):
    def __call__(self, stage: str, cfg: Config, *upstream: StageResult) -> StageResult: ...


def local_runner(stage: str, cfg: Config, *upstream: StageResult) -> StageResult:
    return get_stage(stage).run(cfg, *upstream)


# which earlier stages each stage reads
UPSTREAM: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "precompute": ("ingest",),
    "train": ("ingest", "precompute"),
    "cluster": ("ingest", "precompute", "train"),
    "evaluate": ("ingest", "cluster"),
}


@dataclass
class RunSummary:
    stages: list[StageResult]
    metrics: dict[str, Any]
    track: dict[str, Any] | None = None
    flow_run_id: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": [s.to_dict() for s in self.stages],
            "metrics": self.metrics,
            "track": self.track,
            "flow_run_id": self.flow_run_id,
            "seconds": self.seconds,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSummary":
        return cls(
            stages=[StageResult.from_dict(s) for s in d["stages"]],
            metrics=d["metrics"],
            track=d.get("track"),
            flow_run_id=d.get("flow_run_id"),
            seconds=d.get("seconds", 0.0),
            extra=d.get("extra", {}),
        )

    def stage(self, name: str) -> StageResult:
        return next(s for s in self.stages if s.stage == name)


def run_pipeline(
    cfg: Config,
    runner: StageRunner = local_runner,
    *,
    track_runner: Callable[[Callable[[], dict[str, Any]]], tuple[dict[str, Any], float]] | None = None,
    flow_run_id: str | None = None,
) -> RunSummary:
    """Run every stage; track in MLflow when ``cfg.tracking.enabled``. Raises on the first failure."""
    apply_stack_env()
    t0 = time.perf_counter()
    Store(store_root(cfg.store)).clean_stale()
    tracker = None
    if cfg.tracking.enabled:
        from .tracking import Tracker

        tracker = Tracker(cfg)
        tracker.start({"prefect.flow_run_id": flow_run_id} if flow_run_id else None)
    results: dict[str, StageResult] = {}
    try:
        for stage in STAGE_ORDER:
            res = runner(stage, cfg, *(results[u] for u in UPSTREAM[stage]))
            results[stage] = res
            if stage == "ingest":
                resolve_n_clusters(cfg, res.summary)  # k vs N: fail before any heavy work
            if tracker is not None:
                tracker.log_stage(res)
        track = None
        if tracker is not None:
            t1 = time.perf_counter()
            run_track = lambda: tracker.finish(results).to_dict()  # noqa: E731
            if track_runner is not None:
                track, seconds = track_runner(run_track)
            else:
                track, seconds = run_track(), time.perf_counter() - t1
            status = "cached" if track.get("model_status") == "reused" else "computed"
            results["track"] = StageResult("track", track.get("model_version") or "-", track["run_id"], status, seconds, {})
    except BaseException as err:
        if tracker is not None:
            tracker.fail(err)
        raise
    return RunSummary(
        stages=list(results.values()),
        metrics=dict(results["evaluate"].summary),
        track=track,
        flow_run_id=flow_run_id,
        seconds=time.perf_counter() - t0,
    )
