"""Content-addressed artifact store.

Every stage output lives in ``<root>/<stage>/<key>/`` where ``key`` hashes the stage's input keys, its
own config and its code version (:func:`stage_key`). Writing is atomic: a stage builds its output in a
private temporary folder ``<root>/<stage>/.tmp-<key>-<pid>-<nonce>`` and renames it into place only after
writing ``_artifact.json`` (the list of files with their sizes) last. A folder is a *valid* artifact only
if ``_artifact.json`` exists and every file it lists is present with its recorded size, so

* a stage killed half-way leaves only a ``.tmp-*`` folder, which no lookup ever returns (and which
  :meth:`Store.clean_stale` removes once its process is gone);
* an artifact whose files were deleted or truncated is detected and recomputed, never returned stale;
* two runs racing on the same key both succeed: the second rename loses and its copy is discarded.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

#: bump to invalidate every stored artifact (layout change of the store itself)
STORE_FORMAT = 1
ARTIFACT_META = "_artifact.json"
#: libraries whose version is part of every stage's code version (results may change with them)
_CORE_LIBS = ("numpy", "scipy", "torch", "pyarrow")


# ------------------------------------------------------------------------------------------ hashing
def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def hash_obj(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


@lru_cache(maxsize=None)
def module_files(module: str) -> tuple[Path, ...]:
    """Source files of a module, or of every module below a package."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"cannot find module {module!r}")
    origin = Path(spec.origin)
    if spec.submodule_search_locations:  # a package: every .py below it
        return tuple(sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.py")))
    return (origin,)


def code_version(modules: Sequence[str]) -> str:
    """Hash of the source of ``modules`` (files' contents, not mtimes) and of the core libraries' versions."""
    h = hashlib.sha256()
    for mod in sorted(set(modules)):
        for path in module_files(mod):
            h.update(path.name.encode())
            h.update(_file_digest(path, path.stat().st_mtime_ns, path.stat().st_size).encode())
    h.update(canonical_json(_lib_versions()).encode())
    return h.hexdigest()[:16]


@lru_cache(maxsize=None)
def _file_digest(path: Path, mtime_ns: int, size: int) -> str:  # mtime/size only key the memo
    return hashlib.sha256(path.read_bytes()).hexdigest()


@lru_cache(maxsize=1)
def _lib_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for lib in _CORE_LIBS:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = "absent"
    return out


def stage_key(stage: str, code: Sequence[str], payload: dict[str, Any]) -> str:
    """The cache key of a stage run: its inputs, config and code version."""
    return hash_obj(
        {"stage": stage, "store_format": STORE_FORMAT, "code": code_version(code), "inputs": payload}
    )[:32]


# -------------------------------------------------------------------------------------------- store
@dataclass(frozen=True)
class Artifact:
    stage: str
    key: str
    path: Path
    meta: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    # ---- lookup
    def get(self, stage: str, key: str) -> Artifact | None:
        """The artifact if it exists and is complete, else None (an incomplete one is removed)."""
        path = self.path(stage, key)
        meta = self._check(path)
        if meta is None:
            if path.exists():
                self._discard(path)
            return None
        with contextlib.suppress(OSError):  # last-used time, for cache management
            os.utime(path / ARTIFACT_META)
        return Artifact(stage, key, path, meta)

    def is_valid(self, stage: str, key: str) -> bool:
        return self._check(self.path(stage, key)) is not None

    @staticmethod
    def _check(path: Path) -> dict[str, Any] | None:
        try:
            meta = json.loads((path / ARTIFACT_META).read_text())
            for name, size in meta["files"].items():
                if (path / name).stat().st_size != size:
                    return None
            return meta
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # ---- writing
    @contextlib.contextmanager
    def build(self, stage: str, key: str, info: dict[str, Any] | None = None) -> Iterator[Path]:
        """Yield a private temp folder; on success publish it atomically as ``<stage>/<key>``.

        On any exception (or KeyboardInterrupt) the temp folder is deleted and nothing is published.
        """
        stage_dir = self.root / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = stage_dir / f".tmp-{key}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        t0 = time.time()
        try:
            yield tmp
            files = {
                str(p.relative_to(tmp)): p.stat().st_size
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            }
            meta = {
                "stage": stage,
                "key": key,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.time() - t0, 4),
                "files": files,
                **(info or {}),
            }
            _write_json_durably(tmp / ARTIFACT_META, meta)
            self._publish(tmp, self.path(stage, key))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _publish(self, tmp: Path, final: Path) -> None:
        try:
            os.rename(tmp, final)
        except OSError:
            if self._check(final) is not None:  # another run published the same key first
                shutil.rmtree(tmp, ignore_errors=True)
                return
            self._discard(final)  # an invalid leftover: move it away, then publish
            os.rename(tmp, final)
        _fsync_dir(final.parent)

    def _discard(self, path: Path) -> None:
        trash = path.parent / f".trash-{path.name}-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(OSError):
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def clean_stale(self, max_age_s: float = 24 * 3600) -> int:
        """Remove temp / trash folders of processes that are gone (this host) or older than max_age_s."""
        removed = 0
        if not self.root.exists():
            return 0
        host = socket.gethostname()
        now = time.time()
        for stage_dir in self.root.iterdir():
            if not stage_dir.is_dir():
                continue
            for p in stage_dir.glob(".t*-*"):
                if not (p.name.startswith(".tmp-") or p.name.startswith(".trash-")):
                    continue
                stale = now - p.stat().st_mtime > max_age_s or p.name.startswith(".trash-")
                parts = p.name.split("-")
                if not stale and p.name.startswith(".tmp-") and len(parts) >= 5:
                    phost, pid = "-".join(parts[2:-2]), parts[-2]
                    stale = phost == host and pid.isdigit() and not _pid_alive(int(pid))
                if stale:
                    shutil.rmtree(p, ignore_errors=True)
                    removed += 1
        return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_json_durably(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temp file and rename (for files outside a store build)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    _write_json_durably(tmp, obj)
    os.replace(tmp, path)
