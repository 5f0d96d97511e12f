"""Stage 'data' for MetaWorld: noisy scripted-expert demonstrations as HDF5 (spec §2.5).

The expert is MetaWorld's scripted policy on the 39-d state plus Gaussian action noise (σ = 0.2
in QueST's generator), clipped to [-1, 1]. Unlike QueST we keep only successful demos by default
and report the expert's success rate. Each demo records its task variant, seed, random vector and
simulator states, so RIPT can restart exactly from its first state (spec §5.2, §9.1).

    python -m ript.data.metaworld_demos --task reach-v3 --config cfg.json --out reach.hdf5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import h5py
import numpy as np

from ript.config import from_dict, to_dict
from ript.data.hdf5 import FORMAT_VERSION
from ript.envs.metaworld import (CAMERA, DataConfig, MetaWorldEnv, check_task, expert_policy,
                                 task_id, variant_split)
from ript.utils import atomic_path, progress

MAX_ATTEMPTS_PER_DEMO = 5  # bounds the loop when the noisy expert keeps failing




def rollout_expert(env: MetaWorldEnv, expert, variant: int, rng: np.random.Generator,
                   noise: float) -> dict:
    """One noisy expert episode from context (task, variant); stops at first success."""
    obs = env.reset(variant, seed=int(rng.integers(2**31)))
    init_rand_vec = env.rand_vec()
    frames = {k: [] for k in obs}
    actions, states = [], []
    success = False
    done = False
    state = obs["obs_gt"].astype(np.float64)
    while not done:
        states.append(env.sim_state())
        for k, v in obs.items():
            frames[k].append(v)
        action = expert.get_action(state) + noise * rng.standard_normal(4)
        action = np.clip(action, -1.0, 1.0).astype(np.float32)
        actions.append(action)
        obs, success, done, state = env.step(action)
    T = len(actions)
    rewards = np.zeros(T, np.float32)
    dones = np.zeros(T, np.uint8)
    dones[-1] = 1
    rewards[-1] = float(success)
    return {"obs": {k: np.stack(v) for k, v in frames.items()}, "actions": np.stack(actions),
            "states": np.stack(states), "rewards": rewards, "dones": dones,
            "success": success, "rand_vec": init_rand_vec, "variant": variant}


def generate(task: str, cfg: DataConfig, seed: int, out: str | Path) -> dict:
    """Write `out` (atomically) and return generation statistics."""
    check_task(task)
    demo_variants, eval_variants = variant_split(cfg.eval_variants)
    # Seeded by (seed, global task id): adding a task to the config leaves other files unchanged.
    rng = np.random.default_rng([seed, task_id(task)])
    expert = expert_policy(task)
    kept, attempts, successes, steps = [], 0, 0, 0
    t0 = time.perf_counter()
    bar = progress(total=cfg.demos_per_task, desc=f"demos {task}")
    with MetaWorldEnv(task, cfg.obs_spec(), cfg.max_episode_steps) as env:
        while len(kept) < cfg.demos_per_task:
            if attempts >= MAX_ATTEMPTS_PER_DEMO * cfg.demos_per_task:
                raise RuntimeError(
                    f"{task}: only {len(kept)} of {cfg.demos_per_task} demos after {attempts} "
                    f"attempts (expert success {successes}/{attempts}); lower data.action_noise "
                    f"or raise data.max_episode_steps")
            variant = demo_variants[attempts % len(demo_variants)]
            ep_seed = int(rng.integers(2**31))
            ep = rollout_expert(env, expert, variant, np.random.default_rng(ep_seed),
                                cfg.action_noise)
            ep["seed"] = ep_seed
            attempts += 1
            successes += ep["success"]
            steps += len(ep["actions"])
            if ep["success"] or cfg.keep_failed:
                kept.append(ep)
                bar.update(1)
        state_dim = env.sim_state().shape[0]
    bar.close()
    elapsed = time.perf_counter() - t0
    stats = {"expert_success_rate": successes / attempts, "attempts": attempts,
             "num_demos": len(kept), "env_steps": steps, "seconds": elapsed,
             "env_steps_per_s": steps / max(elapsed, 1e-9),
             "mean_demo_length": float(np.mean([len(e["actions"]) for e in kept]))}
    attrs = {"env_name": "metaworld", "task": task, "task_id": env.task_id,
             "camera": CAMERA, "seed": seed, "format_version": FORMAT_VERSION,
             "state_dim": state_dim, **cfg.file_settings(),
             "obs_keys_json": json.dumps(cfg.obs_spec().keys()),
             "demo_variants_json": json.dumps([demo_variants.start, demo_variants.stop]),
             "eval_variants_range_json": json.dumps([eval_variants.start, eval_variants.stop]),
             "expert_success_rate": stats["expert_success_rate"], "attempts": attempts,
             "num_demos": len(kept), "total": int(sum(len(e["actions"]) for e in kept))}
    write_demos(out, kept, attrs, task, env.task_id)
    return stats


def write_demos(out: str | Path, demos: list[dict], attrs: dict, task: str, tid: int) -> None:
    # track_times=False and a fixed libver keep files byte-identical for the same seed.
    kw = dict(track_times=False)
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w", libver=("v110", "v110"), track_order=False) as f:
            data = f.create_group("data")
            for k, v in attrs.items():
                data.attrs[k] = v
            for i, ep in enumerate(demos):
                g = data.create_group(f"demo_{i}")
                og = g.create_group("obs")
                for k, v in ep["obs"].items():
                    og.create_dataset(k, data=v, **kw)
                for k in ("actions", "states", "rewards", "dones"):
                    g.create_dataset(k, data=ep[k], **kw)
                g.attrs.update({"task": task, "task_id": tid, "variant": ep["variant"],
                                "seed": ep["seed"], "num_samples": len(ep["actions"]),
                                "success": bool(ep["success"]), "rand_vec": ep["rand_vec"],
                                "init_state": ep["states"][0]})


def main(argv=None) -> None:
    from ript.stage import add_common_args, load_block, setup_threads, stage_tracker

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p)
    p.add_argument("--task", required=True)
    p.add_argument("--out", required=True, help="HDF5 file to write")
    a = p.parse_args(argv)
    setup_threads(a)
    cfg = from_dict(DataConfig, load_block(a.config), "data")
    check_task(a.task)
    out = Path(a.out)
    with stage_tracker(a, "data", to_dict(cfg), task=a.task,
                       metrics=out.with_name(f".{out.stem}.metrics.jsonl")) as tr:
        stats = generate(a.task, cfg, a.seed, out)
        tr.log_metrics(stats, step=0)
        tr.log_artifact(out)
    print(json.dumps({"task": a.task, **stats}))


if __name__ == "__main__":
    main()
