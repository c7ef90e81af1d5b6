"""Feature preprocessing before propagation, chunked over rows so that memmapped N x d inputs never load whole.

* ``l1``: each row divided by its L1 norm, zero rows stay zero (what the published SGC / SSGC benchmarks do
  to bag-of-words features);
* ``standardize``: per column ``(x - mean) / std`` with the population std (``std == 0`` -> 1). Statistics
  are computed on this X, or applied as given (a trained model applies its training graph's statistics);
* ``none``: a float32 copy.

Peak memory besides X and the N x d float32 output: one chunk of ``chunk_rows x d`` float64 (standardize
statistics) or float32 (otherwise), plus O(d) float64 accumulators. No float64 N x d temporary exists.
A memory-mapped X (or output) is read (written) through a short-lived window per chunk, so its pages do
not stay resident in this process.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import MAX_SHOWN, ConfigError, StageError

METHODS = ("l1", "standardize", "none")

#: elements per chunk when chunk_rows is not given (16 MiB float32 / 32 MiB float64)
CHUNK_ELEMENTS = 1 << 22


def preprocess_features(
    X: np.ndarray,
    method: str,
    stats: Mapping[str, Any] | None = None,
    *,
    out: np.ndarray | None = None,
    chunk_rows: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Preprocess the N x d features X; return ``(N x d float32 result, stats)``.

    ``stats`` is ``{"method": method}`` plus, for ``standardize``, ``"mean"`` and ``"std"`` (lists of d
    floats); pass a previous result's stats to apply them instead of computing new ones. ``out`` may be a
    preallocated N x d float32 array (e.g. a memmap; X itself for in-place) that receives the result.
    Raises :class:`ConfigError` for an unknown method or stats of another method, :class:`StageError` for
    NaN / inf in X (naming the first offending rows) or stats of another dimension.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown feature preprocessing {method!r}; known: {', '.join(METHODS)}")
    if X.ndim != 2:
        raise ValueError(f"features must be 2-D, got shape {X.shape}")
    n, d = X.shape
    if out is None:
        out = np.empty((n, d), dtype=np.float32)
    elif out.shape != (n, d) or out.dtype != np.float32:
        raise ValueError(f"out must be a {n} x {d} float32 array, got {out.shape} {out.dtype}")
    step = chunk_rows or max(1, CHUNK_ELEMENTS // max(d, 1))
    if step < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    chunks = [(r0, min(r0 + step, n)) for r0 in range(0, n, step)]

    if method == "standardize":
        if stats is None:
            mean, std = _column_stats(X, chunks)
        else:
            mean, std = _given_stats(stats, d)
        result = {"method": method, "mean": mean.tolist(), "std": std.tolist()}
    else:
        if stats is not None and stats.get("method") != method:
            raise ConfigError(f"stats of method {stats.get('method')!r} cannot be applied as {method!r}")
        result = {"method": method}

    from .propagate import _file_of, _read, _write

    x_file, out_file = _file_of(X), _file_of(out)
    for r0, r1 in chunks:
        c = _read(X, x_file, r0, r1) if x_file is not None else np.asarray(X[r0:r1])
        if method != "standardize" or stats is not None:  # else checked while computing the statistics
            _check_finite(c, r0, X, chunks)
        o = out[r0:r1] if out_file is None else np.empty((r1 - r0, d), dtype=np.float32)
        if method == "l1":
            norm = np.abs(c).sum(axis=1, dtype=np.float64)
            norm[norm == 0] = 1.0
            np.divide(c, norm[:, None], out=o)
        elif method == "standardize":
            np.subtract(c, mean, out=o)
            np.divide(o, std, out=o)
        else:
            o[...] = c
        if out_file is not None:
            _write(out_file, r0, r1, 0, d, o)
    return out, result


def _column_stats(X: np.ndarray, chunks: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and population std (float64), one pass merging per-chunk moments (Chan et al.)."""
    d = X.shape[1]
    from .propagate import _file_of, _read

    x_file = _file_of(X)
    count, mean, m2 = 0, np.zeros(d), np.zeros(d)
    for r0, r1 in chunks:
        c = _read(X, x_file, r0, r1) if x_file is not None else np.asarray(X[r0:r1])
        _check_finite(c, r0, X, chunks)
        c = c.astype(np.float64)
        cm = c.mean(axis=0)
        c -= cm
        cm2 = np.einsum("ij,ij->j", c, c)
        nb, tot = r1 - r0, count + r1 - r0
        delta = cm - mean
        mean += delta * (nb / tot)
        m2 += cm2 + delta**2 * (count * nb / tot)
        count = tot
    std = np.sqrt(m2 / count) if count else np.ones(d)
    std[std == 0] = 1.0
    return mean, std


def _given_stats(stats: Mapping[str, Any], d: int) -> tuple[np.ndarray, np.ndarray]:
    if stats.get("method") != "standardize":
        raise ConfigError(f"stats of method {stats.get('method')!r} cannot be applied as 'standardize'")
    mean = np.asarray(stats.get("mean", []), dtype=np.float64)
    std = np.asarray(stats.get("std", []), dtype=np.float64)
    if mean.shape != (d,) or std.shape != (d,):
        raise StageError(
            f"standardize statistics are for {mean.size} features but the feature matrix has {d} columns"
        )
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise StageError("standardize statistics must be finite with std > 0")
    return mean, std


def _check_finite(chunk: np.ndarray, r0: int, X: np.ndarray, chunks: list[tuple[int, int]]) -> None:
    """Raise StageError naming the first rows with NaN / inf (scanning on from this chunk for the count)."""
    if np.isfinite(chunk).all():
        return
    rows: list[int] = []
    count = 0
    for s, e in chunks:
        if s < r0:
            continue
        bad = np.flatnonzero(~np.isfinite(np.asarray(X[s:e])).all(axis=1))
        rows += (bad[: MAX_SHOWN - len(rows)] + s).tolist()
        count += bad.size
    raise StageError(f"features contain NaN or infinite values in {count} rows; first offending rows: {rows}")
