"""Benchmark agcpipe's torch KMeans against scikit-learn's (Lloyd) on the same L2-normalised data.

    python bench/bench_kmeans.py [--n 1000000 --d 64 --k 50 --n-init 3 --max-iter 100 --tol 1e-4
                                  --noise 2.0 --threads N --repeat 1 --seed 0 --embeddings PATH.npy --json PATH
                                  --init-sample M ...]

The data is ``--embeddings`` (an .npy N x d float32, memory-mapped) or a seeded Gaussian mixture written to a
temporary .npy: k centres drawn from N(0, I_d), cluster sizes from a Dirichlet(3), points = centre + ``--noise``
x N(0, I_d), so neighbouring clusters overlap. Each case runs ``--repeat`` times, each in a fresh process
(:func:`bench.common.measure`; data generation too, so the parent stays small and the children's peak RSS
means something: it includes the child's imports, torch alone ~0.3 GB), and the table shows medians. A case
loads the .npy memory-mapped and clusters its L2-normalised rows: agcpipe with ``normalize=True`` on the
memmap (its one float32 copy), sklearn on ``sklearn.preprocessing.normalize(X)``; "seconds" covers load +
normalise + fit, "fit s" the fit call alone.
``--threads N`` caps both (torch threads; threadpoolctl for sklearn's OpenMP and BLAS): on a machine shared
with other jobs, OpenMP teams spin-waiting for a descheduled thread can make either many times slower.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import gib, machine_line, measure, print_table, write_json  # noqa: E402


def build_mixture(path: str, n: int, d: int, k: int, noise: float, seed: int) -> None:
    """Write an n x d float32 Gaussian mixture with k overlapping components to ``path`` (.npy), in chunks."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32)
    weights = rng.dirichlet(np.full(k, 3.0))
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    step = max(1, (1 << 22) // d)
    for r0 in range(0, n, step):
        m = min(step, n - r0)
        comp = rng.choice(k, size=m, p=weights)
        out[r0 : r0 + m] = centres[comp] + noise * rng.standard_normal((m, d), dtype=np.float32)
    out.flush()


def run_case(
    impl: str, path: str, k: int, n_init: int, max_iter: int, tol: float, seed: int, threads: int | None,
    init_sample: int | None = None,
) -> dict[str, Any]:
    """One case (runs in a fresh process): cluster the L2-normalised rows of the .npy at ``path``.

    Libraries are imported here, in the child (the parent stays small, see the module doc), and before
    the clock starts: ``seconds`` is load + normalise + fit, ``fit_seconds`` the fit call.
    """
    import torch
    from sklearn.cluster import KMeans as SkKMeans
    from sklearn.preprocessing import normalize
    from threadpoolctl import threadpool_limits

    from agcpipe.cluster.kmeans import KMeans

    if threads:
        torch.set_num_threads(threads)
    with threadpool_limits(threads):  # None: no limit
        t0 = time.perf_counter()
        X = np.load(path, mmap_mode="r")
        if impl == "agcpipe":
            km = KMeans(k, n_init=n_init, max_iter=max_iter, tol=tol, normalize=True, seed=seed, init_sample=init_sample)
            t1 = time.perf_counter()
            km.fit(X)
        else:
            Xn = normalize(X)
            km = SkKMeans(k, n_init=n_init, max_iter=max_iter, tol=tol, algorithm="lloyd", random_state=seed)
            t1 = time.perf_counter()
            km.fit(Xn)
        t2 = time.perf_counter()
    return {"seconds": t2 - t0, "fit_seconds": t2 - t1, "inertia": float(km.inertia_), "n_iter": int(km.n_iter_)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="rows of the generated mixture")
    ap.add_argument("--d", type=int, default=64, help="columns of the generated mixture")
    ap.add_argument("--k", type=int, default=50, help="clusters (and mixture components)")
    ap.add_argument("--n-init", type=int, default=3, help="KMeans restarts")
    ap.add_argument("--max-iter", type=int, default=100, help="Lloyd iterations per restart at most")
    ap.add_argument("--tol", type=float, default=1e-4, help="KMeans tolerance (sklearn's scaling)")
    ap.add_argument("--noise", type=float, default=2.0, help="mixture noise std (centres ~ N(0, I))")
    ap.add_argument("--threads", type=int, default=None, help="cap torch / OpenMP / BLAS threads (default: theirs)")
    ap.add_argument("--repeat", type=int, default=1, help="fresh-process runs per implementation (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embeddings", type=Path, default=None, help="cluster this .npy (N x d float32) instead")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--init-sample", type=int, nargs="*", default=[],
                    help="also run agcpipe with k-means++ on this many sampled rows (one row per value)")
    args = ap.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = "python bench/bench_kmeans.py " + " ".join(shlex.quote(a) for a in given)

    workdir = Path(tempfile.mkdtemp(prefix="bench_kmeans_"))
    try:
        if args.embeddings is not None:
            path = str(args.embeddings)
            source = str(args.embeddings)
        else:
            path = str(workdir / "mixture.npy")
            built = measure(build_mixture, path, args.n, args.d, args.k, args.noise, args.seed)
            source = f"Gaussian mixture (noise {args.noise}, seed {args.seed})"
            print(f"data: {args.n:,} x {args.d} mixture of {args.k}; built in {built['seconds']:.1f} s", flush=True)
        n, d = np.load(path, mmap_mode="r").shape

        results: dict[str, dict[str, Any]] = {}
        impls = {"agcpipe": None, **{f"agcpipe init_sample={m:,}": m for m in args.init_sample}, "sklearn": None}
        for impl, sample in impls.items():
            runs = []
            for _ in range(args.repeat):
                kind = "sklearn" if impl == "sklearn" else "agcpipe"
                case = (kind, path, args.k, args.n_init, args.max_iter, args.tol, args.seed, args.threads, sample)
                runs.append(measure(run_case, *case))
                res = runs[-1]["result"]
                print(f"  {impl}: {res['seconds']:.2f} s (fit {res['fit_seconds']:.2f} s), "
                      f"inertia {res['inertia']:.6g}", flush=True)
            results[impl] = {
                "seconds": [r["result"]["seconds"] for r in runs],
                "median_seconds": statistics.median(r["result"]["seconds"] for r in runs),
                "median_fit_seconds": statistics.median(r["result"]["fit_seconds"] for r in runs),
                "peak_rss": max(r["peak_rss"] for r in runs),
                "baseline_rss": statistics.median(r["baseline_rss"] for r in runs),
                "inertia": runs[0]["result"]["inertia"],
                "n_iter": runs[0]["result"]["n_iter"],
            }

        ref = results["sklearn"]["inertia"]
        cols = ["impl", "n", "d", "k", "n_init", "max_iter", "seconds", "fit s", "peak RSS GiB", "baseline RSS GiB",
                "inertia", "inertia / sklearn", "n_iter"]
        rows = [
            [impl, n, d, args.k, args.n_init, args.max_iter, r["median_seconds"], r["median_fit_seconds"],
             gib(r["peak_rss"]), gib(r["baseline_rss"]), r["inertia"], f"{r['inertia'] / ref:.5f}", r["n_iter"]]
            for impl, r in results.items()
        ]
        threads = f"{args.threads} thread(s)" if args.threads else "default threads"
        title = f"KMeans on L2-normalised {source}, {threads}, median of {args.repeat} fresh process(es)"
        print_table(title, cols, rows, command=command)
        if args.json:
            write_json(args.json, {"command": command, "source": source, "n": n, "d": d, "k": args.k,
                                   "n_init": args.n_init, "max_iter": args.max_iter, "tol": args.tol,
                                   "threads": args.threads, "machine": machine_line(), "results": results})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
