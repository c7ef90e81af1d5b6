"""Test helpers shared by the method tests: one torch thread, and a MethodContext over a small graph."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agcpipe.config import TrainConfig
from agcpipe.methods.base import MethodContext


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
