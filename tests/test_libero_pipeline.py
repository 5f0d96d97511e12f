"""The LIBERO path of the DAG end to end at toy size on CPU (spec §2.1-2.3, §5.2, §6).

Data: an official-layout HDF5 file recorded here from real LIBERO episodes (conftest
`libero_raw_dir`), verified and subset by the data stage; task embeddings from the packaged
offline sentence encoder; stages 0-1 with both 128×128 cameras and the low-dim keys of spec §4.1;
one RIPT iteration with K = 2 from the demos' initial states; a few rendered evaluation steps.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from conftest import LIBERO_SUITE, libero_task_name, mlflow_runs, run_snakemake

pytestmark = pytest.mark.slow

TINY = {"d_model": 32, "heads": 2, "ffn": 64}
TRAIN = {"steps": 4, "batch_size": 8, "lr": 1.0e-3, "lr_min": 1.0e-4, "log_every": 2,
         "checkpoint_every": 2}


@pytest.fixture(scope="module")
def libero_run(tmp_path_factory, libero_raw_dir):
    work = tmp_path_factory.mktemp("libero_dag")
    task = libero_task_name()
    cfg = {
        "experiment": "libero_tiny", "seed": 0,
        "data": {"benchmark": "libero", "suite": LIBERO_SUITE, "tasks": [task],
                 "demos_per_task": 2, "raw_dir": str(libero_raw_dir), "download": False},
        "autoencoder": {**TINY, "enc_layers": 1, "dec_layers": 1, "chunk_size": 8,
                        "downsample": 2, "codebook_size": 64, "train": TRAIN},
        "prior": {**TINY, "layers": 1, "lowdim_width": 8, "image_width": 16,
                  "action_horizon": 4, "lowdim_keys": ["joint_states", "ee_pos",
                                                       "gripper_states"],
                  "rgb_keys": ["agentview_rgb", "eye_in_hand_rgb"], "train": TRAIN},
        "finetune": {"enabled": False},
        "ript": {"iterations": 1, "group_size": 2, "contexts_per_iteration": 1,
                 "max_rejected_groups": 1, "ppo_epochs": 1, "minibatch_episodes": 2,
                 "lr": 1.0e-4, "max_episode_steps": 8, "n_envs": 2, "n_workers": 1,
                 "eval_every": 1, "eval_episodes_per_task": 1},
        "evaluation": {"episodes_per_task": 2, "n_envs": 2, "n_workers": 1,
                       "max_episode_steps": 8},
        "report": {"title": "LIBERO toy run"},
    }
    proc = run_snakemake(work, cfg, timeout=1500)
    return {"work": work, "res": work / "results" / "libero_tiny", "task": task, "proc": proc,
            "raw": libero_raw_dir}


def test_data_stage_takes_the_few_shot_subset_with_init_states(libero_run):
    res, task = libero_run["res"], libero_run["task"]
    raw = libero_run["raw"] / LIBERO_SUITE / f"{task}_demo.hdf5"
    with h5py.File(res / "data" / f"{task}.hdf5") as f, h5py.File(raw) as src:
        assert sorted(f["data"]) == ["demo_0", "demo_1"]
        # 2 of 3 demos, evenly spaced (spec §2.2): source demos 0 and 2
        assert json.loads(f["data"].attrs["source_demos_json"]) == [0, 2]
        for i, s in ((0, 0), (1, 2)):
            np.testing.assert_array_equal(f[f"data/demo_{i}"].attrs["init_state"],
                                          src[f"data/demo_{s}/states"][0])


def test_policy_carries_the_language_embedding_of_its_task(libero_run):
    res = libero_run["res"]
    from ript.data.language import read_embeddings

    emb = read_embeddings(res / "embeddings" / f"{LIBERO_SUITE}.npz")
    assert len(emb["names"]) == 10 and emb["embeddings"].shape == (10, 384)
    ckpt = torch.load(res / "prior" / "model.pt", weights_only=False)
    enc = ckpt["arch"]["obs_encoder"]
    assert enc["task_names"] == emb["names"] and enc["task_emb_dim"] == 384
    assert enc["rgb_keys"] == ["agentview_rgb", "eye_in_hand_rgb"]
    table = ckpt["state_dict"]["obs_encoder.task_embeddings"]
    np.testing.assert_array_equal(table.numpy(), emb["embeddings"])
    assert ckpt["meta"]["data"]["suite"] == LIBERO_SUITE


def test_ript_iteration_and_evaluation_ran_in_libero(libero_run):
    res, task = libero_run["res"], libero_run["task"]
    rows = [json.loads(line) for line in (res / "ript" / "metrics.jsonl").read_text().splitlines()]
    it1 = next(r for r in rows if r["step"] == 1)
    assert it1["episodes"] >= 2 and it1["env_steps"] >= 2  # one group of K = 2 at least
    assert "eval_success" in it1
    for policy in ("sft", "ript"):
        s = json.loads((res / "eval" / policy / task / "summary.json").read_text())
        assert s["episodes"] == 2 and s["errors"] == 0 and 1 <= s["mean_length"] <= 8
        assert s["variants"] == [0, 1]  # the benchmark's fixed init states, in order (spec §6)
    client, runs = mlflow_runs(res / "mlflow.db", "libero_tiny")
    stages = {r.data.tags.get("stage") for r in runs}
    assert {"data", "autoencoder", "prior", "ript", "eval-sft", "eval-ript"} <= stages
    assert (res / "report" / "index.html").exists()
