"""One RIPT iteration's time split into rollouts and PPO update, and env steps/s in rollouts.

    python benchmarks/bench_ript.py [--experiment metaworld_default] [--iterations 1]

Uses the SFT policy and demos of a finished pipeline run (`results/<experiment>/`) and the
experiment's `ript` config block, so the figures are those of the real stage.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from ript.config import from_dict
from ript.rl.distributed import Dist
from ript.rl.ript import Ript, RiptConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="config/config.yaml")
    p.add_argument("--iterations", type=int, default=1)
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
    try:
        for it in range(a.iterations):
            t0 = time.perf_counter()
            m = ript.step(it)
            total = time.perf_counter() - t0
            print(f"iteration {it}: {total:.1f} s = rollouts {m['rollout_seconds']:.1f} s "
                  f"({m['env_steps']:.0f} env steps, {m['env_steps_per_s']:.0f} steps/s, "
                  f"{m['episodes']:.0f} episodes) + update {m['update_seconds']:.1f} s "
                  f"({m['n_minibatches']:.0f} minibatches); groups kept {m['groups_kept']:.0f}, "
                  f"rejected {m['groups_rejected']:.0f}")
    finally:
        ript.close()


if __name__ == "__main__":
    main()
