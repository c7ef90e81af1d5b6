"""The canonical writer: one :class:`RawGraph` -> one canonical graph folder (format in :mod:`.graph`).

Every reader hands its :class:`RawGraph` to :func:`write_graph`, so symmetrising, self-loop and duplicate
policy, CSR building, feature validation and the content fingerprint exist once for all sources.

Content fingerprint (``manifest["fingerprint"]["content"]``): sha256 of the text ::

    agcpipe-graph/1
    directed=<True|False>
    indptr <dtype.str> <shape> <sha256 of the C-order bytes>
    indices <dtype.str> <shape> <sha256>
    weights <dtype.str> <shape> <sha256>        ("weights none" when unweighted)
    features <dtype.str> <shape> <sha256>       (float32)
    labels <dtype.str> <shape> <sha256>         (int64 codes, -1 = unlabelled; "labels none" without labels)

with ``<shape>`` the Python repr of the shape tuple, e.g. ``indptr <i8 (2709,) 3a7f...`` and
``features <f4 (2708, 1433) ...``.

Each array digest is streamed in blocks, so nothing is copied to hash it. Node keys, label names,
feature names and the source description are not part of it: two sources with the same arrays share it.

Two ways to the CSR, with identical results (the tests compare them entry by entry):

* readers that return whole arrays (Planetoid, npz) go through :func:`canonicalize_edges` in memory;
* readers that stream edge chunks (tables, synthetic: :attr:`RawGraph.edge_chunks`) go through
  :class:`CSRBuilder`, an external sort: each chunk's entry keys are appended to a run, every
  :data:`RUN_ENTRIES` entries the run is sorted and written to disk, and the sorted runs are merged one
  row range (~:data:`MERGE_ENTRIES` entries) at a time, straight into the ``.npy`` files. Memory is
  bounded by the run and merge sizes, not by E.

With ``graph.reorder`` the CSR, features, labels and keys are then permuted into the order of
:mod:`.reorder` (one more pass of the builder over the CSR) and ``order.npy`` records it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import GraphOptions
from ..errors import MAX_SHOWN, InputError, first_rows
from . import graph as g
from .raw import RawGraph

#: bytes of one block when hashing, validating or copying large arrays
BLOCK_BYTES = 64 * 2**20
#: CSR entries per edges.parquet row group (at most; a single row with more entries makes a larger one)
EDGE_GROUP = 2**20
#: entries per block of the chunked key passes (bounds their temporaries to ~8 MiB each)
KEY_BLOCK = 2**20
#: largest node count whose keys src * n + dst fit in int64
MAX_NODES = 3_037_000_499
#: entries of one sorted run of the external CSR build (8 bytes each, ~32 while a weighted run is sorted)
RUN_ENTRIES = 1 << 25
#: entries (before merging duplicates) of one row range of the merge (~8-40 bytes each while merged)
MERGE_ENTRIES = 1 << 25
_ROW_HINT = "Rows are 0-based node rows in the source's node order"
_EDGE_HINT = "Rows are 0-based edge rows in the source's edge order"


# ------------------------------------------------------------------------------------ edges -> CSR
def canonicalize_edges(
    src: np.ndarray,
    dst: np.ndarray,
    weight: np.ndarray | None,
    n: int,
    options: GraphOptions,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, int]]:
    """Build the CSR adjacency of an edge list under ``options``.

    Edges are encoded as int64 keys ``row * n + col`` and sorted (``np.sort``; a stable ``argsort``
    when there are weights, so ``first`` means first in input order). Undirected graphs key each input
    edge by ``(min, max)``, so an edge listed in both directions is one edge, merge on that key and
    then add the reverse of every non-loop edge. ``merge_duplicates=False`` keeps every input row as
    its own (parallel) edge. Self-loops are stored once.

    Returns ``(indptr int64 n+1, indices int32|int64, weights float32 | None, stats)`` where stats has
    ``input_edges``, ``self_loops_dropped``, ``self_loops`` (kept), ``duplicates_merged``,
    ``n_edges`` (canonical edges: undirected counted once) and ``isolated_nodes``.

    Peak memory besides the caller's inputs (E input edges, M canonical edges, Z = nnz <= 2M, n nodes),
    in bytes: unweighted ``max(17 E, 8 M + 8 Z, 12 Z) + 8 n``; weighted ``max(28 E, 12 M + 28 Z) + 8 n``
    (argsort orders and reordered copies). 200M input entries (100M undirected edges listed both ways):
    ~3.4 GB unweighted, ~6.8 GB weighted, plus the inputs (16 E, weights 4 E).
    """
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    if n > MAX_NODES:
        raise ValueError(f"graphs with more than {MAX_NODES} nodes are not supported")
    e_in = int(src.size)

    if options.undirected:  # min * n + max == min * (n - 1) + src + dst, with one temporary
        key = np.minimum(src, dst)
        key *= n - 1
        key += src
        key += dst
    else:
        key = src * n
        key += dst
    w = None if weight is None else np.asarray(weight, dtype=np.float32)

    loops = src == dst
    n_loops = int(np.count_nonzero(loops))
    if options.drop_self_loops and n_loops:
        np.logical_not(loops, out=loops)
        key = key[loops]
        w = None if w is None else w[loops]
    del loops

    if w is None:
        key.sort()
    else:
        order = np.argsort(key, kind="stable")
        key = key[order]
        w = w[order]
        del order

    before = key.size
    if options.merge_duplicates and key.size:
        new = np.empty(key.size, dtype=bool)
        new[0] = True
        np.not_equal(key[1:], key[:-1], out=new[1:])
        if w is None:
            key = key[new]
        else:
            starts = np.flatnonzero(new)
            del new
            if options.duplicate_weight == "max":
                w = np.maximum.reduceat(w, starts)
            elif options.duplicate_weight == "sum":
                w = np.add.reduceat(w, starts, dtype=np.float64).astype(np.float32)
            else:  # first: the stable sort kept input order within a key
                w = w[starts]
            key = key[starts]
            del starts
    merged = before - int(key.size)
    kept_loops = 0 if options.drop_self_loops else _count_loops(key, n)
    n_edges = int(key.size)

    if options.undirected:
        key, w = _mirror(key, w, n, kept_loops)

    indptr = np.searchsorted(key, np.arange(n + 1, dtype=np.int64) * n)
    np.remainder(key, n, out=key)
    indices = key.astype(g.index_dtype(n))
    del key
    deg = np.diff(indptr)
    if options.undirected:
        isolated = int(np.count_nonzero(deg == 0))
    else:
        isolated = int(np.count_nonzero((deg == 0) & (np.bincount(indices, minlength=n) == 0)))
    stats = {
        "input_edges": e_in,
        "self_loops_dropped": n_loops if options.drop_self_loops else 0,
        "self_loops": kept_loops,
        "duplicates_merged": merged,
        "n_edges": n_edges,
        "isolated_nodes": isolated,
    }
    return indptr, indices, w, stats


def _count_loops(key: np.ndarray, n: int) -> int:
    """Self-loops among sorted keys: ``u * n + u == u * (n + 1)``, and no other key is a multiple of n+1."""
    step = KEY_BLOCK
    return sum(
        int(np.count_nonzero(key[a : a + step] % (n + 1) == 0)) for a in range(0, key.size, step)
    )


def _mirror(
    key: np.ndarray, w: np.ndarray | None, n: int, loops: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sorted keys of both directions of the undirected keys ``lo * n + hi`` (self-loops once)."""
    m = key.size
    full = np.empty(2 * m - loops, dtype=np.int64)
    full[:m] = key
    wf = None
    if w is not None:
        wf = np.empty(full.size, dtype=np.float32)
        wf[:m] = w
    pos = m
    step = KEY_BLOCK
    for a in range(0, m, step):  # blocks bound the temporaries
        k = key[a : a + step]
        lo = k // n  # (np.divmod is several times slower)
        hi = k - lo * n
        sel = lo != hi if loops else slice(None)
        rev = hi[sel] * n + lo[sel]
        full[pos : pos + rev.size] = rev
        if wf is not None:
            wf[pos : pos + rev.size] = w[a : a + step][sel]
        pos += rev.size
    del key, w
    if wf is None:
        full.sort()
        return full, None
    order = np.argsort(full, kind="stable")
    return full[order], wf[order]


