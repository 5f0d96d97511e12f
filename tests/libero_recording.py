"""Test helper: LIBERO demonstration files in the official layout, recorded from the real env.

No package ships LIBERO's published HDF5 files and tests have no network (env notes "LIBERO"),
so the data stage is tested against files this module records: real episodes of the real
simulator (from the benchmark's init states, with seeded random actions — a format test, no
expert needed) written exactly as LIBERO's `scripts/create_dataset.py` lays them out (spec §2.1).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np


def record_episode(env, init_state: np.ndarray, steps: int, rng: np.random.Generator,
                   seed: int) -> dict:
    """One episode of `steps` random actions, stored with LIBERO's one-step lag (spec §2.1):
    `states[t]` is the MuJoCo state *before* `actions[t]`, the observations at index t were
    rendered *after* that step."""
    from robosuite.utils.transform_utils import quat2axisangle

    env.reset(init_state, seed=seed)  # reset → set_init_state, gripper command cleared
    raw_env = env.env  # OffScreenRenderEnv: its raw observation dict has the eef quaternion
    keys = ("agentview_rgb", "eye_in_hand_rgb", "joint_states", "gripper_states", "ee_pos",
            "ee_ori", "ee_states")
    obs = {k: [] for k in keys}
    actions, states, robot_states = [], [], []
    for _ in range(steps):
        states.append(raw_env.get_sim_state())
        action = rng.uniform(-1.0, 1.0, 7)
        actions.append(action)
        raw, *_ = raw_env.step(action)
        ori = quat2axisangle(raw["robot0_eef_quat"])
        obs["agentview_rgb"].append(raw["agentview_image"])  # as rendered (OpenGL), not flipped
        obs["eye_in_hand_rgb"].append(raw["robot0_eye_in_hand_image"])
        obs["joint_states"].append(raw["robot0_joint_pos"])
        obs["gripper_states"].append(raw["robot0_gripper_qpos"])
        obs["ee_pos"].append(raw["robot0_eef_pos"])
        obs["ee_ori"].append(ori)
        obs["ee_states"].append(np.hstack([raw["robot0_eef_pos"], ori]))
        robot_states.append(raw_env.env.get_robot_state_vector(raw))
    done = np.zeros(steps, np.uint8)
    done[-1] = 1
    return {"obs": {k: np.stack(v) for k, v in obs.items()}, "actions": np.stack(actions),
            "states": np.stack(states), "robot_states": np.stack(robot_states),
            "rewards": done.copy(), "dones": done}


def record_official_file(path: str | Path, suite: str, task: str | int, n_demos: int,
                         steps: int, seed: int = 0) -> Path:
    """Write `path` in the official LIBERO layout (spec §2.1); demo i starts from the
    benchmark's init state i. Costs ~0.1 s per step (two 128² cameras on CPU) plus ~5 s."""
    from libero.libero import get_libero_path

    from ript.envs.libero import LiberoEnv, task_init_states

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inits = task_init_states(suite, task)
    rng = np.random.default_rng(seed)
    # settle_steps=0: the recording starts right at the init state, as LIBERO's replay does.
    with LiberoEnv(suite, task, image=True, settle_steps=0) as env:
        raw_env = env.env
        bddl_rel = os.path.relpath(raw_env.env.bddl_file_name, get_libero_path("bddl_files"))
        bddl_name = f"chiliocosm/bddl_files/{bddl_rel}"  # how the published files name it
        bddl_content = Path(raw_env.env.bddl_file_name).read_text()
        problem_info = {"problem_name": raw_env.problem_name, "domain_name": raw_env.domain_name,
                        "language_instruction": raw_env.language_instruction}
        env_args = {"type": 1, "env_name": raw_env.env.__class__.__name__,
                    "problem_name": raw_env.problem_name, "bddl_file": bddl_name,
                    "env_kwargs": {"camera_heights": 128, "camera_widths": 128,
                                   "control_freq": 20,
                                   "camera_names": ["agentview", "robot0_eye_in_hand"]}}
        episodes = [record_episode(env, inits[i], steps, rng, seed + i) for i in range(n_demos)]
        model_xml = raw_env.env.sim.model.get_xml()
        env_name = raw_env.env.__class__.__name__
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_name"] = env_name
        data.attrs["problem_info"] = json.dumps(problem_info)
        data.attrs["bddl_file_name"] = bddl_name
        data.attrs["bddl_file_content"] = bddl_content
        data.attrs["env_args"] = json.dumps(env_args)
        data.attrs["macros_image_convention"] = "opengl"
        for i, ep in enumerate(episodes):
            g = data.create_group(f"demo_{i}")
            og = g.create_group("obs")
            for k, v in ep["obs"].items():
                og.create_dataset(k, data=v)
            for k in ("actions", "states", "robot_states", "rewards", "dones"):
                g.create_dataset(k, data=ep[k])
            g.attrs["num_samples"] = len(ep["actions"])
            g.attrs["model_file"] = model_xml
            g.attrs["init_state"] = ep["states"][0]
        data.attrs["num_demos"] = len(episodes)
        data.attrs["total"] = sum(len(ep["actions"]) for ep in episodes)
    return path
