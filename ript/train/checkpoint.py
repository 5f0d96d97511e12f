"""Checkpoints: complete training state for exact resume, and final models for later stages.

A training checkpoint (`ckpt/latest.pt`, undeclared to Snakemake so a failed job keeps it) holds
model, optimizer, scheduler, RNG states, step, config, a resume key and the MLflow run id
(nanoGPT/LeRobot style). A final model file (`model.pt`, the declared output) holds the
architecture, the weights and metadata later stages need (observation keys, tasks, data settings).
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ript.utils import atomic_path


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the requested model."""


def save(path: str | Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def load_resume_state(path: Path, resume_key: str) -> dict[str, Any] | None:
    """`ckpt/latest.pt` if it belongs to this exact run (same config and inputs), else None.

    A checkpoint left by a run with other settings is not resumed: Snakemake re-runs a stage
    because its settings changed, and continuing the old run would mix the two.
    """
    if not path.exists():
        return None
    try:
        state = load(path)
    except CheckpointError as e:
        warnings.warn(f"ignoring unreadable resume checkpoint: {e}", stacklevel=2)
        return None
    if state.get("resume_key") != resume_key:
        warnings.warn(f"{path} was made with other settings or inputs; starting afresh",
                      stacklevel=2)
        return None
    return state


def load_policy(path: str | Path):
    """A final policy file → (QuestPolicy in eval mode, metadata dict)."""
    from ript.models import QuestPolicy

    ckpt = load(path)
    if ckpt.get("kind") != "policy":
        raise CheckpointError(f"{path}: not a policy file (kind={ckpt.get('kind')!r}); "
                              f"stage 0 writes an autoencoder, stages 1/2 and RIPT a policy")
    policy = QuestPolicy.from_arch(ckpt["arch"])
    load_weights(path, policy, ckpt["state_dict"])
    policy.eval()
    return policy, ckpt["meta"]


def load_weights(path, module: torch.nn.Module, state_dict: dict) -> None:
    """Load weights, failing with the first names/shapes that do not fit (not a torch dump)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for k, v in own.items():
        if v.shape != state_dict[k].shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(state_dict[k].shape)}, "
                                  f"model needs {tuple(v.shape)}")
    module.load_state_dict(state_dict)
