"""Clustering quality over several seeds: mean +- std of each metric, and stage seconds.

    python bench/quality.py flows/configs/cora_ssgc.yaml --seeds 5 [--set key=value ...] [--json PATH] [--memory]

Runs the pipeline in-process (no Prefect, no MLflow) against a scratch store unless --store is given;
stages that do not depend on the seed (ingest, precompute, non-parametric train) are computed once and
cached for the other seeds, as in a real re-run. ``train_s`` is reported over the seeds whose train stage
ran (trainable methods: every seed). ``--memory`` runs each seed in a fresh process (bench/common.py) and
adds its peak RSS (interpreter and libraries included).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_json  # noqa: E402

METRICS = ("acc", "nmi", "ari", "f1_macro", "modularity", "conductance")


def run_seed(config: str | None, seed: int, overrides: list[str], store: str) -> dict:
    from agcpipe.config import load_config
    from agcpipe.pipeline import run_pipeline

    cfg = load_config(config, [*overrides, f"seed={seed}", "tracking.enabled=false", f"store={store}"])
    s = run_pipeline(cfg)
    return {
        "seed": seed,
        **{m: s.metrics.get(m) for m in METRICS},
        **{f"{x.stage}_s": x.seconds for x in s.stages},
        "train_status": s.stage("train").status,
        "method": cfg.method.name,
        "params": cfg.method.params,
    }


def run(config: str | None, seeds: list[int], overrides: list[str], store: str | None, memory: bool = False) -> dict:
    per_seed = []
    with tempfile.TemporaryDirectory(prefix="agcpipe-quality-") as scratch:
        for seed in seeds:
            if memory:
                from bench.common import measure

                m = measure(run_seed, config, seed, overrides, store or scratch)
                per_seed.append({**m["result"], "peak_rss_gib": m["peak_rss"] / 2**30})
            else:
                per_seed.append(run_seed(config, seed, overrides, store or scratch))
    for r in per_seed:  # a cached train stage did no training: no train time to report
        if r.pop("train_status") == "cached":
            r["train_s"] = None
    first = per_seed[0]
    return {"config": config, "method": first.pop("method"), "params": first.pop("params"), "per_seed": [{k: v for k, v in r.items() if k not in ("method", "params")} for r in per_seed]}


def summarize(result: dict) -> list[list]:
    rows = []
    for m in (*METRICS, "precompute_s", "train_s", "cluster_s", "peak_rss_gib"):
        vals = [r[m] for r in result["per_seed"] if r.get(m) is not None]
        if not vals:
            continue
        scale = 100 if m in ("acc", "nmi", "ari", "f1_macro") else 1
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append([m, f"{statistics.mean(vals) * scale:.2f} +- {sd * scale:.2f}", f"{min(vals) * scale:.2f}", f"{max(vals) * scale:.2f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--store", help="artifact store (default: a scratch folder)")
    ap.add_argument("--json")
    ap.add_argument("--memory", action="store_true", help="one fresh process per seed; report its peak RSS")
    a = ap.parse_args()
    result = run(a.config, list(range(a.seeds)), a.overrides, a.store, a.memory)
    # precompute is computed for the first seed and cached afterwards: report the first seed's time
    result["per_seed"][1:] = [{**r, "precompute_s": None} for r in result["per_seed"][1:]]
    cmd = "python bench/quality.py " + " ".join(sys.argv[1:])
    print_table(f"{result['method']} {result['params']} on {a.config or 'default job'}, {a.seeds} seeds (x100 for label metrics)", ["metric", "mean +- std", "min", "max"], summarize(result), cmd)
    if a.json:
        write_json(a.json, result)


if __name__ == "__main__":
    main()
