"""``agcpipe`` command line: run, ingest, assign, methods, config.

User errors (:class:`~agcpipe.errors.AgcError`) print one line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from .errors import AgcError, ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agcpipe", description="Attributed graph clustering pipeline")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add_config_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", nargs="?", help="YAML config (default: the built-in synthetic job)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value (dotted key; value parsed as YAML); repeatable")

    r = sub.add_parser("run", help="run the whole flow (ingest, precompute, train, cluster, evaluate, track)")
    add_config_args(r)
    r.add_argument("--no-prefect", action="store_true", help="run the stages in-process without Prefect (same cache)")
    r.add_argument("-v", "--verbose", action="store_true", help="show Prefect's logs")

    i = sub.add_parser("ingest", help="ingest a source into the canonical graph store")
    add_config_args(i)
    i.add_argument("--out", help="also copy the canonical graph folder to OUT")

    a = sub.add_parser("assign", help="assign clusters with a registered model")
    a.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN/model")
    a.add_argument("--graph", required=True, help="a YAML file with a source (a config's 'source:' or a bare source mapping), or a canonical graph folder")
    a.add_argument("--out", required=True, help="output Parquet file (key, node_id, cluster, confidence)")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a field of the graph source (e.g. --set path=...)")
    a.add_argument("--device", default="auto")
    a.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI or the local SQLite store)")

    sv = sub.add_parser("serve", help="run the flow on a cron schedule (UTC); needs a Prefect server (agcpipe infra up)")
    add_config_args(sv)
    sv.add_argument("--cron", required=True, help='cron expression in UTC, e.g. "0 2 * * *"')
    sv.add_argument("--name", help="deployment name (default: <config name>-scheduled)")

    inf = sub.add_parser("infra", help="local Prefect server + worker, MLflow server and Dask cluster on loopback")
    inf.add_argument("action", choices=["up", "down", "status", "deploy"])
    inf.add_argument("--name", action="append", default=[], help="deploy: only these deployments of infra/prefect.yaml")

    sub.add_parser("methods", help="list the registered methods")

    c = sub.add_parser("config", help="print the resolved config")
    add_config_args(c)

    from . import cache, registry

    registry.add_parser(sub)  # agcpipe models list | show | history | promote | rollback
    cache.add_parser(sub)  # agcpipe cache ls | gc
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .settings import apply_stack_env

    apply_stack_env()
    try:
        return {"run": cmd_run, "ingest": cmd_ingest, "assign": cmd_assign, "methods": cmd_methods, "config": cmd_config, "serve": cmd_serve, "infra": cmd_infra, "models": cmd_models, "cache": cmd_cache}[args.cmd](args)
    except AgcError as e:
        print(f"agcpipe: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("agcpipe: interrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.no_prefect:
        from .pipeline import run_pipeline

        summary = run_pipeline(cfg)
    else:
        if not args.verbose:
            os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        from .orchestration import run_flow

        summary = run_flow(cfg)
    print_summary(cfg, summary)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .config import load_config
    from .data.graph import Graph
    from .stages import get_stage

    cfg = load_config(args.config, args.overrides)
    res = get_stage("ingest").run(cfg)
    g = Graph.open(res.path)
    console = Console()
    console.print(f"ingest: {res.status} in {res.seconds:.2f} s -> {res.path}")
    console.print({**g.summary(), "fingerprint": g.fingerprint})
    if args.out:
        _copy_dir_atomic(Path(res.path), Path(args.out))
        console.print(f"copied to {args.out}")
    return 0


def cmd_assign(args: argparse.Namespace) -> int:
    import mlflow.pyfunc
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from .model import is_graph_dir
    from .settings import datasets_root, tracking_uri

    uri = tracking_uri(args.tracking_uri)
    graph_arg = Path(args.graph)
    base_dir = None
    if is_graph_dir(graph_arg):
        source: Any = str(graph_arg.resolve())
    elif graph_arg.is_file():
        loaded = yaml.safe_load(graph_arg.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{graph_arg}: expected a mapping with a source")
        source = loaded.get("source", loaded)
        from .config import _expand_env, apply_overrides

        source = _expand_env(apply_overrides(dict(source), args.overrides))
        base_dir = str(graph_arg.resolve().parent)
    else:
        raise ConfigError(f"--graph {args.graph}: neither a canonical graph folder nor a YAML file with a source")
    with _mlflow_uris(uri):
        try:
            model = mlflow.pyfunc.load_model(args.model)
        except Exception as e:  # MLflow raises several types for a missing model / alias
            raise ConfigError(f"cannot load model {args.model!r} from {uri}: {e}") from None
    params = {"base_dir": base_dir, "datasets_root": str(datasets_root()) if datasets_root() else None, "device": args.device}
    df = model.predict(source, params={k: v for k, v in params.items() if v is not None})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    os.replace(tmp, out)
    sizes = df["cluster"].value_counts()
    print(f"assigned {len(df)} nodes to {sizes.size} clusters with {args.model} -> {out}")
    return 0


@contextlib.contextmanager
def _mlflow_uris(uri: str):
    """Point MLflow's process-global tracking and registry URIs at ``uri`` for the block, then restore.

    ``mlflow.set_tracking_uri`` / ``set_registry_uri`` also write ``MLFLOW_*_URI`` into ``os.environ``;
    left set, they would redirect every later MLflow call in this process (the CLI is also called from
    Python and tests). ``load_model("models:/...")`` only reads these globals, hence the save / restore.
    """
    import mlflow
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {k: os.environ.get(k) for k in keys}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cmd_serve(args: argparse.Namespace) -> int:
    from .orchestration import serve

    serve(args.config, args.overrides, args.cron, args.name)
    return 0


def cmd_infra(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import infra

    console = Console()
    if args.action == "up":
        env = infra.up()
        console.print(f"services up; logs and pid files in {infra.infra_dir()}")
        for k, v in env.items():
            console.print(f"  export {k}={v}")
        console.print(f"or: source {infra.infra_dir() / 'env.sh'}")
    elif args.action == "down":
        stopped = infra.down()
        console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    elif args.action == "deploy":
        console.print(infra.deploy(names=args.name or None))
    else:
        table = Table("service", "pid", "running", "healthy", "log")
        for r in infra.status():
            table.add_row(r["service"], str(r["pid"] or "-"), str(r["running"]), str(r["healthy"]), r["log"])
        console.print(table)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .methods import registry

    table = Table("method", "family", "parameters (defaults)", "description")
    for e in registry.entries():
        defaults = e.params().model_dump()
        table.add_row(e.name, e.family, ", ".join(f"{k}={v}" for k, v in defaults.items()) or "-", e.description)
    Console().print(table)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.resolved(), sort_keys=False), end="")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from . import registry

    return registry.cli(args)


def cmd_cache(args: argparse.Namespace) -> int:
    from . import cache

    return cache.cli(args)


# ----------------------------------------------------------------------------------------- output
_METRIC_ORDER = ("acc", "nmi", "ari", "f1_macro", "modularity", "conductance", "mean_cluster_conductance", "n_labelled", "n_unlabelled", "size_n_clusters_found", "size_min", "size_max")


def print_summary(cfg, summary) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    stages = Table("stage", "status", "seconds", "key", title=f"agcpipe run: {cfg.name} ({cfg.method.name})")
    for s in summary.stages:
        style = "green" if s.status == "cached" else "yellow"
        stages.add_row(s.stage, f"[{style}]{s.status}[/]", f"{s.seconds:.2f}", s.key[:12])
    console.print(stages)
    metrics = Table("metric", "value", title="evaluation")
    shown = [k for k in _METRIC_ORDER if k in summary.metrics]
    for k in shown:
        v = summary.metrics[k]
        metrics.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(metrics)
    t = summary.track
    if t:
        console.print(f"MLflow run: {t['run_id']}  ({t['tracking_uri']})")
        if t.get("model_version"):
            console.print(f"model: {t['model_name']} version {t['model_version']} ({t['model_status']})")
            moved = "moved to this version" if t["alias_moved"] else "not moved"
            console.print(f"alias '{t['alias']}': {moved}; gate: {'passed' if t['gate_passed'] else 'failed'} ({t['gate_reason']})")
    if summary.flow_run_id:
        console.print(f"Prefect flow run: {summary.flow_run_id}")
    console.print(f"total {summary.seconds:.1f} s")


def _copy_dir_atomic(src: Path, dst: Path) -> None:
    if dst.exists():
        raise ConfigError(f"--out {dst} already exists")
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        shutil.copytree(src, tmp)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
