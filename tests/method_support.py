"""Test helpers shared by the method tests: one torch thread, a planted-partition graph, a MethodContext."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from agcpipe.config import TrainConfig
from agcpipe.methods.base import MethodContext
from graph_factory import make_graph


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models: one torch thread is several times faster on the shared 2-core machine.

    Import it into a test module (``from method_support import one_torch_thread``) to apply it there.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def method_context(
    graph,
    tmp_path: Path,
    name: str = "run",
    seed: int = 0,
    *,
    features: dict | None = None,
    n_clusters: int = 3,
    checkpoint: bool = False,
    history: bool = True,
    train_config: bool = True,
    **train,
) -> MethodContext:
    """A CPU context under ``tmp_path/<name>-<seed>``; ``train`` are TrainConfig fields (``progress`` off).

    ``features`` defaults to ``{"x": graph.features}``; ``train_config=False`` with no ``train`` fields
    leaves ``train`` unset (the method's defaults).
    """
    base = tmp_path / f"{name}-{seed}"
    (base / "state").mkdir(parents=True, exist_ok=True)
    (base / "work").mkdir(exist_ok=True)
    return MethodContext(
        graph=graph,
        features=features if features is not None else {"x": graph.features},
        n_clusters=n_clusters,
        seed=seed,
        device="cpu",
        state_dir=base / "state",
        work_dir=base / "work",
        train=TrainConfig(progress=False, **train) if (train or train_config) else None,
        checkpoint_dir=base / "ckpt" if checkpoint else None,
        history_path=base / "history.parquet" if history else None,
    )


def sbm_edges(rng: np.random.Generator, comm: np.ndarray, n_edges: int, p_in: float) -> list[tuple[int, int]]:
    """``n_edges`` draws of an edge from a uniform node, to a node of its community with probability ``p_in``
    else to any node; self-loops dropped."""
    n = comm.size
    edges = []
    for _ in range(n_edges):
        i = int(rng.integers(n))
        j = int(rng.choice(np.flatnonzero(comm == comm[i]))) if rng.random() < p_in else int(rng.integers(n))
        if i != j:
            edges.append((i, j))
    return edges


def planted_sbm(
    tmp_path: Path,
    n_per: int = 40,
    k: int = 3,
    d: int = 12,
    seed: int = 0,
    weights: bool = False,
    p_in: float = 0.85,
    directed: bool = False,
    signal: float = 1.5,
):
    """``(graph, communities)``: ``k`` planted communities of ``n_per`` nodes, ~4 draws of an edge per node
    (a fraction ``p_in`` inside the community), Gaussian features shifted by ``signal`` along the community's axis."""
    rng = np.random.default_rng(seed)
    comm = np.repeat(np.arange(k), n_per)
    edges = sbm_edges(rng, comm, comm.size * 4, p_in)
    x = rng.standard_normal((comm.size, d)) + signal * np.eye(k, d)[comm]
    w = rng.random(len(edges)) + 0.5 if weights else None
    return make_graph(tmp_path, edges, features=x, labels=comm, weights=w, directed=directed), comm
