"""Ingest: resolve a source's paths, fingerprint its input cheaply, read it, write the canonical folder.

Path resolution (:func:`resolve_source`): Planetoid ``root`` defaults to ``<datasets_root>/planetoid``
and a relative one, like a relative npz ``path``, is taken under ``datasets_root``; relative table paths
(files, folders, globs) are taken under ``base_dir`` (the config file's folder), else the working
directory.

Source fingerprint (:func:`source_fingerprint`, part of the ingest cache key, recomputed every run):
file sources hash every input file completely up to ``full_hash_limit`` bytes; a larger file is
identified by its size, ``mtime_ns`` and a sampled sha256 over :data:`SAMPLE_BLOCKS` blocks of 1 MiB
(the first, the last and evenly spaced ones between), so an edit that keeps size and mtime and touches
no sampled block goes unnoticed. Synthetic sources are identified by their generator parameters.

Digest cache: with ``cache=<json file>`` (the ingest stage passes ``<store>/.cache/file-digests.json``)
a full-hash digest is reused while the file's device, inode, size, ``mtime_ns`` and ``ctime_ns`` are
unchanged (``ctime`` moves on every write and cannot be set back by a user or a copy tool), so a re-run
over gigabytes of unchanged input files costs a ``stat`` per file, not a read.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..config import GraphOptions, NpzSource, PlanetoidSource, SyntheticSource, TableSource
from ..errors import ConfigError, InputError
from . import planetoid
from .canonical import write_graph
from .raw import RawGraph
from .synthetic import generate_sbm
from .tables import read_tables, table_files

AnySource = PlanetoidSource | NpzSource | TableSource | SyntheticSource

#: the Planetoid files the reader uses (``ind.<name>.<suffix>``)
SAMPLE_BLOCK = 2**20
SAMPLE_BLOCKS = 32


def resolve_source(source: AnySource, *, datasets_root: Path | None, base_dir: Path | None) -> AnySource:
    """A copy of ``source`` with absolute paths (rules in the module docstring)."""
    if isinstance(source, PlanetoidSource):
        root = Path(source.root or "planetoid").expanduser()
        if not root.is_absolute():
            what = f"source.root '{source.root}'" if source.root else "source.root (default: <datasets_root>/planetoid)"
            root = _datasets(datasets_root, what) / root
        return source.model_copy(update={"root": _abs(root)})
    if isinstance(source, NpzSource):
        path = Path(source.path).expanduser()
        if not path.is_absolute():
            path = _datasets(datasets_root, f"source.path '{source.path}'") / path
        return source.model_copy(update={"path": _abs(path)})
    if isinstance(source, TableSource):
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        return source.model_copy(
            update={k: _abs(base / Path(getattr(source, k)).expanduser()) for k in ("edges", "nodes")}
        )
    return source.model_copy()


def _datasets(root: Path | None, what: str) -> Path:
    if root is None:
        raise ConfigError(
            f"{what} lies under the datasets folder, which is not set: "
            "set the AGCPIPE_DATASETS environment variable or datasets_root in the config"
        )
    return Path(root)


def _abs(p: Path) -> str:
    """Absolute and normalised, without resolving (a glob pattern stays a pattern)."""
    return os.path.abspath(p)


# ------------------------------------------------------------------------------------ fingerprint
def source_fingerprint(
    source: AnySource, *, full_hash_limit: int = 256 * 2**20, cache: str | Path | None = None
) -> dict[str, Any]:
    """What identifies the input of a (resolved) source; see the module docstring."""
    if isinstance(source, SyntheticSource):
        # chunk_nodes changes how the graph is written, not what is written
        return {"kind": "generator", "params": source.model_dump(mode="json", exclude={"chunk_nodes"})}
    digests = _DigestCache(Path(cache) if cache is not None else None)
    files = [_file_entry(p, full_hash_limit, digests) for p in _input_files(source)]
    digests.save()
    return {"kind": "files", "files": files}


def _input_files(source: PlanetoidSource | NpzSource | TableSource) -> list[Path]:
    if isinstance(source, PlanetoidSource):
        raw = Path(source.root or "") / source.name / "raw"
        return [raw / f"ind.{source.name.lower()}.{s}" for s in planetoid.FILES]
    if isinstance(source, NpzSource):
        return [Path(source.path)]
    return table_files(source.edges, source.format)[0] + table_files(source.nodes, source.format)[0]


class _DigestCache:
    """sha256 of files by ``(path, device, inode, size, mtime_ns, ctime_ns)``, kept in a JSON file."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.entries, self.dirty = path, {}, False
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    @staticmethod
    def _stamp(st: os.stat_result) -> list[int]:
        return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def get(self, path: Path, st: os.stat_result) -> str | None:
        e = self.entries.get(str(path)) if self.path is not None else None
        return e["sha256"] if e and e.get("stat") == self._stamp(st) else None

    def put(self, path: Path, st: os.stat_result, digest: str) -> None:
        if self.path is not None:
            self.entries[str(path)] = {"stat": self._stamp(st), "sha256": digest}
            self.dirty = True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".digests-")
        with os.fdopen(fd, "w") as f:
            json.dump(self.entries, f)
        os.replace(tmp, self.path)


def _file_entry(path: Path, limit: int, cache: _DigestCache | None = None) -> dict[str, Any]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError("file not found", file=path) from None
    if st.st_size <= limit:
        digest = cache.get(path, st) if cache is not None else None
        if digest is None:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if cache is not None:
                cache.put(path, st, digest)
        return {"path": str(path), "size": st.st_size, "sha256": digest}
    h = hashlib.sha256()
    offsets = np.unique(np.linspace(0, max(st.st_size - SAMPLE_BLOCK, 0), SAMPLE_BLOCKS).astype(np.int64))
    with open(path, "rb") as f:
        for off in offsets.tolist():
            f.seek(off)
            h.update(f.read(SAMPLE_BLOCK))
    return {
        "path": str(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sampled_sha256": h.hexdigest(),
        "mode": "sampled",
    }


# ----------------------------------------------------------------------------------------- ingest
def read_source(source: AnySource, out_dir: Path) -> RawGraph:
    """Dispatch a resolved source to its reader (tables and synthetic write features into ``out_dir``)."""
    if isinstance(source, PlanetoidSource):
        from .planetoid import read_planetoid

        return read_planetoid(source)
    if isinstance(source, NpzSource):
        from .npz import read_npz

        return read_npz(source)
    if isinstance(source, TableSource):
        return read_tables(source, out_dir)
    if isinstance(source, SyntheticSource):
        return generate_sbm(source, out_dir)
    raise TypeError(f"unknown source type {type(source).__name__}")


def ingest(source: AnySource, options: GraphOptions, out_dir: Path) -> dict[str, Any]:
    """Read a resolved source and write its canonical graph into ``out_dir`` (existing, empty).

    Returns the manifest. Peak memory: the reader's (its module docstring) plus
    :func:`agcpipe.data.canonical.canonicalize_edges` on the E edges it returns, while its arrays live.
    """
    out_dir = Path(out_dir)
    raw = read_source(source, out_dir)
    return write_graph(raw, options, out_dir, source.model_dump(mode="json"))
