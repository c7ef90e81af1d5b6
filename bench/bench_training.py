"""Training benchmark: one mini-batch epoch of each trainable method on a large synthetic graph.

    python bench/bench_training.py [--n 1000000 --avg-degree 20 --d 64 --k 50 --methods gae dgi node2vec
                                    --epochs 1 --threads N --embed --json bench/results/training.json]

The graph is the synthetic attributed SBM of the ingest stage (``--avg-degree 20`` = 10M undirected edges
for 1M nodes), with its raw features as the precomputed input (``op: identity``, preprocess none). Each
method then trains ``--epochs`` epoch(s) in mini-batch mode, in a fresh process (seconds and peak RSS
measured there, see bench/common.py; the peak includes the interpreter, torch and the memory-mapped graph
pages the run touched). ``--embed`` also times the embedding of all N nodes with the trained model
(layer-wise inference for GNN encoders).

Adding a method = adding a row to ``CASES``: the method name, its parameters for the benchmark and the
generic ``train:`` settings (mode is always ``minibatch``; ``epochs`` comes from ``--epochs``).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# imported at module level so that each spawned case has them loaded before its timer starts
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch_geometric  # noqa: E402,F401

from agcpipe.config import GraphOptions, SyntheticSource, TrainConfig  # noqa: E402
from agcpipe.data.graph import Graph  # noqa: E402
from agcpipe.data.ingest import ingest  # noqa: E402
from agcpipe.methods import registry  # noqa: E402
from agcpipe.methods.base import MethodContext  # noqa: E402
from agcpipe.ops.features import compute_features  # noqa: E402
from bench.common import gib, measure, print_table, write_json  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One benchmark row: a registered method, its parameters and its ``train:`` settings."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    note: str = ""


#: the rows: every trainable method, at its published (or PyAGC's) settings unless the note says otherwise
CASES: dict[str, Case] = {
    "gae": Case("gae", {}, {"batch_size": 2048, "fanout": [10, 10]}, "published encoder 256-64"),
    "dgi": Case("dgi", {}, {"batch_size": 2048, "fanout": [10]}, "published encoder: 1 x GCN 512, PReLU"),
    "dmon": Case("dmon", {}, {"batch_size": 2048, "fanout": [10]}, "PyAGC Cora encoder: 1 x GCN 64; 10 draws per seed, k = 50"),
    "mincut": Case("mincut", {}, {"batch_size": 2048, "fanout": [5, 5]}, "PyAGC Cora encoder: GCN 128-128; 10 draws per seed, k = 50"),
    "neuromap": Case("neuromap", {}, {"batch_size": 2048, "fanout": [10]}, "1 x GCN 64; 10 draws per seed, k = 50 (PageRank flow before the epoch: 0.75 s)"),
    "gcsbm": Case("gcsbm", {}, {"batch_size": 2048, "fanout": [10]}, "1 x GCN 64, bernoulli, eta 3; 10 draws per seed, k = 50"),
    "node2vec": Case(
        "node2vec",
        {"walks_per_node": 1, "walk_length": 10, "context_size": 5, "sparse": True},
        {"batch_size": 4096},
        "dim 128, 1 walk of 10 steps per node, window 5, SparseAdam",
    ),
    "arga": Case("arga", {}, {"batch_size": 2048, "fanout": [10, 10]}, "paper: encoder 32-16, discriminator 64-32"),
    "s3gc": Case(
        "s3gc",
        {"walk_length": 4, "context_size": 5, "walks_per_node": 10},
        {"batch_size": 1024},
        "medium (MLP f, g), hidden 256, 10 walks of 5 nodes, sparse I + SparseAdam",
    ),
    "magi": Case(
        "magi",
        {"encoder": {"type": "gcn", "hidden": 512, "layers": 1, "activation": "leaky_relu", "last_activation": False}, "num_walks": 20, "walk_length": 4, "tau": 0.5, "dropout": 0.0, "scale_embeddings": False, "lr": 0.01, "weight_decay": 0.0},
        {"batch_size": 512, "fanout": [10]},
        "GCN 512, 20 walks of 4 steps, 512 seeds (~10x expanded)",
    ),
    "ccassg": Case("ccassg", {}, {"batch_size": 2048, "fanout": [10, 10]}, "published encoder GCN 512-512; 2 augmented views of each sampled subgraph"),
    "gbt": Case("gbt", {}, {"batch_size": 2048, "fanout": [10, 10]}, "published encoder GCN 512-256, batch norm; 2 augmented views"),
    "ns4gc": Case("ns4gc", {}, {"batch_size": 2048, "fanout": [10, 10]}, "published encoder GCN 256-64; seeds + 1 neighbour each, 2 views, B x B sparsity pairs"),
    "daegc": Case(
        "daegc",
        {"encoder": {"type": "gat", "hidden": 64, "layers": 2, "heads": 1, "activation": "elu", "last_activation": False},
         "pretrain_epochs": 1, "init_n_init": 1, "init_sample": 50000},
        {"batch_size": 2048, "fanout": [10, 10]},
        "GAT 64-64; 1 pretrain epoch, KMeans init on 50k of the layer-wise embeddings, P from layer-wise inference; joint epoch",
    ),
    "dinknet": Case(
        "dinknet",
        {"pretrain_epochs": 1, "init_n_init": 1, "init_sample": 50000},
        {"batch_size": 2048, "fanout": [10]},
        "published encoder GCN 512; 1 pretrain epoch, KMeans init on 50k of the layer-wise embeddings; joint epoch",
    ),
    "diffpool": Case("diffpool", {}, {"batch_size": 2048, "fanout": [10, 10]}, "GCN 64-64 + linear head; seeds + 1 neighbour each (unbiased ||A - SS^T||^2)"),
}


def ingest_case(out: str, n: int, avg_degree: float, d: int, k: int) -> dict:
    src = SyntheticSource(type="synthetic", n_nodes=n, n_communities=k, avg_degree=avg_degree, within_between=4.0 * (k - 1), n_features=d, feature_signal=1.0, seed=0)
    m = ingest(src, GraphOptions(), Path(out))
    return {"n_nodes": m["n_nodes"], "n_edges": m["n_edges"], "nnz": m["nnz"]}


def train_case(graph: str, work: str, name: str, epochs: int, threads: int | None, embed: bool) -> dict:
    import time

    case = CASES[name]
    method = registry.get(case.method).build(case.params)
    g = Graph.open(graph)
    feats = Path(work) / "features"
    feats.mkdir(parents=True, exist_ok=True)
    specs = method.precompute_ops()
    features = {s["name"]: np.load(feats / f"{s['name']}.npy", mmap_mode="r") for s in specs}  # written by main()
    run = Path(work) / name
    (run / "state").mkdir(parents=True, exist_ok=True)
    (run / "work").mkdir(exist_ok=True)
    train = TrainConfig(mode="minibatch", epochs=epochs, checkpoint_every=0, checkpoint_seconds=0, progress=False, threads=threads, **case.train)
    ctx = MethodContext(graph=g, features=features, n_clusters=50, seed=0, device="cpu", state_dir=run / "state", work_dir=run / "work", train=train)
    info = method.fit(ctx)
    out = {k: info[k] for k in ("epochs_run", "seconds", "seconds_per_epoch", "steps", "final_loss", "n_parameters")}
    out["plan"] = info["plan"]
    if embed:
        t0 = time.perf_counter()
        emb = method.embed(ctx)
        out["embed_seconds"] = time.perf_counter() - t0
        out["embed_shape"] = list(emb.shape)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--avg-degree", type=float, default=20.0)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--methods", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads while training (default: torch's)")
    ap.add_argument("--embed", action="store_true", help="also time the embedding of all nodes")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    command = "python bench/bench_training.py " + shlex.join(sys.argv[1:])
    rows, records = [], []
    with tempfile.TemporaryDirectory(prefix="agcpipe-bench-train-") as tmp:
        graph = Path(tmp) / "graph"
        graph.mkdir()
        r = measure(ingest_case, str(graph), a.n, a.avg_degree, a.d, a.k)
        g = r["result"]
        records.append({"case": "ingest", **g, "seconds": r["seconds"], "peak_rss": r["peak_rss"]})
        # every case reads precomputed matrices: compute each distinct op once, outside the timed cases
        feats = Path(tmp) / "work" / "features"
        feats.mkdir(parents=True)
        specs = {s["name"]: s for name in a.methods for s in registry.get(CASES[name].method).build(CASES[name].params).precompute_ops()}
        if specs:
            compute_features(Graph.open(graph), list(specs.values()), "none", feats)
        for name in a.methods:
            case = CASES[name]
            r = measure(train_case, str(graph), str(Path(tmp) / "work"), name, a.epochs, a.threads, a.embed)
            res = r["result"]
            plan = res["plan"]
            per_epoch = res["seconds_per_epoch"]
            row = [
                name,
                case.note,
                plan["batch_size"],
                str(plan["fanout"]) if plan["fanout"] else "-",
                res["steps"] // max(res["epochs_run"], 1),
                f"{per_epoch:.1f}",
                f"{res['final_loss']:.4f}",
                gib(r["peak_rss"]),
                gib(r["baseline_rss"]),
            ]
            if a.embed:
                row.append(f"{res['embed_seconds']:.1f}")
            rows.append(row)
            # one line per finished case, so that a long run shows (and keeps) what it measured so far
            print(f"{name}: epoch {per_epoch:.1f} s, peak RSS {gib(r['peak_rss'])} GiB", flush=True)
            records.append({"case": name, **res, "fit_seconds": r["seconds"], "peak_rss": r["peak_rss"], "baseline_rss": r["baseline_rss"]})
    cols = ["method", "setting", "batch", "fanout", "steps/epoch", "epoch s", "loss", "peak RSS GiB", "baseline GiB"]
    if a.embed:
        cols.append("embed all s")
    print_table(
        f"One mini-batch training epoch, synthetic SBM N={g['n_nodes']:,} E={g['n_edges']:,} d={a.d}",
        cols,
        rows,
        command,
    )
    if a.json:
        write_json(a.json, {"command": command, "args": vars(a), "threads": torch.get_num_threads(), "cases": records})


if __name__ == "__main__":
    main()
