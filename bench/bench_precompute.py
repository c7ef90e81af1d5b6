"""Benchmark the precompute operators (SGC / SSGC propagation): gathered bytes per second beside the
machine's streaming copy bandwidth, and what node order, column panels and feature blocks each bring.

    python bench/bench_precompute.py [--n 1000000 --edges 10000000 --d 64 --K 2 4 8 16 --ops ssgc sgc
                                      --graph random sbm --reorder none rcm degree community
                                      --kernels torch library --feature-block default 16
                                      --panel-bytes 0 default --threads T
                                      --block-nnz N [N ...] --repeat 3 --save PATH.npy --json PATH]

``--graph random`` (default) builds a uniform random graph, ``sbm`` the ingest stage's attributed SBM (50
communities, 80% of edges inside, ``--edges`` undirected edges); several run one after the other.
``--reorder`` runs every case on the graph relabelled by each node order of :mod:`agcpipe.data.reorder`
(computed once, as ingest does). ``--kernels torch`` adds the baseline a user would write with plain
torch (one CSR tensor of A with int64 indices, ``torch.sparse.mm``, new tensors every hop);
``library`` is :func:`agcpipe.ops.propagate.propagate`. ``--feature-block`` forces column blocks
(default: the library's choice); ``--panel-bytes 0 default`` compares plain row-blocked products with
the library's column panels. Besides wall-clock seconds the cases report their CPU seconds: on a
machine shared with other jobs the wall clock measures the others too, and "gathered GB/s (CPU)" =
nnz x d x 4 x K / CPU seconds is what the kernel achieves while it runs (per thread when --threads 1).
"x (CPU)" is each case's CPU-seconds speed-up over the same graph's library case in input order,
without panels, at full width. The streaming copy bandwidth is measured at the start and at the end.

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


def build_sbm(workdir: str, n: int, edges: int, d: int, seed: int) -> int:
    """The ingest stage's attributed SBM (50 communities, 80% of edges inside) as indptr / indices / features."""
    from agcpipe.config import GraphOptions, SyntheticSource
    from agcpipe.data.ingest import ingest

    wd = Path(workdir)
    g = wd / "sbm"
    g.mkdir()
    k = 50
    src = SyntheticSource(type="synthetic", n_nodes=n, n_communities=k, avg_degree=2 * edges / n,
                          within_between=4.0 * (k - 1), n_features=d, feature_signal=1.0, seed=seed)
    m = ingest(src, GraphOptions(), g)
    for name, f in (("indptr", "csr_indptr.npy"), ("indices", "csr_indices.npy"), ("features", "features.npy")):
        (g / f).rename(wd / f"{name}.npy")
    shutil.rmtree(g)
    return int(m["nnz"])


