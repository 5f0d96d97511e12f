"""The real workflow through `--workflow-profile workflow/profiles/slurm` on a real SLURM.

tests/slurm/slurm-up.sh brings up a single-node SLURM 22.05 from Debian packages (munge,
slurmctld, slurmd, MariaDB + slurmdbd so that `sacct` works); it is idempotent and needs root
(and apt-get the first time). The node advertises 8 GPUs (device files linked to /dev/null) and
more CPUs and memory than the machine has, so that the profile's unchanged requests (`--gpus`,
`--cpus-per-gpu`, `--mem`) are scheduled; the jobs run on the CPU. slurm-down.sh stops only the
daemons slurm-up.sh started.

The `slurm` extra (the executor plugin, MLflow's basic-auth app) is not part of the base install
(the plugin makes every Snakemake start call `scontrol`): what the venv lacks of it is installed
into a session folder put on PYTHONPATH of the MLflow server and the Snakemake runs only (SLURM
jobs inherit it), and the venv stays as it was.

Jobs log to an authenticated `mlflow server --app-name basic-auth` on 127.0.0.1 started here, as on
a cluster (docs/slurm.md, section 3): its admin password only in an auth config file of mode 600
outside the repository, jobs logging as a pipeline user without admin rights whose credentials
reach them through the environment only (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SNAKEFILE
from mlflow_auth import files_containing, http_status, mlflow_runs

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
# the authenticated MLflow server's session fixtures (and the `slurm` extra's environment)
pytest_plugins = ["mlflow_auth"]

BIN = Path(sys.executable).parent
PROFILE = REPO / "workflow" / "profiles" / "slurm"
SLURM_DIR = REPO / "tests" / "slurm"
# What the CI node advertises (tests/slurm/slurm-up.sh): enough for every request in the profile.
CLUSTER_ENV = {"SLURM_CI_GPUS": "8", "SLURM_CI_CPUS": "64", "SLURM_CI_MEM_MB": "524288"}
RIPT_GPUS = 2  # one RIPT job, two torchrun ranks (gloo on the CPU here)
PARTITION = os.environ.get("SLURM_CI_PARTITION", "debug")

TINY = {
    "seed": 0,
    "data": {"tasks": ["reach-v3"], "demos_per_task": 2, "max_episode_steps": 120},
    "autoencoder": {"d_model": 32, "enc_layers": 1, "dec_layers": 1, "heads": 2, "ffn": 64,
                    "train": {"steps": 40, "batch_size": 32, "checkpoint_every": 10,
                              "log_every": 10}},
    "prior": {"lowdim_keys": ["obs_gt"], "d_model": 32, "layers": 1, "heads": 2, "ffn": 64,
              "train": {"steps": 40, "batch_size": 32, "checkpoint_every": 10,
                        "log_every": 10}},
    "ript": {"iterations": 1, "group_size": 2, "contexts_per_iteration": 2,
             "max_rejected_groups": 2, "ppo_epochs": 1, "minibatch_episodes": 2,
             "max_episode_steps": 40, "n_envs": 2, "n_workers": 0, "eval_every": 1,
             "eval_episodes_per_task": 1},
    "evaluation": {"episodes_per_task": 2, "n_envs": 2, "n_workers": 0, "max_episode_steps": 40},
}


# ------------------------------------------------------------------------------ fixtures
def _alive(pidfile: Path, comm: str) -> bool:
    try:
        pid = int(pidfile.read_text())
        return Path(f"/proc/{pid}/comm").read_text().strip() == comm
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node SLURM; stopped at the end unless it was already up before."""
    if os.geteuid() != 0:
        pytest.skip("starting munge/slurmctld/slurmd/MariaDB needs root")
    if not shutil.which("dpkg-query") or not (shutil.which("apt-get") or shutil.which("sbatch")):
        pytest.skip("needs Debian packages (apt-get) for SLURM 22.05")
    env = {**os.environ, **CLUSTER_ENV}
    rundir = Path(env.get("SLURM_CI_RUNDIR", "/run/ript-slurm-ci"))
    was_up = _alive(rundir / "slurmctld.pid", "slurmctld")
    up = subprocess.run(["bash", str(SLURM_DIR / "slurm-up.sh")], env=env, text=True,
                        capture_output=True, timeout=1200)
    if up.returncode != 0:
        pytest.fail(f"slurm-up.sh failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
    yield
    if not was_up:
        subprocess.run(["bash", str(SLURM_DIR / "slurm-down.sh")], env=env, timeout=300)


@pytest.fixture
def cluster_env(_mlflow_process, slurm_cluster, slurm_extra_env, mlflow_server) -> dict:
    """What a user exports on the login node (docs/slurm.md), pointed at the CI cluster."""
    env = {**os.environ, **slurm_extra_env, "MLFLOW_TRACKING_URI": mlflow_server.uri,
           "MLFLOW_TRACKING_USERNAME": mlflow_server.user,
           "MLFLOW_TRACKING_PASSWORD": mlflow_server.password,
           "SLURM_PARTITION": PARTITION, "RIPT_GPUS": str(RIPT_GPUS)}
    env.pop("SLURM_ACCOUNT", None)
    env.pop("SLURM_GPU_PARTITION", None)
    return env


# ------------------------------------------------------------------------------ helpers
def snakemake_cmd(workdir: Path, *args: str, snakefile: Path = SNAKEFILE,
                  timeout: int = 600) -> list[str]:
    """`snakemake` with the SLURM workflow profile, under `timeout -s INT`: SIGINT makes
    Snakemake cancel its SLURM jobs and exit (SIGTERM does not end a waiting Snakemake)."""
    return ["timeout", "-s", "INT", "-k", "30", str(timeout), str(BIN / "snakemake"),
            "-s", str(snakefile), "-d", str(workdir), "--workflow-profile", str(PROFILE),
            "--slurm-init-seconds-before-status-checks", "1", *args]


def run(cmd: list[str], workdir: Path, env: dict, timeout: int = 660):
    proc = subprocess.run(cmd, cwd=workdir, env=env, text=True, capture_output=True,
                          timeout=timeout)
    (workdir / "snakemake.out").write_text(proc.stdout + proc.stderr)
    return proc


def write_config(workdir: Path, cfg: dict) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def run_uuid(output: str) -> str:
    m = re.search(r"SLURM run ID: (\S+)", output)
    assert m, f"no SLURM run ID in the Snakemake output:\n{output[-3000:]}"
    return m.group(1)


def sacct_jobs(name: str) -> list[dict]:
    """SLURM's accounting of one Snakemake run (its jobs share the job name = run ID)."""
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "--starttime", "now-1days", "--name", name,
         "--format", "JobID,Comment,State,AllocTRES,Partition,Timelimit"],
        check=True, text=True, capture_output=True, timeout=60).stdout
    jobs = []
    for line in out.splitlines():
        jobid, comment, state, tres, partition, limit = line.split("|")
        rule = re.match(r"rule_(\w+?)(_wildcards_.*)?$", comment)
        jobs.append({"id": jobid, "rule": rule.group(1) if rule else comment,
                     "state": state.split()[0], "partition": partition,
                     "minutes": _minutes(limit),
                     "tres": dict(kv.split("=", 1) for kv in tres.split(",") if kv)})
    return sorted(jobs, key=lambda j: int(j["id"]))


