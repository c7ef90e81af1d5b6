"""S2CAG and M-S2CAG: spectral subspace clustering for attributed graphs (Lin, Yang, Zheng & Ke, KDD 2025).

Both start from the *smoothed representations* of the paper (power iteration of its Eq. for Z):

    X^ = row-L2-normalised X,   P = D~^-1 (A + I),
    Z  = sum_{t=0..T} w_t P^t X^,    w_t = (1 - alpha) alpha^t / (1 - alpha^(T+1))   (w_t = 1/(T+1) at alpha = 1)

computed with T row-blocked CSR hops (:meth:`NormalizedAdjacency.hop` with the random-walk scaling, the
weighted sum accumulated in the hop). alpha > 1 is allowed (the published Cora / ArXiv settings use it): the
weights stay positive, sum to 1 and favour the long-range terms.

**S2CAG** (``s2cag``). The self-expressive objective ``min_S ||Z^ - S Z^||^2 + ||S||_* + ||S^T S - I||^2``
is solved by the top singular vectors of the *normalised* smoothed representation

    Z^ = Delta^-1/2 Z,    Delta = diag(Z Z^T 1) = diag(Z (Z^T 1))      (implicit: Z Z^T is never formed)

(the normalisation that ties the objective to conductance on the affinity graph Z Z^T). Its top-(k+1) left
singular vectors come from the blocked randomised SVD (``tau`` power iterations, ``oversampling`` extra
vectors, seeded by the run's seed); the first one is the trivial ``Delta^1/2 1`` direction of the normalised
affinity and is dropped, leaving Y (N x k). Delta > 0 needs non-negative features (bag-of-words, counts);
for signed features (standardised, embeddings, the synthetic SBM) ``normalize: none`` takes the top-k left
singular vectors of Z itself (no trivial vector to drop). Column signs are fixed so that every column's third moment is
non-negative (cluster indicators are positive on their cluster). Y is rounded to clusters by spectral
rounding (``rounding: snem``, the benchmark's ``snem_rounding``): on the row-normalised Y~, from the initial
labels ``argmax_j Y~_ij``, repeat ``C`` = indicator with columns scaled by ``1/sqrt(|cluster|)``,
``M = Y~^T C`` (k x k prototypes), labels = ``argmax_j (Y~ M)_ij`` until the labels stop changing (at most
``rounding_iter`` times). Deviation: the argmax start depends on how the (near-degenerate) singular basis is
rotated and can merge clusters for good, so ``cluster.n_init - 1`` more restarts start from Yu & Shi's
orthogonal rows and the restart with the largest objective ``tr(C^T Y~ Y~^T C)`` is kept (Cora, one
embedding: the argmax start gives NMI 50.2, 15 orthogonal starts 47.0-51.3, the best-objective one 49.2;
CiteSeer 42.5, 42.3-42.6, 42.6). ``rounding: kmeans`` uses the pipeline's KMeans instead. Deviation from the PyAGC
port: it takes the SVD of the unnormalised Z (measured on Cora, 3 seeds: NMI 49.0 against 51.2 with the
normalisation, CiteSeer 41.7 against 42.4).

**M-S2CAG** (``ms2cag``; the benchmark's ``MS2CAG``: the *modularity* variant of the paper, not a multi-scale
one). With ``Z^ = row-L2-normalised Z``, ``omega = Z^ Z^T 1`` and ``gamma``, it takes the dominant k-dimensional
invariant subspace of the modularity matrix of the affinity graph ``Z^ Z^T``,

    B = Z^ Z^T - gamma omega omega^T / (omega^T 1)  =  Z^ J Z^T,    J = I - gamma s s^T / (s^T s),  s = Z^T 1

by ``tau`` steps of subspace iteration ``Q <- qr(B Q)`` from a random start, and clusters its rows by KMeans.
Since B's range lies in range(Z^) (rank r <= d), the iteration runs *exactly* in an r-dimensional basis:
with ``G = Z^T Z^ = W diag(lambda) W^T`` (one blocked pass), ``Z^ W lambda^-1/2`` is orthonormal and B acts on
it as ``K = lambda^1/2 W^T J W lambda^1/2`` (r x r), so ``Q = Z^ W lambda^-1/2 Y`` with Y (r x k) iterated as
``Y <- qr(K Y)`` -- the published N-dimensional iteration after its first step (a Gaussian start projected on
range(B) is Gaussian there), at O(r^2 k) per step instead of O(N d k).

Out-of-sample maps (stored by ``fit`` in ``state_dir``; ``embed`` applies them to the training graph and to
new graphs alike, so the training graph reproduces its training embedding exactly):

* S2CAG: ``s = Z^T 1`` (d; a node's Delta is its degree in the *training* affinity graph, Nystrom-style) and
  ``P`` (d x k) with ``Y = Delta^-1/2 Z P``; the rounding prototypes M are the cluster stage's centres and a
  node goes to ``argmax_j (Y~ M)_ij`` (``kmeans``: nearest centre).
* M-S2CAG: ``P = W lambda^-1/2 Y`` (d x k) with embedding ``Z^ P``; nearest KMeans centre.

Peak memory (bytes), N nodes, d features, k clusters, l = k + 1 + oversampling, b block rows: ``12 N d`` (Z and
the two hop buffers, float32; the hop buffers are freed before the SVD) + the memory-mapped X and CSR
(``8 N + 4 nnz``) + ``~40 N`` (scalings, degrees) + ``4 N k`` (embedding) + ``8 b (d + l) * 3`` (blocks)
+ ``8 d l * 3`` (S2CAG accumulators) or ``8 d^2 * 3`` (M-S2CAG Gram and eigenvectors).
"""
from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from ..config import ClusterConfig
from ..errors import ConfigError, StageError
from ..ops.propagate import DEFAULT_BLOCK_NNZ, NormalizedAdjacency
from ..ops.rsvd import RowMatrix, as_tensor, col_sums, default_block_rows, gram, project, randomized_svd, reduced_basis, row_dot
from .base import Clustering, Method, MethodContext
from .registry import Params, register