# ----------------------------------------------------------------------------- external CSR build
class NpyWriter:
    """A 1-D ``.npy`` file written by appending blocks, its length fixed when closed.

    The header is written first for an unknown length and rewritten in place on :meth:`close` (numpy pads
    the header so that any length fits in the same bytes), so no block is ever copied twice.
    """

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype, self.count = Path(path), np.dtype(dtype), 0
        self._f: BinaryIO = open(self.path, "wb")
        self._header_len = self._header(0)

    def _header(self, count: int) -> int:
        self._f.seek(0)
        np.lib.format.write_array_header_1_0(
            self._f, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (count,)}
        )
        return self._f.tell()

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        self._f.seek(0, os.SEEK_END)
        block.tofile(self._f)
        self.count += block.size

    def close(self) -> int:
        if self._header(self.count) != self._header_len:  # cannot happen with numpy's padded headers
            raise RuntimeError(f"{self.path}: .npy header changed length")
        self._f.close()
        return self.count


class CSRBuilder:
    """The canonical CSR of a stream of edge chunks, by external sort (same result as
    :func:`canonicalize_edges` on the concatenated chunks).

    :meth:`add` turns each chunk into int64 entry keys ``row * n + col`` (undirected: both directions of
    every non-loop edge, interleaved so that a stable sort keeps input order among equal keys) and
    appends them to the current run; a run of :data:`RUN_ENTRIES` keys is sorted (stably when weighted)
    and written to ``work_dir``. :meth:`finish` merges the runs one row range at a time: the range's slice
    of every run, in run order, is sorted again (stable), duplicates are merged with the weight policy
    (``first`` = first in input order, as both directions of an undirected edge carry its input
    position), and the range's indptr, indices and weights are appended to the output ``.npy`` files.

    Peak memory (bytes; R = run entries, G = merge entries, n nodes): unweighted ``8 R`` while a run
    fills and is sorted, ``~21 G`` while a range is merged; weighted ``~32 R`` and ``~45 G``; plus
    ``8 (rows of a range)`` for its indptr, ``n`` bytes (directed graphs: nodes with an in-edge) and the
    caller's chunk (``~40 x`` its edges while keyed). A single row with more than G entries makes a larger
    range. Disk: ``8 Z`` (``12 Z`` weighted) bytes of runs for Z stored entries, removed by :meth:`finish`.
    """

    def __init__(
        self,
        n: int,
        options: GraphOptions,
        *,
        weighted: bool,
        work_dir: Path,
        run_entries: int | None = None,
        merge_entries: int | None = None,
    ) -> None:
        if n > MAX_NODES:
            raise ValueError(f"graphs with more than {MAX_NODES} nodes are not supported")
        self.n, self.options, self.weighted = int(n), options, weighted
        self.work_dir = Path(work_dir)
        self.run_entries = int(run_entries or RUN_ENTRIES)
        self.merge_entries = int(merge_entries or MERGE_ENTRIES)
        self._keys: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []
        self._buffered = 0
        self._runs: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._run_files: list[Path] = []
        self.input_edges = 0
        self.loops_dropped = 0
        self._kept = 0  # input edges left after dropping self-loops

    # ---- input
    def add(self, src: np.ndarray, dst: np.ndarray, weight: np.ndarray | None = None) -> None:
        """Add one chunk of edges (dense int ids in 0..n-1; ``weight`` float32 iff the builder is weighted)."""
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        if (weight is not None) != self.weighted:
            raise ValueError("CSRBuilder: weights must be given for every chunk of a weighted graph, else never")
        w = None if weight is None else np.asarray(weight, dtype=np.float32)
        self.input_edges += int(src.size)
        loops = src == dst
        n_loops = int(np.count_nonzero(loops))
        if self.options.drop_self_loops and n_loops:
            keep = ~loops
            src, dst = src[keep], dst[keep]
            w = None if w is None else w[keep]
            self.loops_dropped += n_loops
            loops, n_loops = None, 0
        self._kept += int(src.size)
        n = self.n
        if self.options.undirected:
            keys = np.empty((src.size, 2), dtype=np.int64)
            np.multiply(src, n, out=keys[:, 0])
            keys[:, 0] += dst
            np.multiply(dst, n, out=keys[:, 1])
            keys[:, 1] += src
            wk = None if w is None else np.repeat(w, 2)
            keys = keys.reshape(-1)
            if n_loops:  # a self-loop is stored once
                mask = np.ones((src.size, 2), dtype=bool)
                mask[:, 1] = ~loops
                mask = mask.reshape(-1)
                keys = keys[mask]
                wk = None if wk is None else wk[mask]
        else:
            keys = src * n
            keys += dst
            wk = w
        del src, dst, loops
        self._keys.append(keys)
        if wk is not None:
            self._weights.append(wk)
        self._buffered += keys.size
        if self._buffered >= self.run_entries:
            self._flush()

    def _flush(self) -> None:
        if not self._keys:
            return
        keys = self._keys[0] if len(self._keys) == 1 else np.concatenate(self._keys)
        self._keys = []
        w = None
        if self.weighted:
            w = self._weights[0] if len(self._weights) == 1 else np.concatenate(self._weights)
            self._weights = []
            order = np.argsort(keys, kind="stable")
            keys, w = keys[order], w[order]
            del order
        else:
            keys.sort()
        self._buffered = 0
        self._runs.append((keys, w))
        if len(self._runs) > 1 or keys.size >= self.run_entries:
            self._spill()

    def _spill(self) -> None:
        """Write the in-memory runs to disk (memory-mapped from then on)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for i, (keys, w) in enumerate(self._runs):
            if isinstance(keys, np.memmap):
                continue
            j = self._n_spilled = getattr(self, "_n_spilled", -1) + 1
            kp = self.work_dir / f"run{j:05d}.keys.npy"
            np.save(kp, keys)
            self._run_files.append(kp)
            wm = None
            if w is not None:
                wp = self.work_dir / f"run{j:05d}.weights.npy"
                np.save(wp, w)
                self._run_files.append(wp)
                wm = np.load(wp, mmap_mode="r")
            self._runs[i] = (np.load(kp, mmap_mode="r"), wm)

    # ---- merge
    def _count_below(self, row: int) -> int:
        key = row * self.n
        return sum(int(np.searchsorted(k, key)) for k, _ in self._runs)

    def _ranges(self) -> Iterator[tuple[int, int]]:
        """Row ranges holding ~merge_entries run entries each (a row is never split)."""
        a, done = 0, 0
        while a < self.n:
            target = done + self.merge_entries
            lo, hi = a + 1, self.n  # smallest row b > a with count(b) >= target (or n)
            while lo < hi:
                mid = (lo + hi) // 2
                if self._count_below(mid) >= target:
                    hi = mid
                else:
                    lo = mid + 1
            yield a, lo
            a, done = lo, self._count_below(lo)

    def finish(self, indptr_path: Path, indices_path: Path, weights_path: Path | None) -> dict[str, int]:
        """Merge the runs into the three ``.npy`` files; returns the stats of :func:`canonicalize_edges`."""
        self._flush()
        n, opt = self.n, self.options
        idx_dtype = g.index_dtype(n)
        ptr_out, idx_out = NpyWriter(indptr_path, np.int64), NpyWriter(indices_path, idx_dtype)
        w_out = NpyWriter(weights_path, np.float32) if self.weighted and weights_path is not None else None
        has_in = np.zeros(n, dtype=bool) if not opt.undirected else None
        nnz = loops_kept = isolated = 0
        ptr_out.append(np.zeros(1, dtype=np.int64))
        try:
            for a, b in self._ranges():
                keys, w = self._merge_range(a, b)
                if keys.size:
                    loops_kept += int(np.count_nonzero(keys % (n + 1) == 0))
                bounds = np.searchsorted(keys, np.arange(a + 1, b + 1, dtype=np.int64) * n)
                deg = np.diff(bounds, prepend=0)
                if opt.undirected:
                    isolated += int(np.count_nonzero(deg == 0))
                bounds += nnz
                ptr_out.append(bounds)
                del bounds, deg
                keys %= n
                cols = keys.astype(idx_dtype)
                del keys
                if has_in is not None:
                    has_in[cols] = True
                idx_out.append(cols)
                if w_out is not None:
                    w_out.append(w)
                nnz += int(cols.size)
                del cols, w
        finally:
            ptr_out.close()
            idx_out.close()
            if w_out is not None:
                w_out.close()
            self._runs = []
            for f in self._run_files:
                f.unlink(missing_ok=True)
            if self._run_files and self.work_dir.exists() and not any(self.work_dir.iterdir()):
                self.work_dir.rmdir()
        if has_in is not None:  # directed: no out-edge (counted per row below) and no in-edge
            indptr = np.load(indptr_path, mmap_mode="r")
            isolated = 0
            step = KEY_BLOCK
            for r in range(0, n, step):
                deg = np.diff(indptr[r : min(n, r + step) + 1])
                isolated += int(np.count_nonzero((deg == 0) & ~has_in[r : r + step]))
            del indptr
        n_edges = (nnz - loops_kept) // 2 + loops_kept if opt.undirected else nnz
        return {
            "input_edges": self.input_edges,
            "self_loops_dropped": self.loops_dropped,
            "self_loops": loops_kept,
            "duplicates_merged": self._kept - n_edges if opt.merge_duplicates else 0,
            "n_edges": n_edges,
            "isolated_nodes": isolated,
        }

    def _merge_range(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Sorted, merged keys (and weights) of rows a:b from every run."""
        lo_key, hi_key = a * self.n, b * self.n
        parts, wparts = [], []
        for keys, w in self._runs:
            i, j = int(np.searchsorted(keys, lo_key)), int(np.searchsorted(keys, hi_key))
            if j > i:
                parts.append(keys[i:j])
                if w is not None:
                    wparts.append(w[i:j])
        if not parts:
            return np.empty(0, dtype=np.int64), (np.empty(0, dtype=np.float32) if self.weighted else None)
        keys = np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])
        w = None
        if self.weighted:
            w = np.concatenate(wparts) if len(wparts) > 1 else np.array(wparts[0])
            if len(parts) > 1:
                order = np.argsort(keys, kind="stable")
                keys, w = keys[order], w[order]
                del order
        elif len(parts) > 1:
            keys.sort()
        del parts, wparts
        if not self.options.merge_duplicates or keys.size == 0:
            return keys, w
        new = np.empty(keys.size, dtype=bool)
        new[0] = True
        np.not_equal(keys[1:], keys[:-1], out=new[1:])
        if w is None:
            return keys[new], None
        starts = np.flatnonzero(new)
        del new
        policy = self.options.duplicate_weight
        if policy == "max":
            w = np.maximum.reduceat(w, starts)
        elif policy == "sum":
            w = np.add.reduceat(w, starts, dtype=np.float64).astype(np.float32)
        else:
            w = w[starts]
        return keys[starts], w


