"""Model registry workflow: list / show models, promote and roll back aliases, and the alias history.

MLflow keeps only where an alias points *now*. Every alias move made by agcpipe (the flow's quality
gate, ``agcpipe models promote``, ``agcpipe models rollback``) is therefore recorded as one run of the
audit experiment :data:`HISTORY_EXPERIMENT` in the *same* MLflow backend as the registry, so the
history is shared by everyone who shares the registry (a SQLite file, or a tracking server with its
database) and survives as long as the registry does. A record's fields are run *params*, which MLflow
never lets anyone change once logged (an audit trail that can be appended to, not rewritten):

==============  =================================================================
model           registered model name
alias           the alias that moved
from_version    the version it pointed at before ('' when it did not exist)
to_version      the version it points at now
user            ``AGCPIPE_USER``, else the login name (``getpass.getuser()``)
reason          free text (promote / rollback ``--reason``; the gate's reasons)
source          ``gate`` | ``promote`` | ``rollback``
run_id          the pipeline run whose gate moved it ('' for manual moves)
at              UTC time (ISO 8601, microseconds); ``seq`` orders moves within a millisecond
==============  =================================================================

The history run's name reads ``<model>@<alias>: <from> -> <to>`` and its ``mlflow.user`` tag is the
user, so the audit experiment is also readable in the MLflow UI.

Moving the alias and appending the record are two calls: a crash between them leaves a move without a
record (``rollback`` then refuses, because the alias no longer points where the last record says; use
``promote``). Concurrent moves of the same alias are ordered by their records' times.
"""
from __future__ import annotations

import getpass
import math
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from .errors import ConfigError

HISTORY_EXPERIMENT = "agcpipe-alias-history"
SOURCES = ("gate", "promote", "rollback")
METRIC_TAG_PREFIX = "metric."
_FIELDS = ("model", "alias", "from_version", "to_version", "user", "reason", "source", "run_id", "at", "seq")


@dataclass
class AliasMove:
    model: str
    alias: str
    from_version: str | None
    to_version: str
    user: str
    reason: str
    source: str
    run_id: str = ""
    at: str = ""
    seq: int = 0
    record_id: str = ""  # the audit run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Champion:
    """The version an alias points at, and its registered metrics (``metric.<name>`` version tags)."""

    version: str
    metrics: dict[str, float]


def current_user() -> str:
    env = os.environ.get("AGCPIPE_USER")
    if env:
        return env
    try:
        return getpass.getuser()
    except Exception:  # no login name (some containers)
        return "unknown"


def get_client(uri: str | None = None):
    from mlflow import MlflowClient

    from .settings import tracking_uri

    uri = tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# ------------------------------------------------------------------------------------------ reading
def alias_holder(client, model: str, alias: str):
    """The ModelVersion ``alias`` points at, or None (no such alias, or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model, alias)
    except MlflowException:
        return None


def version_metrics(mv) -> dict[str, float]:
    """A version's registered metrics, from its ``metric.<name>`` tags (NaN / unparsable ones left out)."""
    out = {}
    for k, v in (mv.tags or {}).items():
        if k.startswith(METRIC_TAG_PREFIX):
            try:
                f = float(v)
            except ValueError:
                continue
            if not math.isnan(f):
                out[k[len(METRIC_TAG_PREFIX):]] = f
    return out


def champion(client, model: str, alias: str) -> Champion | None:
    mv = alias_holder(client, model, alias)
    return None if mv is None else Champion(str(mv.version), version_metrics(mv))


