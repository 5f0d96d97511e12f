"""The Benchmark interface: everything the pipeline asks of a benchmark, and their registry.

One module per benchmark under `ript/envs/` holds its environment, its worker-side env factory
and its `Benchmark` (`metaworld.py`, `libero.py`); `REGISTRY` names them. Nothing outside
`ript/envs/` tests which benchmark it has: the config checks, the data and embedding rules,
training, evaluation and RIPT ask `get(name, suite)` (a config) or `of_data(meta)` (a policy's
data) and speak to the interface. A third benchmark is one new module and one registry line
(or `register` at run time, as the tests do).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from ript.envs.worker import EpisodeContext

DEFAULT = "metaworld"  # `data.benchmark` when a config or a policy's data names none
# name -> "module:class", imported on first use (LIBERO's simulator is an optional extra).
REGISTRY: dict[str, Any] = {
    "metaworld": "ript.envs.metaworld:MetaWorldBenchmark",
    "libero": "ript.envs.libero:LiberoBenchmark",
}


class Benchmark:
    """A benchmark, bound to one task suite where it has several (LIBERO's)."""

    name: str = ""
    step_limit: int = 500
    """Longest episode the benchmark allows (config checks, runners)."""
    data_module: str = ""
    """The data stage's CLI module (`python -m <data_module> --task ...`)."""
    data_code: tuple[str, ...] = ()
    """Library files (relative to `ript/`) whose edits invalidate the data stage."""
    language_embeddings: bool = False
    """Tasks are named by language instructions, embedded once per suite (spec §2.3)."""
    variant_contexts: bool = False
    """RIPT may use task variants as contexts (a start state without a demonstration)."""
    needs_suite: bool = False
    vla_observations: bool = False
    """The env can observe what the OpenVLA family needs (`vla_obs_spec`; LIBERO: 256 px
    renders of both cameras, the 8-d proprio state; vla_spec §2, §3.2)."""

    def __init__(self, suite: str | None = None):
        self.suite = suite

    # -- config ---------------------------------------------------------------------------
    @classmethod
    def data_config(cls) -> type:
        """The data stage's config dataclass (its keys and defaults)."""
        raise NotImplementedError

    def tasks(self, spec: list[str] | str) -> list[str]:
        """`spec` (names, or "all" where the benchmark has a fixed task set) as a checked list;
        an unknown name raises ValueError listing the valid ones."""
        raise NotImplementedError

    def observation_keys(self, image: bool = True) -> list[str]:
        """Keys that both the data stage records and the env runner produces."""
        raise NotImplementedError

    # -- tasks and contexts ---------------------------------------------------------------
    def task_id(self, task: str) -> int:
        raise NotImplementedError

    def all_task_names(self) -> list[str]:
        """Every task, indexed by `task_id` (a VLA's task vocabulary)."""
        return self.tasks("all")

    def instruction(self, task: str) -> str:
        """The task's language instruction (what a VLA is prompted with)."""
        return task.rsplit("-v", 1)[0].replace("-", " ")

    def one_hot_vocabulary(self, tasks: list[str]) -> list[str]:
        """Task names of a policy's one-hot task token when no language embedding is used."""
        return list(tasks)

    def train_contexts(self, kind: str, demo_contexts: list, data: dict) -> list:
        """RIPT's context set (spec §5.2): `demos` = the demonstrations' start states;
        `train_variants` where `variant_contexts`."""
        if kind == "demos":
            return demo_contexts
        raise ValueError(f"ript.contexts: {kind} exists for benchmarks with task variants only; "
                         f"{self.name} contexts are the demos' initial states (demos)")

    def held_out(self, task: str, data: dict) -> list[int]:
        """The held-out start states of `task` (variants or init-state indices), never a
        demo's or a RIPT context's; `data` is the policy's data metadata."""
        raise NotImplementedError

    def eval_contexts(self, task: str, episodes: int, seed: int,
                      data: dict) -> list[EpisodeContext]:
        """The evaluation episodes of `task`: episode i starts from held-out state i mod
        count, with its env seed derived from (seed, task id, i) (spec §6)."""
        from ript.utils import derived_seed

        tid, pool = self.task_id(task), self.held_out(task, data)
        return [EpisodeContext(i, task, pool[i % len(pool)], derived_seed(seed, tid, i))
                for i in range(episodes)]

    def scripted_expert(self):
        """A scripted expert behind the Policy interface (reference rows, tests)."""
        raise ValueError(f"{self.name} has no scripted expert")

    # -- the OpenVLA family (where `vla_observations`; vla_spec §2, §3) ------------------------
    vla_cameras: tuple[str, ...] = ()
    """Observation keys of a VLA's images, in the model's order (third-person first)."""
    vla_images_upside_down: bool = False
    """The renders are upside down and a VLA sees them rotated by 180°."""

    def vla_obs_spec(self, image_size: int, replan_period: int) -> dict:
        """The runner's obs_spec for a VLA whose images are `image_size` px and which reads
        observations every `replan_period` steps; the default is LIBERO's (256 px renders)."""
        return {"image": True, "image_size": 256, "vla": True}

    def vla_state(self, obs: dict, rows) -> np.ndarray:
        """(n, 8) the proprio state of the slots `rows` before normalisation (OFT's token)."""
        raise NotImplementedError

    def vla_env_actions(self, actions: np.ndarray) -> np.ndarray:
        """Un-normalised (..., 7) model actions -> the env's actions (its gripper convention)."""
        raise NotImplementedError

    # -- simulation -----------------------------------------------------------------------
    def factory(self, obs_spec: dict, max_episode_steps: int, *, legacy_reset: bool = False):
        """The worker-side env factory (see ript.envs.worker)."""
        raise NotImplementedError

    def make_runner(self, obs_spec: dict, n_envs: int, n_workers: int, max_episode_steps: int,
                    *, step_timeout_s: float = 60.0, legacy_reset: bool = False,
                    where: str = "evaluation"):
        """An EnvRunner over this benchmark's envs; `where` names the config block in errors."""
        from ript.config import require
        from ript.envs.runner import EnvRunner

        require(max_episode_steps <= self.step_limit, f"{where}.max_episode_steps",
                f"{self.name} episodes end at {self.step_limit} steps")
        factory = self.factory(obs_spec, max_episode_steps, legacy_reset=legacy_reset)
        return EnvRunner(factory, n_envs, n_workers, step_timeout_s)


def register(name: str, cls: type[Benchmark]) -> None:
    """Add a benchmark at run time (tests; a plug-in)."""
    REGISTRY[name] = cls


def names() -> list[str]:
    return sorted(REGISTRY)


def benchmark_class(name: str) -> type[Benchmark]:
    if name not in REGISTRY:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(names())}")
    cls = REGISTRY[name]
    if isinstance(cls, str):
        module, attr = cls.split(":")
        cls = REGISTRY[name] = getattr(importlib.import_module(module), attr)
    return cls


def get(name: str, suite: str | None = None) -> Benchmark:
    cls = benchmark_class(name)
    if cls.needs_suite and not suite:
        raise ValueError(f"{name} needs a suite (data.suite / pretrain.suite)")
    return cls(suite)


def of_data(data: dict | None) -> Benchmark:
    """The benchmark of a policy's data metadata (`meta["data"]`, written by the SFT stages:
    the data files' `env_name` and `suite`); MetaWorld when there is none (scripted policies)."""
    data = data or {}
    return get(data.get("benchmark") or data.get("env_name") or DEFAULT, data.get("suite"))
