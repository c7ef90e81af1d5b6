"""Node orderings for locality of the sparse products (``graph.reorder``), computed once at ingest.

A hop of propagation gathers, for every stored entry (i, j), row j of an N x d matrix. When the
columns of a row block lie close together, those rows come from cache instead of memory, so the order
of the nodes sets the speed of every later hop. Orderings (``order[new id] = input row``):

* ``none``: input order.
* ``degree``: by descending degree (stable): hubs, whose rows are gathered most, share cache lines.
* ``rcm``: reverse Cuthill-McKee (``scipy.sparse.csgraph``): a breadth-first order that narrows the
  band of the matrix; good for meshes and road-like graphs.
* ``community``: nodes of one community become neighbours. P = :data:`PROJECTIONS` random Gaussian
  vectors are smoothed by :data:`HOPS` hops of S = D^-1/2 (A + I) D^-1/2 and divided by sqrt(deg + 1),
  which makes them nearly constant on each community (the leading eigenvectors of the random walk);
  the nodes are then ordered by recursive bisection of these P-dimensional points (split every segment
  longer than :data:`LEAF` nodes at the median of its widest coordinate: a k-d tree order). Isolated
  nodes go last. Deterministic (fixed seed).

Measured gain in gathered bytes per CPU second (1 thread, this 2-core VM, before column panels), 1M-node /
10M-edge / 64-feature attributed SBM with 50 communities, 80% of edges inside, one hop: none 4.9 GB/s,
degree 4.8, rcm 5.4, community 7.9 (ordering by the planted communities: 8.2); 3M nodes / 30M edges: none
4.4, community 5.7. A uniform random graph has nothing local to find; SSGC K=8 over 1M nodes / 10M edges
(``bench/bench_precompute.py --graph random --reorder none degree rcm community --threads 1``): none 4.35,
degree 4.46, rcm 4.76, community 4.42. Cost at 1M / 20M nnz: degree 0.3 s, rcm 2.4 s, community 14 s.

Peak memory (bytes) besides the memory-mapped CSR: degree ``16 N``; rcm scipy's (``~24 N``, and for a
directed graph the symmetrised matrix ``~12 nnz``); community ``~(8 + 20 P) N`` (projections, two hop
buffers, the gathered points of a bisection level, sort keys and order).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

METHODS = ("none", "rcm", "degree", "community")
#: community ordering: random projections, smoothing hops, bisection leaf size (nodes)
PROJECTIONS = 16
HOPS = 8
LEAF = 256
SEED = 0


def compute_order(
    method: str, indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray | None, n: int, *, directed: bool
) -> tuple[np.ndarray, dict[str, Any]]:
    """``(order int64 N, info)`` with ``order[new id] = input row`` for ``method`` (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"unknown node order {method!r}; known: {', '.join(METHODS)}")
    t0 = time.perf_counter()
    if method == "none":
        order = np.arange(n, dtype=np.int64)
    elif method == "degree":
        order = np.argsort(-np.diff(np.asarray(indptr)), kind="stable").astype(np.int64)
    elif method == "rcm":
        order = _rcm(indptr, indices, n, directed)
    else:
        order = _community(indptr, indices, weights, n)
    info = {"method": method, "seconds": round(time.perf_counter() - t0, 3)}
    if method == "community":
        info.update({"projections": PROJECTIONS, "hops": HOPS, "leaf": LEAF})
    return order, info


def _rcm(indptr: np.ndarray, indices: np.ndarray, n: int, directed: bool) -> np.ndarray:
    import scipy.sparse as sp
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    nnz = int(indptr[-1])
    ptr = np.asarray(indptr, dtype=np.int32 if nnz < 2**31 else np.int64)
    ind = np.asarray(indices)
    if ind.dtype != ptr.dtype:
        ind = ind.astype(ptr.dtype)
    data = np.broadcast_to(np.float32(1), (nnz,))  # structure only: no nnz-sized values array
    A = sp.csr_matrix((data, ind, ptr), shape=(n, n))
    return np.asarray(reverse_cuthill_mckee(A, symmetric_mode=not directed), dtype=np.int64)


