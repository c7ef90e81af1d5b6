"""Propagation operators on the symmetric normalised adjacency with self-loops.

    S = D^-1/2 (A + I) D^-1/2,    D = diag(weighted degree of A + 1)

A is the canonical CSR adjacency (:mod:`agcpipe.data.graph`) with its weights, or 1s when unweighted. S is
never materialised and no self-loops are inserted: ``S X = dinv * (A (dinv * X) + dinv * X)``, computed row
block by row block as torch CSR x dense products whose blocks are zero-copy views of the (memory-mapped)
CSR arrays (torch hands int32 CSR x dense float32 to MKL; int64 indices are converted on every call).

The multi-hop operators run in the *scaled* space ``Y = dinv * Z``: one hop is ``T = (A + I) Y`` (a single
``addmm`` per block, the ``+ I`` folded into its ``beta * input`` term) followed by a per-row scaling that
gives either the next ``Y`` (``* dinv**2``) or the unscaled result (``* dinv``), with the op's accumulation
or teleport term applied to the block right after its product. So no N x d scratch for ``dinv * Z`` is
needed between hops, which keeps SSGC at 3 N x d buffers (output included) and SGC / PPR at 2.

Memory of a :class:`NormalizedAdjacency` (bytes): ``8 N`` (dinv, dinv**2) ``+ 4 (N + blocks)`` (block row
pointers) ``+ 4 block_nnz`` (shared ones, unweighted graphs) ``+ 4 nnz`` only when int64 indices of a graph
with N < 2**31 are narrowed to int32; ``16 N`` more while it is built. The CSR arrays are used in place.

**Feature-dimension blocking.** Every op is column-separable (S^k X[:, c] = (S^k X)[:, c]), so
:func:`propagate` runs it on blocks of ``feature_block`` columns, one after the other, holding only
``(buffers + 1) x 4 N x feature_block`` bytes (the block of X, the op's buffers, the output block) and
reading X / writing the output through short-lived row windows of their files. The block is chosen
from ``memory_budget`` (default :data:`DEFAULT_MEMORY_BUDGET`, env ``AGCPIPE_MEMORY_BUDGET``): the whole
width when it fits (then X and the output file are used in place, as before), else the widest multiple
of 8 columns that fits. So SSGC on 10M x 128 (3 buffers of 5 GB at full width) runs in ~4-5 GiB.
Narrower blocks only add per-entry overhead (1 thread, CPU seconds per hop, SBM graphs, d = 64): 1M / 20M
nnz: 64 columns 1.06 s, 16 columns 1.31 s; 3M / 60M nnz: 64 / 32 / 16 / 8 columns 3.5 / 4.9 / 4.8 / 7.4 s,
community-ordered 2.7 / 2.9 / 3.4 s. So blocks serve memory, not speed; the speed lever is the column
*panels* below (and the node order, :mod:`agcpipe.data.reorder`).

**Column panels.** A hop gathers rows of Y at random; splitting the columns of A into panels whose rows of
Y fit in cache (:data:`PANEL_BYTES`) and accumulating the products panel by panel turns most gathers into
cache hits, at the price of streaming the output rows once per panel (numbers at :data:`PANEL_BYTES`).

**Dask.** With a ``client``, each hop runs as row-block tasks (:class:`DistributedAdjacency`): every task
maps the CSR, Y and its rows of the outputs from files, computes ``((A + I) Y)[rows]`` with the same
torch product and writes its rows. Buffers are then memory-mapped files in ``work_dir``; the driver
does the elementwise work. The per-row arithmetic is the single-process one, so results are equal.
"""
from __future__ import annotations

import math
import mmap
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, StageError, first_rows

#: default entries of (A + I) per row block. Measured on 2 shared cores (1M nodes, 20M nnz, d = 64, ssgc,
#: block sizes interleaved): from 2**18 up to a single block the best-of-5 seconds per hop agree within noise
#: (0.42-0.48 s); 2**16 is 5-20% slower and 2**14 30-50%. Each block costs a few OpenMP parallel regions, and
#: while other processes load the cores every region waits for a descheduled thread: medians of 2**14 blocks
#: were 2.6-5.3 s per hop against ~0.5 s, and fresh-process sgc K=8 runs with 2**14 / 2**16 blocks took 5-76 s
#: against 3.3-3.6 s at 2**22. Hence large blocks; they still bound a block's int32 row offsets (graphs with
#: nnz >= 2**31 need several) and the size of the shared ones tensor.
DEFAULT_BLOCK_NNZ = 1 << 22

#: column panels: the Y rows one panel gathers from should stay in cache, but every panel streams the output
#: rows once more, so few panels. Measured on this 2-core VM, 1 thread, CPU seconds of one hop (row blocks of
#: 2^25 entries), gathered GB/s: 1M nodes / 20M nnz random graph, b = 64 columns: 1 panel 4.7, 2 5.1,
#: 3 5.7, 4 6.3, 6 6.7, 8 (31 MB each) 7.4; b = 16: 1 4.2, 2 5.3, 4 6.5, 6 6.8, 8 6.7. 10M nodes / 200M nnz
#: (community-ordered SBM), b = 24: 1 3.2, 3 3.9, 5 (183 MB) 4.3, 8 4.2, 19 3.5; b = 64: 1 4.2, 12 4.7,
#: 19 4.1. Hence panels of 16 MiB, at most a quarter of the average degree (the output streaming caps the
#: gain). Building them costs about one to two hops (0.6-1.1 s at 1M, ~10 s at 10M), once per operator.
PANEL_BYTES = 16 * 2**20
MAX_PANELS = 64
#: row blocks are at least this large when panelled: every panel of a block streams the block's output rows
#: once more, and longer panels reuse the cached Y rows longer (same graph: 4M-entry blocks 0.71 s per hop,
#: one 32M-entry block 0.60 s)
PANEL_BLOCK_NNZ = 1 << 25
#: working-set budget of one column block of :func:`propagate` (bytes), unless ``memory_budget`` is given
DEFAULT_MEMORY_BUDGET = int(float(os.environ.get("AGCPIPE_MEMORY_BUDGET", 4 * 2**30)))
#: bytes per row window when X is read / the output written in column blocks
WINDOW_BYTES = 32 * 2**20