def _require_model(client, model: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(model)
    except MlflowException:
        known = sorted(m.name for m in _all_models(client))
        hint = f"; registered models: {', '.join(known)}" if known else "; no model is registered"
        raise ConfigError(f"no registered model named {model!r}{hint}") from None


def _all_models(client) -> list:
    out, token = [], None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def versions(client, model: str) -> list:
    """Every version of ``model``, newest first."""
    _require_model(client, model)
    return sorted(client.search_model_versions(f"name = '{_q(model)}'"), key=lambda v: -int(v.version))


def list_models(client) -> list[dict[str, Any]]:
    """One row per registered model: name, number of versions, latest version, aliases, last update."""
    rows = []
    for m in sorted(_all_models(client), key=lambda m: m.name):
        vs = client.search_model_versions(f"name = '{_q(m.name)}'")
        rows.append(
            {
                "name": m.name,
                "versions": len(vs),
                "latest": str(max((int(v.version) for v in vs), default=0) or "-"),
                "aliases": dict(sorted((m.aliases or {}).items())),
                "updated": _fmt_ms(m.last_updated_timestamp),
                "description": m.description or "",
            }
        )
    return rows


def alias_history(client, model: str, alias: str | None = None) -> list[AliasMove]:
    """Recorded moves of ``model``'s aliases (or of one alias), oldest first."""
    exp = client.get_experiment_by_name(HISTORY_EXPERIMENT)
    if exp is None:
        return []
    flt = f"params.model = '{_q(model)}'"
    if alias is not None:
        flt += f" and params.alias = '{_q(alias)}'"
    moves, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], flt, max_results=1000, page_token=token)
        for r in page:
            p = r.data.params
            if p.get("model") != model or (alias is not None and p.get("alias") != alias):
                continue
            moves.append(
                AliasMove(
                    model=p["model"],
                    alias=p.get("alias", ""),
                    from_version=p.get("from_version") or None,
                    to_version=p.get("to_version", ""),
                    user=p.get("user", ""),
                    reason=p.get("reason", ""),
                    source=p.get("source", ""),
                    run_id=p.get("run_id", ""),
                    at=p.get("at", ""),
                    seq=int(p.get("seq") or 0),
                    record_id=r.info.run_id,
                )
            )
        token = page.token
        if not token:
            break
    return sorted(moves, key=lambda m: (m.seq, m.at))


# ------------------------------------------------------------------------------------------ writing
def record_alias_move(
    client,
    *,
    model: str,
    alias: str,
    from_version: str | None,
    to_version: str,
    source: str,
    reason: str = "",
    run_id: str = "",
    user: str | None = None,
    artifact_location: str | None = None,
) -> AliasMove:
    """Append one record to the alias history (the audit experiment is created on first use)."""
    from mlflow.entities import Param

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
    seq = time.time_ns()
    move = AliasMove(
        model=model,
        alias=alias,
        from_version=from_version,
        to_version=str(to_version),
        user=user or current_user(),
        reason=reason,
        source=source,
        run_id=run_id or "",
        at=datetime.fromtimestamp(seq / 1e9, tz=timezone.utc).isoformat(timespec="microseconds"),
        seq=seq,
    )
    exp_id = _history_experiment(client, artifact_location)
    run = client.create_run(
        exp_id,
        run_name=f"{model}@{alias}: {from_version or '-'} -> {to_version}",
        tags={"mlflow.user": move.user, "agcpipe.history.source": source},
    )
    values = {k: "" if v is None else str(v) for k, v in asdict(move).items() if k in _FIELDS}
    values["reason"] = values["reason"][:6000]
    client.log_batch(run.info.run_id, params=[Param(k, values[k]) for k in _FIELDS])
    client.set_terminated(run.info.run_id, "FINISHED")
    move.record_id = run.info.run_id
    return move


def move_alias(client, model: str, alias: str, version: str, *, source: str, reason: str = "", run_id: str = "", user: str | None = None, artifact_location: str | None = None) -> AliasMove | None:
    """Point ``alias`` at ``version`` and record the move; None when it already points there."""
    current = alias_holder(client, model, alias)
    previous = None if current is None else str(current.version)
    if previous == str(version):
        return None
    client.set_registered_model_alias(model, alias, str(version))
    return record_alias_move(
        client, model=model, alias=alias, from_version=previous, to_version=str(version), source=source,
        reason=reason, run_id=run_id, user=user, artifact_location=artifact_location,
    )


