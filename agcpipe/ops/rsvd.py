"""Blocked randomised SVD, Gram matrices and products over row blocks of tall N x m matrices.

The training-free spectral methods (:mod:`agcpipe.methods.sagsc`, :mod:`agcpipe.methods.s2cag`) need the top
singular vectors of tall matrices (N up to 10^7 rows, m up to a few thousand columns) that are either
memory-mapped (propagated features) or *implicit*: every row is a cheap function of a row of another matrix
(a centred row, a quadratic feature map, a row scaled by an implicit degree). :class:`RowMatrix` describes
such a matrix by a function returning any row block, and every routine here streams blocks of it: no N x N
matrix, and no N x m copy of an implicit matrix, is ever formed.

Randomised SVD (:func:`randomized_svd`) is Halko, Martinsson & Tropp (2011), Algorithm 4.4 (randomised
subspace iteration) with a Rayleigh-Ritz step, arranged so that **each power iteration reads the matrix
once**: for an orthonormal m x l test basis Z, one pass over the row blocks A_b accumulates

    C = A^T (A Z)  (m x l)     and     G = (A Z)^T (A Z)  (l x l)        (both in float64)

The basis Q = A Z T of range(A Z) is orthonormal for T = W diag(lambda)^-1/2 from the eigendecomposition
G = W diag(lambda) W^T (SVQB, Stathopoulos & Wu 2002; directions with lambda <= rtol * max lambda are
dropped, which handles rank deficiency), so Q itself is never stored: the next basis is Z' = qr(C T)
and, after the last pass, B^T = A^T Q = C T gives the small SVD B = Q^T A = U_B S V^T. The left singular
vectors are returned as a *projection*: U = Q U_B = A P with P = Z T U_B (m x k). Applying P to the rows of
the training matrix reproduces U; applying it to the rows of a new graph's matrix embeds the new rows in
the same space (the out-of-sample map the methods store in their state).

Passes over A: ``n_iter + 1``. Flops: ``4 N m l (n_iter + 1)`` plus what producing the blocks costs.
Memory besides A's blocks: ``8 (m l + l^2)`` bytes per accumulator, a block of A (``block_rows x m``) and of
A Z (``block_rows x l``) in the compute dtype; nothing proportional to N.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import StageError

#: elements of one row block (rows = BLOCK_ELEMENTS // columns, at least MIN_BLOCK_ROWS): 2**23 elements are
#: 64 MiB in float64: large enough for GEMM throughput and few OpenMP regions per pass (each region waits for
#: a descheduled thread when other processes load the cores), small against the N-sized buffers
BLOCK_ELEMENTS = 1 << 23
MIN_BLOCK_ROWS = 256
#: relative eigenvalue floor of the Gram matrices (SVQB / reduced eigenproblems): directions below it are
#: treated as numerically zero
RTOL = 1e-12

BlockFn = Callable[[int, int], torch.Tensor]


def default_block_rows(n_cols: int) -> int:
    return max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // max(1, n_cols))


def as_tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Zero-copy torch view of a numpy array (read-only memmaps included; never written through)."""
    if isinstance(a, torch.Tensor):
        return a
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(a))


