"""SAGSC: scalable attributed-graph subspace clustering (Fettal, Labiod & Nadif, AAAI 2023).

Steps (the authors' ``run_model``; k = number of clusters, c = ``bias``):

1. ``H = S^p X`` with ``S = D~^-1/2 (A + I) D~^-1/2`` (precompute stage, op ``sgc``), centred by its column
   means when ``center`` (the authors' ``StandardScaler(with_std=False)``).
2. ``U`` = the top-k left singular vectors of H (N x k): the low-rank self-expressive coefficients
   ``C = U U^T``.
3. ``Q = Phi(U)``, the row-wise quadratic feature map with ``Phi(u) . Phi(v) = (u . v + c)^2``:
   ``Phi(u) = [c, sqrt(2c) u_1..u_k, u_1^2..u_k^2, sqrt(2) u_i u_j (i < j)]``, m = (k+1)(k+2)/2 columns, so
   the affinity ``M = Q Q^T`` is symmetric and non-negative.
4. Degrees ``D = M 1 = Q (Q^T 1)`` -- computed implicitly from the column sums ``s = Q^T 1``; M (N x N) is never
   formed.
5. ``Q~ = D^-1/2 Q`` and the spectral embedding Z = its left singular vectors 2..k+1 (the first is the trivial
   ``D^1/2 1`` direction of the normalised affinity), clustered by KMeans.

Both SVDs are blocked randomised SVDs (:func:`agcpipe.ops.rsvd.randomized_svd`, seeded by the run's seed) of
implicit matrices: ``H - mean`` and ``Q~`` are produced row block by row block from H and U, so neither the
centred H nor Q (N x m) is stored. Deviation from the PyAGC port: it takes ``D = diag(Q Q^T)`` (the squared row
norms) instead of the row sums the paper and the authors' code use, and does not centre H; both choices are
parameters here only where the authors' code has one (``center``).

Out-of-sample map (what ``fit`` stores in ``state_dir`` and ``embed`` applies, to the training graph and to any
new graph alike): ``mean`` (d), ``P_U`` (d x k) with ``U = (H - mean) P_U``, ``s`` (m) with
``D = Phi(U) s`` (a node's degree in the *training* affinity graph), and ``P_Z`` (m x k) with
``Z = D^-1/2 Phi(U) P_Z``. On the training graph these reproduce the randomised SVDs' singular vectors exactly
(U = A P is how the rSVD returns them), so assigning the training graph gives the training clusters; a new
graph's nodes are embedded in the same space and go to the nearest stored KMeans centre.

Peak memory (bytes) in the train stage, N nodes, d features, k clusters, m = (k+1)(k+2)/2, l = k + 1 +
oversample, b = block rows (about 2**22 / m): ``8 N k`` (U, float64) ``+ 8 N`` (D) ``+ 4 N k`` (the float32
embedding) ``+ 8 b (d + m + l) * 3`` (blocks of H, Phi(U), products and their temporaries)
``+ 8 (m l * 3 + m^2 0)`` accumulators; H itself is memory-mapped (``4 N d`` of page cache as read).
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
from pydantic import Field

from ..errors import ConfigError, StageError
from ..ops.rsvd import RowMatrix, col_sums, project, randomized_svd, row_dot
from .base import Method, MethodContext
from .registry import Params, register


class SAGSCParams(Params):
    p: int = Field(2, ge=0, description="propagation order of S^p X (published default 2; Cora 5)")
    bias: float = Field(2**-0.5, gt=0, description="c of the quadratic kernel (u . v + c)^2")
    center: bool = Field(True, description="centre S^p X by its column means before the SVD (authors' code)")
    n_iter: int = Field(5, ge=0, description="power iterations of each randomised SVD")
    oversample: int = Field(10, ge=0, description="extra random test vectors of each randomised SVD")


def quad_feature_map(u: torch.Tensor, c: float, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Phi(u) row-wise (b x k -> b x (k+1)(k+2)/2), with Phi(u) . Phi(v) = (u . v + c)^2; rows times
    ``row_scale`` (b) when given.

    Built feature-major (an m x b contiguous buffer, returned transposed: GEMMs take it as is) so that every
    write is contiguous: k + 3 vectorised operations per block, none per node.
    """
    b, k = u.shape
    ut = u.T.contiguous()
    out = torch.empty(n_map_columns(k), b, dtype=u.dtype, device=u.device)
    out[0] = c
    torch.mul(ut, math.sqrt(2.0 * c), out=out[1 : k + 1])
    torch.mul(ut, ut, out=out[k + 1 : 2 * k + 1])
    us = ut * math.sqrt(2.0)
    col = 2 * k + 1
    for i in range(k - 1):  # the products u_i u_j, j > i, one row group per i
        torch.mul(us[i : i + 1], ut[i + 1 :], out=out[col : col + k - 1 - i])
        col += k - 1 - i
    if row_scale is not None:
        out.mul_(row_scale.to(out.dtype)[None, :])
    return out.T


def n_map_columns(k: int) -> int:
    return (k + 1) * (k + 2) // 2


