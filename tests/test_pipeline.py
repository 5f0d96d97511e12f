"""The whole DAG on the tiny `config/tests.yaml`: real simulator, training, MLflow, Snakemake.

Also checks that only invalidated stages re-run (issue: re-run only what changed).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from ript.tracking import read_jsonl
from ript.train import checkpoint as ckpt

from conftest import BIN, REPO, copy_repo, mlflow_runs, snakemake_in

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
    """The README's test-config command run from the root of a private copy of the repository
    (so code edits stay inside the test): `snakemake --configfile config/tests.yaml`."""
    repo = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    cfg = yaml.safe_load((repo / "config" / "tests.yaml").read_text())

    def snake(config=None, *args, check=True):
        """`snakemake ARGS --configfile config/tests.yaml`, or a changed whole config."""
        path = "config/tests.yaml"
        if isinstance(config, dict):
            (repo / "changed.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            path = "changed.yaml"
        elif config is not None:
            path = str(config)
        return snakemake_in(repo, *args, "--configfile", path, check=check)

    proc = snake()
    return {"repo": repo, "work": repo, "cfg": cfg, "snake": snake, "first": proc}


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
    assert page.count('src="data:image/png;base64,') == 3  # embedded: one self-contained page
    for fig in ("success.png", "ript_curves.png", "sft_losses.png"):
        assert f'href="{fig}"' in page
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
    # one point per RIPT iteration
    assert [m.step for m in history] == list(range(1, pipeline["cfg"]["ript"]["iterations"] + 1))


def test_second_run_does_nothing(pipeline):
    proc = pipeline["snake"]()
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
        jobs = planned(pipeline["snake"](None, "-n"))
        assert jobs.get("ript") == 1 and "prior" not in jobs and "autoencoder" not in jobs
    finally:
        ppo.write_text(original)


def test_list_changes_names_the_changed_params(pipeline):
    cfg = copy.deepcopy(pipeline["cfg"])
    cfg["ript"]["lr"] = 5e-5
    changed = pipeline["snake"](cfg, "--list-changes", "params")
    same = pipeline["snake"](None, "--list-changes", "params")
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
    """`snakemake --report report.zip` (README), with the captions of workflow/report/."""
    out = pipeline["work"] / "report.zip"
    pipeline["snake"](None, "--report", str(out))
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
        text = z.read("report/report.html").decode(errors="ignore")
        page = z.read(next(n for n in names if n.endswith("/index.html"))).decode()
    assert {n.rsplit("/", 1)[-1] for n in names} >= {"report.html", "index.html", "success.png",
                                                     "ript_curves.png", "sft_losses.png"}
    assert "Wilson" in text  # a caption from workflow/report/
    assert page.count('src="data:image/png;base64,') == 3  # the page's images travel with it
    # a fresh install can build it: snakemake's `reports` extra (pygments) is a dependency
    assert any(r.replace(" ", "").startswith("snakemake[reports]")
               for r in importlib.metadata.requires("ript"))


# --- Real re-runs (issue #12): each executes the re-run and compares its outputs. They run in
# this order, after the dry-run tests above, on the same copy. -------------------------------


def _res(pipeline) -> Path:
    return pipeline["repo"] / "results" / "tests"


def _models(pipeline) -> dict[str, str]:
    """sha256 of every model file of the experiment."""
    return {str(p.relative_to(_res(pipeline))): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(_res(pipeline).glob("*/model.pt"))}


def _ran(proc) -> dict[str, int]:
    """Jobs per rule that a real run executed (its 'Job stats' table)."""
    return planned(proc)


def _ript_log(pipeline) -> str:
    return (pipeline["repo"] / "logs" / "tests" / "ript.log").read_text()


def test_toy_ript_keeps_groups_and_steps_in_every_iteration(pipeline):
    rows = read_jsonl(_res(pipeline) / "ript" / "metrics.jsonl")
    iterations = [r for r in rows if r["step"] >= 1]
    assert [r["step"] for r in iterations] == list(range(1, pipeline["cfg"]["ript"]["iterations"]
                                                         + 1))
    for r in iterations:
        assert r["groups_kept"] >= 1, r
        assert r["n_minibatches"] - r["n_steps_skipped"] >= 1, r  # PPO took optimizer steps
        assert r["initial_ratio_dev"] < 1e-4, r
    sft = ckpt.load(_res(pipeline) / "prior" / "model.pt")["state_dict"]
    rl = ckpt.load(_res(pipeline) / "ript" / "model.pt")["state_dict"]
    assert any(not torch.equal(sft[k], rl[k]) for k in sft), "RIPT did not move the prior"
    pipeline["reference"] = _models(pipeline)


def _kill_ript_mid_run(pipeline) -> int:
    """The RIPT job killed in a run that has not reached it before: with RIPT's outputs and
    everything after them gone, `snakemake --configfile config/tests.yaml`, then kill -9 of the
    RIPT job (stage and env workers) once it has checkpointed an iteration; returns that
    iteration. (Snakemake would not re-run a killed `--forcerun` job whose downstream outputs
    still exist: missing intermediate outputs do not trigger jobs.)"""
    repo = pipeline["repo"]
    for d in ("ript", "eval/ript", "report"):
        shutil.rmtree(_res(pipeline) / d)
    latest = _res(pipeline) / "ript" / "ckpt" / "latest.pt"
    proc = subprocess.Popen([str(BIN / "snakemake"), "--configfile", "config/tests.yaml"],
                            cwd=repo, stdout=subprocess.DEVNULL, start_new_session=True,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    iteration, deadline = 0, time.time() + 300
    try:
        while iteration < 1 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
            if latest.exists():
                iteration = ckpt.load(latest)["iteration"]
        # only this run's RIPT job: its own session (never a user's pipeline on this machine)
        pids = subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "ript[.]rl[.]ript --init"],
                              capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        assert proc.wait(timeout=120) != 0, "the RIPT job finished before it could be killed"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 1 <= iteration < pipeline["cfg"]["ript"]["iterations"] and pids
    assert latest.exists() and not (_res(pipeline) / "ript" / "model.pt").exists()
    return iteration


def test_kill_9_mid_ript_then_rerun_resumes_bit_identical(pipeline):
    killed_at = _kill_ript_mid_run(pipeline)
    proc = pipeline["snake"]()
    assert _ran(proc)["ript"] == 1 and "prior" not in _ran(proc)
    log = _ript_log(pipeline)
    assert f"resuming after iteration {killed_at} of" in log
    assert _models(pipeline) == pipeline["reference"]  # bit-identical final model
    assert not (_res(pipeline) / "ript" / "ckpt" / "latest.pt").exists()


def test_code_edit_under_rl_starts_ript_afresh_despite_a_checkpoint(pipeline):
    _kill_ript_mid_run(pipeline)  # leaves a checkpoint of the unedited code
    ppo = pipeline["repo"] / "ript" / "rl" / "ppo.py"
    ppo.write_text(ppo.read_text() + "\n# an edit to the RIPT algorithm\n")  # kept: copy only
    proc = pipeline["snake"]()
    assert _ran(proc)["ript"] == 1
    log = _ript_log(pipeline)
    assert "differs in: code" in log and "resuming" not in log
    assert "ript iteration 1:" in log
    # a fresh run of the same maths with the same seed: the reference model again
    assert _models(pipeline) == pipeline["reference"]


def test_edit_to_evaluation_code_reruns_only_evaluations_and_report(pipeline):
    before = {p: p.stat().st_mtime_ns for p in _res(pipeline).glob("*/model.pt")}
    ev = pipeline["repo"] / "ript" / "evaluate.py"
    ev.write_text(ev.read_text() + "\n# an edit to evaluation only\n")
    proc = pipeline["snake"]()
    n = len(pipeline["cfg"]["data"]["tasks"])
    assert _ran(proc) == {"evaluate": 2 * n, "aggregate": 2, "report": 1}
    assert _models(pipeline) == pipeline["reference"]
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_prior_change_reruns_ript_from_iteration_1_on_the_new_prior(pipeline):
    overlay = pipeline["repo"] / "lr.yaml"
    overlay.write_text("prior:\n  train:\n    lr: 5.0e-4\n")
    proc = snakemake_in(pipeline["repo"], "--configfile", "config/tests.yaml", "lr.yaml")
    assert {"prior", "ript"} <= set(_ran(proc)) and "autoencoder" not in _ran(proc)
    log = _ript_log(pipeline)
    assert "resuming" not in log
    for it in range(1, pipeline["cfg"]["ript"]["iterations"] + 1):
        assert f"ript iteration {it}:" in log
    models = _models(pipeline)
    assert models["autoencoder/model.pt"] == pipeline["reference"]["autoencoder/model.pt"]
    assert models["prior/model.pt"] != pipeline["reference"]["prior/model.pt"]
    assert models["ript/model.pt"] != pipeline["reference"]["ript/model.pt"]
