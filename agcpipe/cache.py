"""Cache management of the artifact store: list artifacts, and garbage-collect them by age and size.

``agcpipe cache ls`` lists every artifact ``<store>/<stage>/<key>/`` with its size and last-used time
(the mtime of its ``_artifact.json``, touched by every :meth:`Store.get` and, for every stage of a
tracked run, by the track step, so cache hits through Prefect count as uses too).

``agcpipe cache gc --keep-days N --max-size SIZE`` removes, least recently used first, the artifacts
not used for N days and then as many more as needed to bring the store under SIZE, except:

* **protected** artifacts, which a registered model version still needs: the model bundle (the
  version's ``agcpipe.model_key`` tag) and the stage artifacts it was built from (the version's
  ``agcpipe.lineage.<stage>`` tags, written at registration; for versions registered before those
  tags existed, the bundle's ``model.json`` ``training.keys``). The registry is read from the same
  MLflow backend the runs use; when it cannot be read, gc deletes nothing.
* artifacts used within the grace period (default 10 minutes): a running flow may be reading them.

Removal is safe against concurrent runs: the artifact folder is first renamed to a ``.trash-*`` name
(atomic; lookups then see a missing artifact and recompute it), its last-used time is checked again (a
run that looked it up just before the rename touched it: the folder is renamed back), then the
matching Prefect cache record ``<store>/.prefect-results/<stage>-<key>`` is deleted (Prefect never
returns a result whose artifact is gone), then the folder. Prefect records whose artifact no longer
exists are swept as well.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .store import ARTIFACT_META, Store

#: Prefect's result folder inside the store (same as :data:`agcpipe.orchestration.RESULTS_DIR`, not
#: imported from there: that module imports Prefect)
RESULTS_DIR = ".prefect-results"
MODEL_KEY_TAG = "agcpipe.model_key"
LINEAGE_TAG = "agcpipe.lineage."
#: stages in pipeline order, for sorting (other stage folders sort after them, by name)
STAGE_ORDER = ("ingest", "precompute", "train", "cluster", "evaluate", "model", "report")
DEFAULT_GRACE_S = 600.0


@dataclass
class Entry:
    stage: str
    key: str
    path: Path
    size: int
    last_used: float
    valid: bool = True
    protected_by: list[str] = field(default_factory=list)

    @property
    def protected(self) -> bool:
        return bool(self.protected_by)


# ------------------------------------------------------------------------------------------ sizes
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    """``10G``, ``500M``, ``1.5GiB``, ``200k``, ``1048576`` -> bytes (binary units: 1K = 1024)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"size {text!r} is not a number with an optional unit K, M, G, T (e.g. 10G, 500M)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} T"  # pragma: no cover


