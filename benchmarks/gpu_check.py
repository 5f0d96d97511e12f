"""A few iterations of every stage on a small slice of a LIBERO preset, on one GPU: per-stage
wall time, peak host memory and peak GPU memory.

    bash benchmarks/gpu_check.sh [preset] [workdir]        # preset: libero_goal (default)

The slice keeps the preset's paper-size model (spec §4.6, ≈ 20 M parameters), both 128×128
cameras and its RIPT settings (K, PPO epochs), and shrinks only what scales with the data: two
tasks, three demos each, a few dozen optimiser steps, two RIPT iterations, short episodes. The
demos are official-layout files recorded here from the real simulator
(tests/libero_recording.py), so the check needs no network. It runs the real DAG
(`snakemake`), so it also proves the preset's rules on that machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# stage -> its benchmark files under results/<experiment>/benchmarks/ (workflow/rules/*.smk)
STAGES = {"data": "data/*.tsv", "embeddings": "embeddings/*.tsv",
          "autoencoder": "autoencoder.tsv", "prior": "prior.tsv", "finetune": "finetune.tsv",
          "ript": "ript.tsv", "eval": "eval/*/*.tsv"}


def slice_config(preset: str, raw_dir: Path, tasks: list[str], steps: int,
                 episode_steps: int) -> dict:
    cfg = yaml.safe_load((REPO / "config" / f"{preset}.yaml").read_text())
    if cfg["data"].get("benchmark") != "libero" or cfg.get("pretrain"):
        raise SystemExit(f"{preset}: pick a multitask LIBERO preset (libero_goal, ...)")
    few = {"steps": steps, "log_every": max(1, steps // 4), "checkpoint_every": steps,
           "epochs": None}
    cfg["experiment"] = f"gpu_check_{preset}"
    cfg["data"].update(tasks=tasks, demos_per_task=3, raw_dir=str(raw_dir), download=False)
    for stage in ("autoencoder", "prior"):
        cfg[stage]["train"].update(few)
    cfg["ript"].update(iterations=2, contexts_per_iteration=4, max_rejected_groups=4,
                       max_episode_steps=episode_steps, eval_every=2,
                       eval_episodes_per_task=2)
    cfg["evaluation"].update(episodes_per_task=4, max_episode_steps=episode_steps)
    return cfg


def stage_rows(res: Path) -> list[dict]:
    """Snakemake's benchmark files (wall s, max RSS) + the stages' logged GPU peaks."""
    rows = []
    for stage, pattern in STAGES.items():
        tsvs = [t for t in sorted((res / "benchmarks").glob(pattern))
                if t.name != "aggregate.tsv"]
        if not tsvs:
            continue
        recs = [next(csv.DictReader(t.open(), delimiter="\t")) for t in tsvs]
        metrics = res / stage / "metrics.jsonl"
        peaks = [json.loads(line).get("gpu_mem_peak_mb") for line in metrics.open()] \
            if metrics.exists() else []
        peaks = [x for x in peaks if x is not None]
        rows.append({"stage": stage, "jobs": len(recs),
                     "seconds": sum(float(r["s"]) for r in recs),
                     "max_rss_mb": max(float(r["max_rss"]) for r in recs),
                     "gpu_mem_peak_mb": max(peaks) if peaks else None})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="libero_goal")
    p.add_argument("--work", default=None, help="working folder (default: a fresh temp folder)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    p.add_argument("--steps", type=int, default=40, help="optimiser steps of stages 0 and 1")
    p.add_argument("--episode-steps", type=int, default=80, help="step limit of episodes")
    a = p.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from libero_recording import record_official_file

    from ript.envs.libero import suite_tasks

    work = Path(a.work or subprocess.check_output(["mktemp", "-d"], text=True).strip())
    preset = yaml.safe_load((REPO / "config" / f"{a.preset}.yaml").read_text())
    suite = preset["data"]["suite"]
    tasks = suite_tasks(suite)[:2]
    raw = work / "raw"
    t0 = time.perf_counter()
    for t in tasks:
        f = raw / suite / f"{t}_demo.hdf5"
        if not f.exists():
            record_official_file(f, suite, t, n_demos=3, steps=40)
    print(f"recorded {len(tasks)} official-layout files in {time.perf_counter() - t0:.0f} s")
    cfg = slice_config(a.preset, raw, tasks, a.steps, a.episode_steps)
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO / "workflow" /
           "Snakefile"), "-d", str(work), "--configfile", str(cfg_path), "--cores",
           str(a.cores)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-6000:])
        raise SystemExit(f"snakemake failed ({proc.returncode}); logs in {work}/logs")
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU run)"
    print(f"\n{a.preset} slice on {dev}: whole DAG {wall:.0f} s ({work})")
    print(f"{'stage':<16}{'jobs':>5}{'seconds':>10}{'max RSS MiB':>13}{'GPU peak MiB':>14}")
    for r in stage_rows(work / "results" / cfg["experiment"]):
        gpu = "-" if r["gpu_mem_peak_mb"] is None else f"{r['gpu_mem_peak_mb']:.0f}"
        print(f"{r['stage']:<16}{r['jobs']:>5}{r['seconds']:>10.1f}{r['max_rss_mb']:>13.0f}"
              f"{gpu:>14}")


if __name__ == "__main__":
    main()
