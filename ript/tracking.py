"""Experiment tracking: a local JSONL metrics file (ground truth) mirrored to MLflow.

Conventions (see README "Tracking"): one MLflow run per stage job, tagged with the pipeline id
(experiment + config hash), stage, task, seed and git revision. The default store is a SQLite file
in the experiment's results folder; `MLFLOW_TRACKING_URI` overrides it (use an `mlflow server` on a
cluster, never one SQLite file on NFS shared by many jobs). If MLflow is unreachable the stage warns
once and goes on: losing a dashboard must never kill a training run.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from ript.utils import atomic_path, git_revision

# Fail fast instead of retrying for minutes when a tracking server is down.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

ARTIFACT_SIZE_LIMIT = 50 * 2**20  # bigger outputs are logged by path, not copied into the store


def tracking_uri(experiment_dir: str | Path) -> str:
    """`MLFLOW_TRACKING_URI` if set, else a SQLite store inside the experiment's results folder."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(experiment_dir) / 'mlflow.db').resolve()}"


def use_tracking_uri(uri: str) -> None:
    """mlflow.set_tracking_uri without its side effect of exporting MLFLOW_TRACKING_URI: a
    user's variable must keep meaning 'the user chose this store' for every later stage."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def artifact_location(experiment_dir: str | Path) -> str | None:
    """Where the default store's experiment keeps its artifacts: `mlartifacts/` beside
    `mlflow.db`, so one folder is the whole experiment. Left to MLflow, a SQLite store's
    artifacts go to `./mlruns` in whatever directory a job runs in. None (the store decides)
    for a user's `MLFLOW_TRACKING_URI`: a server has its own artifact root."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    return (Path(experiment_dir) / "mlartifacts").resolve().as_uri()


def ensure_experiment(experiment_dir: str | Path, experiment: str) -> str:
    """The experiment's id, created (with its artifact location) if missing, in the store
    `use_tracking_uri` chose. An experiment created before artifacts moved beside the store
    keeps the location it was created with (MLflow cannot change it)."""
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(mlflow.create_experiment(
            experiment, artifact_location=artifact_location(experiment_dir)))
    except Exception:
        # another job created it first (a stage run outside the pipeline's init rule)
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            raise
        return str(exp.experiment_id)


def init_store(experiment_dir: str | Path, experiment: str) -> dict[str, str]:
    """Create the store and the experiment once, before parallel jobs race to do it."""
    uri = tracking_uri(experiment_dir)
    Path(experiment_dir).mkdir(parents=True, exist_ok=True)
    use_tracking_uri(uri)
    return {"tracking_uri": uri, "experiment": experiment,
            "experiment_id": ensure_experiment(experiment_dir, experiment)}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class StageTracker:
    """One stage job's metrics: appended to `metrics_path` (JSONL) and mirrored to MLflow.

    Use as a context manager. `run_id` resumes an existing MLflow run (stored in checkpoints so a
    resumed stage keeps one run with continuous curves).
    """

    def __init__(self, *, experiment_dir: str | Path, experiment: str, stage: str,
                 pipeline_id: str, metrics_path: str | Path, params: dict[str, Any],
                 task: str = "all", seed: int = 0, run_id: str | None = None,
                 enabled: bool = True):
        self.experiment_dir = Path(experiment_dir)
        self.experiment = experiment
        self.stage = stage
        self.metrics_path = Path(metrics_path)
        self.params = params
        self.tags = {
            "pipeline_id": pipeline_id, "stage": stage, "task": task, "seed": str(seed),
            "git_revision": git_revision(), "MUJOCO_GL": os.environ.get("MUJOCO_GL", ""),
        }
        if os.environ.get("SLURM_JOB_ID"):
            self.tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        self.run_id = run_id
        self._mlflow = None
        self._enabled = enabled

    # -- MLflow, guarded ------------------------------------------------------------------
    def _guard(self, what: str, fn, *args, **kwargs):
        if self._mlflow is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any tracking failure must not stop training
            # once per stage: _mlflow = None below turns every later call into a no-op
            error = f"{type(e).__name__}: {e}".splitlines()[0]
            warnings.warn(f"MLflow {what} failed at {tracking_uri(self.experiment_dir)} "
                          f"({error}); metrics stay in {self.metrics_path}", stacklevel=3)
            self._mlflow = None
            return None

    def __enter__(self) -> "StageTracker":
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        if not self._enabled:
            return self
        try:
            import mlflow

            self._mlflow = mlflow
        except ImportError:
            warnings.warn("mlflow is not installed; metrics only go to JSONL", stacklevel=2)
            return self
        self._guard("start", self._start)
        return self

    def _start(self):
        mlflow = self._mlflow
        use_tracking_uri(tracking_uri(self.experiment_dir))
        if self.run_id:
            mlflow.start_run(run_id=self.run_id)
        else:
            # created here when no init rule ran (a stage called by hand): the same artifact
            # location as init_store gives it
            mlflow.set_experiment(experiment_id=ensure_experiment(self.experiment_dir,
                                                                  self.experiment))
            run = mlflow.start_run(run_name=f"{self.stage}-{self.tags['task']}")
            self.run_id = run.info.run_id
            params = {k: str(v)[:6000] for k, v in flatten(self.params).items()}
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow's per-call parameter limit
                mlflow.log_params(dict(items[i:i + 100]))
        mlflow.set_tags(self.tags)

    def __exit__(self, exc_type, exc, tb):
        status = "FINISHED" if exc_type is None else "FAILED"
        self._guard("end", self._mlflow.end_run, status=status) if self._mlflow else None
        return False

    # -- logging --------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        self._guard("log_metrics", lambda: self._mlflow.log_metrics(clean, step=step))

    def log_artifact(self, path: str | Path) -> None:
        path = Path(path)
        if path.stat().st_size > ARTIFACT_SIZE_LIMIT:
            self._guard("set_tag", lambda: self._mlflow.set_tag(
                f"output.{path.name}", str(path.resolve())))
        else:
            self._guard("log_artifact", lambda: self._mlflow.log_artifact(str(path)))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._guard("set_tags", lambda: self._mlflow.set_tags(tags))

    def truncate_after(self, step: int) -> None:
        """Drop JSONL lines logged after `step` (they belong to work a resume will redo)."""
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines()
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in kept))

    def export_metrics(self, dest: str | Path) -> None:
        """Copy the JSONL ground truth to a declared output (atomically)."""
        with atomic_path(dest) as tmp:
            shutil.copyfile(self.metrics_path, tmp)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
