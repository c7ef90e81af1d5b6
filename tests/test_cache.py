"""Cache management: `agcpipe cache ls` and `cache gc` (keep-days and max-size policies), protection of
what registered model versions need, removal of Prefect's records with their artifacts, concurrency
safety, and a later run recomputing exactly what was removed."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from agcpipe import cache
from agcpipe.cache import Entry, parse_duration, parse_size, plan_gc
from agcpipe.cli import main as cli
from agcpipe.config import load_config
from agcpipe.errors import ConfigError
from agcpipe.store import ARTIFACT_META, Store
from integration_support import small_synthetic, statuses

ALL = ("ingest", "precompute", "train", "cluster", "evaluate")


# ------------------------------------------------------------------------------------------ units
def test_parse_size_and_duration():
    assert parse_size("10G") == 10 << 30 and parse_size("500M") == 500 << 20 and parse_size("1.5k") == 1536
    assert parse_size("2GiB") == 2 << 30 and parse_size("3 MB") == 3 << 20 and parse_size("123") == 123 and parse_size("0") == 0
    for bad in ("10X", "G", "-1G", ""):
        with pytest.raises(ConfigError, match="size"):
            parse_size(bad)
    assert parse_duration("0") == 0 and parse_duration("30s") == 30 and parse_duration("10m") == 600 and parse_duration("2h") == 7200 and parse_duration("1d") == 86400
    with pytest.raises(ConfigError):
        parse_duration("soon")
    assert cache.RESULTS_DIR == __import__("agcpipe.orchestration", fromlist=["RESULTS_DIR"]).RESULTS_DIR


def _e(stage, key, size, days_ago, protected=(), valid=True, now=1_000_000_000.0):
    return Entry(stage, key, Path("/x") / stage / key, size, now - days_ago * 86400, valid, list(protected))


def test_plan_policies():
    now = 1_000_000_000.0
    entries = [
        _e("ingest", "old-protected", 500, 30, protected=["m v1"]),
        _e("cluster", "old", 100, 20),
        _e("cluster", "mid", 100, 6),
        _e("report", "new", 100, 1),
        _e("evaluate", "fresh", 100, 0.001),  # 86 s ago: inside the grace period
        _e("train", "broken", 7, 2, valid=False),
    ]
    p = plan_gc(entries, keep_days=10, now=now)
    assert [(e.key, why.split()[0]) for e, why in p.remove] == [("broken", "incomplete"), ("old", "unused")]
    assert [e.key for e in p.keep_protected] == ["old-protected"]
    p = plan_gc(entries, max_size=650, now=now)  # 907 in all: LRU until <= 650 (protected and fresh kept)
    assert [e.key for e, _ in p.remove] == ["broken", "old", "mid", "new"] and p.total_after == 600 and p.size_target_met is True
    p = plan_gc(entries, max_size=0, now=now)
    assert "fresh" not in [e.key for e, _ in p.remove] and [e.key for e in p.keep_recent] == ["fresh"] and not p.size_target_met
    p = plan_gc(entries, max_size=0, now=now, grace_s=0)
    assert [e.key for e, _ in p.remove] == ["broken", "old", "mid", "new", "fresh"]
    p = plan_gc(entries, keep_days=5, max_size=10_000, now=now)  # both: keep-days first, size already met
    assert [e.key for e, _ in p.remove] == ["broken", "old", "mid"]
    with pytest.raises(ConfigError, match="--keep-days"):
        plan_gc(entries)


def test_remove_is_safe_against_a_concurrent_lookup(tmp_path):
    store = Store(tmp_path / "store")
    with store.build("cluster", "k1") as d:
        (d / "labels.npy").write_bytes(b"x" * 10)
    res = store.root / ".prefect-results"
    res.mkdir()
    (res / "cluster-k1").write_text("{}")
    old = time.time() - 5 * 86400
    os.utime(store.path("cluster", "k1") / ARTIFACT_META, (old, old))
    [entry] = cache.scan(store)
    assert entry.valid and entry.size > 10 and abs(entry.last_used - old) < 1
    store.get("cluster", "k1")  # a run looks it up after gc's scan: touches it
    assert cache.remove_artifact(store, entry) is False  # renamed back, not deleted
    assert store.is_valid("cluster", "k1") and (res / "cluster-k1").exists()
    assert not [p for p in (store.root / "cluster").iterdir() if p.name.startswith(".trash-")]
    [entry] = cache.scan(store)
    assert cache.remove_artifact(store, entry) is True
    assert not store.path("cluster", "k1").exists() and not (res / "cluster-k1").exists()
    # an orphan Prefect record (artifact deleted by hand) is swept
    (res / ("train-" + "ab" * 16)).write_text("{}")
    assert cache.sweep_prefect_records(store, dry_run=True) == ["train-" + "ab" * 16]
    assert cache.sweep_prefect_records(store) == ["train-" + "ab" * 16] and not any(res.iterdir())


# ------------------------------------------------------------------------------------------ whole flows
def _flow(cfg):
    from agcpipe.orchestration import run_flow

    return run_flow(cfg)


def _age(store: Store, pairs, days: float) -> None:
    t = time.time() - days * 86400
    for stage, key in pairs:
        os.utime(store.path(stage, key) / ARTIFACT_META, (t, t))


def test_cache_ls_gc_protects_registered_models_and_recomputes(prefect_harness, home, capsys, monkeypatch):
    store = Store(home / "store")
    results = store.root / ".prefect-results"
    kept_cfg = load_config(None, small_synthetic(name="kept"))
    kept = _flow(kept_cfg)  # registered: its artifacts are protected
    assert kept.track["model_status"] == "registered"
    loose_cfg = load_config(None, small_synthetic(name="loose", **{"seed": 11, "method.params.K": 3, "tracking.register_model": "false"}))
    loose = _flow(loose_cfg)
    kept_keys = {s.stage: s.key for s in kept.stages[:5]}
    loose_keys = {s.stage: s.key for s in loose.stages[:5]}
    assert kept_keys["ingest"] == loose_keys["ingest"]  # same graph: shared, and protected by the model
    only_loose = {s: k for s, k in loose_keys.items() if k != kept_keys[s]}
    assert set(only_loose) == {"precompute", "train", "cluster", "evaluate"}
    for s, k in only_loose.items():
        assert (results / f"{s}-{k}").is_file()  # Prefect's cache records exist

    model_key = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}", registry_uri=f"sqlite:///{home / 'mlflow.db'}").get_model_version("agcpipe-kept", "1").tags["agcpipe.model_key"]

    # ls: every artifact, sizes, last use, protection, totals
    assert cli(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    for k in (*kept_keys.values(), *loose_keys.values(), model_key):
        assert k in out
    assert "agcpipe-kept v1" in out and "totals" in out and "all" in out
    assert cli(["cache", "ls", "--sort", "size"]) == 0
    capsys.readouterr()

    # keep-days: only the old, unprotected artifacts go (dry run first: nothing removed)
    _age(store, [*kept_keys.items(), *loose_keys.items(), ("model", model_key)], days=30)
    assert cli(["cache", "gc", "--keep-days", "7", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove" in out and all(store.is_valid(s, k) for s, k in loose_keys.items())
    assert cli(["cache", "gc", "--keep-days", "7"]) == 0
    out = capsys.readouterr().out
    assert "kept 5 artifacts a registered model version needs" in out, out  # ingest, precompute, train, cluster, model
    for s, k in only_loose.items():
        assert not store.path(s, k).exists(), s
        assert not (results / f"{s}-{k}").exists(), s  # Prefect's record went with the artifact
    for s in ("ingest", "precompute", "train", "cluster"):
        assert store.is_valid(s, kept_keys[s]) and (results / f"{s}-{kept_keys[s]}").exists()
    assert store.is_valid("model", model_key)
    assert not store.path("evaluate", kept_keys["evaluate"]).exists()  # a model does not need its evaluation

    # a later run recomputes exactly what was removed; Prefect returns no stale result
    again = _flow(loose_cfg)
    st = statuses(again)
    assert st["ingest"] == "cached" and all(st[s] == "computed" for s in only_loose), st
    assert again.metrics == loose.metrics
    assert statuses(_flow(kept_cfg))["evaluate"] == "computed"

    # max-size: least recently used unprotected artifacts until under the size; protected ones survive
    for stage_dir in store.root.iterdir():
        if not stage_dir.name.startswith("."):
            for art in stage_dir.iterdir():
                _age(store, [(stage_dir.name, art.name)], days=1)
    assert cli(["cache", "gc", "--max-size", "1K", "--grace", "0"]) == 0
    out = capsys.readouterr().out
    assert "stays over --max-size 1K" in out
    left = {(e.stage, e.key) for e in cache.scan(store)}
    assert left == {*((s, kept_keys[s]) for s in ("ingest", "precompute", "train", "cluster")), ("model", model_key)}
    recs = {p.name for p in results.iterdir()}
    assert recs == {f"{s}-{kept_keys[s]}" for s in ("ingest", "precompute", "train", "cluster")}

    # versions registered before lineage tags: protection falls back to the bundle's model.json
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}", registry_uri=f"sqlite:///{home / 'mlflow.db'}")
    for s in ("ingest", "precompute", "train", "cluster"):
        client.delete_model_version_tag("agcpipe-kept", "1", f"agcpipe.lineage.{s}")
    prot = cache.protected_artifacts(client, store)
    assert {("model", model_key), *((s, kept_keys[s]) for s in ("ingest", "precompute", "train", "cluster"))} <= set(prot)
    assert json.loads((store.path("model", model_key) / "model.json").read_text())["training"]["keys"]["cluster"] == kept_keys["cluster"]

    # the wrong registry (no database there, or one without agcpipe models): gc deletes nothing
    missing = home / "missing" / "x.db"
    assert cli(["cache", "gc", "--max-size", "0", "--grace", "0", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert "Nothing was deleted" in capsys.readouterr().err and not missing.parent.exists()
    assert {(e.stage, e.key) for e in cache.scan(store)} == left
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    assert cli(["cache", "gc", "--max-size", "0", "--grace", "0", "--tracking-uri", "http://127.0.0.1:9/"]) == 2  # unreachable
    assert "nothing was deleted" in capsys.readouterr().err
    assert {(e.stage, e.key) for e in cache.scan(store)} == left