@dataclass
class RowMatrix:
    """An N x m matrix given by its row blocks: ``block(r0, r1)`` returns rows r0:r1 as an (r1 - r0) x m tensor
    of ``dtype`` on ``device`` (a fresh tensor or a view; callers never write to it).

    ``block_rows`` rows per block (default: about :data:`BLOCK_ELEMENTS` elements per block).
    """

    n_rows: int
    n_cols: int
    block: BlockFn
    dtype: torch.dtype = torch.float64
    device: torch.device = torch.device("cpu")
    block_rows: int | None = None

    @classmethod
    def from_array(
        cls,
        a: np.ndarray | torch.Tensor,
        *,
        center: torch.Tensor | None = None,
        row_scale: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
        block_rows: int | None = None,
    ) -> "RowMatrix":
        """Rows of ``a`` (N x m array, memmap or tensor), optionally ``(a - center) * row_scale[:, None]``.

        ``center`` (m) and ``row_scale`` (N) are tensors; the transform is applied per block (no copy of a).
        """
        if a.ndim != 2:
            raise ValueError(f"expected a 2-D matrix, got shape {tuple(a.shape)}")
        t = as_tensor(a)
        dev = torch.device(device)
        c = None if center is None else center.to(device=dev, dtype=dtype)
        s = None if row_scale is None else row_scale.to(device=dev, dtype=dtype)

        def block(r0: int, r1: int) -> torch.Tensor:
            b = t[r0:r1].to(device=dev, dtype=dtype)
            if c is not None:
                b = b - c
            if s is not None:
                b = b * s[r0:r1, None]
            return b

        return cls(t.shape[0], t.shape[1], block, dtype, dev, block_rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.n_cols)

    def bounds(self) -> Iterator[tuple[int, int]]:
        step = self.block_rows or default_block_rows(self.n_cols)
        for r0 in range(0, self.n_rows, step):
            yield r0, min(self.n_rows, r0 + step)

    def blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        for r0, r1 in self.bounds():
            yield r0, r1, self.block(r0, r1)

    def map(self, fn: Callable[[torch.Tensor, int, int], torch.Tensor], n_cols: int) -> "RowMatrix":
        """The matrix whose rows r0:r1 are ``fn(self.block(r0, r1), r0, r1)`` (n_cols columns)."""
        parent = self

        def block(r0: int, r1: int) -> torch.Tensor:
            return fn(parent.block(r0, r1), r0, r1)

        return RowMatrix(self.n_rows, n_cols, block, self.dtype, self.device, self.block_rows)


# ---------------------------------------------------------------------------------------------- products
def col_sums(a: RowMatrix) -> torch.Tensor:
    """``A^T 1`` (m, float64), one pass."""
    acc = torch.zeros(a.n_cols, dtype=torch.float64, device=a.device)
    for _, _, b in a.blocks():
        acc += b.sum(0, dtype=torch.float64)
    return acc


def gram(a: RowMatrix) -> torch.Tensor:
    """``A^T A`` (m x m, float64, accumulated over blocks), one pass. Memory ``8 m^2`` bytes."""
    acc = torch.zeros(a.n_cols, a.n_cols, dtype=torch.float64, device=a.device)
    for _, _, b in a.blocks():
        acc += (b.T @ b).to(torch.float64)
    return acc


def row_dot(a: RowMatrix, v: torch.Tensor) -> torch.Tensor:
    """``A v`` (N, float64) for an m-vector v, one pass."""
    out = torch.empty(a.n_rows, dtype=torch.float64, device=a.device)
    v = v.to(device=a.device, dtype=a.dtype)
    for r0, r1, b in a.blocks():
        out[r0:r1] = b @ v
    return out


def project(a: RowMatrix, p: torch.Tensor, out: np.ndarray | torch.Tensor | None = None) -> np.ndarray | torch.Tensor:
    """``A P`` for an m x k matrix P, row block by row block, into ``out`` (N x k; default a new float32
    numpy array). P is cast to the compute dtype once; each block is cast to out's dtype on writing."""
    p = p.to(device=a.device, dtype=a.dtype)
    if out is None:
        out = np.empty((a.n_rows, p.shape[1]), dtype=np.float32)
    if isinstance(out, np.ndarray):
        for r0, r1, b in a.blocks():
            out[r0:r1] = (b @ p).cpu().numpy()
    else:
        for r0, r1, b in a.blocks():
            out[r0:r1] = b @ p
    return out


def svqb(g: torch.Tensor, rtol: float = RTOL) -> torch.Tensor:
    """T (l x l') with ``T^T G T = I`` for a symmetric PSD Gram matrix G = Y^T Y, so that Y T is an orthonormal
    basis of range(Y); eigen-directions with eigenvalue <= rtol * max are dropped (rank deficiency)."""
    g = 0.5 * (g + g.T)
    lam, w = torch.linalg.eigh(g)
    top = float(lam.max()) if lam.numel() else 0.0
    if not top > 0:
        return w[:, :0]
    keep = lam > rtol * top
    return w[:, keep] / torch.sqrt(lam[keep])


