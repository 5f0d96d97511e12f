"""MetaWorld (Farama 3.1, `*-v3` tasks): task registry, exact context resets, observations.

A MetaWorld *context* (spec §9.1) is (task name, task variant): `set_task(variant)` freezes the
object and goal positions, so `reset()` after it always yields the same first state. Variants are
split once, for every stage: demonstrations (and hence RIPT's context set) come from the first
`N_VARIANTS - eval_variants` variants, evaluation from the last `eval_variants` — never the same.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import numpy as np

from ript.config import require
from ript.envs.benchmark import Benchmark
from ript.envs.worker import EpisodeContext

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
    render_every: int = 1
    """Render the camera on every n-th step after a reset (and at the reset); the frame repeats
    in between. For chunked VLAs that read images only when they replan, every `chunk` steps
    from the reset (OFT: 8): a render costs ~11 ms on CPU, the physics step ~0.2 ms."""

    def keys(self) -> list[str]:
        return list(LOWDIM_DIMS) + (["corner_rgb"] if self.image else [])


@dataclass
class DataConfig:
    """Block `data` for MetaWorld: the scripted-expert data stage (spec §2.5)."""

    tasks: list[str] = field(default_factory=list)
    """MetaWorld v3 task names (e.g. reach-v3)."""
    demos_per_task: int = 5
    """Demonstrations kept per task (the low-data regime where RIPT matters)."""
    action_noise: float = 0.2
    """Std of the Gaussian noise added to the expert's actions (QueST used 0.2)."""
    max_episode_steps: int = 500
    """Step limit of a demonstration episode (MetaWorld's own limit is 500)."""
    image: bool = False
    """Also record the 128x128 `corner_rgb` camera (slow on CPU: software rendering)."""
    image_size: int = 128
    """Side of the rendered square image in pixels."""
    keep_failed: bool = False
    """Keep demos in which the noisy expert failed (QueST kept all; default keeps successes)."""
    eval_variants: int = 25
    """How many of each task's 50 variants are held out for evaluation (the last ones)."""

    def validate(self) -> None:
        require(len(self.tasks) > 0, "data.tasks", "list at least one task")
        for t in self.tasks:
            check_task(t)
        require(self.demos_per_task >= 1, "data.demos_per_task", "must be >= 1")
        require(self.action_noise >= 0, "data.action_noise", "must be >= 0")
        require(1 <= self.max_episode_steps <= 500, "data.max_episode_steps", "must be in [1, 500]")
        variant_split(self.eval_variants)

    def obs_spec(self) -> ObsSpec:
        return ObsSpec(image=self.image, image_size=self.image_size)

    def file_settings(self) -> dict:
        """Attributes a dataset must match to be used with this config."""
        return {"image": self.image, "image_size": self.image_size,
                "action_noise": self.action_noise, "eval_variants": self.eval_variants,
                "benchmark_seed": BENCHMARK_SEED}


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
        self._frame = None

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
        self._frame = None
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
            if self.steps % self.obs_spec.render_every == 0 or self._frame is None:
                self._frame = np.ascontiguousarray(self._render()[::-1])  # upright
            obs["corner_rgb"] = self._frame
        return obs

    def _render(self) -> np.ndarray:
        """This env's camera image. Gymnasium makes an env's OpenGL context current only when
        it creates it (or when one env has several render modes), so with several envs in one
        process an env would render its scene into the context of the env created or rendered
        last: another camera, no textures (a worker holds many envs). Make ours current first."""
        viewer = getattr(self.env.mujoco_renderer, "viewer", None)
        if viewer is not None:
            viewer.make_context_current()
        return self.env.render()

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


class MetaWorldFactory:
    """Builds and resets MetaWorld envs in a worker (picklable; no torch)."""

    # Idle envs a worker keeps (ript.envs.worker.SlotEnvs). RIPT's groups move a worker's slots
    # between tasks, so it needs up to slots × tasks envs, of which at most `slots` are busy
    # (default: 16 slots × 5 tasks = 80 = 64 idle + 16 busy); with 32 idle it rebuilt 45-72 envs
    # per iteration (issue #16). An env costs ~0.3 s to build and ~25 MB: 64 keeps all of the
    # default's (≈ 2 GB) and gave 1.26× the rollout steps/s of 32 (interleaved A/B on the
    # default, README "Benchmarks").
    max_idle_envs = 64

    def __init__(self, obs, max_episode_steps: int):
        self.obs = obs  # ript.envs.metaworld.ObsSpec
        self.max_episode_steps = max_episode_steps

    @property
    def start_method(self) -> str:
        # Env notes: rendering in a forked child hangs; state-only envs fork fine (and fast).
        return "forkserver" if self.obs.image else "fork"

    def check(self, ctx: EpisodeContext) -> None:
        """Main-process validation, so a bad context fails before any episode runs."""
        from ript.envs.metaworld import N_VARIANTS, check_task

        check_task(ctx.task)
        if not 0 <= ctx.variant < N_VARIANTS:
            raise ValueError(f"context {ctx.context_id} ({ctx.task}): variant {ctx.variant} out "
                             f"of range [0, {N_VARIANTS})")

    def task_id(self, task: str) -> int:
        from ript.envs.metaworld import task_id

        return task_id(task)

    def make(self, task: str):
        from ript.envs.metaworld import MetaWorldEnv

        return MetaWorldEnv(task, self.obs, self.max_episode_steps)

    def reset(self, env, ctx: EpisodeContext) -> dict:
        return env.reset(ctx.variant, ctx.seed)


