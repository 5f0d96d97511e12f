"""Results of evaluation: per-task statistics, episode records, videos and the per-policy table
(built by `python -m ript.evaluate aggregate`).

Separate from the evaluation stage (`ript.evaluate`) so the statistics and tables do not depend on
how episodes were produced (which benchmark, which policy family), and so the report and the
aggregation can use them without importing the stage.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ript.utils import atomic_path

if TYPE_CHECKING:  # types only: the report and the aggregation need no torch/simulator import
    import pandas as pd

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


def aggregate(inputs: list[str | Path], out: str | Path) -> pd.DataFrame:
    """Per-task table plus a 'mean' row: mean of per-task rates, Wilson over all scored
    (error-free) episodes, the sum of errors. Writes it to `out` (CSV) and returns it."""
    import pandas as pd

    rows = pd.DataFrame([json.loads(Path(p).read_text()) for p in inputs])
    if rows.empty:
        raise ValueError("aggregate: no inputs")
    # summaries written before errors (or the policy label) were recorded
    defaults = {"errors": 0, "policy": ""}
    for col, value in defaults.items():
        rows[col] = rows[col].fillna(value) if col in rows else value
    rows["errors"] = rows["errors"].astype(int)
    table = rows[TABLE_FIELDS]
    scored = table["episodes"] - table["errors"]
    k = int(table["successes"].sum())
    low, high = wilson_interval(k, int(scored.sum()))
    mean = {"task": "mean", "policy": "+".join(sorted(set(table["policy"]))),
            "episodes": int(table["episodes"].sum()), "errors": int(table["errors"].sum()),
            "successes": k,
            # np.mean and Python's left-to-right sum, not Series.mean/sum: the same floats
            # to the last bit as the tables written before pandas (pandas may sum pairwise or
            # through bottleneck)
            "success_rate": float(np.mean(table["success_rate"].to_numpy())),
            "wilson_low": low, "wilson_high": high,
            "mean_length": sum(table["mean_length"] * scored) / max(int(scored.sum()), 1)}
    table = pd.concat([table, pd.DataFrame([mean])], ignore_index=True)
    with atomic_path(out) as tmp:
        # CRLF as the csv module wrote these tables before (RFC 4180): the same bytes as then
        table.to_csv(tmp, index=False, lineterminator="\r\n")
    return table


def read_table(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """A table written by `aggregate` -> (per-task rows indexed by task, the 'mean' row)."""
    import pandas as pd

    # Python's float() parses exactly (the shortest repr round-trips); pandas 2's default C
    # parser may be off by an ulp, so the report could differ from the table in the last bit.
    floats = {c: float for c in ("success_rate", "wilson_low", "wilson_high", "mean_length")}
    table = pd.read_csv(path, keep_default_na=False, converters=floats)  # "" policy stays ""
    is_mean = table["task"] == "mean"
    if is_mean.sum() != 1:
        raise ValueError(f"{path}: expected one 'mean' row, found {int(is_mean.sum())}")
    mean = table[is_mean].iloc[0].to_dict()
    return table[~is_mean].set_index("task", drop=False), mean