@register(
    "sagsc",
    family="non-parametric",
    params=SAGSCParams,
    description="S^p X -> top-k singular vectors -> quadratic kernel affinity (implicit) -> spectral embedding, then KMeans (Fettal et al., AAAI 2023)",
)
class SAGSC(Method):
    """Scalable attributed-graph subspace clustering; see the module docstring."""

    seeded_training = True
    uses_n_clusters_in_training = True
    #: rows per block of the implicit matrices (None = about 2**22 elements per block); tests shrink it
    block_rows: int | None = None
    dtype = torch.float64

    def precompute_ops(self):
        p = self.params["p"]
        return [{"name": "h", "op": "sgc", "K": p}] if p > 0 else [{"name": "h", "op": "identity"}]

    # ------------------------------------------------------------------ the out-of-sample map
    def _h(self, ctx: MethodContext, mean: torch.Tensor | None) -> RowMatrix:
        return RowMatrix.from_array(ctx.features["h"], center=mean, dtype=self.dtype, device=ctx.device, block_rows=self.block_rows)

    def _q(self, u: torch.Tensor, scale: torch.Tensor | None = None) -> RowMatrix:
        """Phi(U) (rows times ``scale`` when given) as an implicit N x m matrix over the rows of U (N x k)."""
        c = float(self.params["bias"])
        k = u.shape[1]

        def block(r0: int, r1: int) -> torch.Tensor:
            return quad_feature_map(u[r0:r1], c, None if scale is None else scale[r0:r1])

        return RowMatrix(u.shape[0], n_map_columns(k), block, self.dtype, u.device, self.block_rows)

    @staticmethod
    def _degrees(q: RowMatrix, s: torch.Tensor) -> torch.Tensor:
        deg = row_dot(q, s)
        bad = ~(deg > 0)
        if bad.any():
            raise StageError(f"SAGSC: {int(bad.sum())} nodes have a non-positive implicit degree (Phi(U) s); cannot normalise")
        return deg

    def _embed_from_state(
        self, ctx: MethodContext, st: dict[str, torch.Tensor], u: torch.Tensor | None = None, deg: torch.Tensor | None = None
    ) -> np.ndarray:
        """Z = D^-1/2 Phi(U) P_Z with U = (H - mean) P_U and D = Phi(U) s (``u`` / ``deg``: already computed)."""
        if u is None:
            u = torch.empty(ctx.graph.n_nodes, st["P_U"].shape[1], dtype=self.dtype, device=ctx.device)
            project(self._h(ctx, st.get("mean")), st["P_U"], u)
        if deg is None:
            deg = self._degrees(self._q(u), st["s"])
        return project(self._q(u, deg.rsqrt()), st["P_Z"])

    # ------------------------------------------------------------------ train
    def fit(self, ctx: MethodContext) -> dict[str, Any]:
        k = ctx.n_clusters
        n, d = ctx.features["h"].shape
        if k > d:
            raise ConfigError(
                f"sagsc takes the top-k left singular vectors of S^p X (N x d = {n} x {d}), so n_clusters={k} "
                f"must be <= the number of features ({d})"
            )
        if k + 1 > n:
            raise ConfigError(f"sagsc needs n_clusters + 1 <= N, got n_clusters={k} for {n} nodes")
        it, over, seed = self.params["n_iter"], self.params["oversample"], ctx.seed
        mean = (col_sums(self._h(ctx, None)) / n) if self.params["center"] else None
        h = self._h(ctx, mean)
        svd_h = randomized_svd(h, k, oversample=over, n_iter=it, seed=seed)
        u = torch.empty(n, k, dtype=self.dtype, device=ctx.device)
        project(h, svd_h.P, u)
        q = self._q(u)
        s = col_sums(q)
        deg = self._degrees(q, s)
        qt = self._q(u, deg.rsqrt())  # Q~ = D^-1/2 Phi(U), implicit
        svd_q = randomized_svd(qt, k + 1, oversample=over, n_iter=it, seed=seed + 1)
        state = {"P_U": svd_h.P, "s": s, "P_Z": svd_q.P[:, 1:]}
        if mean is not None:
            state["mean"] = mean
        for name, t in state.items():
            np.save(ctx.state_dir / f"{name}.npy", t.cpu().numpy())
        (ctx.state_dir / "sagsc.json").write_text(json.dumps({"k": k, "m": q.n_cols, "params": self.params}))
        # the same map embed() applies to any graph (u and deg are what it would recompute, bit for bit)
        self._cache = (ctx.state_dir, self._embed_from_state(ctx, state, u, deg))
        return {
            "singular_values_h": svd_h.s.tolist(),
            "singular_values_q": svd_q.s.tolist(),
            "map_columns": q.n_cols,
            "rsvd_passes": svd_h.n_passes + svd_q.n_passes,
        }

    def embed(self, ctx: MethodContext) -> np.ndarray:
        cache = getattr(self, "_cache", None)
        if cache is not None and cache[0] == ctx.state_dir:
            return cache[1]
        st = {
            name: torch.from_numpy(np.load(ctx.state_dir / f"{name}.npy")).to(ctx.device)
            for name in ("P_U", "s", "P_Z", "mean")
            if (ctx.state_dir / f"{name}.npy").exists()
        }
        if st["P_U"].shape[0] != ctx.features["h"].shape[1]:
            raise StageError(f"the graph has {ctx.features['h'].shape[1]} features but the SAGSC state expects {st['P_U'].shape[0]}")
        return self._embed_from_state(ctx, st)