# ---------------------------------------------------------------------------------------------- rSVD
@dataclass
class RSVD:
    """Top-k singular triplets of A: ``U = A P`` (N x k, orthonormal columns), ``s`` (k, descending), ``V`` (m x k)."""

    P: torch.Tensor
    s: torch.Tensor
    V: torch.Tensor
    n_passes: int

    def left(self, a: RowMatrix, out=None):
        """U = A P, row block by row block (see :func:`project`)."""
        return project(a, self.P, out)


def randomized_svd(
    a: RowMatrix,
    k: int,
    *,
    oversample: int = 10,
    n_iter: int = 5,
    seed: int = 0,
    rtol: float = RTOL,
) -> RSVD:
    """Top-k SVD of the N x m matrix ``a`` by blocked randomised subspace iteration (see the module docstring).

    ``l = min(k + oversample, m, N)`` test vectors, drawn from N(0, 1) with a CPU generator seeded by ``seed``
    (same seed, same result on any device up to floating point); ``n_iter`` power iterations (``n_iter + 1``
    passes over a). Signs are fixed so that the largest-magnitude entry of every right singular vector is
    positive. Raises :class:`StageError` when ``k > min(N, m)`` or the numerical rank of A is below k.
    """
    n, m = a.shape
    if k < 1 or k > min(n, m):
        raise StageError(f"cannot take {k} singular vectors of a {n} x {m} matrix (need 1 <= k <= min(N, m))")
    if n_iter < 0 or oversample < 0:
        raise ValueError("n_iter and oversample must be >= 0")
    l = min(k + oversample, m, n)
    dev, dt = a.device, a.dtype
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(m, l, generator=gen, dtype=torch.float64)
    z = torch.linalg.qr(omega.to(dev)).Q  # m x l, float64
    passes = 0
    for it in range(n_iter + 1):
        zc = z.to(dt)
        c = torch.zeros(m, z.shape[1], dtype=torch.float64, device=dev)
        g = torch.zeros(z.shape[1], z.shape[1], dtype=torch.float64, device=dev)
        for _, _, b in a.blocks():
            y = b @ zc
            c += (b.T @ y).to(torch.float64)
            g += (y.T @ y).to(torch.float64)
        passes += 1
        t = svqb(g, rtol)  # Q = A Z T is orthonormal
        if t.shape[1] < k:
            raise StageError(
                f"the {n} x {m} matrix has numerical rank {t.shape[1]} < {k}: cannot take {k} singular vectors "
                "(too few distinct rows or feature columns for this many clusters?)"
            )
        ct = c @ t  # = A^T Q  (m x l')
        if it < n_iter:
            z = torch.linalg.qr(ct).Q
        else:
            ub, s, vt = torch.linalg.svd(ct.T, full_matrices=False)  # B = Q^T A = ub s vt
            ub, s, v = ub[:, :k], s[:k], vt[:k].T
            p = z @ t @ ub  # U = Q ub = A z t ub
            sign = torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
            sign[sign == 0] = 1
            return RSVD(P=p * sign, s=s, V=v * sign, n_passes=passes)
    raise AssertionError("unreachable")


def reduced_basis(g: torch.Tensor, rtol: float = RTOL) -> tuple[torch.Tensor, torch.Tensor]:
    """For the Gram matrix G = A^T A (m x m): ``(B, R)`` with ``A B`` an orthonormal basis of range(A) (N x r)
    and ``A = (A B) R`` (R: r x m), r the numerical rank. Any operator ``A J A^T`` restricted to range(A) is
    then ``(A B) (R J R^T) (A B)^T``: an N x N eigenproblem reduced to r x r (used by M-S2CAG)."""
    g = 0.5 * (g + g.T)
    lam, w = torch.linalg.eigh(g)
    top = float(lam.max()) if lam.numel() else 0.0
    keep = lam > rtol * top if top > 0 else torch.zeros_like(lam, dtype=torch.bool)
    w, lam = w[:, keep], lam[keep]
    sq = torch.sqrt(lam)
    return w / sq, (w * sq).T
