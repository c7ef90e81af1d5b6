"""The out-of-core flow end to end: a folder of many Parquet files -> ingest -> SSGC -> KMeans -> metrics.

    python bench/bench_scale.py [--n 10000000 --avg-degree 20 --d 128 --k 50 --files 64 --K 8
                                 --reorder community --n-init 1 --max-iter 50 --workdir /tmp/agc-scale
                                 --tracking --prefect --dask --json bench/results/scale.json --keep]

1. **Input** (not timed as part of the flow): the synthetic attributed SBM (``--k`` communities, 80% of
   the edges inside) written as a user would hand it over: ``nodes/part-*.parquet`` (int64 ``id`` =
   10^12 + 3 x row, so ids are looked up, not taken as rows; ``label``; ``x`` fixed-size list of ``--d``
   float32) and ``edges/part-*.parquet`` (``src``, ``dst`` ids), ``--files`` files each.
2. **First run** of the flow from that folder (``source.type: tables``), ``graph.reorder: --reorder``,
   SSGC with ``--K`` hops, KMeans with ``--k`` clusters, all metrics; tracking (MLflow on SQLite under
   the work folder) only with ``--tracking``. It runs in a fresh process; the stages run in-process one
   after the other (the pipeline's local runner, or the Prefect flow with ``--prefect``), and each
   stage's seconds and **peak RSS** (VmHWM, reset before each stage through ``/proc/self/clear_refs``;
   it includes memory-mapped file pages the stage touched) are recorded. The process's overall peak RSS
   is reported too.
3. **Cached re-run** of the same flow in another fresh process: every stage is found in the store.

Prints one table and writes the JSON (``--json``). The work folder keeps the store and the input with
``--keep``; otherwise both are removed at the end. Disk: ~2.2 x the feature bytes (input + canonical
features + propagated matrix) plus ~24 bytes per edge.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import gib, machine_line, measure, peak_rss, print_table, write_json  # noqa: E402

ID_BASE, ID_STRIDE = 10**12, 3


# ------------------------------------------------------------------------------------------ input
def write_input(root: str, n: int, avg_degree: float, d: int, k: int, files: int, seed: int) -> dict[str, Any]:
    """Write the Parquet folders under ``root`` (nodes/, edges/); return counts. Runs in its own process."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from agcpipe.config import SyntheticSource
    from agcpipe.data.synthetic import generate_sbm

    root_p = Path(root)
    gen = root_p / ".gen"
    for sub in ("nodes", "edges", ".gen"):
        (root_p / sub).mkdir(parents=True, exist_ok=True)
    src = SyntheticSource(
        type="synthetic", n_nodes=n, n_communities=k, avg_degree=avg_degree, within_between=4.0 * (k - 1),
        n_features=d, feature_signal=1.0, seed=seed, chunk_nodes=min(n, 1_000_000),
    )
    raw = generate_sbm(src, gen)
    feats = raw.features
    rows = -(-n // files)
    for i, a in enumerate(range(0, n, rows)):
        b = min(n, a + rows)
        with pq.ParquetWriter(root_p / "nodes" / f"part-{i:05d}.parquet", pa.schema([
            ("id", pa.int64()), ("label", pa.int64()), ("x", pa.list_(pa.float32(), d))
        ])) as w:
            for s in range(a, b, 1 << 18):
                e = min(b, s + (1 << 18))
                x = np.ascontiguousarray(feats[s:e])
                w.write_table(pa.table({
                    "id": pa.array(ID_BASE + ID_STRIDE * np.arange(s, e, dtype=np.int64)),
                    "label": pa.array(raw.labels[s:e]),
                    "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d),
                }))
    n_edges = max(1, round(n * avg_degree / 2))
    per_file = -(-n_edges // files)
    writer, written, part = None, 0, 0
    for u, v, _ in raw.edge_chunks():
        table = pa.table({"src": ID_BASE + ID_STRIDE * u, "dst": ID_BASE + ID_STRIDE * v})
        if writer is None:
            writer = pq.ParquetWriter(root_p / "edges" / f"part-{part:05d}.parquet", table.schema)
        writer.write_table(table)
        written += len(u)
        if written >= per_file * (part + 1):
            writer.close()
            writer, part = None, part + 1
    if writer is not None:
        writer.close()
    del feats, raw
    shutil.rmtree(gen)
    size = sum(f.stat().st_size for f in root_p.rglob("*.parquet"))
    return {"n": n, "edges": n_edges, "files": len(list(root_p.rglob("*.parquet"))), "bytes": size}


# ------------------------------------------------------------------------------------------ flow
def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def run_flow(cfg_data: dict[str, Any], home: str, prefect: bool) -> dict[str, Any]:
    """Run the flow in this (fresh) process; per-stage seconds and peak RSS. Runs in its own process."""
    os.environ["AGCPIPE_HOME"] = home
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    from agcpipe.config import validate_config
    from agcpipe.pipeline import local_runner, run_pipeline

    cfg = validate_config(cfg_data)
    stages: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    if prefect:
        from agcpipe.orchestration import run_flow as prefect_flow

        summary = prefect_flow(cfg)
    else:
        def runner(stage, c, *upstream):
            _reset_peak()
            t = time.perf_counter()
            res = local_runner(stage, c, *upstream)
            stages[stage] = {"seconds": time.perf_counter() - t, "peak_rss": peak_rss()}
            return res

        summary = run_pipeline(cfg, runner)
    total = time.perf_counter() - t0
    out = []
    for s in summary.stages:
        rec = {"stage": s.stage, "status": s.status, "seconds": s.seconds, **stages.get(s.stage, {})}
        if s.stage == "precompute":
            rec["propagation"] = s.summary.get("propagation")
        if s.stage == "ingest":
            rec["summary"] = s.summary
        out.append(rec)
    return {"stages": out, "metrics": summary.metrics, "seconds": total}


def flow_config(a: argparse.Namespace, root: Path, store: Path) -> dict[str, Any]:
    return {
        "name": "scale",
        "seed": 0,
        "device": "cpu",
        "store": str(store),
        "source": {
            "type": "tables", "nodes": str(root / "nodes"), "edges": str(root / "edges"),
            "id_column": "id", "source_column": "src", "target_column": "dst", "features": "x", "label_column": "label",
        },
        "graph": {"reorder": a.reorder},
        "features": {"preprocess": "none"},
        "method": {"name": "ssgc", "params": {"K": a.K, "alpha": 0.05}},
        "cluster": {"n_clusters": a.k, "n_init": a.n_init, "max_iter": a.max_iter},
        "tracking": {"enabled": a.tracking, "gate": []},
        "dask": {"enabled": a.dask, "n_workers": 2},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--avg-degree", type=float, default=20.0, help="2 x undirected edges / nodes (20: 100M edges at 10M)")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--files", type=int, default=64, help="Parquet files per table")
    ap.add_argument("--K", type=int, default=8, help="SSGC hops")
    ap.add_argument("--reorder", default="community", choices=["none", "rcm", "degree", "community"])
    ap.add_argument("--n-init", type=int, default=1)
    ap.add_argument("--max-iter", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tracking", action="store_true", help="track in MLflow (SQLite under the work folder)")
    ap.add_argument("--prefect", action="store_true", help="run the Prefect flow (ephemeral API) instead of the local runner")
    ap.add_argument("--dask", action="store_true", help="dask.enabled with a 2-worker local cluster")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the flow process")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/agc-scale"))
    ap.add_argument("--keep", action="store_true", help="keep the input and the store")
    ap.add_argument("--reuse-input", action="store_true", help="reuse an input folder written by an earlier run")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    command = "python bench/bench_scale.py " + shlex.join(sys.argv[1:])
    if a.threads:
        os.environ["BENCH_THREADS"] = str(a.threads)

    work = a.workdir / f"scale-{a.n}-{a.d}"
    root, store, home = work / "input", work / "store", work / "home"
    for p in (root, home):
        p.mkdir(parents=True, exist_ok=True)
    rows, record = [], {"command": command, "args": {k: str(v) for k, v in vars(a).items()}, "machine": machine_line()}
    try:
        marker = root / "input.json"
        if a.reuse_input and marker.exists():
            made = json.loads(marker.read_text())
            print(f"input: reusing {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
            r = measure(write_input, str(root), a.n, a.avg_degree, a.d, a.k, a.files, a.seed)
            made = r["result"] | {"seconds": r["seconds"], "peak_rss": r["peak_rss"]}
            marker.write_text(json.dumps(made))
            print(f"input: {made['files']} Parquet files, {made['bytes'] / 2**30:.2f} GiB, written in {r['seconds']:.0f} s "
                  f"(peak RSS {gib(r['peak_rss'])} GiB)", flush=True)
        record["input"] = made
        cfg = flow_config(a, root, store)
        shutil.rmtree(store, ignore_errors=True)
        runs = {}
        for name in ("first", "cached"):
            r = measure(run_flow, cfg, str(home), a.prefect)
            # VmHWM is reset before each stage: the process peak is the largest of the stages' and the end's
            r["peak_rss"] = max([r["peak_rss"]] + [s.get("peak_rss", 0) for s in r["result"]["stages"]])
            runs[name] = r["result"] | {"wall": r["seconds"], "peak_rss": r["peak_rss"]}
            res = runs[name]
            print(f"{name} run: {r['seconds']:.1f} s, peak RSS {gib(r['peak_rss'])} GiB", flush=True)
            for s in res["stages"]:
                print(f"  {s['stage']:<10} {s['status']:<8} {s['seconds']:8.2f} s"
                      + (f"  peak RSS {gib(s['peak_rss'])} GiB" if "peak_rss" in s else ""), flush=True)
            for s in res["stages"]:
                rows.append([name, s["stage"], s["status"], s["seconds"], gib(s["peak_rss"]) if "peak_rss" in s else ""])
            rows.append([name, "(process)", "", r["seconds"], gib(r["peak_rss"])])
        ratio = runs["cached"]["wall"] / runs["first"]["wall"]
        m = runs["first"]["metrics"]
        record.update(runs=runs, cached_fraction=ratio)
        print_table(
            f"out-of-core flow: {a.n:,} nodes, {made['edges']:,} undirected edges, {a.d} float32 features from "
            f"{made['files']} Parquet files; reorder {a.reorder}, ssgc K={a.K}, KMeans k={a.k}; "
            f"cached re-run = {100 * ratio:.2f}% of the first; NMI {m.get('nmi', float('nan')):.4f}, "
            f"modularity {m['modularity']:.4f}",
            ["run", "stage", "status", "seconds", "peak RSS GiB"], rows, command,
        )
        if a.json:
            write_json(a.json, record)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
