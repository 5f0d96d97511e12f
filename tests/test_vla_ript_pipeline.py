"""RIPT on a CPU-sized OpenVLA-OFT through the real DAG (issue #15): config/metaworld_oft.yaml
at toy size, from the root of a repository copy as the README runs it. Real MetaWorld with
64→32 px renders, real HDF5, the real checkpoint writer and loader, the MLflow store, Snakemake.

data → vla_sft (from scratch) → scale_head → RIPT (LoRA + L1 head) → evaluation → report; then a
second `snakemake` with nothing changed runs nothing, and one with a changed scale-head config
re-runs the scale head and everything after it, not the SFT stage.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from conftest import REPO, copy_repo, mlflow_runs, snakemake_in
from ript.tracking import read_jsonl
from ript.train import checkpoint as ckpt
from ript.vla.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

TASKS = ["reach-v3", "button-press-topdown-v3"]


def toy_config() -> dict:
    cfg = yaml.safe_load((REPO / "config" / "metaworld_oft.yaml").read_text())
    cfg["experiment"] = "toy_oft"
    cfg["data"].update(tasks=TASKS, demos_per_task=2, max_episode_steps=80, image_size=32)
    cfg["vla_sft"].update(image_size=32, train={"steps": 40, "batch_size": 32, "lr": 1e-3,
                                                "lr_min": 1e-4, "log_every": 10,
                                                "checkpoint_every": 20})
    cfg["scale_head"]["train"] = {"steps": 30, "batch_size": 32, "lr": 3e-3, "lr_min": 3e-4,
                                  "log_every": 10, "checkpoint_every": 10}
    cfg["ript"].update(iterations=2, group_size=4, contexts_per_iteration=2,
                       max_rejected_groups=2, dynamic_sampling=False, max_episode_steps=40,
                       n_envs=8, eval_every=2, eval_episodes_per_task=2, lora_rank=4)
    cfg["evaluation"].update(episodes_per_task=3, n_envs=6, max_episode_steps=40)
    cfg["report"]["title"] = "toy OFT RIPT"
    return cfg


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("oft_repo"))
    (repo / "config" / "toy_oft.yaml").write_text(yaml.safe_dump(toy_config()))
    snakemake_in(repo, "--configfile", "config/toy_oft.yaml", timeout=1800)
    return repo, repo / "results" / "toy_oft"


def test_the_whole_chain_runs_and_is_recorded(ran):
    repo, res = ran
    # the scratch model is an official-layout folder the released checkpoints' loader reads
    manifest = json.loads((res / "vla_sft" / "manifest.json").read_text())
    vla = load_checkpoint(repo / manifest["folder"], adapter=None)
    assert vla.family == "openvla_oft" and vla.model.action_dim == 4
    assert (vla.model.chunk, vla.model.proprio_dim, vla.image.size) == (8, 39, 32)
    # SFT learned: the L1 loss fell
    sft = read_jsonl(res / "vla_sft" / "metrics.jsonl")
    assert sft[-1]["loss"] < sft[0]["loss"]
    # the scale head learned: b moved up from its initial e^-3 towards the L1 error, and the NLL
    # is far below the initial head's, Σ_d (−3 + |a−μ|·e³ + ln 2) at the logged mean |a−μ|
    last = read_jsonl(res / "scale_head" / "metrics.jsonl")[-1]
    assert last["mean_log_b"] > -2.5
    assert last["loss"] < 0.5 * 4 * (-3 + last["l1"] * math.exp(3) + math.log(2))
    state = torch.load(res / "scale_head" / "scale_header.pth", weights_only=True)
    assert set(state) == {"scale_trunk", "log_b_head"}
    # RIPT: every iteration logged, a policy file with LoRA + heads only, the scale head frozen
    rows = read_jsonl(res / "ript" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["groups_kept"] >= 1 and r["n_minibatches"] >= 1 for r in rows[1:])
    payload = ckpt.load(res / "ript" / "model.pt")
    assert payload["family"] == "openvla_oft"
    assert {k.split(".")[0] for k in payload["state_dict"]} == {"lora", "action_head",
                                                                "scale_head"}
    released = {f"scale_head.{part}.{k}": v for part, sd in state.items() for k, v in sd.items()}
    for k, v in released.items():
        key = k.replace("scale_trunk", "trunk")
        assert torch.equal(payload["state_dict"][key], v), k
    # both policies evaluated on every task, reported with the losses and RIPT curves
    for policy in ("sft", "ript"):
        for task in TASKS:
            s = json.loads((res / "eval" / policy / task / "summary.json").read_text())
            assert s["episodes"] == 3 and s["errors"] == 0
    report = json.loads((res / "report" / "summary.json").read_text())
    assert report["ript"] is not None and report["lift_points"] is not None
    assert (res / "report" / "ript_curves.png").stat().st_size > 0
    assert (res / "report" / "sft_losses.png").stat().st_size > 0
    page = (res / "report" / "index.html").read_text()
    assert "toy OFT RIPT" in page and "SFT" in page
    _, runs = mlflow_runs(res / "mlflow.db", "toy_oft")
    stages = {r.data.tags.get("stage") for r in runs}
    assert {"vla-sft", "scale-head", "ript", "eval-sft", "eval-ript"} <= stages, stages
    assert not (res / "autoencoder").exists() and not (res / "checkpoint").exists()


def test_rerun_is_a_no_op_and_a_scale_head_change_reruns_only_downstream(ran):
    repo, res = ran
    before = {p: p.stat().st_mtime_ns for p in (res / "vla_sft" / "manifest.json",
                                                 res / "ript" / "model.pt")}
    proc = snakemake_in(repo, "--configfile", "config/toy_oft.yaml", timeout=600)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    cfg = toy_config()
    cfg["scale_head"]["train"]["steps"] = 20
    (repo / "config" / "toy_oft.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake_in(repo, "--configfile", "config/toy_oft.yaml", "-n", timeout=600)
    out = proc.stdout + proc.stderr
    assert "scale_head" in out and "ript" in out and "vla_sft" not in out.split("Job stats")[-1]