def promote(client, model: str, version: str, alias: str, *, reason: str = "", user: str | None = None) -> AliasMove | None:
    """Point ``alias`` at ``version`` (which must exist and be READY); None when it already does."""
    _require_model(client, model)
    mv = _require_version(client, model, version)
    if mv.status != "READY":
        raise ConfigError(f"{model} version {version} is {mv.status}, not READY; only READY versions can be promoted")
    return move_alias(client, model, alias, str(mv.version), source="promote", reason=reason, user=user)


def rollback(client, model: str, alias: str, *, reason: str = "", user: str | None = None) -> AliasMove:
    """Move ``alias`` back to where it pointed before its latest recorded move, and record that.

    Rolling back twice returns to where it started (the rollback is itself the latest move); to go
    further back, ``promote`` the version wanted.
    """
    _require_model(client, model)
    history = alias_history(client, model, alias)
    if not history:
        raise ConfigError(f"alias {alias!r} of {model} has no recorded moves: nothing to roll back to (use promote)")
    last = history[-1]
    current = alias_holder(client, model, alias)
    now = None if current is None else str(current.version)
    if now != last.to_version:
        raise ConfigError(
            f"alias {alias!r} of {model} points at version {now or '(none)'} but its last recorded move "
            f"was to version {last.to_version} (moved outside agcpipe?); use promote to choose a version"
        )
    if last.from_version is None:
        raise ConfigError(
            f"alias {alias!r} of {model} did not exist before its latest move (to version {last.to_version}): "
            "there is no earlier version to roll back to"
        )
    mv = _require_version(client, model, last.from_version)
    if mv.status != "READY":
        raise ConfigError(f"cannot roll back to {model} version {mv.version}: it is {mv.status}")
    why = reason or f"rollback of the {last.source} move {last.from_version} -> {last.to_version} at {last.at}"
    move = move_alias(client, model, alias, str(mv.version), source="rollback", reason=why, user=user)
    assert move is not None  # now != from_version, since now == last.to_version != last.from_version
    return move