#: progress callback: ``progress(hop, K)`` after each of the K hops
Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------- helpers
#: buffers of at least this many bytes are backed by transparent huge pages (see :func:`huge_empty`)
HUGE_MIN_BYTES = 32 * 2**20
_HUGE = 2 * 2**20


def huge_empty(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 CPU tensor in anonymous memory advised to use transparent huge pages.

    A hop gathers rows of Y at random: with 4 KiB pages nearly every gather also misses the TLB. With
    2 MiB pages (``madvise(MADV_HUGEPAGE)``; Linux with THP in ``madvise`` or ``always`` mode) the same
    hop ran 1.3-1.4x faster here (1M nodes / 20M nnz / 64 columns, 1 thread, CPU seconds per hop: 5
    panels 0.585 s -> 0.417 s, 8.8 -> 12.3 GB/s gathered; no panels 0.95 s -> 0.71 s, 5.4 -> 7.2 GB/s).
    The mapping is private (a shared anonymous one is shmem, which THP usually skips). Small buffers,
    other systems and a refused advice fall back to ``torch.empty``.
    """
    n_el = int(np.prod(shape)) if shape else 1
    nbytes = 4 * n_el
    if nbytes < HUGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=torch.float32)
    try:
        m = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared would be shmem
        base = np.frombuffer(m, dtype=np.uint8)
        off = (-base.ctypes.data) % _HUGE  # a 2 MiB-aligned start, so that whole huge pages fit
        m.madvise(mmap.MADV_HUGEPAGE, off, nbytes - nbytes % _HUGE if nbytes >= _HUGE else nbytes)
        arr = base[off : off + nbytes].view(np.float32).reshape(shape)
    except (OSError, ValueError):
        return torch.empty(shape, dtype=torch.float32)
    return torch.from_numpy(arr)  # the array keeps the mapping alive; unmapped with the last reference


def _tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy torch view of a numpy array, also of a read-only memmap (never written through)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def _row_blocks(indptr: np.ndarray, block_nnz: int) -> np.ndarray:
    """Row boundaries ``b`` (b[0] = 0, b[-1] = N) such that rows b[i]:b[i+1] hold ~block_nnz entries of A + I.

    Counting the self-loop keeps blocks of mostly isolated nodes bounded; a row longer than block_nnz gets a
    block of its own.
    """
    n = indptr.shape[0] - 1
    cost = np.asarray(indptr, dtype=np.int64) + np.arange(n + 1, dtype=np.int64)
    starts = np.searchsorted(cost, np.arange(0, int(cost[-1]), block_nnz, dtype=np.int64), side="right") - 1
    return np.unique(np.concatenate([starts, [0, n]]))


def weighted_degree(indptr: np.ndarray, weights: np.ndarray | None, n: int) -> np.ndarray:
    """Row sums of A (float64 N), in row blocks: peak ``8 (N + 2**20)`` bytes besides the result."""
    if weights is None:
        return np.diff(np.asarray(indptr)).astype(np.float64)
    deg = np.empty(n, dtype=np.float64)
    bounds = _row_blocks(indptr, 1 << 20)
    for r0, r1 in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        s = int(indptr[r0])
        csum = np.zeros(int(indptr[r1]) - s + 1, dtype=np.float64)
        np.cumsum(weights[s : int(indptr[r1])], dtype=np.float64, out=csum[1:])
        ptr = np.asarray(indptr[r0 : r1 + 1]) - s
        deg[r0:r1] = csum[ptr[1:]] - csum[ptr[:-1]]
    return deg


def sym_norm_scale(indptr: np.ndarray, weights: np.ndarray | None, n: int) -> np.ndarray:
    """``dinv = (deg + 1) ** -0.5`` as float32 N, deg the weighted row sums of A.

    Raises :class:`StageError` where ``deg + 1 <= 0`` (negative weights), which has no real square root.
    """
    d1 = weighted_degree(indptr, weights, n) + 1.0
    bad = ~(d1 > 0)
    if bad.any():
        rows, count = first_rows(bad)
        raise StageError(
            f"weighted degree + 1 must be positive to normalise D^-1/2 (A + I) D^-1/2, but is not for "
            f"{count} nodes; first offending nodes: {rows} (negative edge weights?)"
        )
    return (1.0 / np.sqrt(d1)).astype(np.float32)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


# ---------------------------------------------------------------------------------------------- row blocks
def panel_count(n: int, nnz: int, width: int, panel_bytes: int | None = None) -> int:
    """Column panels for a hop over an N x ``width`` float32 Y: the Y rows of one panel take about
    ``panel_bytes`` (:data:`PANEL_BYTES`), at most :data:`MAX_PANELS` and at most a quarter of the average
    degree (each panel streams the output rows once more; its row pointers cost 4 N bytes)."""
    target = PANEL_BYTES if panel_bytes is None else panel_bytes
    if target <= 0 or n == 0:
        return 1
    p = int(round(4 * n * width / target))
    return max(1, min(p, MAX_PANELS, nnz // max(n, 1) // 4))


def csr_blocks(
    indptr: np.ndarray,
    indices: np.ndarray,
    weights: np.ndarray | None,
    n: int,
    r0: int,
    r1: int,
    block_nnz: int,
    device: torch.device | str = "cpu",
    panels: int = 1,
) -> list[tuple[int, int, list[tuple[int, int, torch.Tensor]]]]:
    """Torch CSR blocks of rows ``r0:r1`` with ~block_nnz entries of A + I each: ``(a, b, parts)`` where
    ``parts`` lists ``(c0, c1, A[a:b, c0:c1])``, one per column panel.

    One panel: zero-copy views of the CSR arrays (the part is A[a:b] with all n columns). Several: the
    block's entries regrouped by panel (columns stay sorted within a row), ``4 nnz`` bytes of indices
    (``+ 4 nnz`` of weights) and ``4 (rows + 1)`` of row pointers per panel.
    """
    device = torch.device(device)
    bounds = _row_blocks(np.asarray(indptr[r0 : r1 + 1]) - int(indptr[r0]), block_nnz) + r0
    ptr = _tensor(np.asarray(indptr[r0 : r1 + 1], dtype=np.int64))
    base = int(indptr[r0])
    e_all = int(indptr[r1])
    idx_np = np.asarray(indices[base:e_all])
    col = _tensor(idx_np).to(device)
    offs = np.asarray(indptr)[bounds].tolist()
    w_np = None if weights is None else np.asarray(weights[base:e_all])
    if weights is None:
        longest = max((b - a for a, b in zip(offs[:-1], offs[1:])), default=0)
        ones = torch.ones(longest, dtype=torch.float32, device=device)
    else:
        val = _tensor(w_np).to(device)
    width = -(-n // panels) if panels > 1 else n
    blocks: list[tuple[int, int, list[tuple[int, int, torch.Tensor]]]] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        for a, b, s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist(), offs[:-1], offs[1:]):
            rows = b - a
            if panels <= 1:
                crow = (ptr[a - r0 : b - r0 + 1] - s).to(device=device, dtype=col.dtype)
                values = ones[: e - s] if weights is None else val[s - base : e - base]
                part = torch.sparse_csr_tensor(crow, col[s - base : e - base], values, size=(rows, n), check_invariants=False)
                blocks.append((a, b, [(0, n, part)]))
                continue
            cols = idx_np[s - base : e - base]
            pid = (cols // width).astype(np.uint8 if panels <= 256 else np.uint16)  # small: radix argsort
            local = np.repeat(np.arange(rows, dtype=np.int64), np.diff(np.asarray(indptr[a : b + 1])))
            local += pid.astype(np.int64) * rows
            counts = np.bincount(local, minlength=panels * rows).reshape(panels, rows)
            del local
            order = np.argsort(pid, kind="stable")  # by panel; row-major (and sorted columns) within one
            sorted_cols = cols[order]
            sorted_cols -= (pid[order].astype(sorted_cols.dtype) * width).astype(sorted_cols.dtype)
            sorted_w = None if w_np is None else w_np[s - base : e - base][order]
            starts = np.concatenate([[0], np.cumsum(counts.sum(axis=1))])
            parts = []
            for p in range(panels):
                c0, c1 = p * width, min(n, (p + 1) * width)
                if c1 <= c0:
                    break
                ps, pe = int(starts[p]), int(starts[p + 1])
                crow = np.zeros(rows + 1, dtype=idx_np.dtype)
                np.cumsum(counts[p], out=crow[1:])
                values = ones[: pe - ps] if weights is None else _tensor(sorted_w[ps:pe]).to(device)
                part = torch.sparse_csr_tensor(
                    _tensor(crow).to(device), _tensor(sorted_cols[ps:pe]).to(device), values,
                    size=(rows, c1 - c0), check_invariants=False,
                )
                parts.append((c0, c1, part))
            blocks.append((a, b, parts))
    return blocks


def apply_blocks(
    blocks: list[tuple[int, int, list[tuple[int, int, torch.Tensor]]]],
    Y: torch.Tensor,
    out: torch.Tensor,
    scale: torch.Tensor | None,
    acc: torch.Tensor | None = None,
    acc_scale: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
    add_scale: torch.Tensor | float = 1.0,
) -> None:
    """The hop of :meth:`NormalizedAdjacency.hop` on the given row blocks (rows absolute); with column
    panels the block's product is accumulated panel by panel (the first one adds the ``+ I`` term)."""
    for r0, r1, parts in blocks:
        ob = out[r0:r1]
        for i, (c0, c1, part) in enumerate(parts):
            torch.addmm(Y[r0:r1] if i == 0 else ob, part, Y[c0:c1], out=ob)
        if acc is not None:
            acc[r0:r1].addcmul_(ob, acc_scale[r0:r1])
        if scale is not None:
            ob.mul_(scale[r0:r1])
        if add is not None:
            if isinstance(add_scale, torch.Tensor):
                ob.addcmul_(add[r0:r1], add_scale[r0:r1])
            else:
                ob.add_(add[r0:r1], alpha=add_scale)


# ---------------------------------------------------------------------------------------------- operator
class NormalizedAdjacency:
    """``S = D^-1/2 (A + I) D^-1/2`` as a list of zero-copy torch CSR row blocks of A.

    ``indptr`` int64 N+1, ``indices`` int32 (int64 when N >= 2**31; int64 indices of a smaller graph are
    narrowed to int32 once, 4 nnz bytes, rather than by torch on every product), ``weights``
    float32 nnz or None (every entry weighs 1). Arrays may be read-only memmaps. On ``device != "cpu"`` the
    indices (and weights) are copied to the device once.
    """

    def __init__(
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        weights: np.ndarray | None,
        n: int,
        *,
        block_nnz: int = DEFAULT_BLOCK_NNZ,
        device: str | torch.device = "cpu",
    ) -> None:
        if indptr.shape != (n + 1,):
            raise ValueError(f"indptr has shape {indptr.shape}, expected ({n + 1},)")
        if block_nnz < 1:
            raise ValueError(f"block_nnz must be >= 1, got {block_nnz}")
        nnz = int(indptr[-1])
        if indices.shape != (nnz,) or (weights is not None and weights.shape != (nnz,)):
            raise ValueError(f"indices / weights must have indptr[-1] = {nnz} entries")
        index_dtype = np.int32 if n < 2**31 else np.int64
        if indices.dtype != index_dtype:
            indices = indices.astype(index_dtype)
        if weights is not None and weights.dtype != np.float32:
            weights = weights.astype(np.float32)

        self.n, self.nnz, self.device = n, nnz, torch.device(device)
        dinv = _tensor(sym_norm_scale(indptr, weights, n)).to(self.device)
        #: D^-1/2 and D^-1 as N x 1 columns (they scale rows)
        self.dinv, self.dinv2 = dinv[:, None], (dinv * dinv)[:, None]
        self._blocks = csr_blocks(indptr, indices, weights, n, 0, n, block_nnz, self.device)
        self._csr = (indptr, indices, weights, block_nnz)
        self._panelled: dict[int, list] = {1: self._blocks}
        #: target bytes of one column panel of Y (None: :data:`PANEL_BYTES`; 0: no panels)
        self.panel_bytes: int | None = None

    def blocks_for(self, width: int) -> list:
        """The row blocks split into the column panels that suit a Y of ``width`` columns (built once)."""
        p = 1 if self.device.type != "cpu" else panel_count(self.n, self.nnz, width, self.panel_bytes)
        if p not in self._panelled:
            indptr, indices, weights, block_nnz = self._csr
            self._panelled = {1: self._blocks}  # keep one panelled copy at a time (its 4-8 nnz bytes)
            self._panelled[p] = csr_blocks(
                indptr, indices, weights, self.n, 0, self.n, max(block_nnz, PANEL_BLOCK_NNZ), self.device, panels=p
            )
        return self._panelled[p]

    @property
    def n_blocks(self) -> int:
        return len(self._blocks)

    def matmul(self, X: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = S X`` for N x d float32 X; ``out`` (N x d, contiguous) must not alias X.

        Peak memory besides X and out: ``4 N d`` bytes (the scratch ``dinv * X``).
        """
        self._check(X, out)
        scratch = self.buffer(tuple(X.shape))
        torch.mul(X, self.dinv, out=scratch)
        self.hop(scratch, out, scale=self.dinv)
        return out

    def buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised float32 working buffer (here: memory, in huge pages when large; on another
        device: there; :class:`DistributedAdjacency`: a file)."""
        if self.device.type == "cpu":
            return huge_empty(shape)
        return torch.empty(shape, dtype=torch.float32, device=self.device)

    def reset(self) -> None:
        """Forget the working buffers (:class:`DistributedAdjacency` removes their files)."""

    def hop(
        self,
        Y: torch.Tensor,
        out: torch.Tensor,
        *,
        scale: torch.Tensor | None,
        acc: torch.Tensor | None = None,
        acc_scale: torch.Tensor | None = None,
        add: torch.Tensor | None = None,
        add_scale: torch.Tensor | float = 1.0,
    ) -> None:
        """One hop in the scaled space, per row block r (all scales are N x 1 row columns)::

            T = ((A + I) Y)[r];  acc[r] += acc_scale[r] * T;  out[r] = scale[r] * T + add_scale[r] * add[r]

        (each step only when its tensor is given). ``out`` must not overlap Y. No temporaries beyond what the
        CSR product allocates.
        """
        if _overlaps(Y, out):
            raise ValueError("out must not alias the hop's input")
        apply_blocks(self.blocks_for(Y.shape[1]), Y, out, scale, acc, acc_scale, add, add_scale)

    def _check(self, X: torch.Tensor, out: torch.Tensor) -> None:
        if X.ndim != 2 or X.shape[0] != self.n or out.shape != X.shape:
            raise ValueError(f"X and out must both be {self.n} x d, got {tuple(X.shape)} and {tuple(out.shape)}")
        if X.dtype != torch.float32 or out.dtype != torch.float32:
            raise ValueError(f"X and out must be float32, got {X.dtype} and {out.dtype}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
        if _overlaps(X, out):
            raise ValueError("out must not alias X")


# ---------------------------------------------------------------------------------------------- Dask
class DistributedAdjacency(NormalizedAdjacency):
    """:class:`NormalizedAdjacency` whose hops run as Dask tasks over row ranges.

    Buffers are memory-mapped ``.npy`` files under ``work_dir`` (so workers can map them); a scale or
    teleport tensor that is not a file yet (e.g. ``dinv * (1 - alpha)``) is written to one on first use.
    The driver holds the per-node scales and does the elementwise work between hops; each task maps the
    CSR, the hop's input and its rows of the outputs. Peak memory per worker: its row blocks' torch CSR
    headers (``~4 rows``) and the pages it touches; the driver: ``~24 N`` plus touched pages.
    """

    def __init__(
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        weights: np.ndarray | None,
        n: int,
        *,
        client: Any,
        work_dir: Path,
        tasks: int,
        block_nnz: int = DEFAULT_BLOCK_NNZ,
    ) -> None:
        from .. import distributed as dd

        if indptr.shape != (n + 1,):
            raise ValueError(f"indptr has shape {indptr.shape}, expected ({n + 1},)")
        self.client, self.work_dir, self.block_nnz = client, Path(work_dir), block_nnz
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.n, self.nnz, self.device = n, int(indptr[-1]), torch.device("cpu")
        index_dtype = np.int32 if n < 2**31 else np.int64
        if indices.dtype != index_dtype:
            indices = indices.astype(index_dtype)
        if weights is not None and weights.dtype != np.float32:
            weights = weights.astype(np.float32)
        self._graph = (
            dd.shared(np.asarray(indptr, dtype=np.int64) if indptr.dtype != np.int64 else indptr, self.work_dir, "indptr"),
            dd.shared(indices, self.work_dir, "indices"),
            None if weights is None else dd.shared(weights, self.work_dir, "weights"),
        )
        self._files: dict[tuple[int, tuple[int, ...]], tuple[Any, torch.Tensor]] = {}
        self._count = 0
        dinv = sym_norm_scale(indptr, weights, n)
        self.dinv = self.buffer((n, 1))
        self.dinv.copy_(_tensor(dinv)[:, None])
        self.dinv2 = self.buffer((n, 1))
        torch.mul(self.dinv, self.dinv, out=self.dinv2)
        cost = np.asarray(indptr, dtype=np.int64) + np.arange(n + 1, dtype=np.int64)
        self.row_ranges = dd.ranges(n, tasks, cost)
        self._blocks = []
        self.panel_bytes = None

    @property
    def n_blocks(self) -> int:
        return len(self.row_ranges)

    def buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        from ..distributed import ArrayRef

        self._count += 1
        path = self.work_dir / f"buffer{self._count:04d}.npy"
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        t = _tensor(arr)
        self._files[(t.data_ptr(), tuple(t.shape))] = (ArrayRef.of_npy(path), t)
        return t

    def _ref(self, t: torch.Tensor | None) -> Any:
        """The file of a buffer tensor; a tensor that is not one (a constant scale) is copied to a file
        once (and kept alive, so that its address cannot be reused by another tensor)."""
        if t is None:
            return None
        key = (t.data_ptr(), tuple(t.shape))
        hit = self._files.get(key)
        if hit is not None:
            return hit[0]
        copy = self.buffer(tuple(t.shape))
        copy.copy_(t)
        ref = self._files[(copy.data_ptr(), tuple(copy.shape))][0]
        self._files[key] = (ref, t)
        return ref

    def hop(
        self,
        Y: torch.Tensor,
        out: torch.Tensor,
        *,
        scale: torch.Tensor | None,
        acc: torch.Tensor | None = None,
        acc_scale: torch.Tensor | None = None,
        add: torch.Tensor | None = None,
        add_scale: torch.Tensor | float = 1.0,
    ) -> None:
        from .. import distributed as dd

        if _overlaps(Y, out):
            raise ValueError("out must not alias the hop's input")
        refs = {
            "Y": self._ref(Y), "out": self._ref(out), "scale": self._ref(scale), "acc": self._ref(acc),
            "acc_scale": self._ref(acc_scale), "add": self._ref(add),
            "add_scale": self._ref(add_scale) if isinstance(add_scale, torch.Tensor) else float(add_scale),
            "panel_bytes": self.panel_bytes,
        }
        args = [(self._graph, self.n, a, b, self.block_nnz, refs) for a, b in self.row_ranges]
        dd.map_gather(self.client, hop_rows, args)

    def reset(self) -> None:
        """Drop every buffer file but the degree scales (between column blocks)."""
        keep = {(t.data_ptr(), tuple(t.shape)) for t in (self.dinv, self.dinv2)}
        keep_paths = {self._files[k][0].path for k in keep}
        for key in [k for k in self._files if k not in keep]:
            ref = self._files.pop(key)[0]
            if ref.path not in keep_paths:
                Path(ref.path).unlink(missing_ok=True)


#: per worker process: the CSR blocks (with panels) of the row ranges it ran, at most this many entries
TASK_CACHE_ENTRIES = 1 << 27
_TASK_BLOCKS: dict[tuple, list] = {}
_TASK_SIZES: dict[tuple, int] = {}


def _stamp(ref: Any) -> tuple[int, int, int]:
    st = os.stat(ref.path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def hop_rows(graph: tuple, n: int, r0: int, r1: int, block_nnz: int, refs: dict[str, Any]) -> int:
    """Dask task: the hop of :meth:`NormalizedAdjacency.hop` for rows ``r0:r1``, on memory-mapped files.

    Returns the rows done. Only rows r0:r1 of ``out`` / ``acc`` are written.
    """
    indptr_ref, indices_ref, weights_ref = graph
    indptr, indices = indptr_ref.open(), indices_ref.open()
    weights = None if weights_ref is None else weights_ref.open()

    def t(name: str, mode: str = "r") -> torch.Tensor | None:
        ref = refs[name]
        return None if ref is None else _tensor(ref.open(mode))

    Y = t("Y")
    panels = panel_count(n, int(indptr[-1]), Y.shape[1], refs.get("panel_bytes"))
    bnnz = max(block_nnz, PANEL_BLOCK_NNZ) if panels > 1 else block_nnz
    key = (indptr_ref, indices_ref, weights_ref, _stamp(indices_ref), n, r0, r1, bnnz, panels)
    blocks = _TASK_BLOCKS.get(key)
    if blocks is None:  # regrouping into panels costs about a hop: a worker keeps its ranges' blocks
        blocks = csr_blocks(indptr, indices, weights, n, r0, r1, bnnz, panels=panels)
        nnz = int(indptr[r1]) - int(indptr[r0])
        while _TASK_BLOCKS and sum(_TASK_SIZES.values()) + nnz > TASK_CACHE_ENTRIES:
            old = next(iter(_TASK_BLOCKS))
            del _TASK_BLOCKS[old], _TASK_SIZES[old]
        _TASK_BLOCKS[key], _TASK_SIZES[key] = blocks, nnz
    add_scale = refs["add_scale"]
    apply_blocks(
        blocks, Y, t("out", "r+"), t("scale"), t("acc", "r+"), t("acc_scale"), t("add"),
        add_scale if isinstance(add_scale, float) else t("add_scale"),
    )
    return r1 - r0


# ---------------------------------------------------------------------------------------------- op specs
@dataclass(frozen=True)
class Param:
    """One numeric op parameter: type, default and the closed (or left-open) range it must lie in."""

    kind: type  # int or float
    default: int | float
    low: float
    high: float = math.inf
    low_open: bool = False
    doc: str = ""

    def check(self, op: str, name: str, value: Any) -> int | float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ConfigError(f"op '{op}': {name} must be a number, got {value!r}")
        if self.kind is int:
            if isinstance(value, (float, np.floating)):
                raise ConfigError(f"op '{op}': {name} must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        too_low = value <= self.low if self.low_open else value < self.low
        if not math.isfinite(value) or too_low or value > self.high:
            lo = "(" if self.low_open else "["
            raise ConfigError(f"op '{op}': {name} must be in {lo}{self.low:g}, {self.high:g}], got {value!r}")
        return value


@dataclass(frozen=True)
class OpInfo:
    """What an op computes, its parameters and its working memory."""

    description: str
    params: dict[str, Param] = field(default_factory=dict)
    #: N x d float32 buffers held at once besides the input X, the output memmap included
    buffers: int = 1


_K = "propagation steps (hops)"
OPS: dict[str, OpInfo] = {
    "identity": OpInfo("X (float32 copy)", buffers=1),
    "ax": OpInfo("S X", buffers=2),
    "sgc": OpInfo("S^K X (SGC)", {"K": Param(int, 2, 1, doc=_K)}, buffers=2),
    "ssgc": OpInfo(
        "1/K sum_{k=1..K} ((1-alpha) S^k X + alpha X) (SSGC, as torch_geometric.nn.SSGConv)",
        {"K": Param(int, 16, 1, doc=_K), "alpha": Param(float, 0.05, 0.0, 1.0, doc="weight of the raw features")},
        buffers=3,
    ),
    "ppr": OpInfo(
        "APPNP power iteration Z_0 = X, Z_{k+1} = (1-alpha) S Z_k + alpha X, returns Z_K",
        {
            "alpha": Param(float, 0.1, 0.0, 1.0, low_open=True, doc="teleport probability"),
            "K": Param(int, 10, 1, doc="power iterations"),
        },
        buffers=2,
    ),
}


def validate_op(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Normalise an op spec: ``{"op": ..., <every param, defaults filled in>}``.

    A ``name`` key (how methods label their matrices) is kept as is. Raises :class:`ConfigError` for an
    unknown op (listing the known ones), an unknown parameter or a bad value.
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(f"an op spec must be a mapping like {{'op': 'sgc', 'K': 2}}, got {spec!r}")
    known = ", ".join(OPS)
    if "op" not in spec:
        raise ConfigError(f"op spec {dict(spec)!r} has no 'op'; known ops: {known}")
    op = spec["op"]
    if not isinstance(op, str) or op not in OPS:
        raise ConfigError(f"unknown propagation op {op!r}; known ops: {known}")
    info = OPS[op]
    extra = sorted(set(spec) - set(info.params) - {"op", "name"})
    if extra:
        allowed = ", ".join(info.params) or "none"
        raise ConfigError(f"op '{op}': unknown parameter(s) {extra}; its parameters: {allowed}")
    out: dict[str, Any] = {"name": spec["name"]} if "name" in spec else {}
    out["op"] = op
    for name, p in info.params.items():
        out[name] = p.check(op, name, spec.get(name, p.default))
    return out


# ---------------------------------------------------------------------------------------------- ops
def _chain(bufs: list[torch.Tensor], K: int) -> Callable[[int], torch.Tensor]:
    """Ping-pong between two buffers so that step K (the result) lands in ``bufs[0]`` (the output)."""
    return lambda j: bufs[(K - j) % 2]


def _ax(adj: NormalizedAdjacency, X: torch.Tensor, out: torch.Tensor, spec: dict, progress: Progress | None) -> None:
    """S X. Working memory: out + 1 N x d scratch (dinv * X)."""
    adj.matmul(X, out)
    if progress:
        progress(1, 1)


def _sgc(adj: NormalizedAdjacency, X: torch.Tensor, out: torch.Tensor, spec: dict, progress: Progress | None) -> None:
    """S^K X. Working memory: out + 1 N x d buffer (Y_j = dinv * S^j X ping-pongs with out)."""
    K = spec["K"]
    buf = _chain([out, adj.buffer(tuple(out.shape))], K)
    torch.mul(X, adj.dinv, out=buf(0))
    for j in range(1, K + 1):
        adj.hop(buf(j - 1), buf(j), scale=adj.dinv2 if j < K else adj.dinv)
        if progress:
            progress(j, K)


def _ssgc(adj: NormalizedAdjacency, X: torch.Tensor, out: torch.Tensor, spec: dict, progress: Progress | None) -> None:
    """alpha X + (1-alpha)/K sum_{k=1..K} S^k X. Working memory: out (the sum) + 2 N x d buffers (Y_k)."""
    K, alpha = spec["K"], spec["alpha"]
    torch.mul(X, alpha, out=out)
    ys = [adj.buffer(tuple(out.shape)), adj.buffer(tuple(out.shape))]
    torch.mul(X, adj.dinv, out=ys[0])
    coef = adj.dinv * ((1.0 - alpha) / K)
    for j in range(1, K + 1):
        # out += coef * T (= (1-alpha)/K S^j X); the next Y (= dinv^2 T) is only needed before the last hop
        adj.hop(ys[(j - 1) % 2], ys[j % 2], scale=adj.dinv2 if j < K else None, acc=out, acc_scale=coef)
        if progress:
            progress(j, K)


def _ppr(adj: NormalizedAdjacency, X: torch.Tensor, out: torch.Tensor, spec: dict, progress: Progress | None) -> None:
    """Z_K of Z_{k+1} = (1-alpha) S Z_k + alpha X. Working memory: out + 1 N x d buffer.

    In the scaled space W = dinv * Z: W_{k+1} = (1-alpha) dinv^2 (A + I) W_k + alpha dinv X.
    """
    K, alpha = spec["K"], spec["alpha"]
    buf = _chain([out, adj.buffer(tuple(out.shape))], K)
    torch.mul(X, adj.dinv, out=buf(0))
    w_scale, w_add = adj.dinv2 * (1.0 - alpha), adj.dinv * alpha
    z_scale = adj.dinv * (1.0 - alpha)
    for j in range(1, K + 1):
        if j < K:
            adj.hop(buf(j - 1), buf(j), scale=w_scale, add=X, add_scale=w_add)
        else:
            adj.hop(buf(j - 1), buf(j), scale=z_scale, add=X, add_scale=alpha)
        if progress:
            progress(j, K)


_IMPL = {"ax": _ax, "sgc": _sgc, "ssgc": _ssgc, "ppr": _ppr}


def column_block(op: str, n: int, d: int, memory_budget: int | None = None) -> int:
    """Columns per block so that one block's working set (the block of X, the op's buffers and the
    output block: ``(buffers + 1) x 4 N`` bytes per column) fits ``memory_budget``: all d when the
    op's full-width buffers fit, else the widest multiple of 8 (at least 1)."""
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    bufs = OPS[op].buffers
    if bufs * 4 * n * d <= budget:  # full width: X and the output file are used in place
        return d
    per_col = (bufs + 1) * 4 * max(n, 1)
    cols = max(1, budget // per_col)
    return int(min(d, cols if cols < 8 else cols - cols % 8))


def propagate(
    spec: Mapping[str, Any],
    indptr: np.ndarray,
    indices: np.ndarray,
    weights: np.ndarray | None,
    X: np.ndarray,
    out_path: str | Path,
    *,
    block_nnz: int | None = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    feature_block: int | None = None,
    memory_budget: int | None = None,
    client: Any = None,
    tasks: int | None = None,
    work_dir: str | Path | None = None,
    panel_bytes: int | None = None,
) -> dict[str, Any]:
    """Apply the op ``spec`` (see :data:`OPS`) to the N x d float32 ``X`` and write N x d float32 .npy at out_path.

    X may be a read-only memmap (used in place; other dtypes / layouts are copied to C-order float32 once).

    *Full width* (``feature_block >= d``, the default when the buffers fit ``memory_budget``): X is used
    in place and the op's buffers, the output included, are memory (huge pages on CPU, :func:`huge_empty`);
    the result is written to ``out_path`` once at the end, through row windows. Peak memory besides X, in
    N x d float32 buffers (4 N d bytes each, output included): identity 0, ax 2, sgc 2, ppr 2, ssgc 3
    (see :data:`OPS`).

    *Column blocks* of b = ``feature_block`` columns (default :func:`column_block`): per block, ``(buffers
    + 1) x 4 N b`` bytes (X's block, the op's buffers, the output block), X read and the output written
    through row windows of :data:`WINDOW_BYTES` (X and the output file are never mapped whole).

    Both: plus ``<= 24 N`` bytes of per-node scale vectors and block row pointers (``~40 N`` briefly while
    the operator is built), ``4 block_nnz`` (shared ones) and the touched pages of the memory-mapped CSR
    (``8 N + 4 nnz``). On another device the buffers and a copy of X live there and the result is copied
    back to the memmap in row chunks.

    *Dask* (``client``): hops run as ``tasks`` row-range tasks (default 2 per worker) of
    :class:`DistributedAdjacency`; its buffers are files in ``work_dir`` (a temporary folder next to
    ``out_path`` by default, removed at the end), so RAM holds the pages in use, not the buffers.

    *Column panels* (``panel_bytes``, default :data:`PANEL_BYTES`; 0 = none): every hop splits the columns
    of A into panels whose rows of Y fit in cache (:func:`panel_count`) and accumulates the block's
    product panel by panel; ``+ 4 nnz`` bytes (``+ 4 nnz`` weighted) ``+ 4 N x panels`` for the regrouped
    CSR. Results equal the unpanelled ones within float32 rounding (the sums are split).

    Returns ``{"feature_block", "blocks", "panels", "distributed"}``.
    """
    spec = validate_op(spec)
    x_file = _file_of(X)
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D, got shape {X.shape}")
    if X.dtype != np.float32 or not X.flags.c_contiguous:
        X, x_file = np.ascontiguousarray(X, dtype=np.float32), None
    n = indptr.shape[0] - 1
    if X.shape[0] != n:
        raise ValueError(f"X has {X.shape[0]} rows but the graph has {n} nodes")
    d = X.shape[1]
    dev = torch.device(device)
    if client is not None and dev.type != "cpu":
        raise ConfigError("Dask precompute runs on CPU workers; set device: cpu (or dask.enabled: false)")
    op = spec["op"]
    if feature_block is not None and feature_block < 1:
        raise ValueError(f"feature_block must be >= 1, got {feature_block}")
    width = min(d, feature_block or column_block(op, n, d, memory_budget)) if d else 1
    info = {"feature_block": width, "blocks": -(-d // width) if d else 0, "distributed": client is not None}

    out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=X.shape)
    out_file = _file_of(out)
    if op == "identity" or d == 0:
        for r0, r1 in _windows(n, d):
            out[r0:r1] = _read(X, x_file, r0, r1)
        out.flush()
        del out
        return info
    scratch = None
    try:
        if client is not None:
            from .. import distributed as dd

            scratch = Path(tempfile.mkdtemp(prefix=".propagate-", dir=work_dir or Path(out_path).parent))
            adj: NormalizedAdjacency = DistributedAdjacency(
                indptr, indices, weights, n, client=client, work_dir=scratch,
                tasks=tasks or 2 * dd.n_workers(client), block_nnz=block_nnz or DEFAULT_BLOCK_NNZ,
            )
        else:
            adj = NormalizedAdjacency(indptr, indices, weights, n, block_nnz=block_nnz or DEFAULT_BLOCK_NNZ, device=dev)
        adj.panel_bytes = panel_bytes
        info["panels"] = 1 if dev.type != "cpu" else panel_count(n, int(indptr[-1]), width, panel_bytes)
        if width >= d and client is None:
            Xt = _tensor(X).to(dev)
            res = adj.buffer(tuple(X.shape))  # memory (huge pages) on CPU: hops gather from it
            _IMPL[op](adj, Xt, res, spec, progress)
            del out  # written once, through row windows
            for r0, r1 in _windows(n, d):
                _write(out_file, r0, r1, 0, d, res[r0:r1].cpu().numpy())
            return info
        del out  # written through row windows from here on
        n_blocks = info["blocks"]
        for i, c0 in enumerate(range(0, d, width)):
            c1 = min(d, c0 + width)
            xb = adj.buffer((n, c1 - c0))
            for r0, r1 in _windows(n, c1 - c0):
                xb[r0:r1] = _tensor(_read(X, x_file, r0, r1, c0, c1))  # copied: a view of X is never written
            ob = adj.buffer((n, c1 - c0))
            K = spec.get("K", 1)
            step = None if progress is None else (lambda j, k, i=i: progress(i * K + j, n_blocks * K))
            _IMPL[op](adj, xb, ob, spec, step)
            for r0, r1 in _windows(n, c1 - c0):
                _write(out_file, r0, r1, c0, c1, ob[r0:r1].cpu().numpy())
            del xb, ob
            adj.reset()
        return info
    finally:
        if "out" in locals():
            out.flush()
            del out
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _file_of(arr: np.ndarray) -> tuple[str, int, tuple[int, ...]] | None:
    """(file, byte offset, shape) of a whole memory-mapped float32 C-order N x d array, else None."""
    from ..distributed import file_ref

    ref = file_ref(arr) if isinstance(arr, np.memmap) and arr.dtype == np.float32 and arr.ndim == 2 else None
    return None if ref is None else (ref.path, ref.offset, ref.shape)


def _windows(n: int, d: int) -> list[tuple[int, int]]:
    step = max(1, WINDOW_BYTES // (4 * max(d, 1)))
    return [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]


def _read(X: np.ndarray, x_file: tuple | None, r0: int, r1: int, c0: int = 0, c1: int | None = None) -> np.ndarray:
    """Rows r0:r1, columns c0:c1 of X as a C-order array (at full width possibly a read-only view of the
    window, which the caller copies at once); a file-backed X through a window that is unmapped once the
    caller drops the block (so X never becomes resident as a whole)."""
    c1 = X.shape[1] if c1 is None else c1
    if x_file is None:
        return np.ascontiguousarray(X[r0:r1, c0:c1])
    path, offset, (n, d) = x_file
    win = np.memmap(path, dtype=np.float32, mode="r", offset=offset + r0 * d * 4, shape=(r1 - r0, d))
    block = np.ascontiguousarray(win[:, c0:c1])
    del win
    return block


def _write(out_file: tuple, r0: int, r1: int, c0: int, c1: int, block: np.ndarray) -> None:
    path, offset, (n, d) = out_file
    win = np.memmap(path, dtype=np.float32, mode="r+", offset=offset + r0 * d * 4, shape=(r1 - r0, d))
    win[:, c0:c1] = block
    win.flush()
    del win
