"""Demonstrations as an OpenVLA-OFT model learns from them (vla_spec §3.2-3.4): per time step t
the policy images, the normalised proprio state and the normalised action chunk a[t : t+chunk].

Shared by the stages that fit an OFT model to demonstrations: the CPU-sized model trained from
scratch (ript.vla.sft) and RIPT's scale head (ript.vla.scale_head). What is the benchmark's
(cameras, how its state becomes the proprio vector, whether renders are upside down) comes from
its `Benchmark.vla_*` hooks, the same ones the policy uses at run time, so training and acting
see the same inputs: the images go through `processing.policy_image` (JPEG round trip, resize,
optional centre crop) once, when the files are read.

Normalisation is OFT's BOUNDS_Q99 (§2, §3.2): a ↦ clip(2 (a − q01)/(q99 − q01 + 1e-8) − 1, −1, 1)
on the dimensions `mask` selects, the inverse of `processing.unnormalize_actions` inside [q01,
q99]. A chunk that runs past the end of its demo repeats the demo's last action (the robot keeps
doing what it last did; OFT's RLDS loader pads its chunks the same way).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ript.data import hdf5
from ript.vla import processing as P
from ript.vla.prismatic import PAD_ID


def add_demo_args(p) -> None:
    """The flags of the stages that learn from demonstrations (ript.vla.sft, .scale_head)."""
    import argparse

    p.add_argument("--data", nargs="+", required=True, help="demonstration files (with images)")
    p.add_argument("--benchmark", required=True)
    p.add_argument("--suite", default=None)
    p.add_argument("--center-crop", action=argparse.BooleanOptionalAction, default=True,
                   help="the centre-cropped image, as the policy will see it")


def _stats(x: np.ndarray) -> dict:
    x = np.asarray(x, np.float64)
    return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "max": x.max(0).tolist(),
            "min": x.min(0).tolist(), "q01": np.quantile(x, 0.01, axis=0).tolist(),
            "q99": np.quantile(x, 0.99, axis=0).tolist()}


def _read(files: list[Path], bench, keys: list[str]):
    """Yield (task name, {key: (T, ...)}, actions (T, A)) per demo of every file."""
    for path in files:
        with hdf5.open_file(path) as f:
            task = hdf5.file_attrs(f)["task"]
            for demo in hdf5.demo_keys(f):
                hdf5.check_demo(f, demo, keys)
                g = f"data/{demo}"
                obs = {k: hdf5.read_dataset(f, f"{g}/obs/{k}") for k in keys}
                yield task, obs, hdf5.read_dataset(f, f"{g}/actions")


def state_keys(bench, files: list[Path]) -> list[str]:
    """The observation keys of the files that are not cameras (what `vla_state` may read)."""
    with hdf5.open_file(files[0]) as f:
        keys = list(f[f"data/{hdf5.demo_keys(f)[0]}/obs"].keys())
    return [k for k in keys if k not in bench.vla_cameras]


def statistics(files: list[Path], bench) -> dict:
    """dataset_statistics.json's entry for these demos: action and proprio statistics (every
    dimension masked in: the q01/q99 bounds normalise them all), transition and demo counts."""
    keys = state_keys(bench, files)
    actions, states, n = [], [], 0
    for _, obs, act in _read(files, bench, keys):
        actions.append(act)
        states.append(bench.vla_state(obs, slice(None)))
        n += 1
    actions, states = np.concatenate(actions), np.concatenate(states)
    return {"action": {**_stats(actions), "mask": [True] * actions.shape[1]},
            "proprio": _stats(states), "num_transitions": int(len(actions)),
            "num_trajectories": n}


def normalize_actions(actions, stats: dict, eps: float = 1e-8) -> np.ndarray:
    """BOUNDS_Q99 normalisation (module doc); unmasked dimensions pass unchanged."""
    a = np.asarray(actions, np.float64)
    q01, q99 = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(q01, bool)), bool)
    return np.where(mask, np.clip(2.0 * (a - q01) / (q99 - q01 + eps) - 1.0, -1.0, 1.0), a)


def prompt_table(tokenizer, bench, task_names: list[str]) -> torch.Tensor:
    """(tasks, W) BOS + prompt ids of every task, right-padded with PAD (rows by task id)."""
    rows = [P.prompt_ids(tokenizer, bench.instruction(t)) for t in task_names]
    out = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out


class VLADemos(Dataset):
    """Every time step of the demos in `files`, in memory (the CPU-sized models' data is small:
    5 tasks × 20 demos of 64 px frames is ~20 MB).

    Item: images (cams, S, S, 3) uint8 policy images; proprio (P,) float32 normalised; actions
    (chunk, A) float32 normalised; task () long, the index in `task_names`.
    """

    def __init__(self, files: list[Path], bench, stats: dict, *, image_size: int, chunk: int,
                 center_crop: bool, task_names: list[str]):
        keys = state_keys(bench, files) + list(bench.vla_cameras)
        images, proprio, actions, tasks = [], [], [], []
        for task, obs, act in _read(files, bench, keys):
            T = len(act)
            idx = np.minimum(np.arange(T)[:, None] + np.arange(chunk), T - 1)
            actions.append(normalize_actions(act, stats["action"])[idx])
            proprio.append(P.normalize_proprio(bench.vla_state(obs, slice(None)),
                                               stats["proprio"]))
            images.append(np.stack([[P.policy_image(
                np.asarray(obs[c][t]), image_size, crop=center_crop,
                upside_down=bench.vla_images_upside_down) for c in bench.vla_cameras]
                for t in range(T)]))
            tasks.append(np.full(T, task_names.index(task)))
        if not actions:
            raise ValueError("no demonstrations in " + ", ".join(map(str, files)))
        self.images = torch.from_numpy(np.concatenate(images))
        self.proprio = torch.as_tensor(np.concatenate(proprio), dtype=torch.float32)
        self.actions = torch.as_tensor(np.concatenate(actions), dtype=torch.float32)
        self.tasks = torch.as_tensor(np.concatenate(tasks), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> dict:
        return {"images": self.images[i], "proprio": self.proprio[i],
                "actions": self.actions[i], "task": self.tasks[i]}
