"""Vectorised random walks on a CSR adjacency: uniform and node2vec (return p, in-out q).

All walkers of a batch advance together, one torch operation per step over every walker, so the cost is
O(walkers x length) with no Python loop over nodes (torch-cluster's ``random_walk`` does the same in C++).

* **Uniform** (``p = q = 1``): the next node is a uniform entry of the current node's CSR row.
* **node2vec** (Grover & Leskovec, 2016): after the first step, moving from ``cur`` (reached from
  ``prev``) to a neighbour ``x`` has unnormalised weight ``1/p`` if ``x == prev``, ``1`` if ``x`` is a
  neighbour of ``prev`` and ``1/q`` otherwise. Sampled by rejection (as in KnightKing / torch-cluster): draw
  ``x`` uniformly, accept with probability ``weight / max(1/p, 1, 1/q)``; rejected walkers redraw, all
  together. "``x`` is a neighbour of ``prev``" is a binary search in ``prev``'s sorted CSR row, run for
  every walker at once (``log2(max degree)`` vectorised rounds); the canonical CSR has sorted rows.

A walker at a node without neighbours stays there (torch-cluster's convention). Edge weights are ignored.
``self_loops=True`` walks on ``A + I`` without building it: each step also may stay put, with probability
``1 / (deg + 1)`` (MAGI's walks, whose adjacency has self-loops added).

:func:`visit_counts` aggregates walks into (walker's source, visited node, times visited) triples, all
sources at once (one ``torch.unique`` over ``source * N + node`` keys): the co-occurrence statistics of
S3GC- and MAGI-style positive sampling.

Memory (bytes): ``8 (N + 1)`` (int64 offsets) plus the CSR indices used in place; a batch of ``W``
walkers of length ``L`` holds ``8 W (L + 1)`` for the walks and ~``40 W`` of per-step scratch;
:func:`visit_counts` ~``40 W L`` (keys, sort, counts).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .neighbor import as_tensor, single_thread


class RandomWalkSampler:
    """Uniform or node2vec random walks (see the module docstring).

    Args:
        indptr, indices: the CSR adjacency (rows sorted; memory-mapped arrays used in place).
        p: return parameter; q: in-out parameter (``p = q = 1``: uniform walks, no rejection).
        self_loops: walk on ``A + I`` (a step stays put with probability ``1 / (deg + 1)``).
        generator: torch generator (default: one seeded with ``seed``).
    """

    def __init__(
        self,
        indptr: np.ndarray | Tensor,
        indices: np.ndarray | Tensor,
        *,
        p: float = 1.0,
        q: float = 1.0,
        self_loops: bool = False,
        generator: torch.Generator | None = None,
        seed: int = 0,
    ):
        if p <= 0 or q <= 0:
            raise ValueError(f"node2vec p and q must be positive, got p={p}, q={q}")
        self.indptr = as_tensor(indptr).long()
        self.indices = as_tensor(indices)
        self.num_nodes = self.indptr.numel() - 1
        self.deg = self.indptr[1:] - self.indptr[:-1]
        self.p, self.q = float(p), float(q)
        self.self_loops = bool(self_loops)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        self._max_deg_bits = max(1, int(self.deg.max()).bit_length()) if self.num_nodes else 1

    @property
    def uniform(self) -> bool:
        return self.p == 1.0 and self.q == 1.0

    def _uniform_neighbor(self, cur: Tensor) -> Tensor:
        d = self.deg[cur]
        slots = d + 1 if self.self_loops else d  # with self-loops, slot ``d`` is the node itself
        r = torch.floor(torch.rand(cur.numel(), generator=self.generator, dtype=torch.float64) * slots.double()).long()
        r = torch.minimum(r, (slots - 1).clamp_min(0))
        nxt = self.indices[(self.indptr[cur] + r).clamp_max(max(self.indices.numel() - 1, 0))].long() if self.indices.numel() else cur
        return torch.where(r < d, nxt, cur)

    def is_neighbor(self, u: Tensor, v: Tensor) -> Tensor:
        """Whether ``v[i]`` is in CSR row ``u[i]`` (vectorised binary search over sorted rows)."""
        lo = self.indptr[u].clone()
        hi = self.indptr[u + 1].clone()
        if self.indices.numel() == 0:
            return torch.zeros_like(u, dtype=torch.bool)
        for _ in range(self._max_deg_bits + 1):
            active = lo < hi
            if not bool(active.any()):
                break
            mid = (lo + hi) // 2
            val = self.indices[mid.clamp_max(self.indices.numel() - 1)].long()
            less = active & (val < v)
            lo = torch.where(less, mid + 1, lo)
            hi = torch.where(active & ~less, mid, hi)
        found = lo < self.indptr[u + 1]
        return found & (self.indices[lo.clamp_max(self.indices.numel() - 1)].long() == v)

    def walks(self, start: Tensor, walk_length: int) -> Tensor:
        """Walks of ``walk_length`` steps from each node of ``start``: int64 ``len(start) x (walk_length + 1)``."""
        with single_thread():
            return self._walks(start, walk_length)

    def _walks(self, start: Tensor, walk_length: int) -> Tensor:
        start = start.long().flatten()
        out = torch.empty(start.numel(), walk_length + 1, dtype=torch.long)
        out[:, 0] = start
        if walk_length == 0 or start.numel() == 0:
            return out
        out[:, 1] = self._uniform_neighbor(start)
        if self.uniform:
            for t in range(2, walk_length + 1):
                out[:, t] = self._uniform_neighbor(out[:, t - 1])
            return out
        w_return, w_in, w_out = 1.0 / self.p, 1.0, 1.0 / self.q
        w_max = max(w_return, w_in, w_out)
        for t in range(2, walk_length + 1):
            prev, cur = out[:, t - 2], out[:, t - 1]
            nxt = cur.clone()
            pending = torch.nonzero(self.deg[cur] > 0).flatten()  # stuck walkers stay where they are
            while pending.numel():
                c, pv = cur[pending], prev[pending]
                x = self._uniform_neighbor(c)
                w = torch.where(x == pv, w_return, torch.where(self.is_neighbor(pv, x), w_in, w_out))
                accept = torch.rand(pending.numel(), generator=self.generator, dtype=torch.float64) * w_max < w
                nxt[pending[accept]] = x[accept]
                pending = pending[~accept]
            out[:, t] = nxt
        return out

    def negative_walks(self, start: Tensor, walk_length: int) -> Tensor:
        """"Walks" of uniformly random nodes after each start node (skip-gram negatives): same shape as :meth:`walks`."""
        start = start.long().flatten()
        rnd = torch.randint(self.num_nodes, (start.numel(), walk_length), generator=self.generator)
        return torch.cat([start[:, None], rnd], dim=1)


def visit_counts(walks: Tensor, source: Tensor, num_nodes: int) -> tuple[Tensor, Tensor, Tensor]:
    """How often each walk source visited each node: ``(source, node, count)``, sorted by source, then node.

    ``walks``: ``W x (L + 1)`` (column 0, the start, is not a visit); ``source``: int64 ``W``, the id each
    walk counts for (e.g. its start's position in a batch; several walks may share one). Every later
    column is a visit, revisits counted. Memory ~``40 W L`` bytes.
    """
    steps = walks[:, 1:]
    if steps.numel() == 0:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty, empty
    with single_thread():
        keys = source.long().view(-1, 1) * num_nodes + steps.long()
        uniq, counts = torch.unique(keys.flatten(), return_counts=True)
    return uniq // num_nodes, uniq % num_nodes, counts


def context_windows(walks: Tensor, context_size: int) -> Tensor:
    """All windows of ``context_size`` consecutive nodes of every walk: ``(W * (L + 2 - C)) x C``.

    Row ``[v, c1, ..., c_{C-1}]``: ``v`` is the centre (first) node, the others its context (skip-gram).
    """
    if context_size > walks.size(1):
        raise ValueError(f"context_size {context_size} is longer than the walks ({walks.size(1)} nodes)")
    return walks.unfold(1, context_size, 1).reshape(-1, context_size)
