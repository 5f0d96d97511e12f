"""What every stage CLI shares: reading its config block and opening its tracker.

Rules pass a stage its own config block as a JSON string (`--config '{...}'`); people may pass
`--config @file.yaml` instead. Common flags: --experiment-dir, --experiment, --pipeline-id, --seed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import yaml

from ript.config import ConfigError
from ript.tracking import StageTracker


def load_block(value: str) -> dict[str, Any]:
    """Parse `--config`: inline JSON, or `@path` to a JSON/YAML file."""
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.exists():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text())
    else:
        try:
            data = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config is neither JSON nor @file: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("--config must be a mapping")
    return data


def add_common_args(p: argparse.ArgumentParser, config: bool = True) -> None:
    """Flags every stage takes. The Snakefile exports RIPT_EXPERIMENT, RIPT_EXPERIMENT_DIR and
    RIPT_PIPELINE_ID, so rules need not repeat them (and they stay out of rule params)."""
    env = os.environ.get
    if config:
        p.add_argument("--config", required=True,
                       help="the stage's config block: inline JSON or @file.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experiment-dir", default=env("RIPT_EXPERIMENT_DIR"),
                   required=not env("RIPT_EXPERIMENT_DIR"),
                   help="results folder of the experiment (holds the MLflow store) "
                        "[$RIPT_EXPERIMENT_DIR]")
    p.add_argument("--experiment", default=env("RIPT_EXPERIMENT", "default"),
                   help="MLflow experiment name [$RIPT_EXPERIMENT]")
    p.add_argument("--pipeline-id", default=env("RIPT_PIPELINE_ID", "manual"),
                   help="tag shared by all runs of one pipeline (experiment + config hash) "
                        "[$RIPT_PIPELINE_ID]")
    p.add_argument("--no-mlflow", action="store_true", help="only write the JSONL metrics")
    p.add_argument("--code-hash", default=None,
                   help="hash of the library code this stage runs (rules pass their "
                        "params.code); part of the resume key. Default: the whole package")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (more than the free cores makes OpenMP spin: 30x "
                        "slower on a busy 2-core machine)")


def code_hash(args) -> str:
    """The stage's code hash: the rule's, or (called by hand) every module of `ript/`."""
    from ript.utils import source_hash

    return args.code_hash or source_hash(".")


def setup_threads(args) -> None:
    import torch

    torch.set_num_threads(max(1, args.threads))


def stage_tracker(args, stage: str, config: dict[str, Any], *, metrics: str | Path,
                  task: str = "all", run_id: str | None = None) -> StageTracker:
    return StageTracker(
        experiment_dir=args.experiment_dir, experiment=args.experiment, stage=stage,
        pipeline_id=args.pipeline_id, metrics_path=metrics, params=config, task=task,
        seed=args.seed, run_id=run_id, enabled=not getattr(args, "no_mlflow", False))
