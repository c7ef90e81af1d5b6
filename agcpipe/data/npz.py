"""Reader of graph ``.npz`` files. Three layouts, told apart by their keys:

* ``heterophilous`` (Platonov et al., e.g. tolokers): ``node_features``, ``node_labels``, ``edges``
  (E x 2, each undirected edge once); the split masks are ignored. Pickle-free.
* ``gnn-benchmark`` (Shchur et al.): the adjacency as CSR parts ``adj_data`` / ``adj_indices`` /
  ``adj_indptr`` / ``adj_shape``, features as ``attr_data`` / ``attr_indices`` / ``attr_indptr`` /
  ``attr_shape`` or a dense ``attr_matrix``, optional ``labels``, ``node_names``, ``attr_names``,
  ``class_names``. Pickle-free.
* ``GraphData`` (e.g. coauthor_cs, amazon_computers): ``adj_matrix`` and ``node_attr`` as pickled scipy
  sparse matrices, ``node_label``, optional ``metadata`` dict (``node_names``, ``attr_names``,
  ``class_names``). Unpickling runs arbitrary code, so this layout (like any pickled member) is read
  only when ``source.trust_pickle`` is true.

Adjacency entries equal to zero are not edges; non-unit entries become edge weights. Labels: negative
values mean "no label" (-1); class codes are the ranks of the distinct values.
"""
from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from ..config import NpzSource
from ..errors import InputError, first_rows
from .raw import RawGraph

_ADJ_CSR = ("adj_data", "adj_indices", "adj_indptr", "adj_shape")
_ATTR_CSR = ("attr_data", "attr_indices", "attr_indptr", "attr_shape")
_LAYOUTS = (
    "heterophilous (node_features, node_labels, edges)",
    "gnn-benchmark (adj_data, adj_indices, adj_indptr, adj_shape; attr_data, attr_indices, attr_indptr, "
    "attr_shape or attr_matrix; optional labels, node_names, attr_names, class_names)",
    "GraphData (adj_matrix, node_attr, node_label; pickled: needs `source.trust_pickle: true`)",
)
_TRUST_HINT = "If you trust this file, allow unpickling with `source.trust_pickle: true`"


def read_npz(source: NpzSource) -> RawGraph:
    """Read an ``.npz`` graph (``source.path`` must already be resolved)."""
    path = Path(source.path)
    if not path.is_file():
        raise InputError("npz file not found", file=path)
    if not zipfile.is_zipfile(path):
        raise InputError("not an .npz file (not a zip archive)", file=path)
    try:
        npz = np.load(path, allow_pickle=source.trust_pickle)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InputError(f"cannot open as .npz: {e}", file=path) from None
    with npz:
        z = _Npz(npz, path)
        if {"adj_matrix", "node_attr"} <= z.keys:
            if not source.trust_pickle:
                raise InputError(
                    "holds pickled Python objects (adj_matrix, node_attr: the GraphData layout); "
                    "unpickling runs arbitrary code, so it is refused by default",
                    file=path,
                    hint=_TRUST_HINT,
                )
            return _graphdata(z)
        if set(_ADJ_CSR) <= z.keys and (set(_ATTR_CSR) <= z.keys or "attr_matrix" in z.keys):
            return _gnn_benchmark(z)
        if {"node_features", "node_labels", "edges"} <= z.keys:
            return _heterophilous(z)
    raise InputError(
        f"unknown .npz layout; keys found: {sorted(z.keys)}",
        file=path,
        hint="Supported layouts: " + "; ".join(_LAYOUTS),
    )


