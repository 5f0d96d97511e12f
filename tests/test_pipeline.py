"""The whole DAG on the tiny `config/tests.yaml`: real simulator, training, MLflow, Snakemake.

Also checks that only invalidated stages re-run (issue: re-run only what changed).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import BIN, REPO, mlflow_runs, run_snakemake

pytestmark = pytest.mark.slow

STAGE_RULES = {"mlflow_init", "demos", "autoencoder", "prior", "ript", "evaluate", "aggregate",
               "report"}


def planned(proc) -> dict[str, int]:
    """Jobs per rule from a dry run's 'Job stats' table."""
    out = proc.stdout + proc.stderr
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:")[1].split("Reasons:")[0] if "Job stats:" in out else ""
    jobs = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}
    jobs.pop("total", None)
    jobs.pop("all", None)
    return jobs


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A private copy of the workflow and library, so code edits stay inside the test."""
    root = tmp_path_factory.mktemp("pipeline")
    repo = root / "repo"
    for part in ("workflow", "ript", "config"):
        shutil.copytree(REPO / part, repo / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    work = root / "work"
    cfg = yaml.safe_load((REPO / "config" / "tests.yaml").read_text())
    env = {"PYTHONPATH": str(repo)}  # the copy's `ript` wins over the installed one

    def snake(config, *args, check=True):
        return run_snakemake(work, config, "-s", str(repo / "workflow" / "Snakefile"), *args,
                             check=check, env=env)

    proc = snake(cfg)
    return {"repo": repo, "work": work, "cfg": cfg, "snake": snake, "first": proc}


def test_every_declared_output_exists(pipeline):
    res = pipeline["work"] / "results" / "tests"
    tasks = pipeline["cfg"]["data"]["tasks"]
    expected = [res / "mlflow.json", res / "autoencoder" / "model.pt", res / "prior" / "model.pt",
                res / "ript" / "model.pt", res / "ript" / "metrics.jsonl",
                res / "report" / "index.html", res / "report" / "success.png",
                res / "report" / "ript_curves.png", res / "report" / "sft_losses.png"]
    for policy in ("sft", "ript"):
        expected.append(res / "eval" / policy / "table.csv")
        for t in tasks:
            expected += [res / "data" / f"{t}.hdf5", res / "eval" / policy / t / "summary.json",
                         res / "eval" / policy / t / "episodes.csv"]
    missing = [str(p) for p in expected if not p.exists()]
    assert not missing, missing


def test_report_holds_table_and_figures(pipeline):
    page = (pipeline["work"] / "results" / "tests" / "report" / "index.html").read_text()
    for t in pipeline["cfg"]["data"]["tasks"]:
        assert t in page
    assert "SFT [95 % CI]" in page and "RIPT [95 % CI]" in page and "mean" in page
    for fig in ("success.png", "ript_curves.png", "sft_losses.png"):
        assert f'src="{fig}"' in page
        assert (pipeline["work"] / "results" / "tests" / "report" / fig).stat().st_size > 5000
    assert "Wall time" in page and "ript" in page


def test_mlflow_has_one_run_per_stage_job_with_the_pipeline_tag(pipeline):
    client, runs = mlflow_runs(pipeline["work"] / "results" / "tests" / "mlflow.db", "tests")
    stages = sorted(r.data.tags["stage"] for r in runs)
    n_tasks = len(pipeline["cfg"]["data"]["tasks"])
    assert stages == sorted(["data"] * n_tasks + ["autoencoder", "prior", "ript"]
                            + ["eval-sft"] * n_tasks + ["eval-ript"] * n_tasks)
    assert len({r.data.tags["pipeline_id"] for r in runs}) == 1
    assert all(r.info.status == "FINISHED" for r in runs)
    ript_run = next(r for r in runs if r.data.tags["stage"] == "ript")
    history = client.get_metric_history(ript_run.info.run_id, "train_success")
    assert [m.step for m in history] == [1, 2]  # one point per RIPT iteration


def test_second_run_does_nothing(pipeline):
    proc = pipeline["snake"](pipeline["cfg"])
    assert "Nothing to be done" in proc.stdout + proc.stderr


def _changed(pipeline, edit) -> dict[str, int]:
    cfg = copy.deepcopy(pipeline["cfg"])
    edit(cfg)
    return planned(pipeline["snake"](cfg, "-n"))


def test_ript_setting_reruns_ript_its_evaluation_and_report_only(pipeline):
    jobs = _changed(pipeline, lambda c: c["ript"].update(lr=5e-5))
    n = len(pipeline["cfg"]["data"]["tasks"])
    assert jobs == {"ript": 1, "evaluate": n, "aggregate": 1, "report": 1}


def test_stage0_setting_reruns_stage0_and_everything_after(pipeline):
    jobs = _changed(pipeline, lambda c: c["autoencoder"].update(dropout=0.2))
    n = len(pipeline["cfg"]["data"]["tasks"])
    assert jobs == {"autoencoder": 1, "prior": 1, "ript": 1, "evaluate": 2 * n, "aggregate": 2,
                    "report": 1}


def test_prior_setting_does_not_rerun_stage0(pipeline):
    jobs = _changed(pipeline, lambda c: c["prior"].update(top_k=3))
    assert "autoencoder" not in jobs and jobs["prior"] == 1


def test_report_setting_reruns_only_the_report(pipeline):
    assert _changed(pipeline, lambda c: c["report"].update(dpi=90)) == {"report": 1}


def test_edit_to_ript_code_invalidates_ript(pipeline):
    ppo = pipeline["repo"] / "ript" / "rl" / "ppo.py"
    original = ppo.read_text()
    try:
        ppo.write_text(original + "\n# an edit to the RIPT algorithm\n")
        jobs = planned(pipeline["snake"](pipeline["cfg"], "-n"))
        assert jobs.get("ript") == 1 and "prior" not in jobs and "autoencoder" not in jobs
    finally:
        ppo.write_text(original)


def test_list_changes_names_the_changed_params(pipeline):
    cfg = copy.deepcopy(pipeline["cfg"])
    cfg["ript"]["lr"] = 5e-5
    (pipeline["work"] / "changed.yaml").write_text(yaml.safe_dump(cfg))
    changed = pipeline["snake"](pipeline["work"] / "changed.yaml", "--list-changes", "params")
    same = pipeline["snake"](pipeline["cfg"], "--list-changes", "params")
    # (Snakemake 9 also lists the secondary outputs of multi-output rules every time, so only
    # each rule's first output is a reliable signal.)
    assert "results/tests/ript/model.pt" in changed.stdout.split()
    assert "results/tests/ript/model.pt" not in same.stdout.split()
    assert "results/tests/autoencoder/model.pt" not in changed.stdout.split()


def test_lint_and_format_are_clean():
    snakefile = str(REPO / "workflow" / "Snakefile")
    lint = subprocess.run([str(BIN / "snakemake"), "--lint", "-s", snakefile, "--configfile",
                           str(REPO / "config" / "config.yaml"), "-d", str(REPO)],
                          capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run([str(BIN / "snakefmt"), "--check", str(REPO / "workflow")],
                         capture_output=True, text=True, timeout=120)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_snakemake_report_builds_with_captions(pipeline):
    out = pipeline["work"] / "snakemake_report.html"
    pipeline["snake"](pipeline["cfg"], "--report", str(out))
    text = out.read_text(errors="ignore")
    assert out.stat().st_size > 10_000
    assert "Wilson" in text  # a caption from workflow/report/
