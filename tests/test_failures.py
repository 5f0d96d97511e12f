"""Failures the pipeline must survive or show: an unreachable MLflow server costs the dashboard,
never a run, and is said once per job; with MLflow reachable, tracking works as before."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from conftest import copy_repo, mlflow_runs, snakemake_in


def closed_port_uri() -> str:
    """http:// URI of a local port that was just bound and closed: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_init_with_unreachable_mlflow_warns_once_and_goes_on(tmp_path):
    uri = closed_port_uri()
    out = tmp_path / "mlflow.json"
    proc = subprocess.run([sys.executable, "-m", "ript.mlflow_init", "init", "--out", str(out),
                           "--experiment-dir", str(tmp_path), "--experiment", "down"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"WARNING: MLflow tracking store {uri} is unavailable (")
    assert "Connection refused" in line
    info = json.loads(out.read_text())
    assert info["available"] is False and info["tracking_uri"] == uri
    assert info["experiment"] == "down" and "Connection refused" in info["error"]


def test_init_with_a_sqlite_store_still_creates_the_experiment(tmp_path, monkeypatch):
    from ript.mlflow_init import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    main(["init", "--out", str(tmp_path / "mlflow.json"), "--experiment-dir", str(tmp_path),
          "--experiment", "up"])
    info = json.loads((tmp_path / "mlflow.json").read_text())
    assert info["available"] is True and "error" not in info
    assert info["tracking_uri"] == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    client, runs = mlflow_runs(tmp_path / "mlflow.db", "up")
    assert client.get_experiment_by_name("up").experiment_id == info["experiment_id"]
    assert runs == []
    assert "MLFLOW_TRACKING_URI" not in os.environ  # init does not export its store


@pytest.mark.slow
def test_pipeline_completes_with_mlflow_down(tmp_path):
    """The toy DAG with MLFLOW_TRACKING_URI pointing at a closed port: every job runs, each
    tracked job warns exactly once, and every stage's JSONL metrics are complete."""
    uri = closed_port_uri()
    repo = copy_repo(tmp_path / "repo")
    snakemake_in(repo, "--configfile", "config/tests.yaml", env={"MLFLOW_TRACKING_URI": uri})
    cfg = yaml.safe_load((repo / "config" / "tests.yaml").read_text())
    res, logs = repo / "results" / "tests", repo / "logs" / "tests"

    init_log = (logs / "mlflow_init.log").read_text()
    assert f"WARNING: MLflow tracking store {uri} is unavailable" in init_log
    assert json.loads((res / "mlflow.json").read_text())["available"] is False
    warned = {p.relative_to(logs).as_posix(): p.read_text().count(f"failed at {uri}")
              for p in logs.rglob("*.log")}
    tasks = cfg["data"]["tasks"]
    tracked = ["autoencoder.log", "prior.log", "ript.log",
               *[f"data/{t}.log" for t in tasks],
               *[f"eval/{p}/{t}.log" for p in ("sft", "ript") for t in tasks]]
    assert {k: warned.get(k) for k in tracked} == {k: 1 for k in tracked}, warned
    assert all(n <= 1 for n in warned.values()), warned

    for stage in ("autoencoder", "prior"):
        rows = [json.loads(x) for x in (res / stage / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == cfg[stage]["train"]["steps"], stage
    rows = [json.loads(x) for x in (res / "ript" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(cfg["ript"]["iterations"] + 1))
    for policy in ("sft", "ript"):
        for t in tasks:
            summary = json.loads((res / "eval" / policy / t / "summary.json").read_text())
            assert summary["errors"] == 0
            (row,) = [json.loads(x) for x in
                      (res / "eval" / policy / t / "metrics.jsonl").read_text().splitlines()]
            assert row["success_rate"] == summary["success_rate"]
    assert (res / "report" / "index.html").exists()
    assert not (res / "mlflow.db").exists()  # nothing fell back to a local store


@pytest.mark.parametrize("via_init", [True, False], ids=["init-rule", "stage-alone"])
def test_artifacts_live_in_the_experiment_folder(tmp_path, monkeypatch, via_init):
    """One folder is the whole experiment: with the default SQLite store, a logged artifact
    lands beside mlflow.db, and no ./mlruns appears where the job ran; the same when a stage
    run by hand creates the experiment itself (no init rule)."""
    from ript.tracking import StageTracker, init_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    exp_dir = tmp_path / "results" / "exp"
    if via_init:
        init_store(exp_dir, "exp")
    (tmp_path / "summary.json").write_text("{}")
    with StageTracker(experiment_dir=exp_dir, experiment="exp", stage="eval-sft",
                      pipeline_id="p", metrics_path=tmp_path / "m.jsonl", params={}) as t:
        t.log_artifact(tmp_path / "summary.json")
    client, (run,) = mlflow_runs(exp_dir / "mlflow.db", "exp")
    (artifact,) = (exp_dir / "mlartifacts").rglob("summary.json")
    assert artifact.parent == exp_dir / "mlartifacts" / run.info.run_id / "artifacts"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["summary.json"]
    assert not (tmp_path / "mlruns").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results", "summary.json"]


def test_a_users_store_keeps_its_own_artifact_root(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI (a server, here a SQLite file standing in for one): the experiment
    is created without our location, so the store's own artifact root applies."""
    from ript.tracking import artifact_location, init_store

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'server.db'}")
    assert artifact_location(tmp_path / "results" / "exp") is None
    info = init_store(tmp_path / "results" / "exp", "exp")
    client, _ = mlflow_runs(tmp_path / "server.db", "exp")
    location = client.get_experiment(info["experiment_id"]).artifact_location
    assert "mlartifacts" not in location and "results" not in location
