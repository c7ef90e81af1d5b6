"""KMeans in torch with scikit-learn semantics, for embeddings up to 10M x 128 (memory-mapped, CPU or CUDA).

Why not :class:`sklearn.cluster.KMeans`: it cannot run on CUDA, and it needs X as one in-memory C array
that it copies to centre it (a memory-mapped 10M x 128 input is read whole into RAM, plus the normalised
copy the caller makes). This class streams row chunks of the input instead and makes no copy of a
float32 C-order input, not even to L2-normalise it: ``normalize=True`` keeps the N row norms and divides
each chunk (or gathered row) by them as it is read, with the very operation a normalised copy would use
(k-means++ distances divide the m x c dot products by the norms instead: equal within float32 rounding).
Other inputs (float64, strided) are copied once, as float32.
It runs the same algorithm on either device:

* k-means++ is sklearn's greedy variant (``2 + int(log k)`` local trials per centre) or ``"random"``;
  with ``init_sample=m`` and N > m it runs on m rows drawn uniformly without replacement instead of all N
  (k passes over m rows instead of over X: at 1M x 64, k = 50 it is a third of a one-init fit);
* Lloyd iterations stop after ``max_iter``, when the labels do not change, or when the squared centre shift
  summed over the centres is ``<= tol * mean(column variances of X)`` (sklearn's tolerance scaling);
* a cluster left empty is relocated to the point farthest from its centre, as sklearn does;
* of ``n_init`` restarts the one with the lowest inertia wins (unless it is the same partition).

Distances use the matmul trick ``argmin_j -2 x.c_j + ||c_j||^2`` on chunks of ``chunk_size`` rows in
float32. Lloyd's iterates are computed with Hamerly's bounds (a point whose nearest centre provably did not
change is skipped) and centre sums updated by the points that changed cluster only, kept in float64. The
reported inertia is a final pass over exact differences ``||x - c||^2`` (summed in float64).

**Dask.** Inside an active :func:`agcpipe.distributed.session` with Dask enabled (CPU, X a file or
copied to one), each Lloyd assignment step, the final assignment, :meth:`predict` and :meth:`confidence`
run as row-range tasks (:func:`assign_rows`, ranges aligned to ``chunk_size``): every task maps X, reads
the centres, writes its labels into a shared file and returns its clusters' float64 sums, counts and
inertia. The driver runs k-means++ (streaming, as here) and the centre updates. Lloyd then takes full
passes instead of Hamerly's bounded ones: the same iterates (labels, centres within float32 rounding).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from ..errors import MAX_SHOWN, ConfigError, StageError
from ..settings import resolve_device

ArrayLike = np.ndarray | torch.Tensor

#: keep X resident on a CUDA device when it takes at most this fraction of the free device memory
_CUDA_RESIDENT_FRACTION = 0.5
#: CPU fits whose passes are smaller than this (N * d * k multiply-adds) run on one thread, see _threads
_SINGLE_THREAD_WORK = 2**27


class KMeans:
    """Lloyd's KMeans with k-means++ restarts; scikit-learn style (``fit`` / ``predict`` / ``labels_``).

    Peak memory of :meth:`fit` besides X itself, in bytes, for N rows, d columns, k clusters, chunk
    c = min(chunk_size, N) and t = 2 + int(ln k) k-means++ trials, at most about::

        4 N d         only if X is not C-contiguous float32 on the device: the one copy (normalize=True
                      alone does not copy: 4 N more for the row norms)
      + (52 + 4 t) N  labels and best labels (int64), row norms, 2 bounds, scratch; t k-means++ distances
                      and a float64 cumsum, or the bounds' temporaries
      + 12 c (k + d)  distance block and its copy, one gathered / converted / normalised / difference block
      + 40 k d        centres (float32, a few), sums (float64)

    With ``init_sample=m`` (m < N) k-means++ runs on m sampled rows: its t distances and the float64
    cumsum take ``(4 t + 8) m`` instead of N-sized arrays, plus ``4 m d`` for the rows and ``~20 m`` for the
    sample's labels and bounds.

    A memory-mapped X is read in place: its pages (``4 N d``) come and go in the page cache.
    On Dask the driver holds ``(16 + 4 t) N`` (labels, best labels, k-means++ distances) and each task
    ``~12 c (k + d)`` plus the X pages of its rows.

    :meth:`predict`, :meth:`transform` and :meth:`confidence` never copy X whole: they stream chunks,
    ``4 c (k + d)`` bytes besides the N-sized output. On CUDA, X is moved to the device when it takes at
    most half of the free device memory; otherwise it stays in host memory and chunks are streamed.
    """

    cluster_centers_: np.ndarray
    labels_: np.ndarray
    inertia_: float
    n_iter_: int
    best_init_: int

    def __init__(
        self,
        n_clusters: int,
        *,
        n_init: int = 10,
        max_iter: int = 300,
        tol: float = 1e-4,
        normalize: bool = False,
        init: str = "k-means++",
        seed: int | None = None,
        device: str = "auto",
        chunk_size: int = 65536,
        init_sample: int | None = None,
        verbose: bool = False,
    ) -> None:
        if init not in ("k-means++", "random"):
            raise ConfigError(f"KMeans init must be 'k-means++' or 'random', got {init!r}")
        for name, value, low in (("n_init", n_init, 1), ("max_iter", max_iter, 1), ("chunk_size", chunk_size, 1)):
            if int(value) != value or value < low:
                raise ConfigError(f"KMeans {name} must be an integer >= {low}, got {value!r}")
        if not tol >= 0:
            raise ConfigError(f"KMeans tol must be >= 0, got {tol!r}")
        if init_sample is not None and (int(init_sample) != init_sample or init_sample < n_clusters):
            raise ConfigError(
                f"KMeans init_sample must be an integer >= n_clusters ({n_clusters}) or None, got {init_sample!r}"
            )
        self.n_clusters = int(n_clusters)
        self.n_init = int(n_init)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.normalize = bool(normalize)
        self.init = init
        self.seed = seed
        self.device = device
        self.chunk_size = int(chunk_size)
        self.init_sample = None if init_sample is None else int(init_sample)
        self.verbose = verbose
        self._device = _resolve_device(device)

    # ------------------------------------------------------------------ public API
    @classmethod
    def from_centers(
        cls, centers: ArrayLike, *, normalize: bool = False, chunk_size: int = 65536, device: str = "auto"
    ) -> KMeans:
        """A fitted KMeans with the given centres (k x d, in the clustered space: not normalised again)."""
        c = _to_numpy(centers).astype(np.float32)
        if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
            raise StageError(f"KMeans centres must be a non-empty 2-D array (k x d), got shape {c.shape}")
        bad = ~np.isfinite(c).all(axis=1)
        if bad.any():
            raise StageError(f"KMeans centres contain NaN or inf in rows {np.flatnonzero(bad)[:MAX_SHOWN].tolist()}")
        km = cls(c.shape[0], normalize=normalize, chunk_size=chunk_size, device=device)
        km.cluster_centers_ = c
        return km

    def fit(self, X: ArrayLike) -> KMeans:
        """Cluster the rows of X (N x d; numpy array, memmap or tensor); sets the fitted attributes."""
        n, d = _check_shape(X)
        k = self.n_clusters
        if k < 2:
            raise StageError(f"n_clusters={k} is invalid: KMeans needs at least 2 clusters")
        if k > n:
            raise StageError(f"n_clusters={k} is larger than the number of nodes ({n})")
        client = self._client()
        with _threads(1 if self._device.type == "cpu" and n * d * k < _SINGLE_THREAD_WORK else None):
            return self._fit(X, n, d, k, client)

    def _client(self) -> Any:
        """The Dask client of the active agcpipe.distributed session (CPU fits only), else None."""
        if self._device.type != "cpu":
            return None
        from .. import distributed

        return distributed.current_client()

    def _fit(self, X: ArrayLike, n: int, d: int, k: int, client: Any = None) -> KMeans:
        dev = self._device
        Xt, xnorm2, col_var_mean = self._materialise(X, n, d)
        remote = _RemoteSteps(self, X, Xt, client) if client is not None else None
        tol_abs = self.tol * col_var_mean
        block = min(self.chunk_size, n)
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(self.seed))
        ws = _Workspace(n, d, k, block, dev)
        best: tuple[float, torch.Tensor, int, int] | None = None
        best_labels = torch.empty(n, dtype=torch.int64, device=dev)
        for run in range(self.n_init):
            centers = self._init_centers(Xt, xnorm2, k, gen, ws)
            if remote is None:
                centers, n_iter = self._lloyd(Xt, xnorm2, centers, tol_abs, ws)
                inertia = ws.assign(Xt, centers)
            else:
                centers, n_iter = remote.lloyd(centers, tol_abs, ws)
                inertia = remote.assign(centers, ws)
            if self.verbose:
                print(f"KMeans init {run}: {n_iter} iterations, inertia {inertia:.6g}")
            # like sklearn, a lower inertia for the same partition (float noise) does not replace the best
            if best is None or (inertia < best[0] and not _same_partition(ws.labels, best_labels, k)):
                best = (inertia, centers, n_iter, run)
                best_labels.copy_(ws.labels)
        if remote is not None:
            remote.close()
        assert best is not None
        self.inertia_, centers, self.n_iter_, self.best_init_ = best
        self.cluster_centers_ = centers.cpu().numpy()
        self.labels_ = best_labels.cpu().numpy()
        return self

    def predict(self, X: ArrayLike) -> np.ndarray:
        """Index (int64) of the nearest centre of each row of X."""
        c = self._centers(X)
        client = self._client()
        if client is not None:
            return _RemoteSteps(self, X, None, client).per_row("predict", c)
        cn = (c * c).sum(1)
        out = torch.empty(_check_shape(X)[0], dtype=torch.int64)
        for s, e, xb in self._stream(X):
            out[s:e] = torch.addmm(cn, xb, c.T, alpha=-2).argmin(1).cpu()
        return out.numpy()

    def fit_predict(self, X: ArrayLike) -> np.ndarray:
        """``fit(X).labels_``."""
        return self.fit(X).labels_

    def transform(self, X: ArrayLike) -> np.ndarray:
        """Squared distances (float32, N x k) of the rows of X to the centres, in the clustered space."""
        c = self._centers(X)
        out = torch.empty(_check_shape(X)[0], c.shape[0], dtype=torch.float32)
        for s, e, xb in self._stream(X):
            out[s:e] = _sq_dist(xb, c).cpu()
        return out.numpy()

    def confidence(self, X: ArrayLike) -> np.ndarray:
        """Assignment confidence of each row, float32 in [0, 1]: ``1 - d1 / d2``.

        ``d1`` and ``d2`` are the Euclidean distances to the nearest and the second-nearest centre: 1 on
        a centre, 0 on the boundary between two clusters. (The DEC Student-t ``max_j q_ij`` is nearly
        uniform, ~1/k, on L2-normalised embeddings, whose distances are at most 2, so it says little.)
        """
        c = self._centers(X)
        out = torch.empty(_check_shape(X)[0], dtype=torch.float32)
        if c.shape[0] < 2:
            return out.fill_(1.0).numpy()
        client = self._client()
        if client is not None:
            return _RemoteSteps(self, X, None, client).per_row("confidence", c)
        for s, e, xb in self._stream(X):
            d2 = _sq_dist(xb, c).clamp_(min=0).topk(2, dim=1, largest=False).values.sqrt_()
            out[s:e] = torch.where(d2[:, 1] > 0, 1 - d2[:, 0] / d2[:, 1], torch.ones_like(d2[:, 0])).clamp_(0, 1).cpu()
        return out.numpy()

    # ------------------------------------------------------------------ data
    def _stream(self, X: ArrayLike) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Chunks ``(start, end, rows)`` of X as float32 on the device, normalised if asked; checks finiteness."""
        n = _check_shape(X)[0]
        bad = _BadRows()
        for s in range(0, n, self.chunk_size):
            e = min(s + self.chunk_size, n)
            xb = _rows(X, s, e).to(self._device, torch.float32).contiguous()
            xb, stat = _normalize_rows(xb) if self.normalize else (xb, xb.sum(1))
            bad.check(xb, s, stat)
            yield s, e, xb
        bad.raise_if_any()

    def _materialise(self, X: ArrayLike, n: int, d: int) -> tuple[_Data, torch.Tensor, float]:
        """X as the algorithm reads it (:class:`_Data`: a view of X when possible, else the one float32
        copy; rows divided by their norms as they are read when ``normalize``), its squared row norms
        (after normalising) and its mean column variance.

        The tensor lives on the device, or in host memory when it does not fit on the CUDA device.
        """
        dev = home = self._device
        if dev.type == "cuda" and 4 * n * d > _CUDA_RESIDENT_FRACTION * torch.cuda.mem_get_info(dev)[0]:
            home = torch.device("cpu")
        view = _view(X, home)
        out = view if view is not None else torch.empty(n, d, dtype=torch.float32, device=home)
        norms = torch.empty(n, 1, dtype=torch.float32, device=dev) if self.normalize else None
        xnorm2 = torch.empty(n, dtype=torch.float32, device=dev)
        col_sum = torch.zeros(d, dtype=torch.float64, device=dev)
        bad = _BadRows()
        for s in range(0, n, self.chunk_size):
            e = min(s + self.chunk_size, n)
            o = out[s:e]
            if view is None:
                o.copy_(_rows(X, s, e))
            xb = o.to(dev)
            if self.normalize:
                nb = torch.linalg.vector_norm(xb, dim=1, keepdim=True)
                bad.check(xb, s, nb.squeeze(1))
                norms[s:e] = nb.masked_fill_(nb == 0, 1)
                xb = torch.div(xb, norms[s:e])
            xnorm2[s:e] = torch.linalg.vector_norm(xb, dim=1).square_()
            if not self.normalize:
                bad.check(xb, s, xnorm2[s:e])
            col_sum += xb.sum(0)
        bad.raise_if_any()
        # mean over columns of E[x^2] - E[x]^2 in float64 (only scales the stopping threshold)
        col_var_mean = float(xnorm2.sum(dtype=torch.float64) / (n * d) - (col_sum / n).square().mean())
        return _Data(out, norms, dev), xnorm2, max(col_var_mean, 0.0)

    def _centers(self, X: ArrayLike) -> torch.Tensor:
        if not hasattr(self, "cluster_centers_"):
            raise RuntimeError("KMeans is not fitted: call fit() or use KMeans.from_centers()")
        d = _check_shape(X)[1]
        if d != self.cluster_centers_.shape[1]:
            raise StageError(f"X has {d} columns but the KMeans centres have {self.cluster_centers_.shape[1]}")
        return torch.from_numpy(self.cluster_centers_).to(self._device)

    # ------------------------------------------------------------------ algorithm
    def _init_centers(
        self, X: _Data, xnorm2: torch.Tensor, k: int, gen: torch.Generator, ws: _Workspace
    ) -> torch.Tensor:
        """Initial centres (k x d float32 on the device): sklearn's greedy k-means++ (over a uniform sample
        of ``init_sample`` rows when N is larger) or k random rows."""
        n = X.shape[0]
        if self.init == "random":
            idx = torch.randperm(n, generator=gen)[:k]
            return X.gather(idx)
        m = self.init_sample
        if m is not None and n > m:
            idx = torch.randperm(n, generator=gen)[:m].sort().values  # sorted: sequential reads of a memmap
            rows = X.gather(idx)  # normalised as X's rows are
            sample_ws = _Workspace(m, X.shape[1], k, min(ws.block, m), ws.device)
            return self._kmeans_pp(_Data(rows, None, ws.device), (rows * rows).sum(1), k, gen, sample_ws)
        return self._kmeans_pp(X, xnorm2, k, gen, ws)

    def _kmeans_pp(self, X: _Data, xnorm2: torch.Tensor, k: int, gen: torch.Generator, ws: _Workspace) -> torch.Tensor:
        """sklearn's greedy k-means++ over the rows of X."""
        n = X.shape[0]
        dev = ws.device
        trials = 2 + int(math.log(k))
        centers = torch.empty(k, X.shape[1], dtype=torch.float32, device=dev)
        first = int(torch.randint(n, (1,), generator=gen))
        centers[0] = X.gather(torch.tensor([first]))[0]
        closest = ws.closest
        ws.sq_dist_to(X, xnorm2, centers[:1], closest.view(1, n))
        pot = closest.sum().double()
        cand_d = ws.cand_dist(trials)
        for c in range(1, k):
            r = torch.rand(trials, generator=gen, dtype=torch.float64).to(dev) * pot
            cum = torch.cumsum(closest, 0, dtype=torch.float64)
            ids = torch.searchsorted(cum, r).clamp_(max=n - 1)
            cand = X.gather(ids)
            ws.sq_dist_to(X, xnorm2, cand, cand_d)
            torch.minimum(cand_d, closest, out=cand_d)
            pots = cand_d.sum(1).double()  # float32 sums (pairwise): no float64 copy of cand_d
            best = int(pots.argmin())
            pot = pots[best]
            closest.copy_(cand_d[best])
            centers[c] = cand[best]
        return centers

    def _lloyd(
        self, X: _Data, xnorm2: torch.Tensor, centers: torch.Tensor, tol_abs: float, ws: _Workspace
    ) -> tuple[torch.Tensor, int]:
        """Lloyd iterations from ``centers``; returns the final centres and the number of iterations.

        After the first full pass, Hamerly's bounds skip the points whose nearest centre provably did not
        change, and the centre sums are updated with the points that changed cluster only: the iterates
        of plain Lloyd at a fraction of the cost once few points move.
        """
        moved: torch.Tensor | None = None
        n_iter = 0
        for n_iter in range(1, self.max_iter + 1):
            if moved is None:
                ws.full_step(X, xnorm2, centers)
            elif ws.bounded_step(X, xnorm2, centers, moved) == 0:
                break  # no label changed, so the centres stay (sklearn's strict convergence)
            if int(ws.counts.min()) == 0:
                ws.relocate_empty(X, centers)
            new = (ws.sums / ws.counts.clamp_min(1).unsqueeze(1)).to(torch.float32)
            moved = torch.linalg.vector_norm(new.double() - centers.double(), dim=1)
            shift = float((moved * moved).sum())
            centers = new
            if self.verbose:
                print(f"  iteration {n_iter}: centre shift {shift:.4g} (tolerance {tol_abs:.4g})")
            if shift <= tol_abs:
                break
        return centers, n_iter


