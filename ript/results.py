"""Results of evaluation: per-task statistics, episode records, videos and the per-policy table.

    python -m ript.results --inputs a/summary.json b/summary.json --out table.csv

Separate from the evaluation stage (`ript.evaluate`) so the statistics and tables do not depend on
how episodes were produced (which benchmark, which policy family), and so the report and the
aggregation can use them without importing the stage.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ript.utils import atomic_path

if TYPE_CHECKING:  # type only: the report and the aggregation need no torch/simulator import
    from ript.envs.runner import EpisodeRecord

EPISODE_FIELDS = ["task", "context_id", "variant", "seed", "success", "length", "error"]
TABLE_FIELDS = ["task", "policy", "episodes", "errors", "successes", "success_rate",
                "wilson_low", "wilson_high", "mean_length"]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95 % for z = 1.96).

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at 0/n or n/n,
    which matters for per-task rates from 25–50 episodes.
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact bounds at 0/n and n/n (the formula gives them up to rounding)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def summarize(task: str, records: list[EpisodeRecord], policy_name: str) -> dict:
    """Per-task summary. `episodes` is the number run; success, its Wilson interval and the
    mean length count only the episodes without an infrastructure error (`errors`): such an
    episode says nothing about the policy, and scoring it as a failure would bias the rate
    down (0/n for a broken simulator). With no scored episode the rate is 0 and the interval
    [0, 1], i.e. no information."""
    scored = [r for r in records if r.error is None]
    errors = [r for r in records if r.error is not None]
    n, k = len(scored), sum(r.success for r in scored)
    low, high = wilson_interval(k, n)
    return {"task": task, "policy": policy_name, "episodes": len(records), "successes": k,
            "success_rate": k / n if n else 0.0, "wilson_low": low, "wilson_high": high,
            "mean_length": float(np.mean([r.length for r in scored])) if n else 0.0,
            "errors": len(errors), "error_fraction": len(errors) / max(len(records), 1),
            "first_error": errors[0].error if errors else None}


def write_episodes(path: Path, records: list[EpisodeRecord]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, EPISODE_FIELDS)
        w.writeheader()
        for r in records:
            w.writerow({k: ("" if getattr(r, k) is None else getattr(r, k))
                        for k in EPISODE_FIELDS})


def save_videos(out_dir: Path, records: list[EpisodeRecord], fps: int = 30) -> list[Path]:
    import imageio.v3 as iio

    paths = []
    for r in records:
        if not r.frames:
            continue
        frames = np.stack(r.frames)
        path = out_dir / "videos" / f"episode{r.context_id:03d}_{'ok' if r.success else 'fail'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # MP4 needs an ffmpeg/pyav plugin for imageio; fall back to GIF without one
            iio.imwrite(path.with_suffix(".mp4"), frames, fps=fps)
            paths.append(path.with_suffix(".mp4"))
        except Exception as e:  # noqa: BLE001 - which plugin is missing varies
            warnings.warn(f"MP4 writing failed ({e}); writing GIF instead", stacklevel=2)
            iio.imwrite(path.with_suffix(".gif"), frames, duration=1000 / fps, loop=0)
            paths.append(path.with_suffix(".gif"))
    return paths


def aggregate(inputs: list[str | Path], out: str | Path) -> list[dict]:
    """Per-task table plus a 'mean' row: mean of per-task rates, Wilson over all scored
    (error-free) episodes, the sum of errors."""
    rows = [json.loads(Path(p).read_text()) for p in inputs]
    if not rows:
        raise ValueError("aggregate: no inputs")
    for r in rows:
        r.setdefault("errors", 0)  # summaries written before errors were counted
    n = sum(r["episodes"] for r in rows)
    scored = n - sum(r["errors"] for r in rows)
    k = sum(r["successes"] for r in rows)
    low, high = wilson_interval(k, scored)
    policies = sorted({r.get("policy", "") for r in rows})
    mean = {"task": "mean", "policy": "+".join(policies), "episodes": n,
            "errors": n - scored, "successes": k,
            "success_rate": float(np.mean([r["success_rate"] for r in rows])),
            "wilson_low": low, "wilson_high": high,
            "mean_length": sum(r["mean_length"] * (r["episodes"] - r["errors"])
                               for r in rows) / max(scored, 1)}
    table = [{f: r.get(f, "") for f in TABLE_FIELDS} for r in rows] + [mean]
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, TABLE_FIELDS)
        w.writeheader()
        w.writerows(table)
    return table


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ript.results",
                                description="Per-task table of evaluation summaries.")
    p.add_argument("--inputs", nargs="+", required=True, help="summary.json files")
    p.add_argument("--out", required=True, help="CSV table to write")
    a = p.parse_args(argv)
    aggregate(a.inputs, a.out)


if __name__ == "__main__":
    main()