_EPS = 1e-12


# ---------------------------------------------------------------------------------------------- smoothing
def smoothing_weights(T: int, alpha: float) -> list[float]:
    """w_t = (1 - alpha) alpha^t / (1 - alpha^(T+1)), t = 0..T (uniform at alpha = 1); they sum to 1."""
    if abs(alpha - 1.0) < 1e-9:
        return [1.0 / (T + 1)] * (T + 1)
    w = [(1.0 - alpha) * alpha**t / (1.0 - alpha ** (T + 1)) for t in range(T + 1)]
    return w


def smoothed_representation(
    indptr: np.ndarray,
    indices: np.ndarray,
    weights: np.ndarray | None,
    X: np.ndarray,
    T: int,
    alpha: float,
    *,
    device: str | torch.device = "cpu",
    block_rows: int | None = None,
    block_nnz: int | None = None,
) -> torch.Tensor:
    """``Z = sum_t w_t P^t X^`` (N x d float32 tensor), P = D~^-1 (A + I), X^ = row-L2-normalised X.

    Memory: Z plus two N x d hop buffers (freed on return), float32.
    """
    n, d = X.shape
    dev = torch.device(device)
    adj = NormalizedAdjacency(indptr, indices, weights, n, block_nnz=block_nnz or DEFAULT_BLOCK_NNZ, device=dev)
    Xt = as_tensor(np.asarray(X, dtype=np.float32)).to(dev)
    w = smoothing_weights(T, alpha)
    z = torch.empty((n, d), dtype=torch.float32, device=dev)
    ys = [torch.empty((n, d), dtype=torch.float32, device=dev) for _ in range(2 if T > 0 else 1)]
    step = block_rows or default_block_rows(d)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        xb = Xt[r0:r1]
        torch.div(xb, xb.norm(dim=1, keepdim=True).clamp_min(_EPS), out=ys[0][r0:r1])
        torch.mul(ys[0][r0:r1], w[0], out=z[r0:r1])
    for t in range(1, T + 1):
        # out = P cur = D~^-1 (A + I) cur;  z += w_t * D~^-1 (A + I) cur
        adj.hop(ys[(t - 1) % 2], ys[t % 2], scale=adj.dinv2 if t < T else None, acc=z, acc_scale=adj.dinv2 * w[t])
    del ys, adj
    return z


def _row_scale_matrix(z: torch.Tensor, scale: torch.Tensor, block_rows: int | None) -> RowMatrix:
    """Rows of ``scale[:, None] * z`` (float64) as an implicit matrix."""
    return RowMatrix.from_array(z, row_scale=scale, dtype=torch.float64, device=z.device, block_rows=block_rows)


def _load_state(ctx: MethodContext, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(np.load(ctx.state_dir / f"{n}.npy")).to(ctx.device) for n in names}


