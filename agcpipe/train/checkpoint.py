"""Resumable checkpoints and weight files.

A checkpoint is one ``checkpoint.pt`` (``torch.save`` of plain containers and tensors, written to a temp
file and renamed, so a kill mid-write leaves the previous checkpoint intact), loaded with
``weights_only=True`` (no code runs on load). Random-number states are stored as tensors and ints so that
they load under ``weights_only``.

Weights of a trained model are written as ``<name>.safetensors`` when the ``safetensors`` package is
installed, else ``<name>.pt`` (``torch.save`` of the state dict, loaded with ``weights_only=True``);
:func:`load_weights` reads either.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / CHECKPOINT_FILE
    tmp = directory / f".{CHECKPOINT_FILE}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def load_checkpoint(directory: str | Path | None) -> dict[str, Any] | None:
    """The checkpoint in ``directory``, or None when there is none (or it cannot be read)."""
    if directory is None:
        return None
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file: start over rather than fail the run
        return None


# ------------------------------------------------------------------------------------------ RNG states
def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "generators": {k: g.get_state() for k, g in generators.items()},
    }


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"]))
    for k, g in generators.items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])


# ------------------------------------------------------------------------------------------- weights
def _has_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def save_weights(state_dict: dict[str, torch.Tensor], directory: str | Path, name: str = "model") -> Path:
    """Write ``state_dict`` as ``<name>.safetensors`` (or ``<name>.pt``); return the path."""
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if _has_safetensors():
        from safetensors.torch import save_file

        path = directory / f"{name}.safetensors"
        save_file({k: v.clone() for k, v in tensors.items()}, str(path))  # clone: no shared storage
    else:
        path = directory / f"{name}.pt"
        torch.save(tensors, path)
    return path


def load_weights(directory: str | Path, name: str = "model", device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    directory = Path(directory)
    st = directory / f"{name}.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st), device=str(device))
    pt = directory / f"{name}.pt"
    if pt.is_file():
        return torch.load(pt, map_location=device, weights_only=True)
    raise FileNotFoundError(f"no weights '{name}' (.safetensors or .pt) in {directory}")
