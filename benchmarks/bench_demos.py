"""Demonstration generation speed vs the raw simulator on the same task (issue: data stage).

    python benchmarks/bench_demos.py [--task push-v3] [--steps 3000] [--image]

Prints env steps/s of (a) raw `env.step` with random actions, (b) the scripted expert without
noise or recording, (c) the full demo generator (noise, observation mapping, HDF5 writing).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from ript.config import from_dict
from ript.data.metaworld_demos import DataConfig, generate
from ript.envs.metaworld import MetaWorldEnv, ObsSpec, expert_policy


def raw_steps_per_s(task: str, steps: int, image: bool) -> float:
    with MetaWorldEnv(task, ObsSpec(image=image)) as env:
        env.reset(0)
        raw = env.env
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        n = 0
        while n < steps:
            raw.set_task(env._variants[0])
            raw.reset()
            for _ in range(min(400, steps - n)):
                raw.step(rng.uniform(-1, 1, 4))
                if image:
                    raw.render()
                n += 1
        return n / (time.perf_counter() - t0)


def expert_steps_per_s(task: str, steps: int) -> float:
    expert = expert_policy(task)
    with MetaWorldEnv(task) as env:
        t0, n, v = time.perf_counter(), 0, 0
        while n < steps:
            obs, done = env.reset(v % 25), False
            while not done and n < steps:
                obs, _, done, state = env.step(expert.get_action(obs["obs_gt"].astype(np.float64)))
                n += 1
            v += 1
        return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--task", default="push-v3")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--image", action="store_true")
    a = p.parse_args()
    raw = raw_steps_per_s(a.task, a.steps, a.image)
    expert = expert_steps_per_s(a.task, a.steps)
    cfg = from_dict(DataConfig, {"tasks": [a.task], "demos_per_task": max(a.steps // 80, 1),
                                 "max_episode_steps": 200, "image": a.image})
    with tempfile.TemporaryDirectory() as d:
        stats = generate(a.task, cfg, seed=0, out=Path(d) / "x.hdf5")
    gen = stats["env_steps"] / stats["seconds"]
    print(f"task {a.task}  image={a.image}")
    print(f"{'raw env.step (random actions)':40s} {raw:8.0f} steps/s")
    print(f"{'scripted expert, no recording':40s} {expert:8.0f} steps/s")
    print(f"{'demo generator (noise + obs + HDF5)':40s} {gen:8.0f} steps/s  "
          f"({gen / raw:.0%} of raw)")


if __name__ == "__main__":
    main()