class _SmoothedMethod(Method):
    seeded_training = True
    uses_n_clusters_in_training = True
    #: rows per dense block / entries per CSR block (None = defaults); tests shrink them
    block_rows: int | None = None
    block_nnz: int | None = None

    def precompute_ops(self):
        return [{"name": "x", "op": "identity"}]

    def _z(self, ctx: MethodContext) -> torch.Tensor:
        g = ctx.graph
        return smoothed_representation(
            g.indptr, g.indices, g.weights, ctx.features["x"], self.params["T"], self.params["alpha"],
            device=ctx.device, block_rows=self.block_rows, block_nnz=self.block_nnz,
        )

    def _check_k(self, ctx: MethodContext, need: int) -> None:
        n, d = ctx.features["x"].shape
        if need > min(n, d):
            raise ConfigError(
                f"{self.name} takes {need} singular / eigen vectors of the N x d = {n} x {d} smoothed features, "
                f"so n_clusters={ctx.n_clusters} is too large (at most {min(n, d) - (need - ctx.n_clusters)})"
            )

    def embed(self, ctx: MethodContext) -> np.ndarray:
        cache = getattr(self, "_cache", None)
        if cache is not None and cache[0] == ctx.state_dir:
            return cache[1]
        return self._embed_from_state(ctx, _load_state(ctx, self._state_names))

    def _check_state(self, ctx: MethodContext, p: torch.Tensor) -> None:
        d = ctx.features["x"].shape[1]
        if p.shape[0] != d:
            raise StageError(f"the graph has {d} features but the {self.name} state expects {p.shape[0]}")


# ---------------------------------------------------------------------------------------------- S2CAG
class S2CAGParams(Params):
    T: int = Field(10, ge=0, description="propagation steps of the smoothed representation")
    alpha: float = Field(0.9, gt=0, description="decay of the smoothing weights (may exceed 1)")
    tau: int = Field(7, ge=0, description="power iterations of the randomised SVD")
    oversampling: int = Field(10, ge=0, description="extra random vectors of the randomised SVD")
    normalize: Literal["degree", "none"] = Field(
        "degree",
        description="degree: SVD of Delta^-1/2 Z, first (trivial) vector dropped (needs non-negative features); none: SVD of Z, top k",
    )
    rounding: Literal["snem", "kmeans"] = Field("snem", description="spectral rounding (snem) or the pipeline's KMeans")
    rounding_iter: int = Field(100, ge=1, description="maximum snem rounding iterations")


