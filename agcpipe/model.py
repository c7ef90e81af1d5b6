"""The trained clustering model as a self-contained folder (a *bundle*), and assignment with it.

A bundle holds everything needed to cluster a graph the model has never seen::

    model.json       method + params, precompute specs, feature preprocessing, graph options,
                     feature schema, cluster settings, provenance (training graph, stage keys)
    preprocess.json  preprocessing statistics of the training graph (standardisation mean / std)
    centers.npy      cluster centres (post-hoc KMeans methods)
    state/           the method's trained state (encoder / head weights; empty for non-parametric)

The MLflow pyfunc (:mod:`agcpipe.pyfunc_model`) is a thin wrapper around :class:`ModelBundle`, so the
same code assigns clusters from the CLI, from Python, and from ``mlflow.pyfunc.load_model``.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import ValidationError

from . import __version__
from .config import ClusterConfig, Config, GraphOptions, TypeAdapterSource
from .data.graph import FORMAT as GRAPH_FORMAT
from .data.graph import MANIFEST, Graph
from .errors import ConfigError, InputError
from .methods import registry
from .methods.base import MethodContext
from .ops.features import compute_features
from .settings import resolve_device
from .stages.base import StageResult

MODEL_FORMAT = "agcpipe-model/1"


def build_bundle(cfg: Config, g: StageResult, p: StageResult, t: StageResult, c: StageResult, out: Path) -> dict[str, Any]:
    """Write a bundle into ``out`` from the artifacts of one pipeline run."""
    graph = Graph.open(g.path)
    spec = {
        "format": MODEL_FORMAT,
        "agcpipe_version": __version__,
        "method": cfg.method.name,
        "family": registry.get(cfg.method.name).family,
        "params": cfg.method.params,
        "precompute": p.summary["specs"],
        "preprocess": p.summary["preprocess"],
        "graph_options": cfg.graph.model_dump(mode="json"),
        "n_features": graph.n_features,
        "feature_names": graph.manifest.get("feature_names"),
        "n_clusters": int(c.summary["n_clusters"]),
        "cluster": cfg.cluster.model_dump(mode="json"),
        "seed": cfg.seed,
        "training": {
            "graph_fingerprint": g.summary["fingerprint"],
            "n_nodes": graph.n_nodes,
            "keys": {r.stage: r.key for r in (g, p, t, c)},
        },
    }
    (out / "model.json").write_text(json.dumps(spec, indent=1))
    shutil.copy2(Path(p.path) / "preprocess.json", out / "preprocess.json")
    if (Path(c.path) / "centers.npy").exists():
        shutil.copy2(Path(c.path) / "centers.npy", out / "centers.npy")
    shutil.copytree(Path(t.path) / "state", out / "state")
    return spec


class ModelBundle:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.spec = json.loads((self.path / "model.json").read_text())
        if self.spec.get("format") != MODEL_FORMAT:
            raise InputError(f"not an agcpipe model (format {self.spec.get('format')!r})", file=self.path / "model.json")
        self.stats = json.loads((self.path / "preprocess.json").read_text())
        centers = self.path / "centers.npy"
        self.centers = np.load(centers) if centers.exists() else None

    def assign(
        self,
        graph: Any,
        *,
        datasets_root: str | Path | None = None,
        base_dir: str | Path | None = None,
        device: str = "auto",
        work_dir: str | Path | None = None,
    ) -> pa.Table:
        """Cluster every node of ``graph``: a :class:`Graph`, a canonical graph folder, or a source
        (dict / config model, any ingest source) that is ingested first with the model's graph options.

        Returns a table (key, node_id, cluster, confidence) in the graph's node order.
        """
        with tempfile.TemporaryDirectory(prefix="agcpipe-assign-", dir=work_dir) as tmp:
            tmp = Path(tmp)
            g = self._open_graph(graph, tmp, datasets_root, base_dir)
            self._check_schema(g)
            dev = resolve_device(device)
            feats_dir = tmp / "features"
            feats_dir.mkdir()
            feats, _ = compute_features(g, self.spec["precompute"], self.spec["preprocess"], feats_dir, stats=self.stats, device=dev)
            method = registry.get(self.spec["method"]).build(self.spec["params"])
            ctx = MethodContext(
                graph=g,
                features=feats,
                n_clusters=int(self.spec["n_clusters"]),
                seed=int(self.spec["seed"]),
                device=dev,
                state_dir=self.path / "state",
                work_dir=tmp,
            )
            emb = method.embed(ctx)
            result = method.assign(ctx, emb, self.centers, ClusterConfig(**self.spec["cluster"]))
            table = pa.table(
                {
                    "key": g.keys(),
                    "node_id": pa.array(np.arange(g.n_nodes, dtype=np.int64)),
                    "cluster": pa.array(np.asarray(result.labels, dtype=np.int64)),
                    "confidence": pa.array(np.asarray(result.confidence, dtype=np.float32)),
                }
            )
            del feats, emb, ctx  # release memory maps before the temp folder goes
            return table

    def _open_graph(self, graph: Any, tmp: Path, datasets_root, base_dir) -> Graph:
        if isinstance(graph, Graph):
            return graph
        if isinstance(graph, (str, Path)) and (Path(graph) / MANIFEST).is_file():
            return Graph.open(graph)
        from .data.ingest import ingest, resolve_source

        if isinstance(graph, (str, Path)):
            raise InputError(
                "not a canonical graph folder (no manifest.json); pass a source mapping "
                "such as {'type': 'tables', 'edges': ..., 'nodes': ...} or a graph folder",
                file=graph,
            )
        try:
            source = TypeAdapterSource.validate_python(graph.model_dump() if hasattr(graph, "model_dump") else dict(graph))
        except (ValidationError, TypeError, ValueError) as e:
            raise ConfigError(f"assign: the graph source is not valid: {e}") from None
        source = resolve_source(
            source,
            datasets_root=Path(datasets_root) if datasets_root else None,
            base_dir=Path(base_dir) if base_dir else None,
        )
        out = tmp / "graph"
        out.mkdir()
        ingest(source, GraphOptions(**self.spec["graph_options"]), out)
        return Graph.open(out)

    def _check_schema(self, g: Graph) -> None:
        """The graph's features must be the model's: the same columns in the same order when both are
        named (a reordered table would silently permute the features), else the same number."""
        want = int(self.spec["n_features"])
        names = list(self.spec.get("feature_names") or [])
        got = list(g.manifest.get("feature_names") or [])
        where = _source_file(g)
        hint = "assign needs the feature columns of the training graph, in the same order"
        if names and got and names != got:
            missing = [n for n in names if n not in set(got)]
            extra = [n for n in got if n not in set(names)]
            if missing or extra:
                parts = [f"missing {_few(missing)}"] if missing else []
                parts += [f"not in the model {_few(extra)}"] if extra else []
                problem = f"the graph's feature columns do not match the model's: {'; '.join(parts)} (model: {len(names)} columns {_few(names)})"
            else:
                diff = [f"position {i}: {b!r} where the model has {a!r}" for i, (a, b) in enumerate(zip(names, got)) if a != b]
                problem = f"the graph has the model's feature columns in a different order: {'; '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}"
            raise InputError(problem, file=where, hint=hint)
        if g.n_features != want:
            raise InputError(
                f"the graph has {g.n_features} features per node but the model was trained on {want}"
                + (f" (model columns: {_few(names)})" if names else ""),
                file=where,
                hint=hint,
            )


def _source_file(g: Graph) -> str:
    """What to name in a schema error: the nodes table of a tables source, else the source / graph folder."""
    src = g.manifest.get("source") or {}
    if isinstance(src, dict):
        for k in ("nodes", "path"):
            if src.get(k):
                return str(src[k])
        if src.get("name"):
            return f"{src.get('type', 'source')} {src['name']}"
    return str(g.path)


def _few(names: list[str], n: int = 6) -> str:
    return "[" + ", ".join(repr(x) for x in names[:n]) + (f", ... {len(names) - n} more]" if len(names) > n else "]")


def is_graph_dir(path: str | Path) -> bool:
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == GRAPH_FORMAT
    except (OSError, ValueError):
        return False
