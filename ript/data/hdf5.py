"""Reading and checking demonstration files (LIBERO-style HDF5 layout, spec §2.1 / §2.5).

    data/                      attrs: env_name, task, task_id, obs_keys, image, ...
    data/demo_i/obs/<key>      (T, ...) observation before actions[t]
    data/demo_i/actions        (T, A)
    data/demo_i/rewards|dones  (T,)
    data/demo_i/states         (T, S) simulator state before actions[t]
                               attrs: task, variant, seed, num_samples, success, ...

Every failure names the file and the key, so a user knows what to delete or regenerate.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FORMAT_VERSION = 1
DEMO_RE = re.compile(r"^demo_(\d+)$")


class DataError(ValueError):
    """A demonstration file is missing, unreadable, incomplete or made with other settings."""


def open_file(path: str | Path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found (run the data stage to create it)")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {e}") from None


def demo_keys(f: h5py.File) -> list[str]:
    """`demo_i` group names in numeric order (demo_10 after demo_9)."""
    if "data" not in f:
        raise DataError(f"{f.filename}: missing key 'data'")
    keys = [k for k in f["data"] if DEMO_RE.match(k)]
    if not keys:
        raise DataError(f"{f.filename}: 'data' holds no demo_i groups")
    return sorted(keys, key=lambda k: int(DEMO_RE.match(k).group(1)))


def read_dataset(f: h5py.File, key: str) -> np.ndarray:
    if key not in f:
        raise DataError(f"{f.filename}: missing key '{key}'")
    try:
        return f[key][()]
    except (OSError, KeyError) as e:
        raise DataError(f"{f.filename}: key '{key}' cannot be read (corrupt?): {e}") from None


def file_attrs(f: h5py.File) -> dict[str, Any]:
    attrs = {}
    for k, v in f["data"].attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, str) and k.endswith("_json"):
            k, v = k[: -len("_json")], json.loads(v)
        elif isinstance(v, np.generic):
            v = v.item()
        attrs[k] = v
    return attrs


def check_demo(f: h5py.File, demo: str, obs_keys: list[str]) -> int:
    """Check one demo's keys and lengths; returns its length T."""
    base = f"data/{demo}"
    if base not in f:
        raise DataError(f"{f.filename}: missing key '{base}'")
    g = f[base]
    if "num_samples" not in g.attrs:
        raise DataError(f"{f.filename}: missing attribute '{base}.num_samples'")
    n = int(g.attrs["num_samples"])
    for key in ["actions", *(f"obs/{k}" for k in obs_keys)]:
        if key not in g:
            raise DataError(f"{f.filename}: missing key '{base}/{key}'")
        if g[key].shape[0] != n:
            raise DataError(f"{f.filename}: '{base}/{key}' has {g[key].shape[0]} steps, "
                            f"num_samples says {n}")
    return n


def check_settings(path: str | Path, attrs: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a file made with other settings than the config asks for."""
    diffs = [f"{k}: file has {attrs.get(k)!r}, config asks {v!r}"
             for k, v in expected.items() if attrs.get(k) != v]
    if diffs:
        raise DataError(f"{path}: made with other settings than the config asks for "
                        f"({'; '.join(diffs)}). Delete it or re-run the data stage.")


def data_meta(files: list[str | Path]) -> dict:
    """Settings shared by all data files; refuses files made with different settings."""
    metas = []
    for f in files:
        with open_file(f) as h:
            metas.append(file_attrs(h))
    keys = ("env_name", "suite", "image", "image_size", "eval_variants", "benchmark_seed",
            "action_noise")
    first = {k: metas[0].get(k) for k in keys}
    for f, m in zip(files[1:], metas[1:]):
        diff = {k: (m.get(k), first[k]) for k in keys if m.get(k) != first[k]}
        if diff:
            raise ValueError(f"{f}: made with other settings than {files[0]}: {diff}")
    return {**first, "tasks": [m["task"] for m in metas]}
