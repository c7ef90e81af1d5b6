"""Training-free spectral methods end to end at scale: NAFS, SAGSC, S2CAG, M-S2CAG on a synthetic SBM.

    python bench/bench_training_free.py [--n 1000000 --avg-degree 20 --d 128 --k 50 --n-init 3 --max-iter 100
                                         --methods nafs sagsc s2cag ms2cag --json bench/results/training_free.json]

The graph is the ingest stage's synthetic attributed SBM (``--avg-degree 20``: 10M undirected edges for 1M
nodes; ``--k`` communities, 80% of the edges inside them; ``--d`` Gaussian features). Every method runs through
the pipeline's own stages (precompute, train = fit + embed, cluster) against one scratch store, **each stage
in a fresh process** (bench/common.measure: seconds of the stage itself, peak RSS of the process, which
includes ~0.4 GB of interpreter and libraries, see ``baseline``). Parameters are each method's published
defaults except where noted in the table (S2CAG's degree normalisation needs non-negative features; the SBM's
are Gaussian, so it runs with ``normalize: none``). Clustering uses ``--n-init`` restarts and
``--max-iter`` Lloyd iterations (KMeans) or rounding restarts (S2CAG's snem), as in bench_foundation.py; NMI
is against the planted communities.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# imported at module level so that each spawned case has them loaded before its timer starts
import numpy as np  # noqa: E402,F401
import torch  # noqa: E402,F401

from agcpipe.config import load_config  # noqa: E402
from agcpipe.stages import STAGE_ORDER, get_stage  # noqa: E402
from bench.common import gib, measure, print_table, write_json  # noqa: E402

#: method parameters of the run (published defaults unless a note says otherwise)
PARAMS = {
    "nafs": ({}, "K 20, r 0..0.5 (6 x 20 hops), concat"),
    "sagsc": ({}, "p 2, rSVD 5 power its"),
    "s2cag": ({"normalize": "none"}, "T 10, tau 7; normalize none (signed features)"),
    "ms2cag": ({}, "T 10, gamma 0.9, tau 50"),
}


def overrides(a: argparse.Namespace, store: str, method: str | None) -> list[str]:
    o = {
        "name": "bench-training-free",
        "seed": 0,
        "store": store,
        "source": {
            "type": "synthetic", "n_nodes": a.n, "n_communities": a.k, "avg_degree": a.avg_degree,
            "within_between": 4.0 * (a.k - 1), "n_features": a.d, "feature_signal": 1.0, "seed": 0,
        },
        "features.preprocess": "none",
        "cluster.n_clusters": a.k,
        "cluster.n_init": a.n_init,
        "cluster.max_iter": a.max_iter,
        "tracking.enabled": False,
    }
    if method is not None:
        o["method"] = {"name": method, "params": PARAMS[method][0]}
    return [f"{k}={v!r}" if isinstance(v, str) and k == "store" else f"{k}={v}" for k, v in o.items()]


def stage_case(ov: list[str], stage: str) -> dict:
    """Run the pipeline up to ``stage`` (upstream stages are cached artifacts) and time ``stage`` alone."""
    cfg = load_config(None, ov)
    from agcpipe.pipeline import UPSTREAM

    results = {}
    for name in STAGE_ORDER[: STAGE_ORDER.index(stage) + 1]:
        res = get_stage(name).run(cfg, *(results[u] for u in UPSTREAM[name]))
        results[name] = res
    res = results[stage]
    out = {"status": res.status, "seconds": res.seconds}
    if stage == "ingest":
        out.update({k: res.summary[k] for k in ("n_nodes", "n_edges")})
    if stage == "train":
        out["shape"] = res.summary["shape"]
    if stage == "cluster":
        from agcpipe.data.graph import Graph
        from agcpipe.metrics import label_metrics

        labels = np.load(Path(res.path) / "labels.npy")
        out["nmi"] = label_metrics(Graph.open(results["ingest"].path).labels, labels)["nmi"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--avg-degree", type=float, default=20.0)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--n-init", type=int, default=3)
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--methods", nargs="+", default=list(PARAMS), choices=list(PARAMS))
    ap.add_argument("--store", help="scratch store, reused across runs for the ingested graph (its precompute artifacts "
                    "are deleted before each method); default: a temporary folder, removed at the end")
    ap.add_argument("--json", default="bench/results/training_free.json")
    a = ap.parse_args()
    command = "python bench/bench_training_free.py " + shlex.join(sys.argv[1:])
    rows, records = [], []
    with tempfile.TemporaryDirectory(prefix="agcpipe-bench-tf-") as tmp:
        store = a.store or str(Path(tmp) / "store")
        r = measure(stage_case, overrides(a, store, "sagsc"), "ingest")
        g = r["result"]
        print(f"ingest: N={g['n_nodes']:,} E={g['n_edges']:,} in {r['seconds']:.1f} s, peak {gib(r['peak_rss'])} GiB", flush=True)
        records.append({"case": "ingest", **g, "wall": r["seconds"], "peak_rss": r["peak_rss"]})
        for method in a.methods:
            ov = overrides(a, store, method)
            cells, peak, nmi, shape = {}, 0, None, None
            # every method's precompute is timed computed, not as the artifact an earlier method left
            shutil.rmtree(Path(store) / "precompute", ignore_errors=True)
            for stage in ("precompute", "train", "cluster"):
                r = measure(stage_case, ov, stage)
                res = r["result"]
                cells[stage] = res["seconds"]
                peak = max(peak, r["peak_rss"])
                nmi = res.get("nmi", nmi)
                shape = res.get("shape", shape)
                records.append({"case": f"{method}_{stage}", **res, "peak_rss": r["peak_rss"], "baseline_rss": r["baseline_rss"]})
                print(f"{method} {stage}: {res['seconds']:.1f} s ({res['status']}), peak {gib(r['peak_rss'])} GiB", flush=True)
            rows.append([
                method, PARAMS[method][1], f"{cells['precompute']:.1f}", f"{cells['train']:.1f}", f"{cells['cluster']:.1f}",
                f"{sum(cells.values()):.1f}", gib(peak), f"{shape[1]}", f"{nmi:.4f}",
            ])
    print_table(
        f"training-free methods end to end: {g['n_nodes']:,} nodes, {g['n_edges']:,} edges, {a.d} features, k={a.k} "
        f"(each stage in a fresh process; KMeans / rounding n_init={a.n_init}, max_iter={a.max_iter})",
        ["method", "settings", "precompute s", "embedding s (train)", "clustering s", "total s", "peak RSS GiB", "emb dim", "NMI vs planted"],
        rows,
        command,
    )
    if a.json:
        write_json(a.json, {"command": command, "args": vars(a), "cases": records})


if __name__ == "__main__":
    main()