class _Workspace:
    """Buffers and passes over X shared by every restart and iteration of one fit.

    ``labels`` / ``upper`` / ``lower`` hold each point's cluster, an upper bound on its distance to that
    centre and a lower bound on its distance to any other centre (Hamerly); ``sums`` (float64) and
    ``counts`` are the current clusters' coordinate sums and sizes.
    """

    def __init__(self, n: int, d: int, k: int, block: int, device: torch.device) -> None:
        self.n, self.k, self.block, self.device = n, k, block, device
        self.labels = torch.empty(n, dtype=torch.int64, device=device)
        self.upper = torch.empty(n, dtype=torch.float32, device=device)
        self.lower = torch.empty(n, dtype=torch.float32, device=device)
        self.closest = torch.empty(n, dtype=torch.float32, device=device)
        self.part = torch.empty(k, d, dtype=torch.float32, device=device)
        self.scratch = torch.empty(block, d, dtype=torch.float32, device=device)  # gathered rows, differences
        self.sums = torch.empty(k, d, dtype=torch.float64, device=device)
        self.counts = torch.empty(k, dtype=torch.int64, device=device)
        self.stale = False  # sums no longer match labels (after a relocation): recompute them whole
        self._cand: torch.Tensor | None = None

    def cand_dist(self, trials: int) -> torch.Tensor:
        if self._cand is None or self._cand.shape[0] != trials:
            self._cand = torch.empty(trials, self.n, dtype=torch.float32, device=self.device)
        return self._cand

    def ranges(self) -> Iterator[tuple[int, int]]:
        for s in range(0, self.n, self.block):
            yield s, min(s + self.block, self.n)

    def rows(self, X: _Data, s: int, e: int) -> torch.Tensor:
        return X.block(s, e)

    def sq_dist_to(self, X: _Data, xnorm2: torch.Tensor, pts: torch.Tensor, out: torch.Tensor) -> None:
        """``out[j, i] = ||x_i - pts_j||^2`` (m x N), clamped at 0."""
        pn = (pts * pts).sum(1, keepdim=True)
        for s, e in self.ranges():
            o = out[:, s:e]
            if X.norms is None:
                torch.addmm(pn, pts, self.rows(X, s, e).T, alpha=-2, out=o)
            else:  # rows normalised on the fly: scale the m x c products, not the c x d rows (half the pass)
                torch.mm(pts, X.base[s:e].to(self.device, non_blocking=True).T, out=o)
                o.div_(X.norms[s:e].T).mul_(-2).add_(pn)
            o.add_(xnorm2[s:e]).clamp_min_(0)

    def _nearest_two(
        self, xb: torch.Tensor, xn: torch.Tensor, centers: torch.Tensor, cn: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest centre of each row of xb, and the distances to the nearest and second nearest."""
        d2 = torch.addmm(cn, xb, centers.T, alpha=-2)
        first, lab = d2.min(1)
        second = d2.scatter_(1, lab.unsqueeze(1), math.inf).amin(1)  # amin: several times faster than min
        return lab, (first + xn).clamp_min_(0).sqrt_(), (second + xn).clamp_min_(0).sqrt_()

    def full_step(self, X: _Data, xnorm2: torch.Tensor, centers: torch.Tensor) -> None:
        """E-step over all points (labels and exact bounds) and the M-step sums from scratch."""
        cn = (centers * centers).sum(1)
        self.sums.zero_()
        self.counts.zero_()
        for s, e in self.ranges():
            xb = self.rows(X, s, e)
            lab, self.upper[s:e], self.lower[s:e] = self._nearest_two(xb, xnorm2[s:e], centers, cn)
            self.labels[s:e] = lab
            self._add(xb, lab)
        self.stale = False

    def full_sums(self, X: _Data) -> None:
        self.sums.zero_()
        self.counts.zero_()
        for s, e in self.ranges():
            self._add(self.rows(X, s, e), self.labels[s:e])
        self.stale = False

    def _add(self, xb: torch.Tensor, lab: torch.Tensor) -> None:
        self.sums += self.part.zero_().index_add_(0, lab, xb)
        self.counts += torch.bincount(lab, minlength=self.k)

    def bounded_step(self, X: _Data, xnorm2: torch.Tensor, centers: torch.Tensor, moved: torch.Tensor) -> int:
        """E-step for the points the bounds cannot settle, incremental M-step; returns how many changed cluster."""
        lab, up, lo = self.labels, self.upper, self.lower
        mv = moved.to(torch.float32)
        up += mv[lab]
        top = torch.topk(mv, 2).values  # every other centre moved at most the largest shift but one's own
        lo -= torch.where(torch.arange(self.k, device=mv.device) == mv.argmax(), top[1], top[0])[lab]
        cc = torch.cdist(centers, centers, compute_mode="donot_use_mm_for_euclid_dist")
        half = 0.5 * cc.fill_diagonal_(math.inf).min(1).values  # nearer than this, no other centre is nearer
        todo = torch.nonzero(up > torch.maximum(lo, half[lab])).flatten()
        cn = (centers * centers).sum(1)
        part = self.part.zero_()
        changed = 0
        for sel, xb in self._blocks_of(X, todo):
            new, up[sel], lo[sel] = self._nearest_two(xb, xnorm2[sel], centers, cn)
            old = lab[sel]
            ch = torch.nonzero(new != old).flatten()
            if ch.numel() == 0:
                continue
            changed += ch.numel()
            new_c, old_c = new[ch], old[ch]
            lab[sel] = new
            if not self.stale:
                xc = xb[ch]
                part.index_add_(0, new_c, xc).index_add_(0, old_c, xc, alpha=-1)
                self.counts += torch.bincount(new_c, minlength=self.k) - torch.bincount(old_c, minlength=self.k)
        if self.stale:
            self.full_sums(X)
        else:
            self.sums += part
        return changed

    def _blocks_of(self, X: _Data, todo: torch.Tensor) -> Iterator[tuple[slice | torch.Tensor, torch.Tensor]]:
        """``(rows, x[rows])`` blocks covering the sorted indices ``todo``: gathered, or contiguous when
        ``todo`` holds most rows anyway (a full pass is cheaper than gathering them)."""
        if 2 * todo.numel() > self.n:
            for s, e in self.ranges():
                yield slice(s, e), self.rows(X, s, e)
            return
        for a in range(0, todo.numel(), self.block):
            ii = todo[a : a + self.block]
            # into the reused buffer when X is on the device: allocating it afresh costs more than the gather
            yield ii, X.gather(ii, out=self.scratch[: ii.numel()])

    def relocate_empty(self, X: _Data, centers: torch.Tensor) -> None:
        """sklearn's relocation: each empty cluster takes the next point farthest from its centre."""
        dist = self.closest
        for s, e in self.ranges():
            diff = torch.index_select(centers, 0, self.labels[s:e], out=self.scratch[: e - s]).sub_(self.rows(X, s, e))
            dist[s:e] = diff.square_().sum(1)
        empty = torch.nonzero(self.counts == 0).flatten()
        far = torch.topk(dist, empty.numel()).indices
        if float(dist[far[0]]) == 0:  # more clusters than distinct points: nothing to gain
            return
        for j, i in zip(empty.tolist(), far.tolist()):
            x = X.gather(torch.tensor([i]))[0].to(torch.float64)
            old = int(self.labels[i])
            self.sums[old] -= x
            self.counts[old] -= 1
            self.sums[j] = x
            self.counts[j] = 1
        self.stale = True

    def assign(self, X: _Data, centers: torch.Tensor) -> float:
        """Nearest-centre labels into ``labels``; returns the inertia from exact differences (float64 sum)."""
        cn = (centers * centers).sum(1)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for s, e in self.ranges():
            xb = self.rows(X, s, e)
            lab = self.labels[s:e]
            torch.argmin(torch.addmm(cn, xb, centers.T, alpha=-2), 1, out=lab)
            diff = torch.index_select(centers, 0, lab, out=self.scratch[: e - s]).sub_(xb)
            total += diff.square_().sum(1).sum(dtype=torch.float64)
        return float(total)


class _Data:
    """X as the algorithm reads it: a float32 tensor (a view of X or the one copy) whose rows are divided
    by ``norms`` (N x 1, zeros replaced by 1) as they are read, when rows are normalised on the fly."""

    def __init__(self, base: torch.Tensor, norms: torch.Tensor | None, device: torch.device) -> None:
        self.base, self.norms, self.device = base, norms, device
        self.shape = base.shape
        self._buf: torch.Tensor | None = None

    def block(self, s: int, e: int) -> torch.Tensor:
        """Rows s:e (normalised when rows are): valid until the next call (one reused buffer: a fresh
        chunk-sized allocation per call cost twice the pass itself, in page faults)."""
        xb = self.base[s:e].to(self.device, non_blocking=True)
        if self.norms is None:
            return xb
        if self._buf is None or self._buf.shape[0] < e - s:
            self._buf = torch.empty(e - s, self.shape[1], dtype=torch.float32, device=self.device)
        return torch.div(xb, self.norms[s:e], out=self._buf[: e - s])

    def gather(self, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        home = self.base.device
        if home == self.device and out is not None:
            xb = torch.index_select(self.base, 0, idx.to(home), out=out)
        else:
            xb = torch.index_select(self.base, 0, idx.to(home)).to(self.device)
        return xb if self.norms is None else xb.div_(self.norms[idx.to(self.device)])


class _RemoteSteps:
    """The passes over X of one fit (or predict / confidence) as Dask tasks over row ranges."""

    def __init__(self, km: KMeans, X: ArrayLike, data: _Data | None, client: Any) -> None:
        from .. import distributed

        self.km, self.data, self.client = km, data, client
        self.n, self.d = _check_shape(X)
        self.scratch = distributed.scratch_dir()
        arr = X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else X
        ref = distributed.file_ref(arr) if isinstance(arr, np.ndarray) and arr.dtype == np.float32 else None
        if ref is None:
            path = self.scratch / "x.npy"
            np.save(path, np.ascontiguousarray(np.asarray(arr), dtype=np.float32))
            ref = distributed.ArrayRef.of_npy(path)
        self.x = ref
        c = km.chunk_size
        chunks = -(-self.n // c)
        parts = distributed.ranges(chunks, distributed.tasks_for(client))
        self.ranges = [(a * c, min(self.n, b * c)) for a, b in parts]
        self.labels_path = self.scratch / "labels.npy"
        self._labels: distributed.ArrayRef | None = None

    def _run(self, mode: str, centers: torch.Tensor, **kw: Any) -> list[dict[str, Any]]:
        from .. import distributed

        c = centers.detach().cpu().numpy().astype(np.float32)
        args = [(self.x, self.km.normalize, a, b, self.km.chunk_size, c, mode, kw) for a, b in self.ranges]
        return distributed.map_gather(self.client, assign_rows, args)

    def _labels_ref(self) -> Any:
        from .. import distributed

        if self._labels is None:
            np.lib.format.open_memmap(self.labels_path, mode="w+", dtype=np.int64, shape=(self.n,))
            self._labels = distributed.ArrayRef.of_npy(self.labels_path)
        return self._labels

    def lloyd(self, centers: torch.Tensor, tol_abs: float, ws: _Workspace) -> tuple[torch.Tensor, int]:
        """Lloyd iterations from ``centers`` with full assignment steps (the iterates of :meth:`KMeans._lloyd`)."""
        labels = self._labels_ref()
        n_iter = 0
        for n_iter in range(1, self.km.max_iter + 1):
            parts = self._run("step", centers, labels=labels, compare=n_iter > 1)
            if n_iter > 1 and sum(p["changed"] for p in parts) == 0:
                break  # no label changed, so the centres stay
            sums = torch.from_numpy(np.sum([p["sums"] for p in parts], axis=0))
            counts = torch.from_numpy(np.sum([p["counts"] for p in parts], axis=0))
            if int(counts.min()) == 0:
                self._relocate(centers, sums, counts)
            new = (sums / counts.clamp_min(1).unsqueeze(1)).to(torch.float32)
            moved = torch.linalg.vector_norm(new.double() - centers.double(), dim=1)
            shift = float((moved * moved).sum())
            centers = new
            if self.km.verbose:
                print(f"  iteration {n_iter}: centre shift {shift:.4g} (tolerance {tol_abs:.4g})")
            if shift <= tol_abs:
                break
        return centers, n_iter

    def _relocate(self, centers: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """sklearn's relocation (as :meth:`_Workspace.relocate_empty`) with the farthest points of every range."""
        empty = torch.nonzero(counts == 0).flatten()
        parts = self._run("far", centers, labels=self._labels, top=int(empty.numel()))
        dist = torch.from_numpy(np.concatenate([p["dist"] for p in parts]))
        idx = np.concatenate([p["idx"] for p in parts])
        pick = torch.topk(dist, empty.numel()).indices
        if float(dist[pick[0]]) == 0:
            return
        lab = self._labels.open()
        for j, i in zip(empty.tolist(), idx[pick.numpy()].tolist()):
            x = self.data.gather(torch.tensor([i]))[0].cpu().to(torch.float64)
            old = int(lab[i])
            sums[old] -= x
            counts[old] -= 1
            sums[j] = x
            counts[j] = 1

    def assign(self, centers: torch.Tensor, ws: _Workspace) -> float:
        """Final nearest-centre labels (into ``ws.labels``) and the exact inertia."""
        parts = self._run("assign", centers, labels=self._labels_ref())
        ws.labels.copy_(torch.from_numpy(np.array(self._labels.open())).to(ws.labels.device))
        return float(sum(p["inertia"] for p in parts))

    def per_row(self, mode: str, centers: torch.Tensor) -> np.ndarray:
        """predict / confidence of every row, written by the tasks into one file."""
        from .. import distributed

        dtype = np.int64 if mode == "predict" else np.float32
        path = self.scratch / f"{mode}.npy"
        np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(self.n,))
        try:
            self._run(mode, centers, out=distributed.ArrayRef.of_npy(path))
            return np.array(np.load(path, mmap_mode="r"))
        finally:
            self.close()

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.scratch, ignore_errors=True)


def assign_rows(
    x: Any, normalize: bool, r0: int, r1: int, chunk: int, centers: np.ndarray, mode: str, kw: dict[str, Any]
) -> dict[str, Any]:
    """Dask task: one pass of KMeans over rows ``r0:r1`` of X (a file), in chunks of ``chunk`` rows.

    ``mode``: ``step`` (Lloyd assignment: labels into ``kw["labels"]``, returns float64 sums, counts and,
    with ``compare``, how many labels changed), ``far`` (the ``top`` points farthest from their centre),
    ``assign`` (final labels and inertia), ``predict`` / ``confidence`` (into ``kw["out"]``). Each uses
    the arithmetic of the single-process pass it replaces.
    """
    X = x.open()
    c = torch.from_numpy(np.asarray(centers, dtype=np.float32))
    k, d = c.shape
    cn = (c * c).sum(1)
    labels = kw["labels"].open("r+") if kw.get("labels") is not None else None
    out = kw["out"].open("r+") if kw.get("out") is not None else None
    sums = torch.zeros(k, d, dtype=torch.float64)
    counts = torch.zeros(k, dtype=torch.int64)
    part = torch.empty(k, d, dtype=torch.float32)
    changed, inertia = 0, torch.zeros((), dtype=torch.float64)
    far_d: list[torch.Tensor] = []
    far_i: list[torch.Tensor] = []
    with _threads(1):
        for s in range(r0, r1, chunk):
            e = min(r1, s + chunk)
            xb = torch.from_numpy(np.ascontiguousarray(X[s:e], dtype=np.float32))
            if normalize:
                nb = torch.linalg.vector_norm(xb, dim=1, keepdim=True)
                xb = torch.div(xb, nb.masked_fill_(nb == 0, 1))
            if mode == "step":
                lab = torch.addmm(cn, xb, c.T, alpha=-2).min(1).indices
                if kw.get("compare"):
                    changed += int((lab != torch.from_numpy(np.asarray(labels[s:e]))).sum())
                labels[s:e] = lab.numpy()
                sums += part.zero_().index_add_(0, lab, xb)
                counts += torch.bincount(lab, minlength=k)
            elif mode == "far":
                lab = torch.from_numpy(np.asarray(labels[s:e]))
                dist = torch.index_select(c, 0, lab).sub_(xb).square_().sum(1)
                top = torch.topk(dist, min(int(kw["top"]), dist.numel()))
                far_d.append(top.values)
                far_i.append(top.indices + s)
            elif mode == "assign":
                lab = torch.argmin(torch.addmm(cn, xb, c.T, alpha=-2), 1)
                labels[s:e] = lab.numpy()
                inertia += torch.index_select(c, 0, lab).sub_(xb).square_().sum(1).sum(dtype=torch.float64)
            elif mode == "predict":
                out[s:e] = torch.addmm(cn, xb, c.T, alpha=-2).argmin(1).numpy()
            else:  # confidence
                d2 = _sq_dist(xb, c).clamp_(min=0).topk(2, dim=1, largest=False).values.sqrt_()
                out[s:e] = torch.where(d2[:, 1] > 0, 1 - d2[:, 0] / d2[:, 1], torch.ones_like(d2[:, 0])).clamp_(0, 1).numpy()
    for arr in (labels, out):
        if arr is not None:
            arr.flush()
    res: dict[str, Any] = {"rows": r1 - r0}
    if mode == "step":
        res.update(sums=sums.numpy(), counts=counts.numpy(), changed=changed)
    elif mode == "far":
        res.update(dist=torch.cat(far_d).numpy() if far_d else np.empty(0, np.float32),
                   idx=torch.cat(far_i).numpy() if far_i else np.empty(0, np.int64))
    elif mode == "assign":
        res["inertia"] = float(inertia)
    return res


# ---------------------------------------------------------------------- helpers
@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Cap torch's intra-op threads at ``n`` (None: leave them) for the block; restored after.

    A small fit is hundreds of short passes: on a 2-core machine whose other core is busy, OpenMP
    spin-waits made a Cora-sized fit (2708 x 1433, k=7) take 4-11 s on 2 threads against 0.6-1.2 s on
    one, while a second thread gains little on passes this small. Note that the setting is process-wide.
    """
    before = torch.get_num_threads()
    if n is None or n >= before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _same_partition(a: torch.Tensor, b: torch.Tensor, k: int) -> bool:
    """Whether labelling ``a`` determines ``b`` (sklearn's ``_is_same_clustering``): O(N + k)."""
    representative = torch.empty(k, dtype=b.dtype, device=b.device).scatter_(0, a, b)  # some b of each a
    return bool((representative[a] == b).all())


def _resolve_device(device: str) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` (see :func:`agcpipe.settings.resolve_device`) as a torch
    device with an explicit CUDA index: tensors report ``cuda:N``, and device comparisons need that spelling."""
    try:
        dev = torch.device(resolve_device(device))
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"KMeans device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"KMeans device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def _check_shape(X: Any) -> tuple[int, int]:
    shape = tuple(getattr(X, "shape", ()))
    if len(shape) != 2:
        raise StageError(f"KMeans needs a 2-D array (nodes x features), got shape {shape}")
    if shape[1] == 0:
        raise StageError("KMeans needs at least one feature column, got shape " + str(shape))
    return int(shape[0]), int(shape[1])


def _to_numpy(X: ArrayLike) -> np.ndarray:
    return X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else np.asarray(X)


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor of a numpy array, also read-only ones (memmaps); they are never written to."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def _view(X: ArrayLike, device: torch.device) -> torch.Tensor | None:
    """X as a float32 C-contiguous tensor on ``device`` without copying, or None if that needs a copy."""
    if isinstance(X, torch.Tensor):
        X = X.detach()
        ok = X.dtype == torch.float32 and X.is_contiguous() and X.device == device
        return X if ok else None
    if device.type == "cpu" and X.dtype == np.float32 and X.flags.c_contiguous:
        return _from_numpy(X)
    return None


def _rows(X: ArrayLike, s: int, e: int) -> torch.Tensor:
    """Rows s:e of X as a tensor, without copying when torch can view the numpy dtype and layout."""
    if isinstance(X, torch.Tensor):
        return X.detach()[s:e]
    a = np.asarray(X[s:e])
    if a.dtype not in (np.float32, np.float64, np.float16):
        a = a.astype(np.float32)
    return _from_numpy(np.ascontiguousarray(a))


def _normalize_rows(x: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of x divided by their L2 norms, the norms); all-zero rows stay zero (as sklearn's normalize)."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return torch.div(x, norms.masked_fill(norms == 0, 1), out=out), norms.squeeze(1)


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distances (rows of x to rows of c) by the matmul trick, clamped at 0."""
    d = torch.addmm((c * c).sum(1), x, c.T, alpha=-2)
    return d.add_(torch.linalg.vector_norm(x, dim=1, keepdim=True).square_()).clamp_min_(0)


class _BadRows:
    """Collects the rows of X holding NaN or inf, chunk by chunk, for one clear error."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.count = 0

    def check(self, xb: torch.Tensor, start: int, row_stat: torch.Tensor) -> None:
        """Record the bad rows of block ``xb`` (rows ``start...``); ``row_stat`` is a per-row reduction of
        xb (sum, norm) that is NaN or inf for every bad row, so only its non-finite rows are inspected."""
        suspects = torch.nonzero(~torch.isfinite(row_stat)).flatten()
        if suspects.numel() == 0:
            return
        idx = suspects[~torch.isfinite(xb[suspects]).all(1)]
        self.count += idx.numel()
        self.rows += (idx[: MAX_SHOWN - len(self.rows)] + start).tolist()

    def raise_if_any(self) -> None:
        if self.count:
            raise StageError(
                f"KMeans input contains NaN or inf in {self.count} rows; first offending rows: {self.rows}"
            )
