"""RIPT iterations split into rollouts and PPO update, beside the raw simulator (issue #16).

    python benchmarks/bench_ript.py [--config config/config.yaml] [--iterations 3]

Uses the SFT policy and demos of a finished pipeline run (`results/<experiment>/`) and the
experiment's `ript` config block, so the figures are those of the real stage. In the same run it
measures the raw simulator (random actions, the config's first task, as many processes as
`ript.n_workers` and envs as `ript.n_envs`; bench_rollouts.raw_rate) and prints, over the
iterations after the first (whose env builds are a one-time cost): rollout env steps/s, the
raw rate, their ratio (goal ≥ 0.85), the informative-group yield kept / (kept + rejected), and
rollout vs update seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

from ript.config import from_dict
from ript.rl.distributed import Dist
from ript.rl.ript import Ript, RiptConfig

sys.path.insert(0, str(Path(__file__).parent))  # bench_rollouts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="config/config.yaml")
    p.add_argument("--iterations", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    full = yaml.safe_load(Path(a.config).read_text())
    res = Path("results") / full["experiment"]
    init = res / ("finetune" if full.get("finetune", {}).get("enabled") else "prior") / "model.pt"
    if not init.exists():
        raise SystemExit(f"{init} not found: run the pipeline first (snakemake --until prior)")
    cfg = from_dict(RiptConfig, full["ript"], "ript")
    files = sorted((res / "data").glob("*.hdf5"))
    ript = Ript(cfg, init, files, seed=0, dist=Dist())
    totals = dict(rollout=0.0, update=0.0, steps=0.0, kept=0.0, rejected=0.0)
    try:
        for it in range(a.iterations):
            t0 = time.perf_counter()
            m = ript.step(it)
            total = time.perf_counter() - t0
            print(f"iteration {it}: {total:.1f} s = rollouts {m['rollout_seconds']:.1f} s "
                  f"({m['env_steps']:.0f} env steps, {m['env_steps_per_s']:.0f} steps/s, "
                  f"{m['episodes']:.0f} episodes) + update {m['update_seconds']:.1f} s "
                  f"({m['n_minibatches']:.0f} minibatches); groups kept {m['groups_kept']:.0f}, "
                  f"rejected {m['groups_rejected']:.0f}", flush=True)
            if it or a.iterations == 1:
                for k, key in (("rollout", "rollout_seconds"), ("update", "update_seconds"),
                               ("steps", "env_steps"), ("kept", "groups_kept"),
                               ("rejected", "groups_rejected")):
                    totals[k] += m[key]
    finally:
        ript.close()
    raw = raw_simulator(full, cfg)
    rate = totals["steps"] / max(totals["rollout"], 1e-9)
    judged = totals["kept"] + totals["rejected"]
    print(f"\nrollouts {rate:.0f} env steps/s vs raw simulator {raw:.0f} steps/s "
          f"({cfg.n_workers} processes, {cfg.n_envs} envs): ratio {rate / raw:.2f} "
          f"(goal >= 0.85); informative-group yield {totals['kept'] / max(judged, 1):.2f} "
          f"({totals['kept']:.0f} kept of {judged:.0f}); rollouts {totals['rollout']:.1f} s vs "
          f"update {totals['update']:.1f} s")


def raw_simulator(full: dict, cfg: RiptConfig) -> float:
    """The raw simulator's env steps/s on the same cores and process count."""
    from bench_rollouts import raw_rate

    from ript.envs.benchmark import get

    data = full.get("data", {})
    bench = get(data.get("benchmark", "metaworld"), data.get("suite"))
    factory = bench.factory({"image": bool(data.get("image", False))}, cfg.max_episode_steps)
    task = bench.tasks(data["tasks"])[0]
    return raw_rate(factory, task, max(cfg.n_workers, 1), cfg.n_envs, 2000 // cfg.n_envs * 8)[0]


if __name__ == "__main__":
    main()
