"""MLflow tracking and model registry for pipeline runs.

Everything goes through :class:`mlflow.MlflowClient` with explicit run ids: MLflow's fluent "active run"
is per thread, and Prefect runs tasks in worker threads (NOTES-stack.md). One flow run = one parent run;
each stage adds a nested run (tags ``mlflow.parentRunId``, cache key, cache status). The track step logs
metrics and artifacts, builds the model bundle, registers it (once per distinct model: a re-run of the
same model reuses its version), evaluates the quality gate and moves the alias only when it passes.
Failure anywhere marks the parent run FAILED and registers nothing. Gate conditions may compare with
the alias's current holder (``nmi >= champion - 0.01``); every alias move is appended to the alias
history (:mod:`agcpipe.registry`); every run gets a report (:mod:`agcpipe.report`), which never fails it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import operator
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .cache import lineage_tags
from .config import _GATE_RE, Config
from .settings import artifact_root, store_root, tracking_uri
from .stages.base import StageResult
from .store import Store, stage_key

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
MODEL_KEY_TAG = "agcpipe.model_key"


@dataclass
class GateResult:
    passed: bool
    reasons: list[str]

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "no gate configured"


def evaluate_gate(conditions: list[str], metrics: dict[str, Any], champion: Any = None, alias: str = "champion") -> GateResult:
    """Check ``'<metric> <op> <number>'`` and ``'<metric> <op> champion [(+|-|*) <number>]'`` conditions.

    ``champion`` (a :class:`agcpipe.registry.Champion`: the version ``alias`` points at now and its
    ``metric.<name>`` tags) is what ``champion`` stands for; with no holder (None) such a condition
    passes and says so. A missing or NaN metric of the candidate fails its condition, and so does a
    champion without the metric. Champion comparisons use the candidate's value at the precision the
    registry stores (6 significant digits), so a model compared with its own tags is equal to itself.
    """
    passed, reasons = True, []
    for cond in conditions:
        m = _GATE_RE.match(cond)
        assert m is not None  # validated with the config
        name, op = m.group(1), m.group(2)
        value = metrics.get(name)
        if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
            passed = False
            reasons.append(f"{name} not available ({cond.strip()}) -> fail")
            continue
        value = float(value)
        if m.group(3) is not None:
            threshold = float(m.group(3))
            rhs = f"{threshold:g}"
        else:
            if champion is None:
                reasons.append(f"{name}: no version holds '{alias}' yet ({cond.strip()}) -> pass")
                continue
            ref = champion.metrics.get(name)
            if ref is None:
                passed = False
                reasons.append(f"{name}: '{alias}' version {champion.version} has no {name} to compare with ({cond.strip()}) -> fail")
                continue
            arith, operand = m.group(4), float(m.group(5)) if m.group(5) else None
            threshold = ref if arith is None else ref + operand if arith == "+" else ref - operand if arith == "-" else ref * operand
            value = float(f"{value:.6g}")
            rhs = f"{alias} v{champion.version} {ref:.4f}" + (f" {arith} {operand:g} = {threshold:.4f}" if arith else "")
        ok = _OPS[op](value, threshold)
        passed &= ok
        reasons.append(f"{name}={value:.4f} {op} {rhs} -> {'pass' if ok else 'fail'}")
    return GateResult(passed, reasons)


@dataclass
class TrackResult:
    run_id: str
    experiment_id: str
    model_name: str | None = None
    model_version: str | None = None
    model_status: str | None = None  # "registered" | "reused" | None
    gate_passed: bool | None = None
    gate_reason: str | None = None
    alias: str | None = None
    alias_moved: bool = False
    alias_previous: str | None = None
    tracking_uri: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


class Tracker:
    """MLflow bookkeeping of one pipeline run."""

    def __init__(self, cfg: Config):
        from mlflow import MlflowClient

        self.cfg = cfg
        self.uri = tracking_uri(cfg.tracking.tracking_uri)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    # ------------------------------------------------------------------------- run lifecycle
    def start(self, tags: dict[str, str] | None = None) -> str:
        exp_name = self.cfg.tracking.experiment
        exp = self.client.get_experiment_by_name(exp_name)
        if exp is None:
            # a local backend gets artifacts under the data folder; a tracking server keeps its own store
            local = self.uri.startswith(("sqlite:", "file:", "/")) or self.cfg.tracking.artifact_root
            location = (artifact_root(self.cfg.tracking.artifact_root) / exp_name).as_uri() if local else None
            self.experiment_id = self.client.create_experiment(exp_name, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.cfg.name}-{self.cfg.method.name}",
            tags={"agcpipe.version": __version__, "agcpipe.config": self.cfg.name, "agcpipe.method": self.cfg.method.name, **(tags or {})},
        )
        self.run_id = run.info.run_id
        self._log_params(self.run_id, flatten(self.cfg.resolved()))
        return self.run_id

    def log_stage(self, result: StageResult) -> None:
        """A nested run for one stage, and the stage's key / status / seconds on the parent."""
        from mlflow.entities import Metric, Param, RunTag

        assert self.run_id and self.experiment_id
        child = self.client.create_run(
            self.experiment_id,
            run_name=result.stage,
            tags={
                "mlflow.parentRunId": self.run_id,
                "agcpipe.stage": result.stage,
                "agcpipe.cache_key": result.key,
                "agcpipe.cache_status": result.status,
            },
        )
        now = int(time.time() * 1000)
        metrics = [Metric("seconds", float(result.seconds), now, 0)]
        metrics += [
            Metric(k, float(v), now, 0)
            for k, v in result.summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        params = [Param("artifact_path", result.path)]
        self.client.log_batch(child.info.run_id, metrics=metrics, params=params)
        self._log_history(child.info.run_id, Path(result.path) / "history.parquet", now)
        self.client.set_terminated(child.info.run_id, "FINISHED")
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(f"stage_seconds.{result.stage}", float(result.seconds), now, 0)],
            tags=[
                RunTag(f"agcpipe.stage.{result.stage}.key", result.key),
                RunTag(f"agcpipe.stage.{result.stage}.status", result.status),
            ],
        )

    def fail(self, error: BaseException) -> None:
        if self.run_id is None:
            return
        msg = f"{type(error).__name__}: {error}"[:5000]
        self.client.set_tag(self.run_id, "agcpipe.error", msg)
        self.client.set_terminated(self.run_id, "FAILED")

    # ------------------------------------------------------------------------- the track step
    def finish(self, results: dict[str, StageResult]) -> TrackResult:
        """Log metrics and artifacts, register the model, apply the gate, close the run."""
        from mlflow.entities import Metric, RunTag

        assert self.run_id and self.experiment_id
        cfg = self.cfg
        g, p, t, c, e = (results[s] for s in ("ingest", "precompute", "train", "cluster", "evaluate"))
        metrics = {k: v for k, v in e.summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        now = int(time.time() * 1000)
        self._batched_metrics([Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(float(v))])
        with tempfile.TemporaryDirectory(prefix="agcpipe-track-") as tmp:
            tmp = Path(tmp)
            (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
            self.client.log_artifact(self.run_id, str(tmp / "config.yaml"))
        for path in (Path(g.path) / "manifest.json", Path(e.path) / "metrics.json", Path(t.path) / "train.json"):
            self.client.log_artifact(self.run_id, str(path))
        for name in ("assignments.parquet", "cluster.json", "cluster_graph.parquet", "cluster_features.parquet", "representatives.parquet"):
            self.client.log_artifact(self.run_id, str(Path(c.path) / name), "clusters")

        res = TrackResult(run_id=self.run_id, experiment_id=self.experiment_id, tracking_uri=self.uri)
        if cfg.tracking.register_model:
            bundle_dir = self._bundle(results)
            res.model_name = cfg.model_name
            res.model_version, res.model_status = self._register(bundle_dir, model_key=Path(bundle_dir).name, metrics=metrics)
            gate = evaluate_gate(cfg.tracking.gate, metrics, champion=self._champion(), alias=cfg.tracking.alias)
            res.gate_passed, res.gate_reason, res.alias = gate.passed, gate.reason, cfg.tracking.alias
            res.alias_moved, res.alias_previous = self._move_alias(res.model_version, gate)
        self._report(results, res)  # never fails the run
        tags = {
            "agcpipe.gate.passed": str(res.gate_passed),
            "agcpipe.gate.reason": res.gate_reason or "",
            "agcpipe.alias": res.alias or "",
            "agcpipe.alias.moved": str(res.alias_moved),
            "agcpipe.alias.previous_version": res.alias_previous or "",
            "agcpipe.model_name": res.model_name or "",
            "agcpipe.model_version": res.model_version or "",
            "agcpipe.model_status": res.model_status or "",
        }
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(self.run_id, "FINISHED")
        return res

    def _bundle(self, results: dict[str, StageResult]) -> Path:
        """The model bundle, itself a content-addressed store artifact (built once per model)."""
        from .model import build_bundle

        g, p, t, c = (results[s] for s in ("ingest", "precompute", "train", "cluster"))
        store = Store(store_root(self.cfg.store))
        key = stage_key("model", ("agcpipe.model", "agcpipe.pyfunc_model"), {s.stage: s.key for s in (g, p, t, c)})
        if store.get("model", key) is None:
            with store.build("model", key) as tmp:
                build_bundle(self.cfg, g, p, t, c, tmp)
        return store.path("model", key)

    def _register(self, bundle_dir: Path, model_key: str, metrics: dict[str, Any]) -> tuple[str, str]:
        """Register the bundle as a pyfunc version, unless a READY version of the same model exists."""
        import mlflow.pyfunc
        from mlflow.exceptions import MlflowException

        from . import pyfunc_model

        name = self.cfg.model_name
        try:
            self.client.create_registered_model(name, description="agcpipe clustering model")
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        existing = [
            v
            for v in self.client.search_model_versions(f"name='{name}' and tags.`{MODEL_KEY_TAG}` = '{model_key}'")
            if v.status == "READY"
        ]
        if existing:
            version = max(existing, key=lambda v: int(v.version))
            self.client.set_tag(self.run_id, "agcpipe.model_source_run", version.run_id or "")
            return str(version.version), "reused"
        with tempfile.TemporaryDirectory(prefix="agcpipe-model-") as tmp:
            model_dir = Path(tmp) / "model"
            with warnings.catch_warnings():
                # no input example exists for "a graph source"; the signature carries the params only
                warnings.filterwarnings("ignore", message=".*input example was not provided.*")
                mlflow.pyfunc.save_model(
                str(model_dir),
                    python_model=pyfunc_model.__file__,
                    artifacts={"bundle": str(bundle_dir)},
                    pip_requirements=_requirements(),
                    signature=pyfunc_model.SIGNATURE,
                )
            self.client.log_artifacts(self.run_id, str(model_dir), "model")
        run = self.client.get_run(self.run_id)
        tags = {MODEL_KEY_TAG: model_key, "agcpipe.config": self.cfg.name, "agcpipe.method": self.cfg.method.name}
        tags.update({f"metric.{k}": f"{float(v):.6g}" for k, v in metrics.items()})
        tags.update(lineage_tags(bundle_dir))  # the stage artifacts cache gc must keep for this version
        mv = self.client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=self.run_id, tags=tags)
        return str(mv.version), "registered"

    def _move_alias(self, version: str | None, gate: GateResult) -> tuple[bool, str | None]:
        from mlflow.exceptions import MlflowException

        name, alias = self.cfg.model_name, self.cfg.tracking.alias
        try:
            previous = str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            previous = None
        if version is None:
            return False, previous
        self.client.set_model_version_tag(name, version, "agcpipe.gate.passed", str(gate.passed))
        self.client.set_model_version_tag(name, version, "agcpipe.gate.reason", gate.reason[:5000])
        if not gate.passed or previous == version:
            return False, previous
        self.client.set_registered_model_alias(name, alias, version)
        self._record_move(name, alias, previous, version, gate.reason)
        return True, previous

    def _champion(self):
        """The version the alias points at now and its metric tags (for 'champion' gate conditions)."""
        from .registry import champion

        if not any(m and m.group(3) is None for m in map(_GATE_RE.match, self.cfg.tracking.gate)):
            return None  # no condition refers to the champion
        return champion(self.client, self.cfg.model_name, self.cfg.tracking.alias)

    def _record_move(self, name: str, alias: str, previous: str | None, version: str, reason: str) -> None:
        """Append the gate's alias move to the alias history (agcpipe.registry); a failure is logged."""
        from .registry import record_alias_move

        try:
            record_alias_move(
                self.client, model=name, alias=alias, from_version=previous, to_version=version, source="gate",
                reason=reason, run_id=self.run_id or "", artifact_location=_history_location(self.cfg, self.uri),
            )
        except Exception as err:  # the alias did move: say so, do not fail the run
            logging.getLogger("agcpipe").warning("alias history not recorded: %s: %s", type(err).__name__, err)
            self.client.set_tag(self.run_id, "agcpipe.alias.history_error", f"{type(err).__name__}: {err}"[:5000])

    def _report(self, results: dict[str, StageResult], res: TrackResult) -> None:
        """The run report (agcpipe.report): a ``report`` store artifact, logged under ``report/``.

        Also marks the run's stage artifacts as used (cache gc's last-used time), which Prefect cache
        hits do not do. Any failure is logged as a warning and tagged; the run goes on.
        """
        from .cache import touch
        from .store import ARTIFACT_META

        touch(Store(store_root(self.cfg.store)), [(r.stage, r.key) for r in results.values()])
        try:
            from .report import REPORT_FILE, write_run_report

            path = write_run_report(self.cfg, results, res.to_dict())
            for f in sorted(path.iterdir()):
                if f.is_file() and f.name != ARTIFACT_META:
                    self.client.log_artifact(self.run_id, str(f), "report")
            self.client.set_tag(self.run_id, "agcpipe.report", str(path / REPORT_FILE))
        except Exception as err:  # noqa: BLE001 - a report never fails a run
            logging.getLogger("agcpipe").warning("run report skipped: %s: %s", type(err).__name__, err)
            with contextlib.suppress(Exception):
                self.client.set_tag(self.run_id, "agcpipe.report.error", f"{type(err).__name__}: {err}"[:5000])

    # ------------------------------------------------------------------------- helpers
    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def _log_history(self, run_id: str, path: Path, now: int) -> None:
        """A train artifact's loss history (epoch, component, value) as step metrics, <= 1000 per call.

        Read from the artifact, so a cached re-run logs the same curves.
        """
        from mlflow.entities import Metric

        if not path.is_file():
            return
        import pyarrow.parquet as pq

        t = pq.read_table(path)
        rows = zip(t.column("epoch").to_pylist(), t.column("component").to_pylist(), t.column("value").to_pylist())
        metrics = [Metric(c, float(v), now, int(e)) for e, c, v in rows if v is not None and math.isfinite(v)]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000])

    def _batched_metrics(self, metrics: list) -> None:
        for i in range(0, len(metrics), 500):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 500])


def _history_location(cfg: Config, uri: str) -> str | None:
    """Artifact location of the alias-history experiment on a local backend (it stores no artifacts)."""
    if uri.startswith(("sqlite:", "file:", "/")) or cfg.tracking.artifact_root:
        from .registry import HISTORY_EXPERIMENT

        return (artifact_root(cfg.tracking.artifact_root) / HISTORY_EXPERIMENT).as_uri()
    return None


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = [f"agcpipe=={__version__}"]
    for lib in ("torch", "numpy", "scipy", "pyarrow", "pandas", "pydantic", "mlflow"):
        try:
            reqs.append(f"{lib}=={version(lib).split('+')[0]}")
        except PackageNotFoundError:
            pass
    return reqs