def build_csr(
    chunks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    n: int,
    options: GraphOptions,
    out_dir: Path,
    *,
    weighted: bool,
    prefix: str = "",
) -> dict[str, int]:
    """Stream ``(src, dst, weight)`` chunks through a :class:`CSRBuilder` into ``out_dir/<prefix><csr file>``."""
    out_dir = Path(out_dir)
    builder = CSRBuilder(n, options, weighted=weighted, work_dir=out_dir / f".{prefix}csr-runs")
    for src, dst, w in chunks:
        builder.add(src, dst, w)
    return builder.finish(out_dir / f"{prefix}{g.INDPTR}", out_dir / f"{prefix}{g.INDICES}", out_dir / f"{prefix}{g.WEIGHTS}" if weighted else None)


# --------------------------------------------------------------------------------- feature file
class FeatureFile:
    """``features.npy`` (float32 N x d, C order) written or read one row block at a time.

    ``np.lib.format.open_memmap`` creates the file; each block maps only its own rows and unmaps after,
    so resident memory stays at one block however large N x d is.
    """

    def __init__(self, path: Path, n: int, d: int, *, offset: int | None = None) -> None:
        self.path, self.n, self.d = Path(path), n, d
        if offset is None:
            mm = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(n, d))
            offset = int(mm.offset)
            del mm
        self.offset = offset

    @classmethod
    def of(cls, arr: np.memmap) -> "FeatureFile":
        """The file behind a memmap returned by :meth:`array` (for reading)."""
        return cls(Path(arr.filename), arr.shape[0], arr.shape[1], offset=int(arr.offset))

    def window(self, a: int, b: int, mode: str = "r") -> np.ndarray:
        if b <= a or self.d == 0:
            return np.empty((max(b - a, 0), self.d), dtype=np.float32)
        return np.memmap(
            self.path, dtype=np.float32, mode=mode, offset=self.offset + a * self.d * 4, shape=(b - a, self.d)
        )

    def write(self, a: int, block: np.ndarray) -> None:
        win = self.window(a, a + len(block), "r+")
        win[...] = block
        if isinstance(win, np.memmap):
            win.flush()

    def array(self) -> np.memmap:
        """The whole file as a read-only memmap (pages load on access)."""
        return np.load(self.path, mmap_mode="r")


