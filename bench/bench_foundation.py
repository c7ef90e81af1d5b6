"""Foundation benchmark: ingest, SSGC precompute (K = 2..16) and KMeans vs scikit-learn, one table.

    python bench/bench_foundation.py [--n 1000000 --avg-degree 20 --d 64 --k 50 --K 2 4 8 16
                                      --n-init 3 --max-iter 100 --json bench/results/foundation.json]

The graph is the synthetic attributed SBM of the ingest stage (``--avg-degree 20`` = 10M undirected
edges for 1M nodes, ``--k`` communities, ``--d`` features), written to the canonical store format, with
80% of edges inside communities (within_between = 4 (k - 1)) so that the clusters are recoverable.
Each case runs in a fresh process (time and peak RSS measured there, see bench/common.py); KMeans runs on
the SSGC K=max output, L2-normalised, with the same n_init / max_iter / tol for agcpipe and
scikit-learn (``algorithm="lloyd"``), and both are scored against the planted communities.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# imported at module level so that each spawned case has them loaded before its timer starts
import numpy as np  # noqa: E402
from sklearn.cluster import KMeans as SkKMeans  # noqa: E402

from agcpipe.cluster.kmeans import KMeans  # noqa: E402
from agcpipe.config import GraphOptions, SyntheticSource  # noqa: E402
from agcpipe.data.graph import Graph  # noqa: E402
from agcpipe.data.ingest import ingest  # noqa: E402
from agcpipe.metrics import label_metrics  # noqa: E402
from agcpipe.ops.features import compute_features  # noqa: E402
from bench.common import gib, measure, print_table, write_json  # noqa: E402


def ingest_case(out: str, n: int, avg_degree: float, d: int, k: int) -> dict:
    src = SyntheticSource(type="synthetic", n_nodes=n, n_communities=k, avg_degree=avg_degree, within_between=4.0 * (k - 1), n_features=d, feature_signal=1.0, seed=0)
    m = ingest(src, GraphOptions(), Path(out))
    return {"n_nodes": m["n_nodes"], "n_edges": m["n_edges"], "nnz": m["nnz"]}


def precompute_case(graph: str, out: str, K: int) -> dict:
    compute_features(Graph.open(graph), [{"name": "x", "op": "ssgc", "K": K, "alpha": 0.05}], "none", Path(out))
    return {}


def kmeans_case(impl: str, emb: str, graph: str, k: int, n_init: int, max_iter: int) -> dict:
    x = np.load(emb, mmap_mode="r")
    if impl == "agcpipe":
        km = KMeans(k, n_init=n_init, max_iter=max_iter, tol=1e-4, normalize=True, seed=0, device="cpu").fit(x)
    else:
        xn = np.asarray(x, dtype=np.float32)
        xn = xn / np.maximum(np.linalg.norm(xn, axis=1, keepdims=True), 1e-12)
        km = SkKMeans(k, n_init=n_init, max_iter=max_iter, tol=1e-4, algorithm="lloyd", random_state=0).fit(xn)
    nmi = label_metrics(Graph.open(graph).labels, np.asarray(km.labels_))["nmi"]
    return {"inertia": float(km.inertia_), "n_iter": int(km.n_iter_), "nmi": nmi}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--avg-degree", type=float, default=20.0)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--K", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--n-init", type=int, default=3)
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--json", default="bench/results/foundation.json")
    a = ap.parse_args()
    command = "python bench/bench_foundation.py " + shlex.join(sys.argv[1:])
    rows, records = [], []
    with tempfile.TemporaryDirectory(prefix="agcpipe-bench-") as tmp:
        graph = Path(tmp) / "graph"
        graph.mkdir()
        r = measure(ingest_case, str(graph), a.n, a.avg_degree, a.d, a.k)
        g = r["result"]
        rows.append(["ingest (synthetic SBM)", f"N={g['n_nodes']:,} E={g['n_edges']:,} d={a.d}", f"{r['seconds']:.2f}", gib(r["peak_rss"]), "", "", ""])
        records.append({"case": "ingest", **g, "seconds": r["seconds"], "peak_rss": r["peak_rss"]})
        emb = None
        for K in a.K:
            out = Path(tmp) / f"ssgc{K}"
            out.mkdir()
            r = measure(precompute_case, str(graph), str(out), K)
            gbs = g["nnz"] * a.d * 4 * K / r["seconds"] / 1e9
            rows.append([f"precompute ssgc K={K}", f"{r['seconds'] / K:.3f} s/hop, {gbs:.1f} GB/s gathered", f"{r['seconds']:.2f}", gib(r["peak_rss"]), "", "", ""])
            records.append({"case": f"ssgc_K{K}", "seconds": r["seconds"], "peak_rss": r["peak_rss"], "gathered_gbs": gbs})
            emb = out / "x.npy"
        base = None
        for impl in ("agcpipe", "sklearn")[: 1 if a.skip_sklearn else 2]:
            r = measure(kmeans_case, impl, str(emb), str(graph), a.k, a.n_init, a.max_iter)
            res = r["result"]
            base = base or res["inertia"]
            rows.append([f"KMeans {impl}", f"k={a.k} n_init={a.n_init} max_iter={a.max_iter}, {res['n_iter']} iters", f"{r['seconds']:.2f}", gib(r["peak_rss"]), f"{res['inertia']:,.1f}", f"{res['inertia'] / base:.4f}", f"{res['nmi']:.4f}"])
            records.append({"case": f"kmeans_{impl}", "seconds": r["seconds"], "peak_rss": r["peak_rss"], **res})
    print_table(
        f"agcpipe foundation benchmark: {a.n:,} nodes, avg degree {a.avg_degree:g}, {a.d} features",
        ["stage", "detail", "seconds", "peak RSS GiB", "inertia", "inertia / agcpipe", "NMI vs planted"],
        rows,
        command,
    )
    if a.json:
        write_json(a.json, {"command": command, "args": vars(a), "cases": records})


if __name__ == "__main__":
    main()