def smoothed_projections(
    indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray | None, n: int, p: int = PROJECTIONS, hops: int = HOPS
) -> np.ndarray:
    """N x p float32: S^hops R / sqrt(deg + 1) for Gaussian R (seeded), nearly constant on communities.

    Its own small kernel (torch CSR row blocks, as :mod:`agcpipe.ops.propagate` but independent of it, so
    that the ingest stage's code version stays the data package alone).
    """
    rng = np.random.default_rng(SEED)
    ptr = np.asarray(indptr, dtype=np.int64)
    if weights is None:
        deg = np.diff(ptr).astype(np.float64)
    else:
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(ptr))
        deg = np.bincount(rows, weights=np.asarray(weights, dtype=np.float64), minlength=n)
        del rows
    d1 = deg + 1.0
    dinv = torch.from_numpy((1.0 / np.sqrt(np.where(d1 > 0, d1, 1.0))).astype(np.float32))[:, None]
    dinv2 = dinv * dinv
    idx = np.asarray(indices)
    idx = idx if idx.dtype == (np.int32 if n < 2**31 else np.int64) else idx.astype(np.int32 if n < 2**31 else np.int64)
    blocks = []
    step = 1 << 22
    cost = ptr + np.arange(n + 1, dtype=np.int64)
    bounds = np.unique(np.concatenate([np.searchsorted(cost, np.arange(0, int(cost[-1]), step), side="right") - 1, [0, n]]))
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        col = torch.from_numpy(idx)
        val = None if weights is None else torch.from_numpy(np.asarray(weights, dtype=np.float32))
        for r0, r1 in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            s, e = int(ptr[r0]), int(ptr[r1])
            crow = torch.from_numpy(ptr[r0 : r1 + 1] - s).to(col.dtype)
            v = torch.ones(e - s) if val is None else val[s:e]
            blocks.append((r0, r1, torch.sparse_csr_tensor(crow, col[s:e], v, size=(r1 - r0, n), check_invariants=False)))
    a = torch.from_numpy(rng.standard_normal((n, p), dtype=np.float32)).mul_(dinv)  # Y_0 = dinv * R
    b = torch.empty_like(a)
    for j in range(1, hops + 1):  # Y_j = dinv^2 (A + I) Y_{j-1}; the last one times dinv only
        for r0, r1, blk in blocks:
            ob = b[r0:r1]
            torch.addmm(a[r0:r1], blk, a, out=ob)
            ob.mul_(dinv2[r0:r1] if j < hops else dinv[r0:r1])
        a, b = b, a
    return a.mul_(dinv).numpy()  # S^hops R / sqrt(deg + 1)


def _community(indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray | None, n: int) -> np.ndarray:
    z = smoothed_projections(indptr, indices, weights, n)
    isolated = np.diff(np.asarray(indptr)) == 0
    connected = np.flatnonzero(~isolated)
    if isolated.any():
        z = z[connected]
    order = connected[bisection_order(z, LEAF)] if isolated.any() else bisection_order(z, LEAF)
    return np.concatenate([order, np.flatnonzero(isolated)]).astype(np.int64)


def bisection_order(z: np.ndarray, leaf: int = LEAF) -> np.ndarray:
    """Order of the rows of z (N x p) by recursive median bisection on the widest coordinate (k-d tree).

    One level splits every segment longer than ``leaf`` in two halves: one stable argsort of float64 keys
    ``segment + position of the value within the segment's range``. ``log2(N / leaf)`` levels.
    """
    n, p = z.shape
    order = np.arange(n, dtype=np.int64)
    seg = np.array([0, n], dtype=np.int64)
    while n:
        lens = np.diff(seg)
        big = lens > leaf
        if not big.any():
            break
        starts = seg[:-1]
        zo = z[order]
        var = np.empty((lens.size, p))
        for j in range(p):  # per column: float64 temporaries of one column only
            col = zo[:, j].astype(np.float64)
            s1 = np.add.reduceat(col, starts)
            s2 = np.add.reduceat(col * col, starts)
            var[:, j] = s2 / lens - (s1 / lens) ** 2
        dim = var.argmax(axis=1)
        segid = np.repeat(np.arange(lens.size, dtype=np.int64), lens)
        val = zo[np.arange(n), dim[segid]].astype(np.float64)
        del zo
        lo = np.minimum.reduceat(val, starts)
        width = np.maximum.reduceat(val, starts) - lo
        scale = np.where(big & (width > 0), 0.5 / np.where(width > 0, width, 1.0), 0.0)
        key = (val - lo[segid]) * scale[segid]
        key += segid
        del val, segid
        order = order[np.argsort(key, kind="stable")]
        del key
        seg = np.unique(np.concatenate([seg, starts[big] + lens[big] // 2]))
    return order