def _require_version(client, model: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(model, str(version))
    except MlflowException:
        have = ", ".join(str(v.version) for v in sorted(client.search_model_versions(f"name = '{_q(model)}'"), key=lambda v: int(v.version)))
        raise ConfigError(f"{model} has no version {version!r} (versions: {have or 'none'})") from None


def _history_experiment(client, artifact_location: str | None = None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(HISTORY_EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    if artifact_location is None and client.tracking_uri.startswith(("sqlite:", "file:", "/")):
        from .settings import artifact_root

        artifact_location = (artifact_root() / HISTORY_EXPERIMENT).as_uri()
    try:
        return client.create_experiment(HISTORY_EXPERIMENT, artifact_location=artifact_location)
    except MlflowException:  # created concurrently by another process
        exp = client.get_experiment_by_name(HISTORY_EXPERIMENT)
        if exp is None:
            raise
        return exp.experiment_id


def _q(s: str) -> str:
    """Escape a value for an MLflow filter string literal."""
    return s.replace("\\", "\\\\").replace("'", "\\'")


def _fmt_ms(ms: int | None) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# ------------------------------------------------------------------------------------------ CLI
def add_parser(sub) -> None:
    """``agcpipe models list | show | history | promote | rollback``."""
    m = sub.add_parser("models", help="registered models: list, show, promote, rollback, alias history")
    msub = m.add_subparsers(dest="models_cmd", required=True)

    def common(sp):
        sp.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI or the local SQLite store)")
        return sp

    common(msub.add_parser("list", help="registered models with their versions and aliases"))
    s = common(msub.add_parser("show", help="a model's versions (metrics, gate, aliases) and its alias history"))
    s.add_argument("name")
    h = common(msub.add_parser("history", help="the alias history of a model (who moved which alias when and why)"))
    h.add_argument("name")
    h.add_argument("--alias", help="only this alias")
    p = common(msub.add_parser("promote", help="point an alias at a version (recorded in the alias history)"))
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--alias", default="champion", help="default: champion")
    p.add_argument("--reason", default="", help="why (recorded)")
    r = common(msub.add_parser("rollback", help="move an alias back to where it pointed before its latest move"))
    r.add_argument("name")
    r.add_argument("--alias", default="champion", help="default: champion")
    r.add_argument("--reason", default="", help="why (recorded)")


_SHOWN_METRICS = ("acc", "nmi", "ari", "f1_macro", "modularity", "conductance")


def _console():
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 150)  # logs and pipes: no 80-column wrapping


def cli(args) -> int:
    from rich.table import Table

    console = _console()
    client = get_client(args.tracking_uri)
    cmd = args.models_cmd
    if cmd == "list":
        rows = list_models(client)
        if not rows:
            console.print(f"no registered models in {client.tracking_uri}")
            return 0
        t = Table("model", "versions", "latest", "aliases", "updated (UTC)", title=f"registered models ({client.tracking_uri})")
        for r in rows:
            t.add_row(r["name"], str(r["versions"]), r["latest"], ", ".join(f"{a} -> v{v}" for a, v in r["aliases"].items()) or "-", r["updated"][:16])
        console.print(t)
        return 0
    if cmd == "show":
        vs = versions(client, args.name)
        model = client.get_registered_model(args.name)
        by_version: dict[str, list[str]] = {}
        for a, v in (model.aliases or {}).items():
            by_version.setdefault(str(v), []).append(a)
        present = {k for v in vs for k in version_metrics(v)}
        names = [k for k in _SHOWN_METRICS if k in present]  # every metric: the version's metric.* tags
        t = Table("version", "aliases", "created (UTC)", *names, "gate", "method", "run", title=f"{args.name}: versions")
        for v in vs:
            mets = version_metrics(v)
            tags = v.tags or {}
            gate = tags.get("agcpipe.gate.passed", "")
            gate = {"True": "[green]passed[/]", "False": "[red]failed[/]"}.get(gate, gate)
            status = "" if v.status == "READY" else f" [red]{v.status}[/]"
            t.add_row(
                f"{v.version}{status}", ", ".join(sorted(by_version.get(str(v.version), []))), _fmt_ms(v.creation_timestamp)[:16],
                *[f"{mets[k]:.4f}" if k in mets else "" for k in names], gate, tags.get("agcpipe.method", ""), (v.run_id or "")[:8],
            )
        console.print(t)
        console.print("metrics: the version's metric.* tags; gate: the quality gate of the run that registered or last re-ran it")
        _print_history(console, alias_history(client, args.name), f"{args.name}: alias history")
        return 0
    if cmd == "history":
        _require_model(client, args.name)
        _print_history(console, alias_history(client, args.name, args.alias), f"{args.name}: alias history")
        return 0
    if cmd == "promote":
        move = promote(client, args.name, args.version, args.alias, reason=args.reason)
        if move is None:
            console.print(f"alias '{args.alias}' of {args.name} already points at version {args.version}: nothing to do")
        else:
            console.print(f"{args.name}@{args.alias}: {move.from_version or '(none)'} -> {move.to_version} (promote by {move.user}; recorded)")
        return 0
    if cmd == "rollback":
        move = rollback(client, args.name, args.alias, reason=args.reason)
        console.print(f"{args.name}@{args.alias}: {move.from_version} -> {move.to_version} (rollback by {move.user}; recorded)")
        return 0
    raise AssertionError(cmd)  # pragma: no cover


def _print_history(console, moves: list[AliasMove], title: str) -> None:
    from rich.table import Table

    if not moves:
        console.print(f"{title}: no recorded alias moves")
        return
    t = Table(title=title)
    for col in ("when (UTC)", "alias", "from", "to", "source", "user", "run"):
        t.add_column(col, no_wrap=True)
    t.add_column("reason", overflow="fold", ratio=1)
    for m in reversed(moves):  # newest first
        t.add_row(m.at[:19].replace("T", " "), m.alias, m.from_version or "-", m.to_version, m.source, m.user, m.run_id[:8], m.reason)
    console.print(t)