def _minutes(limit: str) -> int:
    """SLURM's `[D-]HH:MM:SS` time limit in minutes."""
    days, _, hms = limit.rpartition("-")
    h, m, _s = (int(x) for x in hms.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m


def mem_mb(tres: str) -> float:
    """A TRES memory value (`32000M`, `125G`) in MB, as Snakemake's mem_mb."""
    return float(tres[:-1]) * {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}[tres[-1]]


def rules_run(output: str, local: bool) -> Counter:
    """Jobs of each rule in a Snakemake log: `localrule x:` ran here, `rule x:` was submitted."""
    pattern = r"^localrule (\w+):" if local else r"^rule (\w+):"
    return Counter(re.findall(pattern, output, flags=re.M))


def profile_resources(rule: str) -> dict:
    prof = yaml.safe_load((PROFILE / "config.yaml").read_text())
    return prof.get("set-resources", {}).get(rule, {})


def sbatch_recorder(workdir: Path, env: dict) -> tuple[dict, Path]:
    """`env` with tests/slurm/sbatch-recorder.sh first on PATH as `sbatch`, and the file where
    it records every sbatch command line (and batch script) before running the real sbatch."""
    real = shutil.which("sbatch", path=env.get("PATH"))
    assert real, "no sbatch on PATH"
    shim = workdir / "sbatch-recorder"
    shim.mkdir()
    (shim / "sbatch").symlink_to(SLURM_DIR / "sbatch-recorder.sh")
    log = shim / "calls.txt"
    log.touch()
    return {**env, "PATH": f"{shim}{os.pathsep}{env['PATH']}", "RIPT_CI_SBATCH": real,
            "RIPT_CI_SBATCH_LOG": str(log)}, log


def rule_of_stage(stage: str) -> str:
    return "demos" if stage == "data" else "evaluate" if stage.startswith("eval-") else stage


def log_steps(log: Path, stage: str) -> list[int]:
    """Steps of the `<stage> step N/M` heartbeat lines a batch job writes to its stage log."""
    return [int(m) for m in re.findall(rf"^{stage} step (\d+)/", log.read_text(), flags=re.M)]


# ------------------------------------------------------------------------------ tests
def test_pipeline_runs_through_slurm(tmp_path, cluster_env, mlflow_server):
    exp = unique("slurm")
    cfg = write_config(tmp_path, {"experiment": exp, **TINY})
    # every sbatch command line recorded; SLURM's job logs kept, to be searched below
    env, sbatch_log = sbatch_recorder(tmp_path, cluster_env)
    cmd = snakemake_cmd(tmp_path, "--configfile", str(cfg), "--printshellcmds",
                        "--slurm-keep-successful-logs")
    proc = run(cmd, tmp_path, env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"snakemake failed ({proc.returncode}):\n{out[-6000:]}"

    # Every non-local job went through SLURM: one COMPLETED job per Snakemake job, named by the
    # run ID, the rule in the comment; local rules never reached SLURM.
    jobs = sacct_jobs(run_uuid(out))
    submitted, local = rules_run(out, local=False), rules_run(out, local=True)
    assert {"demos", "autoencoder", "prior"} <= set(submitted), out[-3000:]
    assert "mlflow_init" in local and "mlflow_init" not in submitted
    assert Counter(j["rule"] for j in jobs) == submitted, jobs
    assert all(j["state"] == "COMPLETED" for j in jobs), jobs
    assert all(j["partition"] == PARTITION for j in jobs), jobs  # from $SLURM_PARTITION

    # The profile's per-rule resources reached SLURM (GPUs, CPUs per GPU, memory).
    for j in jobs:
        res = profile_resources(j["rule"])
        if "gpu" not in res:
            assert "gres/gpu" not in j["tres"], j
            continue
        gpus = RIPT_GPUS if j["rule"] == "ript" else int(res["gpu"])
        assert j["tres"]["gres/gpu"] == str(gpus), j
        assert int(j["tres"]["cpu"]) == gpus * int(res["cpus_per_gpu"]), j
        assert mem_mb(j["tres"]["mem"]) == int(res["mem_mb"]), j
    if "ript" in submitted:  # one job, torchrun over its GPUs
        assert re.search(rf"--nproc_per_node[ =]{RIPT_GPUS}\b", out), out[-3000:]

    res = tmp_path / "results" / exp
    for f in ["data/reach-v3.hdf5", "autoencoder/model.pt", "prior/model.pt"]:
        assert (res / f).stat().st_size > 0, f
    if "ript" in submitted:
        assert (res / "ript" / "model.pt").exists()
    assert not list(tmp_path.glob("mlflow.db")) and not (res / "mlflow.db").exists(), \
        "jobs must log to the server, not to a SQLite file"

    # One MLflow run per stage job, on the server, tagged with that job's SLURM id.
    by_id = {j["id"]: j for j in jobs}
    runs = mlflow_runs(mlflow_server, exp)
    tagged = Counter()
    for r in runs:
        job = by_id.get(r.data.tags.get("slurm_job_id"))
        assert job is not None, (r.data.tags, list(by_id))
        assert job["rule"] == rule_of_stage(r.data.tags["stage"]), (r.data.tags, job)
        assert r.info.status == "FINISHED"
        tagged[job["id"]] += 1
    tracked = [j for j in jobs if j["rule"] in {"demos", "autoencoder", "prior", "finetune",
                                                  "ript", "evaluate"}]
    assert all(tagged[j["id"]] == 1 for j in tracked), (tagged, tracked)

    # The server lets in the pipeline's user only: no credentials or a wrong password get 401,
    # another user of the server 403 (default_permission = NO_PERMISSIONS).
    url = f"{mlflow_server.uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name={exp}"
    user = mlflow_server.user
    assert http_status(url, (user, mlflow_server.password)) == 200
    assert http_status(url) == 401
    assert http_status(url, (user, mlflow_server.password[:-1] + "!")) == 401
    assert http_status(url, ("nobody", mlflow_server.password)) == 401
    assert http_status(url, mlflow_server.stranger) == 403

    # The password reached the jobs through their environment only: not on an sbatch command
    # line, in Snakemake's or SLURM's logs, the stage logs, results, or what MLflow stored.
    sbatch = sbatch_log.read_text()
    assert len(re.findall(r"^sbatch .*--job-name", sbatch, flags=re.M)) == len(jobs), sbatch
    assert mlflow_server.password not in sbatch
    assert len(list((tmp_path / ".snakemake" / "slurm_logs").rglob("*.log"))) == len(jobs)
    assert (tmp_path / "logs" / exp).is_dir()
    leaks = [*files_containing(tmp_path, mlflow_server.password),  # the Snakemake working dir
             *files_containing(mlflow_server.dir, mlflow_server.password)]
    assert not leaks, leaks


def test_failing_rule_fails_the_run(tmp_path, cluster_env):
    # --retries 0: the plugin polls ever more slowly after failures (+10 s per poll), and the
    # resubmission after a failure is tested with the profile's retries below.
    cmd = snakemake_cmd(tmp_path, "--retries", "0", snakefile=SLURM_DIR / "failing.smk",
                        timeout=300)
    proc = run(cmd, tmp_path, cluster_env)
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 124, 137), f"rc {proc.returncode}:\n{out[-4000:]}"
    assert "Error in rule broken_stage" in out
    # show-failed-logs: the stage's log, written on the compute node, is in Snakemake's output
    assert re.search(r"^broken_stage: deliberate failure on [^$\s]+$", out, flags=re.M), out
    assert not (tmp_path / "broken" / "done.txt").exists()
    jobs = sacct_jobs(run_uuid(out))
    assert [(j["rule"], j["state"]) for j in jobs] == [("broken_stage", "FAILED")]


def test_cancelled_training_job_is_resubmitted_and_resumes(tmp_path, cluster_env,
                                                          mlflow_server):
    import torch

    steps, every = 200, 10
    exp = unique("slurm_resume")
    cfg = {"experiment": exp, **TINY}
    cfg["autoencoder"] = {**cfg["autoencoder"], "train": {
        "steps": steps, "batch_size": 32, "checkpoint_every": every, "log_every": every}}
    cfgfile = write_config(tmp_path, cfg)
    res = tmp_path / "results" / exp
    target = res / "autoencoder" / "model.pt"
    latest = res / "autoencoder" / "ckpt" / "latest.pt"
    out_file = tmp_path / "snakemake.out"
    with open(out_file, "w") as out:
        cmd = snakemake_cmd(tmp_path, str(target.relative_to(tmp_path)),
                            "--configfile", str(cfgfile))
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=cluster_env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            # wait for the first checkpoint, then cancel the job as a walltime kill would
            deadline = time.time() + 300
            while not latest.exists():
                assert proc.poll() is None, out_file.read_text()[-4000:]
                assert time.time() < deadline, "no checkpoint after 300 s"
                time.sleep(0.1)
            job = _running_job(tmp_path, "rule_autoencoder")
            saved = torch.load(latest, map_location="cpu", weights_only=False)["step"]
            subprocess.run(["scancel", job], timeout=30)
            assert 0 < saved < steps, "the job ended before it could be cancelled"
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=60)
    text = out_file.read_text()
    assert rc == 0, f"snakemake failed ({rc}):\n{text[-6000:]}"

    # SLURM: the cancelled job, then a resubmitted one that completed
    ae = [j for j in sacct_jobs(run_uuid(text)) if j["rule"] == "autoencoder"]
    assert [j["id"] for j in ae][0] == job
    assert [j["state"] for j in ae] == ["CANCELLED", "COMPLETED"], ae
    assert ae[1]["minutes"] == 2 * ae[0]["minutes"], ae  # the profile's runtime x attempt
    assert target.exists()

    # The second job resumed from the checkpoint: its log starts after the saved step, and the
    # metrics are one continuous curve (no step twice, none missing).
    resumed = log_steps(tmp_path / "logs" / exp / "autoencoder.log", "autoencoder")
    assert resumed and resumed[0] > saved and resumed[-1] == steps, (saved, resumed)
    metrics = [json.loads(line)["step"] for line in
               (res / "autoencoder" / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(every, steps + 1, every))

    # One MLflow run for the stage, carried over and re-tagged by the resumed job
    runs = [r for r in mlflow_runs(mlflow_server, exp) if r.data.tags["stage"] == "autoencoder"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["slurm_job_id"] == ae[1]["id"]


def _running_job(workdir: Path, comment: str, timeout: float = 60) -> str:
    """The SLURM id of the job with this comment started from `workdir`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-o", "%i|%k|%Z"], text=True,
                             capture_output=True, timeout=30).stdout
        for line in out.splitlines():
            jobid, kcomment, wd = line.split("|")
            if kcomment == comment and Path(wd) == workdir:
                return jobid
        time.sleep(0.2)
    raise AssertionError(f"no running job {comment} from {workdir}")
