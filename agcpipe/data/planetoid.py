"""Reader of the Planetoid split files (Cora, CiteSeer, PubMed).

``<root>/<Name>/raw/ind.<name>.{allx,tx,ally,ty,graph,test.index}`` are Python-2 pickles (plus one text
file). They are read with a restricted unpickler that resolves only the few numpy / scipy.sparse /
collections / builtins names these files use and refuses any other reference, so no code in the file
can run: user-supplied Planetoid folders are safe to load and no trust flag is needed.

The assembly reproduces ``torch_geometric.io.read_planetoid_data``: features are ``allx`` followed by
the test rows (``tx`` row j belongs to node ``test.index[j]``), labels are the argmax of the one-hot
rows, edges come from the adjacency dict. One deliberate difference: CiteSeer's isolated test nodes
(ids in ``[min(test.index), max(test.index)]`` absent from ``test.index``; 15 of them) keep zero
features and get no label (-1), where PyG gives them label 0. ``ind.<name>.{x,y}`` (subsets of
``allx`` / ``ally``) are not needed.
"""
from __future__ import annotations

import pickle
import warnings
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..config import PlanetoidSource
from ..errors import InputError
from .raw import RawGraph

_PICKLES = ("allx", "tx", "ally", "ty", "graph")
#: every file the reader opens (the ingest fingerprint hashes exactly these)
FILES = (*_PICKLES, "test.index")

#: (module, name) pairs a Planetoid pickle may reference; old and current spellings of each
_ALLOWED = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        # numpy scalars (a number rebuilt from a dtype and bytes): absent from Cora / CiteSeer,
        # allowed for PubMed, whose files are not available to check
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("scipy.sparse.csr", "csr_matrix"),
        ("scipy.sparse._csr", "csr_matrix"),
        ("scipy.sparse", "csr_matrix"),
        ("collections", "defaultdict"),
        ("__builtin__", "list"),
        ("builtins", "list"),
    }
)


