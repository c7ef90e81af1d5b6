"""Attributed stochastic block model, generated in chunks.

Model (``n`` nodes, ``k`` communities, ``r = within_between = p_in / p_out``, ``s = feature_signal``):

* **communities**: a seeded random permutation ``perm`` of the nodes is cut into ``k`` consecutive
  runs of ``floor`` / ``ceil`` of ``n / k`` nodes; run ``c`` is community ``c`` (label ``c``).
* **edges**: ``E = round(n * avg_degree / 2)`` undirected edges. Each picks ``u`` uniformly; with
  probability ``f_in = r / (r + k - 1)`` (the within-community share of an SBM with equal blocks) ``v``
  is uniform among the *other* members of ``u``'s community, else uniform among the nodes of the other
  communities. No self-loops are generated; rare duplicate pairs are merged by the canonical writer.
  Expected degree of every node: ``avg_degree``.
* **features**: ``x_i = mu_{c(i)} + eps_i`` with ``eps_i ~ N(0, I_d)`` (float32). The community means
  are Gaussian vectors, centred, and scaled so that the root-mean-square Euclidean distance over all
  pairs of community means is exactly ``s``: in units of the noise standard deviation, two communities'
  means are ``s`` apart (the distance between the two classes along the line joining their means).
  ``k = 1``: the mean is 0.

Determinism: every random stream is a ``numpy`` Generator seeded by
``SeedSequence(seed, spawn_key=(stream, block))`` (the children ``SeedSequence(seed).spawn`` would give):
stream 0 the permutation, 1 the edges (blocks of :data:`EDGE_BLOCK` edges), 2 the means, 3 the noise
(blocks of :data:`ROW_BLOCK` rows). Blocks are fixed, so the output depends on the parameters and the
seed but not on ``chunk_nodes``, which only sets how many feature rows are written at a time.

Edges are streamed (:attr:`RawGraph.edge_chunks`): each block of :data:`EDGE_BLOCK` edges is generated
when the canonical writer asks for it, so no E-sized array exists.

Peak memory: ``24 n`` (permutation, its inverse, communities) + ``~100 x`` :data:`EDGE_BLOCK` bytes of
per-block temporaries + ``4 x chunk_nodes x d`` bytes: features are written into
``out_dir/features.npy`` one mapped chunk at a time (its dirty pages count as resident). 10M nodes /
d=128 / 1M-row chunks: ~0.24 + 0.1 + 0.5 GB (plus the writer's bounded CSR build).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import SyntheticSource
from ..errors import ConfigError
from .canonical import FeatureFile
from .graph import FEATURES
from .raw import RawGraph

EDGE_BLOCK = 2**20
ROW_BLOCK = 2**14


def _rng(seed: int, stream: int, block: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, block)))


def within_fraction(source: SyntheticSource) -> float:
    """Expected share of edges inside a community: ``r / (r + k - 1)``."""
    return source.within_between / (source.within_between + source.n_communities - 1)


def generate_sbm(source: SyntheticSource, out_dir: Path) -> RawGraph:
    """Generate the graph of ``source``; features are written to ``out_dir/features.npy`` and memory-mapped."""
    n, k, d, seed = source.n_nodes, source.n_communities, source.n_features, source.seed
    if k > n:
        raise ConfigError(f"source.n_communities ({k}) exceeds source.n_nodes ({n})")

    perm = _rng(seed, 0).permutation(n)
    starts = np.arange(k + 1, dtype=np.int64) * n // k
    sizes = np.diff(starts)
    community = np.empty(n, dtype=np.int64)
    community[perm] = np.repeat(np.arange(k, dtype=np.int64), sizes)
    position = np.empty(n, dtype=np.int64)
    position[perm] = np.arange(n, dtype=np.int64)

    f_in = within_fraction(source)
    n_edges = max(1, round(n * source.avg_degree / 2))

    def edge_chunks():
        """The edges, one block of :data:`EDGE_BLOCK` at a time (each block from its own seeded stream)."""
        for b, a in enumerate(range(0, n_edges, EDGE_BLOCK)):
            rng = _rng(seed, 1, b)
            m = min(EDGE_BLOCK, n_edges - a)
            u = rng.integers(0, n, m)
            c = community[u]
            size = sizes[c]
            draw_in, draw_out, coin = rng.random(m), rng.random(m), rng.random(m)
            # inside: one of the size - 1 other members (skip u's own slot in perm)
            pos_in = starts[c] + (draw_in * (size - 1)).astype(np.int64)
            pos_in += pos_in >= position[u]
            # outside: one of the n - size nodes of the other communities (skip u's community's run)
            pos_out = (draw_out * (n - size)).astype(np.int64)
            pos_out += (pos_out >= starts[c]) * size
            inside = ((coin < f_in) & (size > 1)) | (size == n)
            yield u, perm[np.where(inside, pos_in, pos_out)], None

    means = _rng(seed, 2).standard_normal((k, d))
    means -= means.mean(axis=0)
    if k > 1:  # mean squared pairwise distance of centred points: 2 * sum ||mu_c||^2 / (k - 1)
        rms = np.sqrt(2.0 * np.square(means).sum() / (k - 1))
        means *= source.feature_signal / rms
    means = means.astype(np.float32)

    out = FeatureFile(Path(out_dir) / FEATURES, n, d)
    for a in range(0, n, source.chunk_nodes):
        b = min(n, a + source.chunk_nodes)
        chunk = out.window(a, b, "r+")  # only this chunk of the file is mapped
        for blk in range(a // ROW_BLOCK, (b - 1) // ROW_BLOCK + 1):
            r0, r1 = blk * ROW_BLOCK, min(n, (blk + 1) * ROW_BLOCK)
            x = _rng(seed, 3, blk).standard_normal((r1 - r0, d), dtype=np.float32)
            x += means[community[r0:r1]]
            lo, hi = max(r0, a), min(r1, b)
            chunk[lo - a : hi - a] = x[lo - r0 : hi - r0]
        chunk.flush()
        del chunk

    return RawGraph(
        n_nodes=n,
        src=None,
        dst=None,
        edge_chunks=edge_chunks,
        features=out.array(),
        labels=community,
        label_classes=list(range(k)),
        info={
            "generator": "sbm",
            "sampled_edges": n_edges,
            "within_fraction": f_in,
            "community_sizes": [int(sizes.min()), int(sizes.max())],
        },
    )