def _block_rows(d: int) -> int:
    """Rows of a float32 N x d block of about :data:`BLOCK_BYTES`."""
    return max(1, BLOCK_BYTES // (4 * max(d, 1)))


def _is_file(arr: np.ndarray, path: Path) -> bool:
    return (
        isinstance(arr, np.memmap)
        and arr.filename is not None
        and Path(arr.filename).resolve() == path.resolve()
    )


# ------------------------------------------------------------------------------------------ writer
def write_graph(
    raw: RawGraph, options: GraphOptions, out_dir: Path, source_meta: dict[str, Any]
) -> dict[str, Any]:
    """Write every file of the canonical format into ``out_dir`` (existing, empty); return the manifest.

    Features are validated (NaN / inf -> :class:`InputError` naming the source, the feature and the first
    rows) and copied block by block; a ``raw.features`` that is already the memmap of
    ``out_dir/features.npy`` is only validated and hashed. ``manifest.json`` is written last.

    Peak memory: the CSR build (:func:`canonicalize_edges` for array sources, which dominates; the
    bounded :class:`CSRBuilder` for streamed ones), plus ``8 n`` (node table) and one feature block
    (:data:`BLOCK_BYTES`); plus the caller's ``raw`` arrays. With ``options.reorder``: the ordering's
    memory (:mod:`.reorder`), then ``16 n`` (the permutation and its inverse) besides one more builder pass
    over the CSR and a row-block gather of the features.
    """
    out_dir = Path(out_dir)
    n = int(raw.n_nodes)
    _check_raw(raw, source_meta)

    d, feat_hash = _write_features(raw, out_dir, source_meta)
    reorder = options.reorder != "none"
    prefix = ".input-" if reorder else ""
    weighted = raw.has_weights
    if raw.streamed:
        stats = build_csr(_checked_chunks(raw, source_meta), n, options, out_dir, weighted=weighted, prefix=prefix)
        if stats["input_edges"] == 0:
            raise InputError("the graph has no edges", file=_origin(source_meta, "edges"))
    else:
        indptr, indices, weights, stats = canonicalize_edges(raw.src, raw.dst, raw.weight, n, options)
        for fname, arr in ((g.INDPTR, indptr), (g.INDICES, indices), (g.WEIGHTS, weights)):
            if arr is not None:
                np.save(out_dir / f"{prefix}{fname}", arr)
        del indptr, indices, weights

    labels, classes = _labels(raw)
    keys = raw.keys
    order_info = None
    if reorder:
        order, order_info = _reorder(out_dir, prefix, options, n, weighted)
        feat_hash = _permute_features(out_dir, order, n, d)
        if labels is not None:
            labels = labels[order]
        keys = pa.array(order) if keys is None else keys.take(pa.array(order))
        del order

    indptr, indices = np.load(out_dir / g.INDPTR, mmap_mode="r"), np.load(out_dir / g.INDICES, mmap_mode="r")
    weights = np.load(out_dir / g.WEIGHTS, mmap_mode="r") if weighted else None
    parts = {"features": _line("features", np.dtype(np.float32), (n, d), feat_hash)}
    for name, arr in (("indptr", indptr), ("indices", indices), ("weights", weights)):
        parts[name] = _array_line(name, arr)
    _write_edges(out_dir / g.EDGES, indptr, indices, weights, options.undirected)
    n_edges = stats["n_edges"]
    nnz = int(indices.size)
    del indptr, indices, weights

    parts["labels"] = _array_line("labels", labels)
    key_type = _write_nodes(out_dir / g.NODES, n, keys, labels)

    directed = not options.undirected
    text = f"{g.FORMAT}\ndirected={directed}\n" + "".join(
        parts[k] for k in ("indptr", "indices", "weights", "features", "labels")
    )

    manifest = {
        "format": g.FORMAT,
        "n_nodes": n,
        "n_edges": n_edges,
        "nnz": nnz,
        "n_features": d,
        "feature_names": list(raw.feature_names) if raw.feature_names is not None else None,
        "directed": directed,
        "weighted": weighted,
        "has_labels": labels is not None,
        "n_labelled": 0 if labels is None else int(np.count_nonzero(labels >= 0)),
        "n_classes": len(classes),
        "label_classes": classes,
        "key_type": key_type,
        "options": options.model_dump(mode="json"),
        "source": _jsonable(source_meta),
        "dtypes": {
            "indptr": "int64",
            "indices": g.index_dtype(n).name,
            "weights": "float32" if weighted else None,
            "features": "float32",
            "node_id": "int64",
            "key": key_type,
            "label": "int64",
        },
        "stats": stats,
        "info": _jsonable(raw.info),
        "fingerprint": {"content": hashlib.sha256(text.encode()).hexdigest(), "algorithm": "sha256"},
    }
    if order_info is not None:
        manifest["order"] = {**order_info, "file": g.ORDER}
    (out_dir / g.MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default))
    return manifest