def MetaWorldRunner(obs: ObsSpec, n_envs: int, n_workers: int,  # noqa: N802
                    max_episode_steps: int, step_timeout_s: float = 60.0,
                    start_method: str | None = None, pipeline: bool = False):
    """EnvRunner over MetaWorld contexts (task, variant, seed) (spec §9.1). A function, so that
    workers unpickling the factory do not import torch with this module."""
    from ript.envs.runner import EnvRunner

    return EnvRunner(MetaWorldFactory(obs, max_episode_steps), n_envs, n_workers,
                     step_timeout_s, start_method, pipeline)


# The data stage's default held-out split, for policies whose metadata has none (scripted).
DEFAULT_EVAL_VARIANTS = 25


class MetaWorldBenchmark(Benchmark):
    """MetaWorld v3: scripted-expert data, task variants as contexts, 500-step episodes."""

    name = "metaworld"
    step_limit = 500
    data_module = "ript.data.metaworld_demos"
    data_code = ("data/metaworld_demos.py", "data/hdf5.py", "envs/metaworld.py")
    variant_contexts = True

    @classmethod
    def data_config(cls) -> type:
        return DataConfig

    def tasks(self, spec) -> list[str]:
        if isinstance(spec, str):
            raise ValueError("MetaWorld needs a list of task names, not "
                             f"{spec!r} (see config/metaworld_ml45.yaml for ML45's)")
        return [check_task(t) for t in spec]

    def observation_keys(self, image: bool = True) -> list[str]:
        return ObsSpec(image=image).keys()

    def task_id(self, task: str) -> int:
        return task_id(task)

    def all_task_names(self) -> list[str]:
        return all_tasks()

    def one_hot_vocabulary(self, tasks: list[str]) -> list[str]:
        return all_tasks()  # the original's one-hot over all 50 tasks (spec §2.3)

    def train_contexts(self, kind: str, demo_contexts: list, data: dict) -> list:
        """`train_variants`: one context per (task, non-held-out variant); the variant alone
        fixes the start state, so no demonstration is needed (more contexts, paper Fig. 6)."""
        if kind != "train_variants":
            return super().train_contexts(kind, demo_contexts, data)
        from ript.data.dataset import Context

        tasks = sorted({c.task for c in demo_contexts})
        train, _ = variant_split(data["eval_variants"])
        return [Context(i * len(train) + j, t, task_id(t), v, (), f"{t}:variant_{v}")
                for i, t in enumerate(tasks) for j, v in enumerate(train)]

    def held_out(self, task: str, data: dict) -> list[int]:
        """The last `eval_variants` variants, which the policy's data held out."""
        return list(variant_split(int(data.get("eval_variants") or DEFAULT_EVAL_VARIANTS))[1])

    def factory(self, obs_spec: dict, max_episode_steps: int, *, legacy_reset: bool = False):
        return MetaWorldFactory(ObsSpec(**obs_spec), max_episode_steps)

    # -- the OpenVLA family: CPU-sized OFT models trained here (ript.vla.sft, issue #15) --------
    vla_observations = True
    vla_cameras = ("corner_rgb",)  # rendered upright already (`MetaWorldEnv.observe`)

    def vla_obs_spec(self, image_size: int, replan_period: int) -> dict:
        """Render at the model's size, only on the steps a chunked policy replans."""
        return {"image": True, "image_size": image_size, "render_every": replan_period}

    def vla_state(self, obs: dict, rows) -> np.ndarray:
        """The whole 39-d state is the proprio token (no end-effector convention to follow)."""
        return np.asarray(obs["obs_gt"], np.float64)[rows]

    def vla_env_actions(self, actions: np.ndarray) -> np.ndarray:
        """(..., 4) xyz + gripper in [-1, 1]: the env clips, no gripper rule (spec §2.4)."""
        return np.asarray(actions, np.float64)

    def scripted_expert(self):
        return ScriptedExpertPolicy()


class ScriptedExpertPolicy:
    """MetaWorld's scripted experts on `obs_gt`, behind the policy protocol (no RL record).

    Proves contexts, stepping and success detection independently of any learned model.
    """

    def __init__(self, task_names=None):
        self.task_names = list(task_names or all_tasks())  # index = task id given to act()
        self._experts: dict[str, object] = {}

    def reset(self, n_envs: int) -> None:
        self.n_envs = n_envs

    def reset_envs(self, idx) -> None:
        pass  # stateless

    def act(self, obs, task, generator=None, active=None):
        state = obs["obs_gt"].double().numpy()
        active = np.ones(len(state), bool) if active is None else np.asarray(active, bool)
        actions = np.zeros((len(state), 4), np.float32)
        for i in np.flatnonzero(active):
            name = self.task_names[int(task[i])]
            if name not in self._experts:
                self._experts[name] = expert_policy(name)
            actions[i] = np.clip(self._experts[name].get_action(state[i]), -1, 1)
        return actions, None, active.copy()
