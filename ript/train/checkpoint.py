"""Checkpoints: complete training state for exact resume, and final models for later stages.

A training checkpoint (`ckpt/latest.pt`, undeclared to Snakemake so a failed job keeps it) holds
model, optimizer, scheduler, RNG states, step, config, a resume key and the MLflow run id
(nanoGPT/LeRobot style). A final model file (`model.pt`, the declared output) holds the
architecture, the weights and metadata later stages need (observation keys, tasks, data settings).
"""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ript.utils import atomic_path, stable_hash


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the requested model."""


def save(path: str | Path, payload: dict[str, Any]) -> None:
    # Through a file object: torch names the archive inside after a path it is given (here a
    # random temporary name), so the same weights would give other bytes in every run.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


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


# Inputs up to this size are identified by a hash of their content (models, small data files);
# larger ones (LIBERO suites are GBs) by size, mtime in ns, inode and a hash of their first and
# last MiB: cheap, and a file rewritten by a re-run job (atomic rename: new inode, new mtime)
# never keeps its identity, so a stale checkpoint cannot match it.
CONTENT_HASH_LIMIT = 64 * 2**20


def input_identity(path: str | Path) -> str:
    """A short identity of an input file's content (see CONTENT_HASH_LIMIT); of a folder (a
    VLA checkpoint given by its folder), that of every file in it with its relative name."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}:{input_identity(f)}\n".encode())
        return h.hexdigest()[:16]
    st = path.stat()
    with open(path, "rb") as f:
        if st.st_size <= CONTENT_HASH_LIMIT:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode())
            h.update(f.read(2**20))
            f.seek(-2**20, os.SEEK_END)
            h.update(f.read(2**20))
    return h.hexdigest()[:16]


def resume_key(config: dict, seed: int, inputs: list[str | Path], code: str,
               world: int = 1, **extra) -> dict[str, Any]:
    """What makes a stage job *this* job: its config block, seed, world size, the content of
    every input and the hash of the code it runs (the rule's `params.code`). A checkpoint
    resumes only into a job with an equal key (issue: "Resume only into the same job")."""
    return {"config": stable_hash(config), "seed": int(seed), "world": int(world),
            "inputs": {str(p): input_identity(p) for p in inputs}, "code": code, **extra}


def key_differences(old: Any, new: dict[str, Any]) -> list[str]:
    """The parts of two resume keys that differ, for the warning (inputs by path)."""
    if not isinstance(old, dict):
        return ["format (written by an older version)"]
    diffs = []
    for part in sorted(set(old) | set(new)):
        a, b = old.get(part), new.get(part)
        if a == b:
            continue
        if part == "inputs" and isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"input {p}" for p in sorted(set(a) | set(b)) if a.get(p) != b.get(p)]
        else:
            diffs.append(part)
    return diffs


def load_resume_state(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """`ckpt/latest.pt` if an interrupted run of exactly this job wrote it, else None.

    Snakemake re-runs a stage because its settings, inputs or code changed; continuing the old
    run would mix the two (or return the old model unchanged), so a checkpoint whose key differs
    is ignored with a warning naming what differed.
    """
    if not path.exists():
        return None
    try:
        state = load(path)
    except CheckpointError as e:
        warnings.warn(f"ignoring unreadable resume checkpoint: {e}", stacklevel=2)
        return None
    diffs = key_differences(state.get("resume_key"), key)
    if diffs:
        warnings.warn(f"{path} was written by another job (differs in: {', '.join(diffs)}); "
                      "starting afresh", stacklevel=2)
        return None
    return state


def clear_resume_state(ckpt_dir: Path) -> None:
    """Called once a stage has written its outputs: its resume state must never be picked up
    by a later, different job (it would be the finished job's state)."""
    (Path(ckpt_dir) / "latest.pt").unlink(missing_ok=True)


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