class _PlanetoidUnpickler(pickle.Unpickler):
    """Unpickler (latin1, for Python-2 numpy pickles) that resolves only the names in ``_ALLOWED``."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise InputError(
                f"refusing to unpickle a reference to {module}.{name}: a Planetoid file may only hold "
                "numpy arrays, scipy CSR matrices and dicts of lists",
                file=self._path,
            )
        with warnings.catch_warnings():  # scipy deprecates the old `scipy.sparse.csr` spelling
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def read_planetoid(source: PlanetoidSource) -> RawGraph:
    """Read a Planetoid dataset (``source.root`` must already be resolved to a folder)."""
    if source.root is None:
        raise ValueError("PlanetoidSource.root must be resolved before reading")
    folder = Path(source.root) / source.name / "raw"
    prefix = source.name.lower()
    paths = {part: folder / f"ind.{prefix}.{part}" for part in (*_PICKLES, "test.index")}
    _require_files(folder, paths.values())

    allx, tx = (_matrix(_unpickle(paths[p]), paths[p]) for p in ("allx", "tx"))
    ally, ty = (_matrix(_unpickle(paths[p]), paths[p]) for p in ("ally", "ty"))
    test_index = _read_test_index(paths["test.index"])
    n_all = allx.shape[0]
    _check_shapes(paths, allx, tx, ally, ty, test_index)
    n_nodes = int(test_index.max()) + 1 if test_index.size else n_all

    features = np.zeros((n_nodes, allx.shape[1]), dtype=np.float32)
    features[:n_all] = _dense32(allx)
    features[test_index] = _dense32(tx)
    labels = np.full(n_nodes, -1, dtype=np.int64)
    labels[:n_all] = _onehot_codes(ally)
    labels[test_index] = _onehot_codes(ty)

    src, dst = _edges(_unpickle(paths["graph"]), paths["graph"], n_nodes)
    return RawGraph(
        n_nodes=n_nodes,
        src=src,
        dst=dst,
        features=features,
        labels=labels,
        label_classes=list(range(ally.shape[1])),
        info={"label_less_nodes": int(np.count_nonzero(labels < 0))},
    )


def _require_files(folder: Path, paths: Any) -> None:
    if not folder.is_dir():
        raise InputError("Planetoid folder not found", file=folder, hint="expected <root>/<Name>/raw")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        held = sorted(p.name for p in folder.iterdir())
        raise InputError(f"missing Planetoid file; the folder holds {held}", file=missing[0])


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _PlanetoidUnpickler(f, path).load()
    except InputError:
        raise
    except Exception as e:  # a damaged pickle fails in many ways (EOFError, UnpicklingError, ...)
        raise InputError(f"corrupt Planetoid file: {type(e).__name__}: {e}", file=path) from None


def _matrix(obj: Any, path: Path) -> np.ndarray | sp.csr_matrix:
    if sp.issparse(obj) or (isinstance(obj, np.ndarray) and obj.ndim == 2):
        return obj
    raise InputError(f"expected a 2-D matrix, found {type(obj).__name__}", file=path)


def _read_test_index(path: Path) -> np.ndarray:
    try:
        with warnings.catch_warnings():  # an empty file warns; the shape check below reports it
            warnings.simplefilter("ignore", UserWarning)
            return np.loadtxt(path, dtype=np.int64, ndmin=1)
    except ValueError as e:
        raise InputError(f"not a list of integer node ids: {e}", file=path) from None


def _check_shapes(
    paths: dict[str, Path], allx: Any, tx: Any, ally: Any, ty: Any, test_index: np.ndarray
) -> None:
    n_all, n_test = allx.shape[0], test_index.size
    for name, m, rows in (("ally", ally, n_all), ("tx", tx, n_test), ("ty", ty, n_test)):
        if m.shape[0] != rows:
            raise InputError(f"has {m.shape[0]} rows, expected {rows}", file=paths[name])
    if tx.shape[1] != allx.shape[1] or ty.shape[1] != ally.shape[1]:
        raise InputError(
            f"has {tx.shape[1]} features / {ty.shape[1]} classes where allx / ally have "
            f"{allx.shape[1]} / {ally.shape[1]}",
            file=paths["tx"],
        )
    repeats = n_test - np.unique(test_index).size
    if n_test and (test_index.min() != n_all or repeats):
        raise InputError(
            f"test node ids must be distinct and start at {n_all} (the rows of allx); "
            f"found minimum {test_index.min()} and {repeats} repeats",
            file=paths["test.index"],
        )


def _dense32(m: np.ndarray | sp.csr_matrix) -> np.ndarray:
    if sp.issparse(m):
        return m.astype(np.float32, copy=False).toarray()
    return np.asarray(m, dtype=np.float32)


def _onehot_codes(onehot: np.ndarray | sp.csr_matrix) -> np.ndarray:
    """Class code per row (argmax); -1 for an all-zero row."""
    dense = _dense32(onehot)
    codes = dense.argmax(axis=1).astype(np.int64)
    codes[~dense.any(axis=1)] = -1
    return codes


def _edges(graph: Any, path: Path, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Flatten ``{node: [neighbours]}`` into src / dst arrays."""
    try:
        if not isinstance(graph, dict):
            raise TypeError(f"found {type(graph).__name__}")
        src_ids = np.fromiter(graph.keys(), dtype=np.int64, count=len(graph))
        degrees = np.fromiter(map(len, graph.values()), dtype=np.int64, count=len(graph))
        dst = np.fromiter(chain.from_iterable(graph.values()), dtype=np.int64, count=int(degrees.sum()))
    except (TypeError, ValueError, OverflowError) as e:
        raise InputError(f"expected a dict of node id -> list of node ids ({e})", file=path) from None
    src = np.repeat(src_ids, degrees)
    bad = (src < 0) | (src >= n_nodes) | (dst < 0) | (dst >= n_nodes)
    if bad.any():
        raise InputError(
            f"{int(bad.sum())} edges refer to node ids outside 0..{n_nodes - 1}",
            file=path,
            values=np.stack([src[bad], dst[bad]], axis=1)[:5].tolist(),
        )
    return src, dst
