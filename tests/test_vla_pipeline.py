"""An OpenVLA-family checkpoint through the real DAG: fetch stage → evaluation on the real LIBERO
simulator → report, from the root of a repository copy as the README runs it (issue #14).

The checkpoints are tiny random instances of the same architecture and file layout
(`ript.vla.fake`, named as fakes: no 7-B weights can be downloaded here), loaded through the
real loader. A random model scores ~0 %; what is tested is that every step of the real path
runs, is recorded and reported, and that a folder that is not a checkpoint stops the DAG with
one clear message before any evaluation.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import copy_repo, mlflow_runs, snakemake_in

pytestmark = pytest.mark.slow

SUITE = "libero_spatial"
STEPS = 12  # policy steps per episode (after the 10 settle steps): toy size


def _config(name: str, family: str, folder: str, task: str) -> dict:
    return {
        "experiment": name, "seed": 7,
        "data": {"benchmark": "libero", "suite": SUITE, "tasks": [task]},
        "policy": {"family": family, "checkpoint": folder, "download": False},
        "evaluation": {"episodes_per_task": 2, "n_envs": 2, "n_workers": 1,
                       "max_episode_steps": STEPS},
        "report": {"title": f"{family} toy run"},
        "ript": {"enabled": False},  # the checkpoint as released (RIPT: test_vla_ript_pipeline)
    }


@pytest.fixture(scope="module")
def vla_repo(tmp_path_factory):
    from ript.envs.libero import suite_tasks

    repo = copy_repo(tmp_path_factory.mktemp("vla_repo"))
    task = suite_tasks(SUITE)[0]
    for family in ("openvla_oft", "openvla"):
        subprocess.run([sys.executable, "-m", "ript.vla.fake", f"checkpoints/fake-{family}",
                        "--family", family, "--suite", SUITE], cwd=repo, check=True,
                       env={"PYTHONPATH": str(repo), "PATH": str(sys.prefix) + "/bin"})
        cfg = _config(f"toy_{family}", family, f"checkpoints/fake-{family}", task)
        (repo / "config" / f"toy_{family}.yaml").write_text(yaml.safe_dump(cfg))
    return repo, task


@pytest.mark.parametrize("family", ["openvla_oft", "openvla"])
def test_checkpoint_is_evaluated_on_libero_to_a_report(vla_repo, family):
    repo, task = vla_repo
    snakemake_in(repo, "--configfile", f"config/toy_{family}.yaml", timeout=1200)
    res = repo / "results" / f"toy_{family}"
    manifest = json.loads((res / "checkpoint" / "manifest.json").read_text())
    assert manifest["family"] == family
    summary = json.loads((res / "eval" / "sft" / task / "summary.json").read_text())
    assert summary["episodes"] == 2 and summary["errors"] == 0
    episodes = (res / "eval" / "sft" / task / "episodes.csv").read_text().splitlines()
    assert len(episodes) == 3
    # a random tiny model does not solve the task: every episode runs to the step limit
    assert summary["mean_length"] == STEPS
    page = (res / "report" / "index.html").read_text()
    assert f"{family} toy run" in page and "Held-out success" in page
    report = json.loads((res / "report" / "summary.json").read_text())
    assert report["ript"] is None and report["lift_points"] is None
    # the stages are MLflow runs of the experiment
    _, runs = mlflow_runs(res / "mlflow.db", f"toy_{family}")
    stages = {r.data.tags.get("stage") for r in runs}
    assert {"vla-checkpoint", "eval-sft"} <= stages, stages
    # nothing of QueST's stages ran
    assert not (res / "autoencoder").exists() and not (res / "prior").exists()


def test_a_folder_that_is_not_a_checkpoint_stops_before_evaluation(vla_repo):
    repo, task = vla_repo
    bad = repo / "checkpoints" / "not-a-checkpoint"
    bad.mkdir(parents=True)
    (bad / "notes.txt").write_text("the weights were never copied here")
    cfg = _config("toy_bad", "openvla_oft", "checkpoints/not-a-checkpoint", task)
    (repo / "config" / "toy_bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake_in(repo, "--configfile", "config/toy_bad.yaml", check=False, timeout=600)
    assert proc.returncode != 0
    log = (repo / "logs" / "toy_bad" / "vla_checkpoint.log").read_text()
    assert "checkpoints/not-a-checkpoint" in log and "config.json" in log
    assert "Traceback" not in log
    assert not (repo / "results" / "toy_bad" / "eval").exists()
    assert sorted(p.name for p in bad.iterdir()) == ["notes.txt"]  # nothing written there
