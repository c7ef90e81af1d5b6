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
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

    Peak memory: :func:`canonicalize_edges` (which dominates), plus ``8 n`` (node table) and one
    feature block (:data:`BLOCK_BYTES`); plus the caller's ``raw`` arrays.
    """
    out_dir = Path(out_dir)
    n = int(raw.n_nodes)
    _check_raw(raw, source_meta)

    d, feat_hash = _write_features(raw, out_dir, source_meta)
    parts = {"features": _line("features", np.dtype(np.float32), (n, d), feat_hash)}

    indptr, indices, weights, stats = canonicalize_edges(raw.src, raw.dst, raw.weight, n, options)
    arrays = {"indptr": (g.INDPTR, indptr), "indices": (g.INDICES, indices), "weights": (g.WEIGHTS, weights)}
    for name, (fname, arr) in arrays.items():
        if arr is not None:
            np.save(out_dir / fname, arr)
        parts[name] = _array_line(name, arr)
    _write_edges(out_dir / g.EDGES, indptr, indices, weights, options.undirected)
    n_edges = stats["n_edges"]
    nnz = int(indices.size)
    del indptr, indices, weights, arrays

    labels, classes = _labels(raw)
    parts["labels"] = _array_line("labels", labels)
    key_type = _write_nodes(out_dir / g.NODES, raw, labels)

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
        "weighted": raw.weight is not None,
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
            "weights": "float32" if raw.weight is not None else None,
            "features": "float32",
            "node_id": "int64",
            "key": key_type,
            "label": "int64",
        },
        "stats": stats,
        "info": _jsonable(raw.info),
        "fingerprint": {"content": hashlib.sha256(text.encode()).hexdigest(), "algorithm": "sha256"},
    }
    (out_dir / g.MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default))
    return manifest


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
    n, e = int(raw.n_nodes), len(raw.src)
    if n <= 0:
        raise InputError("the graph has no nodes", file=_origin(meta, "nodes"))
    if e == 0:
        raise InputError("the graph has no edges", file=_origin(meta, "edges"))
    if len(raw.dst) != e or (raw.weight is not None and len(raw.weight) != e):
        raise ValueError("RawGraph: src, dst and weight must have one entry per edge")
    if raw.features.ndim != 2 or raw.features.shape[0] != n:
        raise ValueError(f"RawGraph: features must be n_nodes x d, got {raw.features.shape}")
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


def _write_nodes(path: Path, raw: RawGraph, labels: np.ndarray | None) -> str:
    n = int(raw.n_nodes)
    ids = pa.array(np.arange(n, dtype=np.int64))
    keys = ids if raw.keys is None else raw.keys
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
