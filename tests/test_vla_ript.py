"""RIPT on a CPU-sized OpenVLA-OFT through the stage CLIs on real MetaWorld (issue #15):
the scratch SFT stage and the scale-head stage build the policy, then RIPT is killed with
SIGKILL mid-run and resumed, and must end bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ript.config import from_dict
from ript.data.metaworld_demos import DataConfig, generate
from ript.tracking import read_jsonl
from ript.train import checkpoint as ckpt

pytestmark = pytest.mark.slow

TASK = "reach-v3"
SIZE = 32
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(module: str, *args: str, timeout: int = 900) -> None:
    subprocess.run([sys.executable, "-m", module, *args], check=True, capture_output=True,
                   env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """Demos with 32 px renders → a scratch OFT (stage vla_sft) → its scale head."""
    d = tmp_path_factory.mktemp("oft")
    cfg = from_dict(DataConfig, {"tasks": [TASK], "demos_per_task": 3, "max_episode_steps": 80,
                                 "image": True, "image_size": SIZE})
    data = d / f"{TASK}.hdf5"
    generate(TASK, cfg, seed=0, out=data)
    common = ["--benchmark", "metaworld", "--no-center-crop", "--experiment-dir", str(d),
              "--no-mlflow", "--data", str(data)]
    train = {"steps": 60, "batch_size": 32, "lr": 1e-3, "lr_min": 1e-4, "log_every": 20,
             "checkpoint_every": 30}
    _cli("ript.vla.sft", "--config", json.dumps({"image_size": SIZE, "train": train}),
         "--out", str(d / "sft" / "manifest.json"), "--metrics", str(d / "sft" / "m.jsonl"),
         *common)
    _cli("ript.vla.scale_head", "--checkpoint", str(d / "sft" / "manifest.json"),
         "--config", json.dumps({"train": {**train, "steps": 30}}),
         "--out", str(d / "head" / "scale_header.pth"), "--metrics", str(d / "head" / "m.jsonl"),
         *common)
    return d, data


RIPT = {"contexts": "train_variants", "iterations": 3, "group_size": 4,
        "contexts_per_iteration": 2, "max_rejected_groups": 2, "dynamic_sampling": False,
        "ppo_epochs": 1, "minibatch_episodes": 2, "lr": 1e-3, "head_lr": 1e-3,
        "max_episode_steps": 32, "n_envs": 8, "n_workers": 1, "eval_every": 3,
        "eval_episodes_per_task": 2, "lora_rank": 4, "scale_factor": 3.0}


def _ript_cmd(d: Path, data: Path, out: Path) -> list[str]:
    vla = {"family": "openvla_oft", "benchmark": "metaworld", "suite": None, "center_crop": False}
    return [sys.executable, "-m", "ript.rl.ript", "--init", str(d / "sft" / "manifest.json"),
            "--vla", json.dumps(vla), "--scale-head", str(d / "head" / "scale_header.pth"),
            "--data", str(data), "--config", json.dumps(RIPT), "--out", str(out),
            "--metrics", str(out.with_suffix(".jsonl")), "--experiment-dir", str(out.parent),
            "--no-mlflow", "--seed", "3"]


def test_kill_and_resume_reproduces_the_uninterrupted_run(policy, tmp_path):
    d, data = policy
    straight = tmp_path / "straight" / "model.pt"
    subprocess.run(_ript_cmd(d, data, straight), check=True, capture_output=True, env=ENV,
                   timeout=900)
    killed = tmp_path / "killed" / "model.pt"
    proc = subprocess.Popen(_ript_cmd(d, data, killed), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    latest = killed.parent / "ckpt" / "latest.pt"
    deadline = time.time() + 900
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the stage and its env workers, at once
    proc.wait()
    assert not killed.exists(), "finished before it could be killed"
    assert 1 <= ckpt.load(latest)["iteration"] < RIPT["iterations"]
    subprocess.run(_ript_cmd(d, data, killed), check=True, capture_output=True, env=ENV,
                   timeout=900)
    a, b = ckpt.load(straight)["state_dict"], ckpt.load(killed)["state_dict"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the weights RIPT trains moved (LoRA B starts at 0), the frozen scale head did not
    first = torch.load(d / "head" / "scale_header.pth", weights_only=True)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    assert torch.equal(a["scale_head.log_b_head.weight"], first["log_b_head"]["weight"])
    rows_a = read_jsonl(straight.with_suffix(".jsonl"))
    rows_b = read_jsonl(killed.with_suffix(".jsonl"))
    assert [r["step"] for r in rows_b] == [0, 1, 2, 3]
    for ra, rb in zip(rows_a, rows_b):  # the same rollouts and updates, not only end weights
        for k in ("train_success", "env_steps", "groups_kept", "loss", "grad_norm",
                  "eval_success"):
            if k in ra:
                assert ra[k] == rb[k] or (ra[k] != ra[k] and rb[k] != rb[k]), (k, ra, rb)