def snem_rounding(
    y: torch.Tensor, k: int, max_iter: int, *, n_init: int = 1, seed: int = 0, chunk: int = 1 << 16
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Spectral rounding of row-normalised Y (N x h): ``(labels, M, iterations, objective)``, labels = argmax(Y M).

    From initial labels, repeat M = Y^T C (C: one-hot labels, columns / sqrt(cluster size)), labels =
    argmax(Y M) until stable; each step does not decrease the objective ``sum_j ||Y^T c_j||^2 / |c_j|``
    (``tr(C^T Y Y^T C)``). Restart 0 starts from ``argmax_j Y_ij`` (the benchmark's snem); restarts 1.. from
    the orthogonal-rows initialisation of Yu & Shi (2003) (a seeded random row, then repeatedly the row least
    aligned with those picked), which does not depend on how the spectral basis is rotated. The restart with
    the largest objective is kept (ties: the earliest). Vectorised (index_add for Y^T C), scores in row chunks.
    """
    n, h = y.shape
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    best: tuple[float, torch.Tensor, torch.Tensor, int] | None = None
    for run in range(n_init):
        if run == 0:
            labels = _argmax_chunked(y[:, :k], None, chunk)
        else:
            rows = torch.empty(k, h, dtype=y.dtype, device=y.device)
            rows[0] = y[int(torch.randint(n, (1,), generator=gen))]
            align = torch.zeros(n, dtype=y.dtype, device=y.device)
            for j in range(1, k):
                align += (y @ rows[j - 1]).abs()
                rows[j] = y[int(align.argmin())]
            labels = _argmax_chunked(y, rows.T, chunk)
        it = 0
        for it in range(1, max_iter + 1):
            m, _ = _prototypes(y, labels, k)
            new = _argmax_chunked(y, m, chunk)
            stable = bool(torch.equal(new, labels))
            labels = new
            if stable:
                break
        m, obj = _prototypes(y, labels, k)
        labels = _argmax_chunked(y, m, chunk)  # consistent with the returned prototypes
        if best is None or obj > best[0]:
            best = (obj, labels, m, it)
    assert best is not None
    obj, labels, m, it = best
    return labels, m, it, obj


def _prototypes(y: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """M = Y^T C (h x k) for C the one-hot labels with columns scaled by 1/sqrt(size), and tr(M^T M)."""
    sums = torch.zeros(k, y.shape[1], dtype=torch.float64, device=y.device).index_add_(0, labels, y.to(torch.float64))
    size = torch.bincount(labels, minlength=k).to(torch.float64)
    m = sums / size.clamp_min(1).sqrt()[:, None]
    return m.T.to(y.dtype), float((m * m).sum())


def _argmax_chunked(y: torch.Tensor, m: torch.Tensor | None, chunk: int) -> torch.Tensor:
    out = torch.empty(y.shape[0], dtype=torch.int64, device=y.device)
    for r0 in range(0, y.shape[0], chunk):
        b = y[r0 : r0 + chunk]
        out[r0 : r0 + chunk] = (b if m is None else b @ m).argmax(1)
    return out


def _score_confidence(y: torch.Tensor, m: torch.Tensor, chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """labels = argmax(Y M) and confidence = (s1 - s2) / |s1| clipped to [0, 1] (top-two score margin)."""
    n = y.shape[0]
    labels = np.empty(n, dtype=np.int64)
    conf = np.empty(n, dtype=np.float32)
    for r0 in range(0, n, chunk):
        s = y[r0 : r0 + chunk] @ m
        top = torch.topk(s, min(2, s.shape[1]), dim=1)
        labels[r0 : r0 + chunk] = top.indices[:, 0].cpu().numpy()
        if s.shape[1] > 1:
            c = (top.values[:, 0] - top.values[:, 1]) / top.values[:, 0].abs().clamp_min(_EPS)
        else:
            c = torch.ones(s.shape[0], dtype=s.dtype, device=s.device)
        conf[r0 : r0 + chunk] = c.clamp(0, 1).cpu().numpy()
    return labels, conf


def _row_normalised(emb: np.ndarray, device: str) -> torch.Tensor:
    y = as_tensor(np.ascontiguousarray(emb, dtype=np.float32)).to(device)
    return y / y.norm(dim=1, keepdim=True).clamp_min(_EPS)


@register(
    "s2cag",
    family="non-parametric",
    params=S2CAGParams,
    description="smoothed representations -> degree-normalised truncated randomised SVD -> spectral rounding (Lin et al., KDD 2025)",
)
class S2CAG(_SmoothedMethod):
    """S2CAG; see the module docstring."""

    _state_names = ("s", "P")

    def _embed_from_state(self, ctx: MethodContext, st: dict[str, torch.Tensor]) -> np.ndarray:
        self._check_state(ctx, st["P"])
        return project(self._zhat(self._z(ctx), st["s"]), st["P"])

    def _zhat(self, z: torch.Tensor, s: torch.Tensor) -> RowMatrix:
        """Delta^-1/2 Z with Delta = Z s (normalize: degree) or Z itself (normalize: none), implicit."""
        zr = RowMatrix.from_array(z, dtype=torch.float64, device=z.device, block_rows=self.block_rows)
        if self.params["normalize"] == "none":
            return zr
        return _row_scale_matrix(z, self._delta(zr, s).rsqrt(), self.block_rows)

    @staticmethod
    def _delta(zr: RowMatrix, s: torch.Tensor) -> torch.Tensor:
        delta = row_dot(zr, s)
        bad = ~(delta > 0)
        if bad.any():
            raise StageError(
                f"s2cag: {int(bad.sum())} nodes have a non-positive degree Z Z^T 1 in the smoothed affinity graph "
                "(features with negative entries?); use non-negative features or method.params.normalize: none"
            )
        return delta

    def fit(self, ctx: MethodContext) -> dict[str, Any]:
        k = ctx.n_clusters
        drop = 1 if self.params["normalize"] == "degree" else 0
        self._check_k(ctx, k + drop)
        z = self._z(ctx)
        s = col_sums(RowMatrix.from_array(z, dtype=torch.float64, device=z.device, block_rows=self.block_rows))
        zh = self._zhat(z, s)
        svd = randomized_svd(zh, k + drop, oversample=self.params["oversampling"], n_iter=self.params["tau"], seed=ctx.seed)
        p = svd.P[:, drop:]
        y = project(zh, p)
        # sign: non-negative third moment per column (indicator-like columns point to their cluster)
        sign = torch.from_numpy(np.where((y.astype(np.float64) ** 3).sum(0) < 0, -1.0, 1.0)).to(p)
        p = p * sign
        y *= sign.cpu().numpy().astype(np.float32)
        np.save(ctx.state_dir / "s.npy", s.cpu().numpy())
        np.save(ctx.state_dir / "P.npy", p.cpu().numpy())
        (ctx.state_dir / "s2cag.json").write_text(json.dumps({"k": k, "params": self.params}))
        self._cache = (ctx.state_dir, y)
        return {"singular_values": svd.s.tolist(), "rsvd_passes": svd.n_passes}

    def cluster(self, ctx: MethodContext, embeddings: np.ndarray, cfg: ClusterConfig) -> Clustering:
        if self.params["rounding"] == "kmeans":
            return super().cluster(ctx, embeddings, cfg)
        y = _row_normalised(embeddings, ctx.device)
        labels, m, it, obj = snem_rounding(y, ctx.n_clusters, self.params["rounding_iter"], n_init=cfg.n_init, seed=ctx.seed)
        lab, conf = _score_confidence(y, m)
        return Clustering(
            labels=lab, confidence=conf, centers=m.T.cpu().numpy().astype(np.float32),
            info={"rounding_iter": it, "rounding_objective": obj},
        )

    def assign(self, ctx: MethodContext, embeddings: np.ndarray, centers: np.ndarray, cfg: ClusterConfig) -> Clustering:
        if self.params["rounding"] == "kmeans":
            return super().assign(ctx, embeddings, centers, cfg)
        m = torch.from_numpy(np.asarray(centers, dtype=np.float32)).T.to(ctx.device)
        lab, conf = _score_confidence(_row_normalised(embeddings, ctx.device), m)
        return Clustering(labels=lab, confidence=conf, centers=centers)


# ---------------------------------------------------------------------------------------------- M-S2CAG
class MS2CAGParams(Params):
    T: int = Field(10, ge=0, description="propagation steps of the smoothed representation")
    alpha: float = Field(0.9, gt=0, description="decay of the smoothing weights (may exceed 1)")
    gamma: float = Field(0.9, ge=0, description="resolution of the modularity matrix")
    tau: int = Field(50, ge=1, description="subspace iterations")


@register(
    "ms2cag",
    family="non-parametric",
    params=MS2CAGParams,
    description="modularity variant of S2CAG (M-S2CAG, the benchmark's MS2CAG): subspace iteration on the modularity matrix of Z^ Z^T, then KMeans",
)
class MS2CAG(_SmoothedMethod):
    """M-S2CAG; see the module docstring."""

    _state_names = ("P",)

    def _zhat(self, z: torch.Tensor) -> RowMatrix:
        norms = torch.empty(z.shape[0], dtype=torch.float64, device=z.device)
        step = self.block_rows or default_block_rows(z.shape[1])
        for r0 in range(0, z.shape[0], step):
            norms[r0 : r0 + step] = z[r0 : r0 + step].norm(dim=1)
        return _row_scale_matrix(z, 1.0 / norms.clamp_min(_EPS), self.block_rows)

    def _embed_from_state(self, ctx: MethodContext, st: dict[str, torch.Tensor]) -> np.ndarray:
        self._check_state(ctx, st["P"])
        return project(self._zhat(self._z(ctx)), st["P"])

    def fit(self, ctx: MethodContext) -> dict[str, Any]:
        k = ctx.n_clusters
        self._check_k(ctx, k)
        zh = self._zhat(self._z(ctx))
        s = col_sums(zh)
        ss = float(s @ s)
        if not ss > 0:
            raise StageError("ms2cag: the smoothed representations sum to zero (omega^T 1 = 0); cannot form the modularity matrix")
        basis, r_mat = reduced_basis(gram(zh))
        r = basis.shape[1]
        if r < k:
            raise StageError(f"ms2cag: the smoothed features have numerical rank {r} < n_clusters={k}")
        rs = r_mat @ s  # R s, so R J R^T = R R^T - gamma (R s)(R s)^T / s.s
        kmat = r_mat @ r_mat.T - self.params["gamma"] * torch.outer(rs, rs) / ss
        gen = torch.Generator(device="cpu").manual_seed(int(ctx.seed))
        y = torch.linalg.qr(torch.randn(r, k, generator=gen, dtype=torch.float64).to(kmat.device)).Q
        for _ in range(self.params["tau"]):
            y = torch.linalg.qr(kmat @ y).Q
        rayleigh = torch.linalg.eigvalsh(y.T @ kmat @ y).flip(0)
        p = basis @ y
        np.save(ctx.state_dir / "P.npy", p.cpu().numpy())
        (ctx.state_dir / "ms2cag.json").write_text(json.dumps({"k": k, "rank": r, "params": self.params}))
        self._cache = (ctx.state_dir, project(zh, p))
        return {"rank": r, "ritz_values": rayleigh.tolist()}