def reorder_graph(workdir: str, method: str) -> dict:
    """Relabel indptr / indices / features of workdir by the node order ``method`` into ``<method>/``."""
    from agcpipe.config import GraphOptions
    from agcpipe.data.canonical import FeatureFile, build_csr
    from agcpipe.data.reorder import compute_order

    wd = Path(workdir)
    out = wd / method
    out.mkdir(exist_ok=True)
    ip, ix = np.load(wd / "indptr.npy", mmap_mode="r"), np.load(wd / "indices.npy", mmap_mode="r")
    n = ip.shape[0] - 1
    order, info = compute_order(method, ip, ix, None, n, directed=False)
    inv = np.empty(n, dtype=np.int64)
    inv[order] = np.arange(n)

    def chunks():
        step = 1 << 22
        for r0 in range(0, n, max(1, step // 20)):
            r1 = min(n, r0 + max(1, step // 20))
            yield np.repeat(inv[r0:r1], np.diff(ip[r0 : r1 + 1])), inv[np.asarray(ix[ip[r0] : ip[r1]])], None

    build_csr(chunks(), n, GraphOptions(undirected=False, merge_duplicates=False, drop_self_loops=False), out, weighted=False)
    (out / "csr_indptr.npy").rename(out / "indptr.npy")
    (out / "csr_indices.npy").rename(out / "indices.npy")
    X = np.load(wd / "features.npy", mmap_mode="r")
    dest = FeatureFile(out / "features.npy", n, X.shape[1])
    for a in range(0, n, 1 << 18):
        dest.write(a, np.asarray(X[order[a : a + (1 << 18)]]))
    rows = np.repeat(np.arange(n), np.diff(np.load(out / "indptr.npy")))
    span = float(np.abs(rows - np.load(out / "indices.npy")).mean()) / n
    return {**info, "mean_entry_span": span}


def _spec(op: str, K: int) -> dict:
    return {"op": op, "K": K} if op == "sgc" else {"op": op, "K": K, "alpha": 0.05}


def plain_torch(indptr: np.ndarray, indices: np.ndarray, X: np.ndarray, spec: dict, out_path: str) -> None:
    """The baseline: SGC / SSGC as one would write them with plain torch (one CSR tensor of A, int64
    indices, ``torch.sparse.mm``, fresh tensors per hop); S Z = dinv (A (dinv Z) + dinv Z), as the library."""
    import torch

    n = indptr.shape[0] - 1
    dinv = torch.from_numpy((1.0 / np.sqrt(np.diff(np.asarray(indptr)) + 1.0)).astype(np.float32))[:, None]
    A = torch.sparse_csr_tensor(torch.from_numpy(np.asarray(indptr, dtype=np.int64)),
                                torch.from_numpy(np.asarray(indices, dtype=np.int64)),
                                torch.ones(int(indptr[-1])), size=(n, n))
    x = torch.from_numpy(np.array(X))
    K, z = spec["K"], x
    res = x * spec["alpha"] if spec["op"] == "ssgc" else None
    for _ in range(K):
        y = dinv * z
        z = dinv * (torch.sparse.mm(A, y) + y)
        if res is not None:
            res += z * ((1.0 - spec["alpha"]) / K)
    np.save(out_path, (z if res is None else res).numpy())


def run_case(workdir: str, op: str, K: int, block_nnz: int | None, out_path: str,
             feature_block: int | None = None, threads: int | None = None, panel_bytes: int | None = None,
             kernel: str = "library") -> dict:
    """One timed case (runs in a fresh process): propagate the memory-mapped features into out_path."""
    import warnings

    import torch

    if threads:
        torch.set_num_threads(threads)
    wd = Path(workdir)
    indptr = np.load(wd / "indptr.npy", mmap_mode="r")
    indices = np.load(wd / "indices.npy", mmap_mode="r")
    X = np.load(wd / "features.npy", mmap_mode="r")
    cpu = time.process_time()
    if kernel == "torch":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            plain_torch(indptr, indices, X, _spec(op, K), out_path)
        info = {"feature_block": X.shape[1], "blocks": 1, "panels": 1, "distributed": False}
    else:
        info = propagate(_spec(op, K), indptr, indices, None, X, out_path, block_nnz=block_nnz,
                         feature_block=feature_block, panel_bytes=panel_bytes)
    return {"cpu_seconds": time.process_time() - cpu, **info}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="nodes")
    ap.add_argument("--edges", type=int, default=10_000_000, help="undirected edges (nnz = 2 x edges)")
    ap.add_argument("--d", type=int, default=64, help="feature dimension")
    ap.add_argument("--K", type=int, nargs="+", default=[2, 4, 8, 16], help="hops")
    ap.add_argument("--ops", nargs="+", default=["ssgc", "sgc"], choices=["ssgc", "sgc"])
    ap.add_argument("--block-nnz", type=int, nargs="+", default=[None], help="block sizes to try (default: library's)")
    ap.add_argument("--graph", nargs="+", default=["random"], choices=["random", "sbm"], help="graphs to build and run")
    ap.add_argument("--reorder", nargs="+", default=["none"], choices=["none", "rcm", "degree", "community"])
    ap.add_argument("--kernels", nargs="+", default=["library"], choices=["torch", "library"],
                    help="torch = the plain-torch baseline (one CSR tensor, torch.sparse.mm), library = agcpipe.ops.propagate")
    ap.add_argument("--feature-block", nargs="+", default=["default"],
                    help="column blocks to try ('default' = the library's choice, the full width when it fits)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the cases (default: torch's)")
    ap.add_argument("--panel-bytes", nargs="+", default=["default"],
                    help="column panel target bytes to try; 0 = no panels, 'default' = the library's")
    ap.add_argument("--repeat", type=int, default=3, help="fresh-process runs per case (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder for graph and outputs")
    ap.add_argument("--save", type=Path, default=None, help="write the ssgc K=16 output here (.npy; first graph)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    cli = sys.argv[1:] if argv is None else argv
    command = "python bench/bench_precompute.py " + " ".join(shlex.quote(a) for a in cli)
    fbs = [None if f == "default" else int(f) for f in args.feature_block]
    panel_opts = [None if p == "default" else int(p) for p in args.panel_bytes]
    ks = sorted(set(args.K) | ({16} if args.save and "ssgc" in args.ops else set()))

    workdir = Path(tempfile.mkdtemp(prefix="bench_precompute_", dir=args.workdir))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still remove workdir when killed
    try:
        bw = [measure(copy_bandwidth)["result"]]
        print(f"streaming copy bandwidth: numpy {bw[0]['numpy']:.1f} GB/s, torch {bw[0]['torch']:.1f} GB/s", flush=True)
        rows, records, nnzs = [], [], {}
        for graph in args.graph:
            gwd = workdir / graph
            gwd.mkdir()
            builder = build_inputs if graph == "random" else build_sbm
            built = measure(builder, str(gwd), args.n, args.edges, args.d, args.seed)
            nnz = nnzs[graph] = built["result"]
            print(f"{graph} graph: {args.n:,} nodes, {nnz:,} nnz, d={args.d}; built in {built['seconds']:.1f} s, "
                  f"peak RSS {gib(built['peak_rss'])} GiB", flush=True)
            graphs = {}
            for method in args.reorder:
                if method == "none":
                    graphs[method] = (gwd, {})
                else:
                    r = measure(reorder_graph, str(gwd), method)
                    graphs[method] = (gwd / method, r["result"])
                    print(f"  reorder {method}: {r['result']} in {r['seconds']:.1f} s, peak RSS {gib(r['peak_rss'])} GiB", flush=True)
            cases = [("torch", m, None, 0, None, op, K) for m in graphs for op in args.ops for K in ks if "torch" in args.kernels]
            if "library" in args.kernels:
                cases += [("library", m, fb, pb, b, op, K) for m in graphs for fb in fbs for pb in panel_opts
                          for b in args.block_nnz for op in args.ops for K in ks]
            graph_rows = []
            for kernel, method, fb, pb, block_nnz, op, K in cases:
                gdir, order_info = graphs[method]
                runs = []
                for _ in range(args.repeat):
                    out = workdir / "out.npy"
                    runs.append(measure(run_case, str(gdir), op, K, block_nnz, str(out), fb, args.threads, pb, kernel))
                    if args.save and kernel == "library" and op == "ssgc" and K == 16 and graph == args.graph[0]:
                        args.save.parent.mkdir(parents=True, exist_ok=True)
                        shutil.move(out, args.save)
                    else:
                        out.unlink()
                if K not in args.K:
                    continue  # only computed for --save
                secs = statistics.median(r["seconds"] for r in runs)
                cpu = statistics.median(r["result"]["cpu_seconds"] for r in runs)
                peak = max(r["peak_rss"] for r in runs)
                base = statistics.median(r["baseline_rss"] for r in runs)
                gathered = nnz * args.d * 4 * K / secs / 1e9
                gathered_cpu = nnz * args.d * 4 * K / cpu / 1e9
                bn = "-" if kernel == "torch" else block_nnz or DEFAULT_BLOCK_NNZ
                width = runs[0]["result"]["feature_block"]
                panels = runs[0]["result"].get("panels", 1)
                rec = {"graph": graph, "kernel": kernel, "reorder": method, "order": order_info, "op": op, "K": K,
                       "block_nnz": bn, "feature_block": width, "feature_block_arg": fb, "panel_bytes": pb, "panels": panels,
                       "seconds": [r["seconds"] for r in runs], "cpu_seconds": [r["result"]["cpu_seconds"] for r in runs],
                       "median_seconds": secs, "median_cpu_seconds": cpu, "gathered_gb_s": gathered,
                       "gathered_gb_s_cpu": gathered_cpu, "peak_rss": peak, "baseline_rss": base}
                records.append(rec)
                graph_rows.append(rec)
                print(f"  {graph} {kernel} {method} {op} K={K} block_nnz={bn} cols={width} panels={panels}: "
                      f"{[round(r['seconds'], 2) for r in runs]} s, cpu {[round(r['result']['cpu_seconds'], 2) for r in runs]} s",
                      flush=True)
            # speed-up of each case over the graph's plain library case (input order, no panels, full width)
            ref = {(r["op"], r["K"]): r["median_cpu_seconds"] for r in graph_rows
                   if r["kernel"] == "library" and r["reorder"] == "none" and r["panels"] == 1 and r["feature_block"] == args.d}
            for r in graph_rows:
                base_cpu = ref.get((r["op"], r["K"]))
                r["speedup_cpu"] = base_cpu / r["median_cpu_seconds"] if base_cpu else None
                rows.append([graph, r["kernel"], r["reorder"], r["op"], r["K"], r["feature_block"], r["panels"], r["median_seconds"],
                             r["gathered_gb_s"], r["median_cpu_seconds"], r["gathered_gb_s_cpu"],
                             "" if r["speedup_cpu"] is None else f"{r['speedup_cpu']:.2f}", gib(r["peak_rss"]), gib(r["baseline_rss"])])
            shutil.rmtree(gwd, ignore_errors=True)
        bw.append(measure(copy_bandwidth)["result"])
        print(f"streaming copy bandwidth (end): numpy {bw[1]['numpy']:.1f} GB/s, torch {bw[1]['torch']:.1f} GB/s", flush=True)

        cols = ["graph", "kernel", "reorder", "op", "K", "cols", "panels", "seconds", "gathered GB/s", "CPU s",
                "gathered GB/s (CPU)", "x (CPU)", "peak RSS GiB", "baseline RSS GiB"]
        copy = " / ".join(f"{b['numpy']:.1f}" for b in bw)
        copy_t = " / ".join(f"{b['torch']:.1f}" for b in bw)
        title = (
            f"precompute: {args.n:,} nodes, {', '.join(f'{g} {z:,} nnz' for g, z in nnzs.items())}, d={args.d}, "
            f"{args.threads or 'default'} thread(s), median of {args.repeat} fresh processes; streaming copy bandwidth in "
            f"the same run (start / end): {copy} GB/s (numpy, 1 thread), {copy_t} GB/s (torch)"
        )
        print_table(title, cols, rows, command=command)
        print("gathered GB/s = nnz x d x 4 x K / seconds (wall; CPU: / CPU seconds of the case process); "
              "x (CPU) = CPU-seconds speed-up over the same graph's library case in input order without panels "
              "at full width; kernel torch = plain torch.sparse.mm on one CSR tensor", flush=True)
        if args.json:
            write_json(args.json, {"command": command, "graphs": nnzs, "n": args.n, "d": args.d, "threads": args.threads,
                                   "copy_gb_s": bw, "machine": machine_line(), "cases": records})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
