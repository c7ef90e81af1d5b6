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
"""
from __future__ import annotations

import math
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

#: progress callback: ``progress(hop, K)`` after each of the K hops
Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------- helpers
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

        bounds = _row_blocks(indptr, block_nnz)
        ptr = _tensor(np.asarray(indptr, dtype=np.int64))
        col = _tensor(indices).to(self.device)
        offs = np.asarray(indptr)[bounds].tolist()
        if weights is None:
            longest = max((b - a for a, b in zip(offs[:-1], offs[1:])), default=0)
            ones = torch.ones(longest, dtype=torch.float32, device=self.device)
        else:
            val = _tensor(weights).to(self.device)
        self._blocks: list[tuple[int, int, torch.Tensor]] = []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            for r0, r1, s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist(), offs[:-1], offs[1:]):
                crow = (ptr[r0 : r1 + 1] - s).to(device=self.device, dtype=col.dtype)
                values = ones[: e - s] if weights is None else val[s:e]
                block = torch.sparse_csr_tensor(crow, col[s:e], values, size=(r1 - r0, n), check_invariants=False)
                self._blocks.append((r0, r1, block))

    @property
    def n_blocks(self) -> int:
        return len(self._blocks)

    def matmul(self, X: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = S X`` for N x d float32 X; ``out`` (N x d, contiguous) must not alias X.

        Peak memory besides X and out: ``4 N d`` bytes (the scratch ``dinv * X``).
        """
        self._check(X, out)
        self.hop(X * self.dinv, out, scale=self.dinv)
        return out

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
        for r0, r1, block in self._blocks:
            ob = out[r0:r1]
            torch.addmm(Y[r0:r1], block, Y, out=ob)
            if acc is not None:
                acc[r0:r1].addcmul_(ob, acc_scale[r0:r1])
            if scale is not None:
                ob.mul_(scale[r0:r1])
            if add is not None:
                if isinstance(add_scale, torch.Tensor):
                    ob.addcmul_(add[r0:r1], add_scale[r0:r1])
                else:
                    ob.add_(add[r0:r1], alpha=add_scale)

    def _check(self, X: torch.Tensor, out: torch.Tensor) -> None:
        if X.ndim != 2 or X.shape[0] != self.n or out.shape != X.shape:
            raise ValueError(f"X and out must both be {self.n} x d, got {tuple(X.shape)} and {tuple(out.shape)}")
        if X.dtype != torch.float32 or out.dtype != torch.float32:
            raise ValueError(f"X and out must be float32, got {X.dtype} and {out.dtype}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
        if _overlaps(X, out):
            raise ValueError("out must not alias X")


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
    buf = _chain([out, torch.empty_like(out)], K)
    torch.mul(X, adj.dinv, out=buf(0))
    for j in range(1, K + 1):
        adj.hop(buf(j - 1), buf(j), scale=adj.dinv2 if j < K else adj.dinv)
        if progress:
            progress(j, K)


def _ssgc(adj: NormalizedAdjacency, X: torch.Tensor, out: torch.Tensor, spec: dict, progress: Progress | None) -> None:
    """alpha X + (1-alpha)/K sum_{k=1..K} S^k X. Working memory: out (the sum) + 2 N x d buffers (Y_k)."""
    K, alpha = spec["K"], spec["alpha"]
    torch.mul(X, alpha, out=out)
    ys = [torch.empty_like(out), torch.empty_like(out)]
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
    buf = _chain([out, torch.empty_like(out)], K)
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
) -> None:
    """Apply the op ``spec`` (see :data:`OPS`) to the N x d float32 ``X`` and write N x d float32 .npy at out_path.

    X may be a read-only memmap (used in place; other dtypes / layouts are copied to C-order float32 once).
    The result is written to ``out_path`` directly through ``np.lib.format.open_memmap``, which on CPU is
    also the op's output working buffer. Peak memory besides X, in N x d float32 buffers (4 N d bytes each,
    output included): identity 1, ax 2, sgc 2, ppr 2, ssgc 3 (see :data:`OPS`); plus ``<= 24 N`` bytes of
    per-node scale vectors and block row pointers (``~40 N`` briefly while the operator is built),
    ``4 block_nnz`` (shared ones) and the touched pages of the memory-mapped CSR (``8 N + 4 nnz``). On another
    device the buffers and a copy of X live there and the result is copied back to the memmap in row chunks.
    """
    spec = validate_op(spec)
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D, got shape {X.shape}")
    if X.dtype != np.float32 or not X.flags.c_contiguous:
        X = np.ascontiguousarray(X, dtype=np.float32)
    n = indptr.shape[0] - 1
    if X.shape[0] != n:
        raise ValueError(f"X has {X.shape[0]} rows but the graph has {n} nodes")

    out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=X.shape)
    try:
        if spec["op"] == "identity":
            out[...] = X
            return
        dev = torch.device(device)
        adj = NormalizedAdjacency(indptr, indices, weights, n, block_nnz=block_nnz or DEFAULT_BLOCK_NNZ, device=dev)
        Xt = _tensor(X).to(dev)
        res = _tensor(out) if dev.type == "cpu" else torch.empty(X.shape, dtype=torch.float32, device=dev)
        _IMPL[spec["op"]](adj, Xt, res, spec, progress)
        if dev.type != "cpu":
            step = max(1, (1 << 24) // max(1, X.shape[1]))
            for r0 in range(0, n, step):
                out[r0 : r0 + step] = res[r0 : r0 + step].cpu().numpy()
    finally:
        out.flush()
        del out