class _Npz:
    """An open npz whose member reads turn every failure into an InputError naming file and key."""

    def __init__(self, npz: np.lib.npyio.NpzFile, path: Path) -> None:
        self.npz, self.path, self.keys = npz, path, set(npz.files)

    def __getitem__(self, key: str) -> Any:
        """The member as an array, or the unpickled object of a 0-d object array."""
        try:
            with warnings.catch_warnings():  # trusted GraphData pickles use scipy's old module names
                warnings.filterwarnings(
                    "ignore", r".*`scipy\.sparse\.\w+` namespace is deprecated", DeprecationWarning
                )
                arr = self.npz[key]
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise InputError(
                    f"key '{key}' holds pickled Python objects; unpickling runs arbitrary code, "
                    "so it is refused by default",
                    file=self.path,
                    hint=_TRUST_HINT,
                ) from None
            raise self.corrupt(key, e) from None
        except MemoryError:
            raise
        except Exception as e:  # damaged member (zlib.error, EOFError, ...) or a failing trusted pickle
            raise self.corrupt(key, e) from None
        if not isinstance(arr, np.ndarray):  # numpy returns the raw bytes of a member without .npy magic
            raise self.corrupt(key, ValueError("not a .npy array"))
        return arr.item() if arr.dtype.hasobject and arr.ndim == 0 else arr

    def get(self, key: str) -> Any:
        return self[key] if key in self.keys else None

    def corrupt(self, key: str, e: Exception) -> InputError:
        return InputError(f"cannot read key '{key}': {type(e).__name__}: {e}", file=self.path)

    def error(self, key: str, problem: str, **details: Any) -> InputError:
        return InputError(problem, file=self.path, column=key, **details)


# ------------------------------------------------------------------------------------------ layouts
def _heterophilous(z: _Npz) -> RawGraph:
    features = _features(z, "node_features", z["node_features"])
    n = features.shape[0]
    edges = np.asarray(z["edges"])
    if edges.ndim != 2 or edges.shape[1] != 2 or not np.issubdtype(edges.dtype, np.integer):
        raise z.error("edges", f"expected an E x 2 integer array, found {edges.shape} {edges.dtype}")
    src, dst = edges[:, 0].astype(np.int64), edges[:, 1].astype(np.int64)
    bad = (src < 0) | (src >= n) | (dst < 0) | (dst >= n)
    if bad.any():
        rows, count = first_rows(bad)
        raise z.error(
            "edges", f"node ids outside 0..{n - 1}", rows=rows, count=count, values=edges[rows].tolist()
        )
    labels, classes = _labels(z, "node_labels", z["node_labels"], n)
    return _raw("heterophilous", n, src, dst, None, features, labels, classes)


def _gnn_benchmark(z: _Npz) -> RawGraph:
    adj = _csr(z, _ADJ_CSR)
    if "attr_matrix" in z.keys:
        features = _features(z, "attr_matrix", z["attr_matrix"])
    else:
        features = _features(z, "attr_data", _csr(z, _ATTR_CSR))
    n, src, dst, weight = _adjacency(z, "adj_data", adj, features.shape[0])
    labels, classes = None, None
    if "labels" in z.keys:
        labels, classes = _labels(z, "labels", z["labels"], n, z.get("class_names"))
    return _raw(
        "gnn-benchmark", n, src, dst, weight, features, labels, classes,
        keys=_names(z, "node_names", z.get("node_names"), n),
        feature_names=_names(z, "attr_names", z.get("attr_names"), features.shape[1]),
    )


def _graphdata(z: _Npz) -> RawGraph:
    features = _features(z, "node_attr", z["node_attr"])
    n, src, dst, weight = _adjacency(z, "adj_matrix", z["adj_matrix"], features.shape[0])
    meta = z.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    labels, classes = None, None
    if "node_label" in z.keys:
        labels, classes = _labels(z, "node_label", z["node_label"], n, meta.get("class_names"))
    return _raw(
        "GraphData", n, src, dst, weight, features, labels, classes,
        keys=_names(z, "metadata.node_names", meta.get("node_names"), n),
        feature_names=_names(z, "metadata.attr_names", meta.get("attr_names"), features.shape[1]),
    )


