"""Benchmark the precompute operators (SGC / SSGC propagation) on a random graph.

    python bench/bench_precompute.py [--n 1000000 --edges 10000000 --d 64 --K 2 4 8 16
                                      --block-nnz N [N ...] --repeat 3 --save PATH.npy --json PATH]

Builds a random undirected graph directly as canonical CSR arrays (``--edges`` distinct undirected edges, no
self-loops, so nnz = 2 x edges; int32 indices, columns sorted) and random float32 features, saved as .npy and
memory-mapped by the cases as in the pipeline. Every (op, K, block size) case runs ``--repeat`` times, each in a
fresh process (:func:`bench.common.measure`, peak RSS from VmHWM) writing to a temporary .npy; the table shows
medians. Graph building and the bandwidth probe also run in child processes, keeping the parent small. The
machine's streaming copy bandwidth is measured in the same run, so "gathered GB/s" (nnz x d x 4 x K / seconds,
the bytes of X rows gathered by the sparse products) can be read against it. ``--save`` writes the ssgc K=16
output (the input of the KMeans benchmark).
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agcpipe.ops.propagate import DEFAULT_BLOCK_NNZ, propagate  # noqa: E402  (imported before the timed section)
from bench.common import gib, machine_line, measure, print_table, write_json  # noqa: E402


def random_csr(n: int, edges: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr int64, indices int32) of ``edges`` distinct random undirected edges, both directions stored.

    Peak memory ~ 100 x edges bytes (int64 edge keys, both directions, their sort; measured 0.9 GiB for 10M).
    """
    if edges > n * (n - 1) // 2:
        raise SystemExit(f"--edges {edges} exceeds the {n * (n - 1) // 2} possible edges on {n} nodes")
    rng = np.random.default_rng(seed)
    keys = np.empty(0, dtype=np.int64)
    while keys.size < edges:  # top up after dropping self-loops and duplicates (a round or two)
        need = edges - keys.size
        u = rng.integers(0, n, size=need + need // 8 + 16, dtype=np.int64)
        v = rng.integers(0, n, size=u.size, dtype=np.int64)
        u, v = u[u != v], v[u != v]
        keys = np.unique(np.concatenate([keys, np.minimum(u, v) * n + np.maximum(u, v)]))
    keys = rng.permutation(keys)[:edges]
    lo, hi = np.divmod(keys, n)
    both = np.concatenate([lo * n + hi, hi * n + lo])
    del keys, lo, hi
    both.sort()
    rows, cols = np.divmod(both, n)
    del both
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return indptr, cols.astype(np.int32)


def copy_bandwidth(gib_size: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Streaming copy bandwidth in GB/s ((read + write bytes) / s, median): numpy (1 thread) and torch (all threads)."""
    import torch

    src = np.ones(int(gib_size * 2**28), dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the pages once
    res = {}
    copies = {"numpy": lambda: np.copyto(dst, src), "torch": lambda: torch.from_numpy(dst).copy_(torch.from_numpy(src))}
    for name, copy in copies.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            copy()
            times.append(time.perf_counter() - t0)
        res[name] = 2 * src.nbytes / statistics.median(times) / 1e9
    return res


def build_inputs(workdir: str, n: int, edges: int, d: int, seed: int) -> int:
    """Write indptr.npy, indices.npy and features.npy (uniform [0, 1) float32) to workdir; return nnz."""
    wd = Path(workdir)
    indptr, indices = random_csr(n, edges, seed)
    np.save(wd / "indptr.npy", indptr)
    np.save(wd / "indices.npy", indices)
    feats = np.lib.format.open_memmap(wd / "features.npy", mode="w+", dtype=np.float32, shape=(n, d))
    rng = np.random.default_rng(seed + 1)
    step = max(1, (1 << 24) // d)
    for r0 in range(0, n, step):
        feats[r0 : r0 + step] = rng.random((min(step, n - r0), d), dtype=np.float32)
    feats.flush()
    return int(indptr[-1])


def run_case(workdir: str, op: str, K: int, block_nnz: int | None, out_path: str) -> None:
    """One timed case (runs in a fresh process): propagate the memory-mapped features into out_path."""
    wd = Path(workdir)
    indptr = np.load(wd / "indptr.npy", mmap_mode="r")
    indices = np.load(wd / "indices.npy", mmap_mode="r")
    X = np.load(wd / "features.npy", mmap_mode="r")
    spec = {"op": op, "K": K} if op == "sgc" else {"op": op, "K": K, "alpha": 0.05}
    propagate(spec, indptr, indices, None, X, out_path, block_nnz=block_nnz)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="nodes")
    ap.add_argument("--edges", type=int, default=10_000_000, help="undirected edges (nnz = 2 x edges)")
    ap.add_argument("--d", type=int, default=64, help="feature dimension")
    ap.add_argument("--K", type=int, nargs="+", default=[2, 4, 8, 16], help="hops")
    ap.add_argument("--ops", nargs="+", default=["ssgc", "sgc"], choices=["ssgc", "sgc"])
    ap.add_argument("--block-nnz", type=int, nargs="+", default=[None], help="block sizes to try (default: library's)")
    ap.add_argument("--repeat", type=int, default=3, help="fresh-process runs per case (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder for graph and outputs")
    ap.add_argument("--save", type=Path, default=None, help="write the ssgc K=16 output here (.npy)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    cli = sys.argv[1:] if argv is None else argv
    command = "python bench/bench_precompute.py " + " ".join(shlex.quote(a) for a in cli)

    workdir = Path(tempfile.mkdtemp(prefix="bench_precompute_", dir=args.workdir))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still remove workdir when killed
    try:
        built = measure(build_inputs, str(workdir), args.n, args.edges, args.d, args.seed)
        nnz = built["result"]
        print(f"graph: {args.n:,} nodes, {nnz:,} nnz, d={args.d}; built in {built['seconds']:.1f} s, "
              f"peak RSS {gib(built['peak_rss'])} GiB", flush=True)

        bw = measure(copy_bandwidth)["result"]
        print(f"streaming copy bandwidth: numpy {bw['numpy']:.1f} GB/s, torch {bw['torch']:.1f} GB/s", flush=True)

        ks = sorted(set(args.K) | ({16} if args.save and "ssgc" in args.ops else set()))
        rows, records = [], []
        for block_nnz in args.block_nnz:
            for op in args.ops:
                for K in ks:
                    runs = []
                    for _ in range(args.repeat):
                        out = workdir / "out.npy"
                        runs.append(measure(run_case, str(workdir), op, K, block_nnz, str(out)))
                        if args.save and op == "ssgc" and K == 16:
                            args.save.parent.mkdir(parents=True, exist_ok=True)
                            shutil.move(out, args.save)
                        else:
                            out.unlink()
                    if K not in args.K:
                        continue  # only computed for --save
                    secs = statistics.median(r["seconds"] for r in runs)
                    peak = max(r["peak_rss"] for r in runs)
                    base = statistics.median(r["baseline_rss"] for r in runs)
                    gathered = nnz * args.d * 4 * K / secs / 1e9
                    bn = block_nnz or DEFAULT_BLOCK_NNZ
                    rows.append([op, K, bn, secs, secs / K, gathered, gib(peak), gib(base)])
                    records.append(
                        {"op": op, "K": K, "block_nnz": bn, "seconds": [r["seconds"] for r in runs],
                         "median_seconds": secs, "gathered_gb_s": gathered, "peak_rss": peak, "baseline_rss": base}
                    )
                    print(f"  {op} K={K} block_nnz={bn}: {[round(r['seconds'], 2) for r in runs]} s", flush=True)

        cols = ["op", "K", "block_nnz", "seconds", "s / hop", "gathered GB/s", "peak RSS GiB", "baseline RSS GiB"]
        title = (
            f"precompute: {args.n:,} nodes, {nnz:,} nnz, d={args.d}, median of {args.repeat} fresh processes; "
            f"streaming copy {bw['numpy']:.1f} GB/s (numpy, 1 thread), {bw['torch']:.1f} GB/s (torch)"
        )
        print_table(title, cols, rows, command=command)
        if args.json:
            write_json(args.json, {"command": command, "n": args.n, "nnz": nnz, "d": args.d, "copy_gb_s": bw,
                                   "machine": machine_line(), "cases": records})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
