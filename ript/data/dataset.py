"""Windowed demonstration datasets (spec §2.2) and the RIPT context set (spec §5.2).

`SequenceDataset` exposes one sample per (demo, start index t): `actions[t:t+seq_len]` and the
observation frames `obs[t-frame_stack+1 : t+obs_seq_len]`. Windows that run past the end repeat
the last element (`pad_seq_length`) and carry a pad mask (1 = real); frames before the start repeat
`obs[0]` (`pad_frame_stack`). Low-dim observations are cached in memory; images are read lazily
from the HDF5 file (one handle per worker process).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ript.data.hdf5 import (DataError, check_demo, check_settings, demo_keys, file_attrs,
                            open_file, read_dataset)


@dataclass
class _Demo:
    file_index: int
    key: str
    length: int
    task_id: int
    actions: np.ndarray
    lowdim: dict[str, np.ndarray]


class SequenceDataset(Dataset):
    """Multi-task windows over demonstration files (one file per task)."""

    def __init__(self, files: list[str | Path], obs_keys: list[str] | None, *, seq_len: int = 32,
                 frame_stack: int = 1, obs_seq_len: int = 1, pad_seq_length: bool = True,
                 pad_frame_stack: bool = True, expect: dict | None = None,
                 demos_per_file: int | None = None, task_ids: dict[str, int] | None = None):
        """obs_keys: observation keys to load (None or [] = actions only, as in stage 0).
        expect: file attributes that must match the config (e.g. image settings).
        demos_per_file: use only the first n demos of each file (few-shot subsets).
        task_ids: task name -> id in the policy's task vocabulary (default: the files' own
        `task_id`, MetaWorld's global index)."""
        if seq_len < 1 or frame_stack < 1 or obs_seq_len < 1:
            raise ValueError("seq_len, frame_stack and obs_seq_len must be >= 1")
        self.files = [Path(f) for f in files]
        self.obs_keys = list(obs_keys or [])
        self.seq_len, self.frame_stack, self.obs_seq_len = seq_len, frame_stack, obs_seq_len
        self.pad_seq_length, self.pad_frame_stack = pad_seq_length, pad_frame_stack
        self.demos: list[_Demo] = []
        self.image_keys: list[str] = []
        self._handles: dict[int, object] = {}
        self.tasks: list[str] = []
        for fi, path in enumerate(self.files):
            with open_file(path) as f:
                attrs = file_attrs(f)
                if expect:
                    check_settings(path, attrs, expect)
                self.tasks.append(attrs.get("task", path.stem))
                if task_ids is not None:
                    if self.tasks[-1] not in task_ids:
                        raise DataError(f"{path}: task {self.tasks[-1]!r} is not in the "
                                        f"policy's task vocabulary")
                    attrs["task_id"] = task_ids[self.tasks[-1]]
                keys = demo_keys(f)[:demos_per_file]
                for key in keys:
                    self.demos.append(self._load_demo(f, fi, key, attrs))
        if not self.demos:
            raise DataError(f"no demonstrations in {[str(p) for p in self.files]}")
        # Start indices per demo: all t with padding, else the T - seq_len + 1 full windows.
        counts = [d.length if pad_seq_length else max(d.length - seq_len + 1, 1)
                  for d in self.demos]
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self.action_dim = self.demos[0].actions.shape[1]

    def _load_demo(self, f, fi: int, key: str, attrs: dict) -> _Demo:
        n = check_demo(f, key, self.obs_keys)
        base = f"data/{key}"
        lowdim, image_keys = {}, []
        for k in self.obs_keys:
            ds = f[f"{base}/obs/{k}"]
            if ds.dtype == np.uint8 and ds.ndim == 4:  # (T, H, W, C) image: read lazily
                image_keys.append(k)
            else:
                lowdim[k] = read_dataset(f, f"{base}/obs/{k}").astype(np.float32)
        self.image_keys = image_keys
        actions = read_dataset(f, f"{base}/actions").astype(np.float32)
        tid = int(attrs["task_id"]) if "task_id" in attrs else fi
        return _Demo(fi, key, n, tid, actions, lowdim)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Global sample index → (demo index, start t)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        d = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return d, int(index - self._offsets[d])

    def _handle(self, fi: int):
        if fi not in self._handles:  # opened lazily, so each DataLoader worker has its own
            self._handles[fi] = open_file(self.files[fi])
        return self._handles[fi]

    def __getitem__(self, index: int) -> dict:
        d, t = self.locate(index)
        demo = self.demos[d]
        T = demo.length
        # actions[t : t+seq_len], padded by repeating the last action
        a_idx = np.arange(t, t + self.seq_len)
        pad_mask = a_idx < T
        a_idx = np.minimum(a_idx, T - 1)
        # observation frames t-frame_stack+1 .. t+obs_seq_len-1, clamped to the demo
        o_idx = np.arange(t - self.frame_stack + 1, t + self.obs_seq_len)
        if not self.pad_frame_stack:
            o_idx = o_idx[o_idx >= 0] if (o_idx >= 0).any() else np.array([0])
        o_idx = np.clip(o_idx, 0, T - 1)
        obs = {k: torch.from_numpy(v[o_idx]) for k, v in demo.lowdim.items()}
        if self.image_keys:
            f = self._handle(demo.file_index)
            for k in self.image_keys:
                frames = f[f"data/{demo.key}/obs/{k}"][np.unique(o_idx)]
                frames = frames[np.searchsorted(np.unique(o_idx), o_idx)]
                obs[k] = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)))
        return {"actions": torch.from_numpy(demo.actions[a_idx]), "obs": obs,
                "pad_mask": torch.from_numpy(pad_mask), "task_id": torch.tensor(demo.task_id)}

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()

    def __getstate__(self):  # h5py handles do not cross process boundaries
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


@dataclass(frozen=True)
class Context:
    """One RIPT context (spec §5.2): where an episode starts and which task it solves."""

    context_id: int
    task: str
    task_id: int
    variant: int
    init_state: tuple  # simulator state (qpos ‖ qvel) of the demo's first step
    source: str        # "<file>:<demo key>"


def load_contexts(files: list[str | Path], demos_per_file: int | None = None) -> list[Context]:
    """One context per demonstration, in file then demo order (ids are stable)."""
    contexts = []
    for path in files:
        with open_file(path) as f:
            attrs = file_attrs(f)
            for key in demo_keys(f)[:demos_per_file]:
                g = f[f"data/{key}"]
                for a in ("variant", "init_state"):
                    if a not in g.attrs:
                        raise DataError(f"{path}: missing attribute 'data/{key}.{a}'")
                contexts.append(Context(len(contexts), attrs["task"], int(attrs["task_id"]),
                                        int(g.attrs["variant"]),
                                        tuple(np.asarray(g.attrs["init_state"]).tolist()),
                                        f"{Path(path).name}:{key}"))
    if not contexts:
        raise DataError(f"no contexts in {[str(p) for p in files]}")
    return contexts
