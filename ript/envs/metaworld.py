"""MetaWorld (Farama 3.1, `*-v3` tasks): task registry, exact context resets, observations.

A MetaWorld *context* (spec §9.1) is (task name, task variant): `set_task(variant)` freezes the
object and goal positions, so `reset()` after it always yields the same first state. Variants are
split once, for every stage: demonstrations (and hence RIPT's context set) come from the first
`N_VARIANTS - eval_variants` variants, evaluation from the last `eval_variants` — never the same.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

N_VARIANTS = 50          # parametric variants per task in MT1/ML45
BENCHMARK_SEED = 0       # fixes which 50 variants MT1 draws; part of the data's identity
CAMERA = "corner2"       # spec §2.5: QueST's camera, position overridden below
CAMERA_POS = (0.75, 0.075, 0.7)
LOWDIM_DIMS = {"obs_gt": 39, "robot_states": 8}


def all_tasks() -> list[str]:
    """The 50 MetaWorld v3 task names; a task's index here is its one-hot id (spec §2.3)."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return list(ALL_V3_ENVIRONMENTS)


def task_id(name: str) -> int:
    return all_tasks().index(check_task(name))


def check_task(name: str) -> str:
    valid = all_tasks()
    if name not in valid:
        raise ValueError(f"unknown MetaWorld task {name!r}; valid tasks: {', '.join(valid)}")
    return name


def variant_split(eval_variants: int) -> tuple[range, range]:
    """(demonstration variants, held-out evaluation variants)."""
    if not 1 <= eval_variants < N_VARIANTS:
        raise ValueError(f"eval_variants must be in [1, {N_VARIANTS - 1}], got {eval_variants}")
    return range(0, N_VARIANTS - eval_variants), range(N_VARIANTS - eval_variants, N_VARIANTS)


@functools.lru_cache(maxsize=None)
def _benchmark(name: str):
    import metaworld

    return metaworld.MT1(check_task(name), seed=BENCHMARK_SEED)


@dataclass
class ObsSpec:
    """Which observations an environment produces (must match the dataset's)."""

    image: bool = False
    image_size: int = 128

    def keys(self) -> list[str]:
        return list(LOWDIM_DIMS) + (["corner_rgb"] if self.image else [])


class MetaWorldEnv:
    """One MetaWorld task with context resets and the observation mapping of spec §2.5."""

    def __init__(self, task: str, obs: ObsSpec | None = None, max_episode_steps: int = 500):
        obs = obs or ObsSpec()
        bench = _benchmark(task)
        self.task = task
        self.task_id = task_id(task)
        self.obs_spec = obs
        self.max_episode_steps = min(max_episode_steps, 500)  # MetaWorld raises past 500
        kwargs = {}
        if obs.image:
            os.environ.setdefault("MUJOCO_GL", "egl")
            kwargs = dict(render_mode="rgb_array", camera_name=CAMERA,
                          width=obs.image_size, height=obs.image_size)
        self.env = bench.train_classes[task](**kwargs)
        self._variants = bench.train_tasks
        if obs.image:
            # Fast render settings (env notes: shadows and MSAA dominate render time).
            self.env.model.vis.quality.offsamples = 0
            self.env.model.vis.quality.shadowsize = 0
            self.env.model.cam_pos[self.env.model.camera(CAMERA).id] = CAMERA_POS
        self.variant: int | None = None
        self._prev_state = None

    def reset(self, variant: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Reset to context (task, variant); `seed` seeds the env's own RNG."""
        if not 0 <= variant < len(self._variants):
            raise ValueError(f"{self.task}: variant {variant} out of range "
                             f"[0, {len(self._variants)})")
        self.env.set_task(self._variants[variant])
        self.env.seed(seed)
        state, _ = self.env.reset()
        self.variant = variant
        self.steps = 0
        return self.observe(state)

    def step(self, action: np.ndarray):
        """Step with a clipped action (spec §2.4). Returns (obs, success, done, raw_state)."""
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        state, _, _, _, info = self.env.step(action)
        self.steps += 1
        success = bool(info["success"])
        done = success or self.steps >= self.max_episode_steps
        return self.observe(state), success, done, state

    def observe(self, state: np.ndarray) -> dict[str, np.ndarray]:
        obs = {
            "obs_gt": state.astype(np.float32),
            # hand xyz + gripper of the current and the previous frame (spec §2.5)
            "robot_states": np.concatenate([state[0:4], state[18:22]]).astype(np.float32),
        }
        if self.obs_spec.image:
            obs["corner_rgb"] = np.ascontiguousarray(self.env.render()[::-1])  # upright
        return obs

    def sim_state(self) -> np.ndarray:
        """qpos ‖ qvel: enough to check that a context reset reproduces a recorded start."""
        d = self.env.data
        return np.concatenate([d.qpos, d.qvel]).astype(np.float64)

    def rand_vec(self) -> np.ndarray:
        return np.asarray(self.env._last_rand_vec, dtype=np.float64)

    def close(self) -> None:
        self.env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def expert_policy(task: str):
    """MetaWorld's scripted expert for `task` (acts on the 39-d state)."""
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[check_task(task)]()
