"""The real Snakemake workflow on the data stage, with a real MLflow store."""

from __future__ import annotations

import pytest

from conftest import REPO, mlflow_runs, run_snakemake


def test_default_config_dry_runs(tmp_path):
    proc = run_snakemake(tmp_path, REPO / "config" / "config.yaml", "-n")
    assert "demos" in proc.stdout and "mlflow_init" in proc.stdout


@pytest.mark.parametrize("bad,message", [
    ({"demos_per_task": 0}, "demos_per_task"),
    ({"tasks": ["reach-v9"]}, "reach-v9"),
    ({"demo_per_task": 2}, "demo_per_task"),
])
def test_bad_config_fails_at_parse_time_naming_the_key(tmp_path, tiny_data_cfg, bad, message):
    cfg = {"experiment": "bad", "data": {**tiny_data_cfg, **bad}}
    proc = run_snakemake(tmp_path, cfg, "-n", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert message in out
    if "reach-v9" in bad.get("tasks", []):
        assert "reach-v3" in out  # the error lists the valid task names
    assert not (tmp_path / "results").exists()


def test_data_stage_runs_tracks_and_is_idempotent(tmp_path, tiny_data_cfg):
    cfg = {"experiment": "tiny", "seed": 3, "data": tiny_data_cfg}
    target = "results/tiny/data/reach-v3.hdf5"  # only the data stage of the DAG
    run_snakemake(tmp_path, cfg, target)
    data = tmp_path / "results" / "tiny" / "data" / "reach-v3.hdf5"
    assert data.exists()
    assert (tmp_path / "logs" / "tiny" / "data" / "reach-v3.log").exists()
    assert (tmp_path / "results" / "tiny" / "benchmarks" / "data" / "reach-v3.tsv").exists()

    client, runs = mlflow_runs(tmp_path / "results" / "tiny" / "mlflow.db", "tiny")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["stage"] == "data" and tags["task"] == "reach-v3" and tags["seed"] == "3"
    assert tags["pipeline_id"].startswith("tiny-") and tags["git_revision"]
    assert run.data.params["demos_per_task"] == "2"
    assert 0 < run.data.metrics["expert_success_rate"] <= 1
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "reach-v3.hdf5" in artifacts

    again = run_snakemake(tmp_path, cfg, target)
    assert "Nothing to be done" in again.stdout + again.stderr
