"""Benchmark suite: every heavy stage at growing sizes, one table, one JSON to compare runs over time.

    python bench/bench_suite.py [--sizes 10000 100000 1000000 10000000 --d 64 --avg-degree 20 --k 20
                                 --K 8 --reorder none --max-iter 20 --threads N
                                 --json bench/results/suite.json --compare OLD.json]

For each size N the synthetic attributed SBM (``--avg-degree`` -> N x avg/2 undirected edges, ``--k``
communities, ``--d`` features) goes through the library's stage functions, **each case in a fresh
process** (bench/common.measure: seconds of the case, peak RSS from VmHWM, which includes ~0.3-0.4 GB of
interpreter and torch; ``baseline`` is the RSS before the case):

==========  =========================================================  =========================================
case        what                                                       throughput
==========  =========================================================  =========================================
ingest      generate + canonical CSR (external sort) [+ reorder]       input edges / s
precompute  SSGC, ``--K`` hops, default column blocking                gathered GB/s = nnz x d x 4 x K / s
kmeans      ``--k`` clusters, 1 init, ``--max-iter`` Lloyd iterations  rows x iterations / s
evaluate    all metrics (contingency table + one CSR pass)             stored entries / s
==========  =========================================================  =========================================

The machine's streaming copy bandwidth (read + write bytes / s) is measured in the same run and printed
beside the gathered throughput. The JSON holds the command, git commit, machine, bandwidth and every
case; ``--compare OLD.json`` adds a column with this run's seconds / the old run's for the same case.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# imported at module level so that each spawned case has them loaded before its timer starts
import numpy as np  # noqa: E402
import torch  # noqa: E402

from agcpipe.cluster.kmeans import KMeans  # noqa: E402
from agcpipe.config import GraphOptions, SyntheticSource  # noqa: E402
from agcpipe.data.graph import Graph  # noqa: E402
from agcpipe.data.ingest import ingest  # noqa: E402
from agcpipe.metrics import evaluate  # noqa: E402
from agcpipe.ops.features import compute_features  # noqa: E402
from bench.common import gib, machine_line, measure, print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def case_ingest(out: str, n: int, avg_degree: float, d: int, k: int, reorder: str, threads: int | None) -> dict[str, Any]:
    _threads(threads)
    src = SyntheticSource(type="synthetic", n_nodes=n, n_communities=k, avg_degree=avg_degree,
                          within_between=4.0 * (k - 1), n_features=d, feature_signal=1.0, seed=0)
    m = ingest(src, GraphOptions(reorder=reorder), Path(out))
    return {"input_edges": m["stats"]["input_edges"], "nnz": m["nnz"], "n_edges": m["n_edges"]}


def case_precompute(graph: str, out: str, K: int, threads: int | None) -> dict[str, Any]:
    _threads(threads)
    g = Graph.open(graph)
    runs: dict[str, Any] = {}
    t = time.process_time()
    compute_features(g, [{"name": "x", "op": "ssgc", "K": K, "alpha": 0.05}], "none", Path(out), runs=runs)
    return {"cpu_seconds": time.process_time() - t, **runs["x"]}


def case_kmeans(emb: str, k: int, max_iter: int, threads: int | None) -> dict[str, Any]:
    _threads(threads)
    x = np.load(emb, mmap_mode="r")
    km = KMeans(k, n_init=1, max_iter=max_iter, tol=0.0, normalize=True, seed=0, device="cpu").fit(x)
    return {"n_iter": int(km.n_iter_), "inertia": float(km.inertia_)}


def case_evaluate(graph: str, emb: str, k: int, threads: int | None) -> dict[str, Any]:
    _threads(threads)
    g = Graph.open(graph)
    # cheap labels (the case times the metrics, not a clustering): nearest of k rows
    x = np.load(emb, mmap_mode="r")
    labels = KMeans.from_centers(np.asarray(x[:k]), normalize=True, device="cpu").predict(x)
    t = time.perf_counter()
    m = evaluate(g, labels, k)
    return {"metrics_seconds": time.perf_counter() - t, "nmi": m.get("nmi"), "modularity": m["modularity"]}


def copy_bandwidth() -> dict[str, float]:
    from bench.bench_precompute import copy_bandwidth as probe

    return probe()


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--avg-degree", type=float, default=20.0)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--max-iter", type=int, default=20)
    ap.add_argument("--reorder", default="none", choices=["none", "rcm", "degree", "community"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every case (default: torch's)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "suite.json")
    ap.add_argument("--compare", type=Path, default=None, help="an earlier run's JSON: adds seconds ratios")
    a = ap.parse_args()
    command = "python bench/bench_suite.py " + shlex.join(sys.argv[1:])
    old = {}
    if a.compare:
        prev = json.loads(a.compare.read_text())
        old = {(c["n"], c["case"]): c for c in prev.get("cases", [])}

    bw = measure(copy_bandwidth)["result"]
    print(f"streaming copy bandwidth: numpy {bw['numpy']:.1f} GB/s (1 thread), torch {bw['torch']:.1f} GB/s", flush=True)
    rows, cases = [], []

    def add(n: int, name: str, r: dict[str, Any], thr: float, unit: str, detail: str) -> None:
        rec = {"n": n, "case": name, "seconds": r["seconds"], "peak_rss": r["peak_rss"], "baseline_rss": r["baseline_rss"],
               "throughput": thr, "unit": unit, "detail": detail, "result": r["result"]}
        cases.append(rec)
        row = [f"{n:,}", name, detail, r["seconds"], f"{thr:.3g} {unit}", gib(r["peak_rss"]), gib(r["baseline_rss"])]
        if old:
            o = old.get((n, name))
            row.append(f"{r['seconds'] / o['seconds']:.2f}" if o else "")
        rows.append(row)
        print("  " + " | ".join(str(v) for v in row), flush=True)

    for n in a.sizes:
        work = Path(tempfile.mkdtemp(prefix=f"agc-suite-{n}-", dir=a.workdir))
        try:
            graph, pre = work / "graph", work / "pre"
            graph.mkdir()
            pre.mkdir()
            r = measure(case_ingest, str(graph), n, a.avg_degree, a.d, a.k, a.reorder, a.threads)
            g = r["result"]
            add(n, "ingest", r, g["input_edges"] / r["seconds"], "edges/s", f"{g['n_edges']:,} edges, reorder {a.reorder}")
            r = measure(case_precompute, str(graph), str(pre), a.K, a.threads)
            gbs = g["nnz"] * a.d * 4 * a.K / r["seconds"] / 1e9
            add(n, "precompute", r, gbs, "GB/s", f"ssgc K={a.K}, {g['nnz']:,} nnz, block {r['result']['feature_block']} cols")
            emb = str(pre / "x.npy")
            r = measure(case_kmeans, emb, a.k, a.max_iter, a.threads)
            add(n, "kmeans", r, n * r["result"]["n_iter"] / r["seconds"], "rows*it/s", f"k={a.k}, {r['result']['n_iter']} iterations")
            r = measure(case_evaluate, str(graph), emb, a.k, a.threads)
            add(n, "evaluate", r, g["nnz"] / r["result"]["metrics_seconds"], "entries/s", "all metrics (seconds incl. labels)")
        finally:
            shutil.rmtree(work, ignore_errors=True)

    cols = ["N", "case", "detail", "seconds", "throughput", "peak RSS GiB", "baseline GiB"] + (["s / old"] if old else [])
    print_table(
        f"agcpipe suite: d={a.d}, avg degree {a.avg_degree:g}, k={a.k}; streaming copy {bw['numpy']:.1f} GB/s "
        f"(numpy, 1 thread) / {bw['torch']:.1f} GB/s (torch)",
        cols, rows, command,
    )
    if a.json:
        write_json(a.json, {"command": command, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_commit(),
                            "machine": machine_line(), "args": {k: str(v) for k, v in vars(a).items()},
                            "copy_gb_s": bw, "cases": cases})


if __name__ == "__main__":
    main()
