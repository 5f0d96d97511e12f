"""Rollout throughput of the EnvRunner against the raw simulator (spec §5.3 cost, §9.8).

    python benchmarks/bench_rollouts.py [--quick] [--workers 2] [--n-envs 8]

For each setting it prints env steps/s of (a) the raw simulator — `workers` processes, each
stepping its share of the envs in a tight loop with random actions — and (b) the runner with the
same worker count, `n-envs` slots and one batched (random) policy call per tick, plus the ratio
runner/raw (goal ≥ 85 %). Env construction is excluded from both timings. Each measurement is
repeated and the best kept, since other jobs on a shared machine only ever slow a run down.
`cpu eff` = raw CPU per step / runner CPU per step (main + workers): the share of the runner's
CPU spent inside the simulator, which bounds the ratio on a machine with no spare core.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")


def _raw_worker(factory, task, n_envs, steps, barrier, out):
    envs = [factory.make(task) for _ in range(n_envs)]
    ctx = _contexts(task, n_envs)
    for env, c in zip(envs, ctx):
        factory.reset(env, c)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (256, factory_action_dim(factory)))
    barrier.wait()
    t0, c0, done_steps = time.monotonic(), time.process_time(), 0
    for i in range(steps):
        for j, env in enumerate(envs):
            _, _, done, _ = env.step(actions[(i + j) % 256])
            done_steps += 1
            if done:
                factory.reset(env, ctx[j])
    out.put((done_steps, t0, time.monotonic(), time.process_time() - c0))
    for env in envs:
        env.close()


def factory_action_dim(factory) -> int:
    return 7 if type(factory).__name__ == "LiberoFactory" else 4


def _contexts(task, n, variant0=25):
    from ript.envs.worker import EpisodeContext

    return [EpisodeContext(i, task, variant0 + i % 25, i) for i in range(n)]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_rate(factory, task, workers, n_envs, steps_per_env) -> tuple[float, float]:
    """-> (env steps/s, CPU seconds per step)."""
    ctx = mp.get_context(factory.start_method)
    barrier, out = ctx.Barrier(workers + 1), ctx.Queue()
    share = [n_envs // workers + (w < n_envs % workers) for w in range(workers)]
    procs = [ctx.Process(target=_raw_worker, args=(factory, task, k, steps_per_env, barrier, out))
             for k in share]
    for p in procs:
        p.start()
    barrier.wait()
    res = [out.get() for _ in procs]
    for p in procs:
        p.join()
    steps = sum(r[0] for r in res)
    return steps / (max(r[2] for r in res) - min(r[1] for r in res)), sum(r[3] for r in res) / steps


def runner_rate(runner, task, n_envs, reps) -> list[tuple[float, float]]:
    from ript.policy import RandomPolicy

    policy = RandomPolicy(factory_action_dim(runner.factory))
    runner.run(policy, _contexts(task, n_envs), seed=0)  # warm-up: start workers, build envs
    out = []
    for rep in range(reps):  # one episode (of the step limit) per slot
        runner.env_steps = 0
        pids = [p for p in runner.pool.pids() if p]
        c0, w0, t0 = time.process_time(), sum(map(_cpu_s, pids)), time.monotonic()
        runner.run(policy, _contexts(task, n_envs), seed=rep + 1)
        dt = time.monotonic() - t0
        cpu = time.process_time() - c0 + sum(map(_cpu_s, pids)) - w0
        out.append((runner.env_steps / dt, cpu / runner.env_steps))
    return out


def bench(name, factory, task, workers, n_envs, steps, reps):
    from ript.envs.runner import EnvRunner

    raw = [raw_rate(factory, task, workers, n_envs, steps) for _ in range(reps)]
    raw_r, raw_c = max(r for r, _ in raw), min(c for _, c in raw)
    print(f"{name:<22} workers={workers} n_envs={n_envs:<3} steps/env={steps:<4} "
          f"raw     {raw_r:8.1f} steps/s", flush=True)
    for pipeline in (True, False):
        with EnvRunner(factory, n_envs, workers, pipeline=pipeline) as runner:
            run = runner_rate(runner, task, n_envs, reps)
        run_r, run_c = max(r for r, _ in run), min(c for _, c in run)
        print(f"{'':<22} runner ({'pipelined' if pipeline else 'lockstep '}) {run_r:8.1f} "
              f"steps/s   ratio {run_r / raw_r:6.1%}   cpu eff {raw_c / run_c:6.1%}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs (a minute or two)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--n-envs", type=int, default=8)
    p.add_argument("--no-libero", action="store_true")
    a = p.parse_args(argv)
    from ript.envs.metaworld import ObsSpec
    from ript.envs.metaworld import MetaWorldFactory

    q = a.quick
    state_steps, image_steps, libero_steps = (300, 40, 10) if q else (500, 150, 40)
    reps = 2 if q else 3
    bench("metaworld state", MetaWorldFactory(ObsSpec(), state_steps), "reach-v3", a.workers,
          a.n_envs, state_steps, reps)
    bench("metaworld image 128px", MetaWorldFactory(ObsSpec(image=True), image_steps),
          "reach-v3", a.workers, a.n_envs, image_steps, reps)
    if a.no_libero:
        return
    try:
        from ript.envs.libero import LiberoFactory, suite_tasks
    except ImportError as e:
        print(f"libero skipped: {e}")
        return
    n = a.workers if q else min(a.n_envs, 2 * a.workers)  # a LIBERO env takes ~10 s to build
    factory = LiberoFactory("libero_goal", max_episode_steps=libero_steps, settle_steps=0)
    bench("libero 2x128px", factory, suite_tasks("libero_goal")[0], a.workers, n, libero_steps,
          1 if q else 2)


if __name__ == "__main__":
    main()