# ------------------------------------------------------------------------------------------ parts
def _raw(
    layout: str,
    n: int,
    src: np.ndarray,
    dst: np.ndarray,
    weight: np.ndarray | None,
    features: np.ndarray,
    labels: np.ndarray | None,
    classes: list[Any] | None,
    keys: np.ndarray | None = None,
    feature_names: np.ndarray | None = None,
) -> RawGraph:
    info: dict[str, Any] = {"layout": layout}
    if labels is not None:
        info["label_less_nodes"] = int(np.count_nonzero(labels < 0))
    return RawGraph(
        n_nodes=n,
        src=src,
        dst=dst,
        features=features,
        weight=weight,
        labels=labels,
        label_classes=classes,
        keys=None if keys is None else pa.array(keys),
        feature_names=None if feature_names is None else feature_names.astype(str).tolist(),
        info=info,
    )


def _csr(z: _Npz, parts: tuple[str, str, str, str]) -> sp.csr_array:
    data, indices, indptr, shape = (z[p] for p in parts)
    try:
        m = sp.csr_array((data, indices, indptr), shape=tuple(int(s) for s in np.ravel(shape)))
        m.check_format(full_check=True)
    except (ValueError, TypeError) as e:
        raise z.error(parts[0], f"invalid CSR parts {', '.join(parts)}: {e}") from None
    return m


def _features(z: _Npz, key: str, x: Any) -> np.ndarray:
    """Dense float32 N x d (sparse input is converted to float32 before densifying)."""
    if sp.issparse(x) and x.ndim == 2:
        return x.astype(np.float32, copy=False).toarray()
    numeric = isinstance(x, np.ndarray) and (np.issubdtype(x.dtype, np.number) or x.dtype == bool)
    if numeric and x.ndim == 2:
        return np.ascontiguousarray(x, dtype=np.float32)
    raise z.error(key, f"expected a 2-D numeric matrix, found {_describe(x)}")


def _adjacency(
    z: _Npz, key: str, adj: Any, n_features_rows: int
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
    """Edges (row -> column) of a square matrix; zero entries dropped, weights None when all are 1."""
    matrix = sp.issparse(adj) or isinstance(adj, np.ndarray)
    if not matrix or adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise z.error(key, f"expected a square adjacency matrix, found {_describe(adj)}")
    n = adj.shape[0]
    if n != n_features_rows:
        raise z.error(key, f"adjacency has {n} nodes but the features have {n_features_rows} rows")
    coo = sp.coo_array(adj)
    keep = coo.data != 0
    data = coo.data[keep]
    weight = None if np.all(data == 1) else data.astype(np.float32)
    return n, coo.row[keep].astype(np.int64), coo.col[keep].astype(np.int64), weight


def _labels(z: _Npz, key: str, y: Any, n: int, names: Any = None) -> tuple[np.ndarray, list[Any]]:
    """int64 codes (-1 where y < 0) and the original value (or class name) of each code."""
    y = np.asarray(y)
    if y.shape != (n,) or not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise z.error(key, f"expected {n} integer labels, found shape {y.shape} {y.dtype}")
    known = y >= 0
    classes, codes_known = np.unique(y[known], return_inverse=True)
    codes = np.full(n, -1, dtype=np.int64)
    codes[known] = codes_known
    if names is None:
        return codes, classes.tolist()
    names = np.asarray(names)
    if classes.size and (names.ndim != 1 or int(classes[-1]) >= names.size):
        raise z.error(key, f"labels go up to {int(classes[-1])} but there are {names.size} class names")
    return codes, names[classes].astype(str).tolist()


def _names(z: _Npz, key: str, names: Any, expected: int) -> np.ndarray | None:
    """Optional per-node / per-feature names, checked for length."""
    if names is None:
        return None
    names = np.asarray(names)
    if names.shape != (expected,):
        raise z.error(key, f"expected {expected} names, found shape {names.shape}")
    return names


def _describe(obj: Any) -> str:
    return f"{type(obj).__name__} of shape {getattr(obj, 'shape', '?')}"