def parse_duration(text: str) -> float:
    """``0``, ``90``, ``30s``, ``10m``, ``2h``, ``1d`` -> seconds (a bare number is seconds)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not m:
        raise ConfigError(f"duration {text!r} is not a number with an optional unit s, m, h, d (e.g. 10m)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


# ------------------------------------------------------------------------------------------ scanning
def scan(store: Store) -> list[Entry]:
    """Every artifact folder of the store (valid or not; temp / trash folders are not artifacts)."""
    out: list[Entry] = []
    if not store.root.is_dir():
        return out
    for stage_dir in sorted(store.root.iterdir()):
        if not stage_dir.is_dir() or stage_dir.name.startswith("."):
            continue
        for path in stage_dir.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            entry = _entry(store, stage_dir.name, path)
            if entry is not None:
                out.append(entry)
    return out


def _entry(store: Store, stage: str, path: Path) -> Entry | None:
    meta_path = path / ARTIFACT_META
    meta = store._check(path)
    try:
        if meta is not None:
            size = sum(int(s) for s in meta["files"].values()) + meta_path.stat().st_size
            return Entry(stage, path.name, path, size, meta_path.stat().st_mtime, True)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        used = meta_path.stat().st_mtime if meta_path.exists() else path.stat().st_mtime
        return Entry(stage, path.name, path, size, used, False)
    except OSError:  # removed while scanning
        return None


def sort_entries(entries: list[Entry], by: str = "stage") -> list[Entry]:
    """``stage`` (pipeline order, then most recently used first), ``used`` (most recent first), ``size`` (largest first)."""
    if by == "used":
        return sorted(entries, key=lambda e: (-e.last_used, e.stage, e.key))
    if by == "size":
        return sorted(entries, key=lambda e: (-e.size, e.stage, e.key))
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return sorted(entries, key=lambda e: (order.get(e.stage, len(order)), e.stage, -e.last_used, e.key))


def touch(store: Store, pairs: Iterable[tuple[str, str]]) -> None:
    """Mark artifacts as used now (the track step calls this for every stage of the run)."""
    for stage, key in pairs:
        with contextlib.suppress(OSError):
            os.utime(store.path(stage, key) / ARTIFACT_META)


# ------------------------------------------------------------------------------------------ protection
def lineage_tags(bundle_dir: str | Path) -> dict[str, str]:
    """``agcpipe.lineage.<stage>`` = key for every stage artifact a model bundle was built from."""
    try:
        keys = json.loads((Path(bundle_dir) / "model.json").read_text())["training"]["keys"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {f"{LINEAGE_TAG}{stage}": str(key) for stage, key in keys.items()}


def protected_artifacts(client, store: Store) -> dict[tuple[str, str], list[str]]:
    """(stage, key) -> the registered model versions ('name vN') that need it, over every registered model."""
    out: dict[tuple[str, str], list[str]] = {}
    token = None
    while True:
        page = client.search_model_versions(max_results=10000, page_token=token)
        for mv in page:
            tags = mv.tags or {}
            model_key = tags.get(MODEL_KEY_TAG)
            if not model_key:
                continue  # not an agcpipe model
            who = f"{mv.name} v{mv.version}"
            needed = {("model", model_key)}
            lineage = {k[len(LINEAGE_TAG):]: v for k, v in tags.items() if k.startswith(LINEAGE_TAG)}
            if not lineage:  # registered before lineage tags: read the bundle
                lineage = {k[len(LINEAGE_TAG):]: v for k, v in lineage_tags(store.path("model", model_key)).items()}
            needed |= set(lineage.items())
            for pair in needed:
                out.setdefault(pair, []).append(who)
        token = getattr(page, "token", None)
        if not token:
            return out


def mark_protected(entries: list[Entry], protected: dict[tuple[str, str], list[str]]) -> None:
    for e in entries:
        e.protected_by = sorted(protected.get((e.stage, e.key), []))


# ------------------------------------------------------------------------------------------ gc
@dataclass
class Plan:
    remove: list[tuple[Entry, str]]  # (entry, why)
    keep_protected: list[Entry]
    keep_recent: list[Entry]  # inside the grace period although a policy selected them
    total_before: int
    total_after: int
    max_size: int | None

    @property
    def size_target_met(self) -> bool:
        return self.max_size is None or self.total_after <= self.max_size


def plan_gc(entries: list[Entry], *, keep_days: float | None = None, max_size: int | None = None, grace_s: float = DEFAULT_GRACE_S, now: float | None = None) -> Plan:
    """What gc removes: invalid folders, then unused for ``keep_days``, then LRU until under ``max_size``."""
    if keep_days is None and max_size is None:
        raise ConfigError("cache gc needs --keep-days N and/or --max-size SIZE")
    if keep_days is not None and keep_days < 0:
        raise ConfigError(f"--keep-days must be >= 0, got {keep_days}")
    if max_size is not None and max_size < 0:
        raise ConfigError(f"--max-size must be >= 0, got {max_size}")
    now = time.time() if now is None else now
    total = sum(e.size for e in entries)
    remove: list[tuple[Entry, str]] = []
    chosen: set[int] = set()
    held: dict[int, Entry] = {}
    recent: dict[int, Entry] = {}

    def take(e: Entry, why: str) -> bool:
        if e.protected:
            held[id(e)] = e
            return False
        if e.valid and now - e.last_used < grace_s:
            recent[id(e)] = e
            return False
        remove.append((e, why))
        chosen.add(id(e))
        return True

    lru = sorted(entries, key=lambda e: (e.last_used, e.stage, e.key))
    for e in lru:  # incomplete folders are never returned by a lookup: always garbage
        if not e.valid and not e.protected:
            take(e, "incomplete")
    if keep_days is not None:
        cutoff = now - keep_days * 86400
        for e in lru:
            if id(e) not in chosen and e.last_used < cutoff:
                take(e, f"unused for {(now - e.last_used) / 86400:.1f} days (> {keep_days:g})")
    remaining = total - sum(e.size for e, _ in remove)
    if max_size is not None:
        for e in lru:
            if remaining <= max_size:
                break
            if id(e) in chosen:
                continue
            if take(e, f"least recently used; store over {format_size(max_size)}"):
                remaining -= e.size
    return Plan(remove, list(held.values()), [e for i, e in recent.items() if i not in chosen], total, remaining, max_size)


def remove_artifact(store: Store, entry: Entry) -> bool:
    """Remove one artifact safely (see the module docstring); False when a run used it meanwhile."""
    path = store.path(entry.stage, entry.key)
    trash = path.parent / f".trash-{entry.key}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        trash = None  # already gone: still drop Prefect's record
    except OSError:
        return False
    if trash is not None and entry.valid:
        try:
            used = (trash / ARTIFACT_META).stat().st_mtime
        except OSError:
            used = entry.last_used
        if used > entry.last_used:  # looked up between the scan and the rename: give it back
            with contextlib.suppress(OSError):
                os.rename(trash, path)
                return False
    (store.root / RESULTS_DIR / f"{entry.stage}-{entry.key}").unlink(missing_ok=True)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return True


def sweep_prefect_records(store: Store, dry_run: bool = False) -> list[str]:
    """Prefect records ``<stage>-<key>`` whose artifact folder no longer exists (removed unless dry_run)."""
    folder = store.root / RESULTS_DIR
    out = []
    if not folder.is_dir():
        return out
    for rec in folder.iterdir():
        stage, sep, key = rec.name.partition("-")
        if not sep or not rec.is_file() or not re.fullmatch(r"[0-9a-f]{16,64}", key):
            continue
        if not store.path(stage, key).exists():
            out.append(rec.name)
            if not dry_run:
                rec.unlink(missing_ok=True)
    return out


def gc(store: Store, registry, *, keep_days: float | None = None, max_size: int | None = None, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False, force: bool = False) -> dict[str, Any]:
    """Plan and (unless ``dry_run``) apply a gc; returns what was (or would be) removed and kept.

    Refuses (deleting nothing) when the registry cannot be read, and when the store holds model
    bundles but the registry knows no agcpipe model version at all (most likely the wrong registry:
    ``--tracking-uri`` / ``MLFLOW_TRACKING_URI``) unless ``force``.
    """
    plan_gc([], keep_days=keep_days, max_size=max_size)  # argument errors before reading the registry
    entries = scan(store)
    protected = _protected_or_fail(registry, store)
    bundles = sum(e.stage == "model" for e in entries)
    if bundles and not protected and not force:
        uri = registry if isinstance(registry, str) else registry.tracking_uri
        raise ConfigError(
            f"the model registry at {uri} has no agcpipe model versions, but the store holds "
            f"{bundles} model bundles: is it the registry these models were registered in (--tracking-uri, "
            "MLFLOW_TRACKING_URI)? Nothing was deleted; pass --force to collect without protection"
        )
    mark_protected(entries, protected)
    plan = plan_gc(entries, keep_days=keep_days, max_size=max_size, grace_s=grace_s)
    removed, skipped = [], []
    for e, why in plan.remove:
        if dry_run or remove_artifact(store, e):
            removed.append((e, why))
        else:
            skipped.append(e)
    records = sweep_prefect_records(store, dry_run=dry_run)
    if not dry_run:
        store.clean_stale()
    freed = sum(e.size for e, _ in removed)
    return {
        "plan": plan,
        "removed": removed,
        "skipped_in_use": skipped,
        "orphan_records": records,
        "freed": freed,
        "total_before": plan.total_before,
        "total_after": plan.total_before - freed,
        "dry_run": dry_run,
    }


# ------------------------------------------------------------------------------------------ CLI
def add_parser(sub) -> None:
    """``agcpipe cache ls | gc``."""
    c = sub.add_parser("cache", help="the artifact store: list artifacts, garbage-collect")
    csub = c.add_subparsers(dest="cache_cmd", required=True)

    def common(sp):
        sp.add_argument("--store", help="artifact store (default: AGCPIPE_STORE or <data>/store)")
        sp.add_argument("--tracking-uri", help="MLflow registry whose model versions protect artifacts (default: MLFLOW_TRACKING_URI or the local SQLite store)")
        return sp

    ls = common(csub.add_parser("ls", help="artifacts with size and last use, and totals"))
    ls.add_argument("--sort", choices=("stage", "used", "size"), default="stage", help="stage (pipeline order, newest first; default), used (newest first), size (largest first)")
    gcp = common(csub.add_parser("gc", help="remove unused artifacts (never those a registered model version needs)"))
    gcp.add_argument("--keep-days", type=float, help="remove artifacts not used for N days")
    gcp.add_argument("--max-size", help="then remove least recently used artifacts until the store is under SIZE (e.g. 10G, 500M)")
    gcp.add_argument("--grace", default="10m", help="never remove artifacts used this recently (a running flow may read them); default 10m, 0 to disable")
    gcp.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    gcp.add_argument("--force", action="store_true", help="collect even when the registry knows no agcpipe model although the store holds model bundles")


def _protected_or_fail(registry, store: Store) -> dict[tuple[str, str], list[str]]:
    """protected_artifacts from ``registry`` (an MlflowClient, or a tracking URI); ConfigError if unreadable."""
    uri = registry if isinstance(registry, str) else registry.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return {}  # no database, no registered model (and MLflow must not create one here)
    try:
        if isinstance(registry, str):
            from .registry import get_client

            registry = get_client(uri)
        return protected_artifacts(registry, store)
    except Exception as e:  # noqa: BLE001 - unreachable / broken registry: delete nothing
        raise ConfigError(f"cannot read the model registry at {uri} ({type(e).__name__}: {str(e)[:300]}); nothing was deleted") from None


def _when(ts: float, now: float) -> str:
    age = now - ts
    ago = f"{age / 86400:.1f} d ago" if age >= 86400 else f"{age / 3600:.1f} h ago" if age >= 3600 else f"{max(age, 0) / 60:.0f} min ago"
    return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(ts))} ({ago})"


def cli(args) -> int:
    from rich.table import Table

    from .registry import _console
    from .settings import store_root, tracking_uri

    console = _console()
    store = Store(store_root(args.store))
    uri = tracking_uri(args.tracking_uri)
    now = time.time()
    if args.cache_cmd == "ls":
        entries = scan(store)
        try:
            mark_protected(entries, _protected_or_fail(uri, store))
            protection = True
        except ConfigError as e:  # listing still works without the registry
            console.print(f"[yellow]warning:[/] {str(e).replace('; nothing was deleted', '')}; protection not shown")
            protection = False
        if not entries:
            console.print(f"no artifacts in {store.root}")
            return 0
        t = Table("stage", "key", "size", "last used", "protected by" if protection else "protected by (?)", title=f"artifacts in {store.root}")
        for e in sort_entries(entries, args.sort):
            t.add_row(e.stage, e.key + ("" if e.valid else " [red](incomplete)[/]"), format_size(e.size), _when(e.last_used, now), ", ".join(e.protected_by))
        console.print(t)
        totals = Table("stage", "artifacts", "size", "protected", title="totals")
        stages = sort_entries(entries, "stage")
        for stage in dict.fromkeys(e.stage for e in stages):
            group = [e for e in entries if e.stage == stage]
            totals.add_row(stage, str(len(group)), format_size(sum(e.size for e in group)), str(sum(e.protected for e in group)))
        totals.add_row("[b]all[/]", f"[b]{len(entries)}[/]", f"[b]{format_size(sum(e.size for e in entries))}[/]", f"[b]{sum(e.protected for e in entries)}[/]")
        console.print(totals)
        return 0
    # gc
    max_size = parse_size(args.max_size) if args.max_size is not None else None
    grace = parse_duration(args.grace)
    out = gc(store, uri, keep_days=args.keep_days, max_size=max_size, grace_s=grace, dry_run=args.dry_run, force=args.force)
    plan, removed, skipped, records = out["plan"], out["removed"], out["skipped_in_use"], out["orphan_records"]
    verb = "would remove" if args.dry_run else "removed"
    if removed:
        t = Table("stage", "key", "size", "last used", "why", title=f"{verb} {len(removed)} artifacts")
        for e, why in removed:
            t.add_row(e.stage, e.key, format_size(e.size), _when(e.last_used, now), why)
        console.print(t)
    freed = sum(e.size for e, _ in removed)
    console.print(f"{verb} {len(removed)} artifacts, {format_size(freed)}; store {format_size(plan.total_before)} -> {format_size(plan.total_before - freed)}")
    if records:
        console.print(f"{verb} {len(records)} Prefect cache records without an artifact")
    if plan.keep_protected:
        console.print(f"kept {len(plan.keep_protected)} artifacts a registered model version needs ({format_size(sum(e.size for e in plan.keep_protected))})")
    if plan.keep_recent:
        console.print(f"kept {len(plan.keep_recent)} artifacts used within the last {args.grace} (--grace)")
    if skipped:
        console.print(f"kept {len(skipped)} artifacts a run used while gc ran")
    if not plan.size_target_met:
        console.print(f"[yellow]note:[/] the store stays over --max-size {args.max_size}: the rest is protected or recently used")
    return 0
