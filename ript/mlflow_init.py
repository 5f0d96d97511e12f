"""Stage 'mlflow_init': create the MLflow store and the experiment once, before parallel jobs
race to do it. An unreachable store is recorded, not fatal: the stages then log to their JSONL
files only (README, "Tracking with MLflow").

    python -m ript.mlflow_init init --out results/<exp>/mlflow.json
"""

from __future__ import annotations

import argparse
import os
import sys

from ript.tracking import init_store, tracking_uri


def main(argv=None) -> None:
    from ript.utils import write_json

    # The stage CLIs' two flags and environment defaults (ript.stage has them too, but imports
    # the tracking library only for stage trackers).
    env = os.environ.get
    p = argparse.ArgumentParser(description="Create the MLflow store and experiment once.")
    p.add_argument("command", choices=["init"])
    p.add_argument("--experiment-dir", default=env("RIPT_EXPERIMENT_DIR"),
                   required=not env("RIPT_EXPERIMENT_DIR"),
                   help="results folder of the experiment [$RIPT_EXPERIMENT_DIR]")
    p.add_argument("--experiment", default=env("RIPT_EXPERIMENT", "default"),
                   help="MLflow experiment name [$RIPT_EXPERIMENT]")
    p.add_argument("--out", required=True, help="JSON file recording the store and experiment")
    a = p.parse_args(argv)
    try:
        info = {**init_store(a.experiment_dir, a.experiment), "available": True}
    except Exception as e:  # noqa: BLE001 - an unreachable store must not stop the pipeline
        # The stages then degrade on their own (one warning each, JSONL only); this file
        # records why the dashboard is empty. Only the first line: MLflow's messages embed
        # whole urllib3 reprs.
        uri, error = tracking_uri(a.experiment_dir), f"{type(e).__name__}: {e}".splitlines()[0]
        print(f"WARNING: MLflow tracking store {uri} is unavailable ({error}); the stages "
              f"will log their metrics to their JSONL files only", file=sys.stderr, flush=True)
        info = {"tracking_uri": uri, "experiment": a.experiment, "available": False,
                "error": error}
    write_json(a.out, info)


if __name__ == "__main__":
    main()