def _checked_chunks(raw: RawGraph, meta: dict[str, Any]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """The reader's edge chunks, with ids checked to be in range and weights to be finite.

    A bad weight stops the build; the remaining chunks are only scanned, so that the error counts them all.
    """
    n = int(raw.n_nodes)
    offset = 0
    bad_rows: list[int] = []
    bad_values: list[float] = []
    bad_count = 0
    assert raw.edge_chunks is not None
    for src, dst, w in raw.edge_chunks():
        if len(src) != len(dst) or (w is not None and len(w) != len(src)):
            raise ValueError("RawGraph: src, dst and weight chunks must have one entry per edge")
        if bad_count == 0 and len(src):
            for name, ends in (("source", src), ("target", dst)):
                if ends.min() < 0 or ends.max() >= n:
                    rows, count = first_rows((ends < 0) | (ends >= n))
                    raise InputError(
                        f"edge {name} ids outside 0..{n - 1}", file=_origin(meta, "edges"),
                        rows=[r + offset for r in rows], values=[int(ends[r]) for r in rows], count=count,
                        hint=_EDGE_HINT,
                    )
        if w is not None:
            ok = np.isfinite(w)
            if not ok.all():
                rows, count = first_rows(~ok)
                shown = rows[: MAX_SHOWN - len(bad_rows)]
                bad_rows += [r + offset for r in shown]
                bad_values += [float(w[r]) for r in shown]
                bad_count += count
        if bad_count == 0:
            yield src, dst, w
        offset += len(src)
    if bad_count:
        raise InputError(
            "edge weights must be finite numbers", file=_origin(meta, "edges"), column=meta.get("weight_column"),
            rows=bad_rows, values=bad_values, count=bad_count, hint=_EDGE_HINT,
        )


def _reorder(out_dir: Path, prefix: str, options: GraphOptions, n: int, weighted: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """Compute the node order of the input-order CSR ``<prefix>csr_*.npy``, write the permuted CSR and
    ``order.npy``; remove the input-order files. Returns ``(order, info)``."""
    from .reorder import compute_order

    names = [g.INDPTR, g.INDICES] + ([g.WEIGHTS] if weighted else [])
    ip, ix, *rest = (np.load(out_dir / f"{prefix}{name}", mmap_mode="r") for name in names)
    w = rest[0] if rest else None
    order, info = compute_order(options.reorder, ip, ix, w, n, directed=not options.undirected)
    np.save(out_dir / g.ORDER, order)
    inv = np.empty(n, dtype=np.int64)
    inv[order] = np.arange(n, dtype=np.int64)
    t0 = time.perf_counter()

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        step = 4 * KEY_BLOCK
        nnz = int(ip[-1])
        bounds = np.unique(np.concatenate([np.searchsorted(ip, np.arange(0, nnz, step), side="right") - 1, [0, n]]))
        for r0, r1 in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            s, e = int(ip[r0]), int(ip[r1])
            rows = np.repeat(inv[r0:r1], np.diff(ip[r0 : r1 + 1]))
            yield rows, inv[np.asarray(ix[s:e])], None if w is None else np.asarray(w[s:e])

    # entries are already canonical: relabel and re-sort them, nothing else
    exact = GraphOptions(undirected=False, merge_duplicates=False, drop_self_loops=False)
    build_csr(chunks(), n, exact, out_dir, weighted=weighted)
    del ip, ix, w, rest, inv
    for name in names:
        (out_dir / f"{prefix}{name}").unlink()
    info["relabel_seconds"] = round(time.perf_counter() - t0, 3)
    return order, info


def _permute_features(out_dir: Path, order: np.ndarray, n: int, d: int) -> str:
    """Rewrite ``features.npy`` in the new node order (row blocks gathered in sorted-row order); its sha256.

    The source is gathered at random, so it is mapped whole; its pages are dropped from this process
    after every block (``madvise(MADV_DONTNEED)``: they stay in the page cache), so the resident set stays
    at about one block instead of growing to the whole ``4 N d``.
    """
    import mmap

    src_path, tmp_path = out_dir / g.FEATURES, out_dir / ".features-reordered.npy"
    src = np.load(src_path, mmap_mode="r")
    raw_map = getattr(src, "_mmap", None)
    dest = FeatureFile(tmp_path, n, d)
    h = hashlib.sha256()
    step = _block_rows(d)
    for a in range(0, n, step):
        b = min(n, a + step)
        rows = order[a:b]
        by_row = np.argsort(rows, kind="stable")  # read the source forwards
        block = np.empty((b - a, d), dtype=np.float32)
        block[by_row] = src[rows[by_row]]
        h.update(memoryview(block).cast("B"))
        dest.write(a, block)
        del block
        if raw_map is not None and hasattr(mmap, "MADV_DONTNEED"):
            raw_map.madvise(mmap.MADV_DONTNEED)
    del src, raw_map
    os.replace(tmp_path, src_path)
    return h.hexdigest()


def _origin(meta: dict[str, Any], part: str) -> str:
    """What to name in an error about a source's ``part`` ('nodes' or 'edges')."""
    if meta.get("type") == "tables":
        return str(meta.get(part))
    if meta.get("path"):
        return str(meta["path"])
    if meta.get("type") == "planetoid":
        return f"{meta.get('root')}/{meta.get('name')}"
    return str(meta.get("type") or "source")


def _check_raw(raw: RawGraph, meta: dict[str, Any]) -> None:
    n = int(raw.n_nodes)
    if n <= 0:
        raise InputError("the graph has no nodes", file=_origin(meta, "nodes"))
    if raw.features.ndim != 2 or raw.features.shape[0] != n:
        raise ValueError(f"RawGraph: features must be n_nodes x d, got {raw.features.shape}")
    if raw.streamed:
        return  # chunks are checked as they stream (_checked_chunks)
    e = len(raw.src)
    if e == 0:
        raise InputError("the graph has no edges", file=_origin(meta, "edges"))
    if len(raw.dst) != e or (raw.weight is not None and len(raw.weight) != e):
        raise ValueError("RawGraph: src, dst and weight must have one entry per edge")
    for name, ends in (("source", raw.src), ("target", raw.dst)):
        if ends.min() < 0 or ends.max() >= n:
            rows, count = first_rows((ends < 0) | (ends >= n))
            raise InputError(
                f"edge {name} ids outside 0..{n - 1}", file=_origin(meta, "edges"),
                rows=rows, values=[int(ends[r]) for r in rows], count=count, hint=_EDGE_HINT,
            )
    if raw.weight is not None:
        ok = np.isfinite(raw.weight)
        if not ok.all():
            rows, count = first_rows(~ok)
            raise InputError(
                "edge weights must be finite numbers", file=_origin(meta, "edges"),
                column=meta.get("weight_column"), rows=rows,
                values=[float(raw.weight[r]) for r in rows], count=count, hint=_EDGE_HINT,
            )


def _write_features(raw: RawGraph, out_dir: Path, meta: dict[str, Any]) -> tuple[int, str]:
    """Validate, copy (unless already in place) and hash the features block by block: (d, sha256)."""
    n, d = raw.features.shape
    dest_path = out_dir / g.FEATURES
    reader = dest = None
    if _is_file(raw.features, dest_path):
        if raw.features.dtype != np.float32 or not raw.features.flags.c_contiguous:
            raise ValueError("RawGraph: features.npy written by a reader must be float32 C order")
        reader = FeatureFile.of(raw.features)
    else:
        dest = FeatureFile(dest_path, n, d)
    h = hashlib.sha256()
    step = _block_rows(d)
    for a in range(0, n, step):
        b = min(n, a + step)
        if reader is not None:
            block = reader.window(a, b)
        else:
            block = np.ascontiguousarray(raw.features[a:b], dtype=np.float32)
        finite = np.isfinite(block)
        if not finite.all():
            bad_rows = np.flatnonzero(~finite.all(axis=1))
            col = int(np.flatnonzero(~finite[bad_rows[0]])[0])
            shown = bad_rows[:MAX_SHOWN]
            raise InputError(
                "features must be finite numbers (NaN, infinite or missing values found)",
                file=_origin(meta, "nodes"),
                column=raw.feature_names[col] if raw.feature_names else f"feature {col}",
                rows=(shown + a).tolist(),
                values=[float(block[r, col]) for r in shown],
                hint=_ROW_HINT,
            )
        h.update(memoryview(block).cast("B"))
        if dest is not None:
            dest.write(a, block)
        del block, finite
    return int(d), h.hexdigest()


def _line(name: str, dtype: np.dtype, shape: tuple[int, ...], digest: str) -> str:
    """One fingerprint line: ``name dtype shape sha256``."""
    return f"{name} {dtype.str} {tuple(int(v) for v in shape)} {digest}\n"


def _array_line(name: str, arr: np.ndarray | None) -> str:
    return f"{name} none\n" if arr is None else _line(name, arr.dtype, arr.shape, _digest(arr))


def _digest(arr: np.ndarray) -> str:
    h = hashlib.sha256()
    for block in _byte_blocks(arr):
        h.update(block)
    return h.hexdigest()


def _byte_blocks(arr: np.ndarray) -> Iterator[memoryview]:
    flat = np.ascontiguousarray(arr).reshape(-1)
    step = max(1, BLOCK_BYTES // max(flat.itemsize, 1))
    for a in range(0, flat.size, step):
        yield memoryview(flat[a : a + step]).cast("B")


def _write_edges(
    path: Path, indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray | None, undirected: bool
) -> None:
    """edges.parquet from the CSR, one row group per ~:data:`EDGE_GROUP` entries (undirected: src <= dst)."""
    fields = [pa.field("src", pa.int64(), nullable=False), pa.field("dst", pa.int64(), nullable=False)]
    if weights is not None:
        fields.append(pa.field("weight", pa.float32(), nullable=False))
    schema = pa.schema(fields)
    n = indptr.size - 1
    starts = np.unique(np.searchsorted(indptr, np.arange(0, int(indptr[-1]), EDGE_GROUP), side="right") - 1)
    bounds = np.append(starts, n) if starts.size else np.array([0, n])
    with pq.ParquetWriter(path, schema) as writer:
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            p, q = int(indptr[a]), int(indptr[b])
            rows = np.repeat(np.arange(a, b, dtype=np.int64), np.diff(indptr[a : b + 1]))
            cols = indices[p:q].astype(np.int64)
            cols_w = [rows, cols] + ([weights[p:q]] if weights is not None else [])
            if undirected:
                keep = rows <= cols
                cols_w = [c[keep] for c in cols_w]
            writer.write_table(pa.Table.from_arrays([pa.array(c) for c in cols_w], schema=schema))


def _labels(raw: RawGraph) -> tuple[np.ndarray | None, list[Any]]:
    if raw.labels is None:
        return None, []
    labels = np.asarray(raw.labels, dtype=np.int64)
    if labels.shape != (raw.n_nodes,):
        raise ValueError("RawGraph: labels must have one entry per node")
    if raw.label_classes is not None:
        classes = list(raw.label_classes)
    else:
        classes = list(range(int(labels.max(initial=-1)) + 1))
    if labels.size and (labels.min() < -1 or labels.max() >= len(classes)):
        raise ValueError("RawGraph: label codes must lie in -1..len(label_classes)-1")
    return labels, _jsonable(classes)


def _write_nodes(path: Path, n: int, keys: pa.Array | pa.ChunkedArray | None, labels: np.ndarray | None) -> str:
    ids = pa.array(np.arange(n, dtype=np.int64))
    keys = ids if keys is None else keys
    if len(keys) != n:
        raise ValueError("RawGraph: keys must have one entry per node")
    if pa.types.is_integer(keys.type):
        keys, key_type = keys.cast(pa.int64()), "int64"
    else:
        key_type = "string"
    label = pa.nulls(n, pa.int64()) if labels is None else pa.array(labels, mask=labels < 0, type=pa.int64())
    table = pa.table({"node_id": ids, "key": keys, "label": label})
    pq.write_table(table, path, row_group_size=EDGE_GROUP)
    return key_type


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (Path, np.dtype)):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _jsonable(v: Any) -> Any:
    """Plain Python values (numpy scalars -> int / float / str) for the manifest."""
    return json.loads(json.dumps(v, default=_json_default))
