"""QueST stages 0-2 through their real CLI on real demonstrations: learning, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ript.config import from_dict
from ript.data.metaworld_demos import DataConfig, generate, write_demos
from ript.tracking import read_jsonl
from ript.policy import load_policy
from ript.train import checkpoint as ckpt
from ript.train.sft import main

TINY_AE = {"d_model": 32, "enc_layers": 1, "dec_layers": 1, "heads": 2, "ffn": 64}
TINY_PRIOR = {"lowdim_keys": ["obs_gt"], "d_model": 32, "layers": 1, "heads": 2, "ffn": 64}


def _train(steps, **kw):
    return {"steps": steps, "batch_size": 32, "lr": 1e-3, "lr_min": 1e-4, "log_every": 10,
            "checkpoint_every": 10, **kw}


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    d = tmp_path_factory.mktemp("demos")
    cfg = from_dict(DataConfig, {"tasks": ["reach-v3", "drawer-close-v3"], "demos_per_task": 3,
                                 "max_episode_steps": 150})
    files = []
    for task in cfg.tasks:
        generate(task, cfg, seed=0, out=d / f"{task}.hdf5")
        files.append(str(d / f"{task}.hdf5"))
    return files


def _cli(stage, files, out: Path, cfg, init=None, extra=()):
    args = ["--stage", str(stage), "--data", *files, "--config", json.dumps(cfg),
            "--out", str(out), "--metrics", str(out.with_suffix(".jsonl")),
            "--experiment-dir", str(out.parent), "--no-mlflow", *extra]
    if init:
        args += ["--init", str(init)]
    return args


@pytest.fixture(scope="module")
def stage0(demos, tmp_path_factory):
    out = tmp_path_factory.mktemp("s0") / "model.pt"
    main(_cli(0, demos, out, {**TINY_AE, "train": _train(150)}))
    return out


def test_stage0_reconstruction_loss_falls(stage0):
    rows = read_jsonl(stage0.with_suffix(".jsonl"))
    assert rows[-1]["step"] == 150
    assert rows[-1]["recon_l1"] < 0.6 * rows[0]["recon_l1"]
    model = ckpt.load(stage0)
    assert model["kind"] == "autoencoder" and model["arch"]["action_dim"] == 4


def test_bf16_precision_autocasts_and_learns_like_fp32(demos, stage0, tmp_path, monkeypatch):
    from ript.models import autoencoder

    seen = []  # the autocast dtype each stage-0 loss ran under (None: no autocast)
    loss = autoencoder.SkillVAE.loss

    def recording_loss(self, *args):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return loss(self, *args)

    monkeypatch.setattr(autoencoder.SkillVAE, "loss", recording_loss)
    out = tmp_path / "bf16.pt"
    main(_cli(0, demos, out, {**TINY_AE, "train": _train(150, precision="bf16")}))
    assert seen and set(seen) == {torch.bfloat16}
    rows, ref = read_jsonl(out.with_suffix(".jsonl")), read_jsonl(stage0.with_suffix(".jsonl"))
    assert rows[-1]["recon_l1"] < 0.6 * rows[0]["recon_l1"]
    assert rows[-1]["recon_l1"] < 1.2 * ref[-1]["recon_l1"]  # the fp32 run of the same data
    # weights and the file stay fp32
    assert all(v.dtype != torch.bfloat16 for v in ckpt.load(out)["state_dict"].values())


def test_stage1_ce_falls_and_autoencoder_stays_frozen(demos, stage0, tmp_path):
    out = tmp_path / "prior.pt"
    main(_cli(1, demos, out, {**TINY_PRIOR, "train": _train(150)}, init=stage0))
    rows = read_jsonl(out.with_suffix(".jsonl"))
    assert rows[-1]["ce"] < 0.7 * rows[0]["ce"]
    policy, meta = load_policy(out)
    ae = ckpt.load(stage0)["state_dict"]
    for k, v in policy.autoencoder.state_dict().items():
        assert torch.equal(v, ae[k]), f"stage 1 changed the frozen autoencoder ({k})"
    assert meta["obs_keys"] == ["obs_gt"] and meta["data"]["tasks"] == ["reach-v3",
                                                                          "drawer-close-v3"]
    # stage 2: the decoder moves, the encoder does not
    ft = tmp_path / "finetune.pt"
    main(_cli(2, demos, ft, {"enabled": True, "l1_weight": 10.0, "train": _train(20)}, init=out))
    before, after = ckpt.load(out)["state_dict"], ckpt.load(ft)["state_dict"]
    changed = {k.split(".")[1] for k in before
               if k.startswith("autoencoder.") and not torch.equal(before[k], after[k])}
    assert changed == {"decoder"}


def test_resume_after_kill_equals_uninterrupted_run(demos, tmp_path):
    cfg = {**TINY_AE, "train": _train(240, checkpoint_every=20)}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads, same float summation order

    def cmd(out):
        return [sys.executable, "-m", "ript.train.sft", *_cli(0, demos, out, cfg)]

    straight = tmp_path / "straight" / "model.pt"
    subprocess.run(cmd(straight), check=True, capture_output=True, env=env)
    killed = tmp_path / "killed" / "model.pt"
    proc = subprocess.Popen(cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    latest = killed.parent / "ckpt" / "latest.pt"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not killed.exists(), "the run finished before it could be killed"
    step_at_kill = ckpt.load(latest)["step"]
    assert 0 < step_at_kill < 240
    subprocess.run(cmd(killed), check=True, capture_output=True, env=env)  # resumes
    a, b = ckpt.load(straight)["state_dict"], ckpt.load(killed)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = read_jsonl(killed.with_suffix(".jsonl"))
    assert [r["step"] for r in rows] == list(range(10, 241, 10))  # one continuous curve


def test_finished_stage_leaves_no_resume_state(demos, tmp_path):
    out = tmp_path / "model.pt"
    main(_cli(0, demos, out, {**TINY_AE, "train": _train(20)}))
    assert out.exists() and not (tmp_path / "ckpt" / "latest.pt").exists()


def test_resume_only_into_the_same_job(demos, stage0, tmp_path, monkeypatch):
    """A checkpoint left by an interrupted job (simulated: the stage stops between its last
    checkpoint and clearing it) resumes only into a job with the same config, inputs (by
    content) and code; otherwise it is ignored with a warning naming what differed."""
    out = tmp_path / "prior" / "model.pt"
    latest = out.parent / "ckpt" / "latest.pt"
    init = tmp_path / "autoencoder" / "model.pt"
    init.parent.mkdir()
    init.write_bytes(stage0.read_bytes())
    cfg = {**TINY_PRIOR, "train": _train(20)}
    original = ("--code-hash", "original")
    monkeypatch.setattr(ckpt, "clear_resume_state", lambda d: None)  # "killed" after saving

    def interrupted_original_job():
        init.write_bytes(stage0.read_bytes())
        main(_cli(1, demos, out, cfg, init=init, extra=original))
        assert ckpt.load(latest)["step"] == 20

    def other_autoencoder():
        # same shape, same file size, other weights: what a re-run stage 0 writes (the bug
        # where RIPT resumed from a checkpoint of the previous prior)
        payload = ckpt.load(stage0)
        payload["state_dict"] = {k: v + 1e-3 if v.is_floating_point() else v
                                 for k, v in payload["state_dict"].items()}
        ckpt.save(init, payload)
        assert init.stat().st_size == stage0.stat().st_size
        return cfg, original

    for what, change in (("config", lambda: ({**cfg, "dropout": 0.2}, original)),
                         (f"input {init}", other_autoencoder),
                         ("code", lambda: (cfg, ("--code-hash", "edited")))):
        interrupted_original_job()
        new_cfg, code = change()
        with pytest.warns(UserWarning, match=f"differs in: {what}"):
            main(_cli(1, demos, out, new_cfg, init=init, extra=code))
        # started afresh: a whole curve from step 10, not a resumed tail
        assert [r["step"] for r in read_jsonl(out.with_suffix(".jsonl"))] == [10, 20]
    interrupted_original_job()
    proc = subprocess.run([sys.executable, "-m", "ript.train.sft",
                           *_cli(1, demos, out, cfg, init=init, extra=original)],
                          capture_output=True, text=True, check=True)
    assert "resuming from step 20 of 20" in proc.stdout  # the same job resumes, and says so
    assert not latest.exists()  # (the subprocess is not monkeypatched: it cleared its state)


def test_wrong_action_dim_and_architecture_are_named(demos, stage0, tmp_path):
    bad = ckpt.load(stage0)
    bad["arch"] = {**bad["arch"], "action_dim": 7}
    ckpt.save(tmp_path / "ae7.pt", bad)
    with pytest.raises(ckpt.CheckpointError, match="action_dim|shape"):
        main(_cli(1, demos, tmp_path / "p.pt", {**TINY_PRIOR, "train": _train(5)},
                  init=tmp_path / "ae7.pt"))
    with pytest.raises(ckpt.CheckpointError, match="stage 1 needs the stage-0 autoencoder"):
        prior = tmp_path / "prior.pt"
        main(_cli(1, demos, prior, {**TINY_PRIOR, "train": _train(5)}, init=stage0))
        main(_cli(1, demos, tmp_path / "p2.pt", {**TINY_PRIOR, "train": _train(5)}, init=prior))
    wide = ckpt.load(stage0)
    wide["arch"] = {**wide["arch"], "d_model": 64}
    ckpt.save(tmp_path / "wide.pt", wide)
    with pytest.raises(ckpt.CheckpointError, match="has shape"):
        main(_cli(1, demos, tmp_path / "p3.pt", {**TINY_PRIOR, "train": _train(5)},
                  init=tmp_path / "wide.pt"))
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
        load_policy(tmp_path / "junk.pt")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    demos = []
    for i in range(4):
        T = 40
        actions = rng.uniform(-1, 1, (T, 4)).astype(np.float32)
        demos.append({"obs": {"obs_gt": rng.normal(size=(T, 39)).astype(np.float32)},
                      "actions": actions, "states": np.zeros((T, 3)),
                      "rewards": np.zeros(T, np.float32), "dones": np.eye(T, dtype=np.uint8)[-1],
                      "success": True, "rand_vec": np.zeros(6), "variant": i, "seed": i})
    f = tmp_path / "nan.hdf5"
    write_demos(f, demos, {"task": "reach-v3", "task_id": 43, "env_name": "metaworld"},
                "reach-v3", 43)
    out = tmp_path / "model.pt"
    with pytest.raises(FloatingPointError, match="non-finite loss.*last good checkpoint"):
        main(_cli(0, [str(f)], out, {**TINY_AE, "train": _train(
            200, lr=1e12, lr_min=1e12, checkpoint_every=1, grad_clip=1e30)}))
    assert not out.exists()
    last = ckpt.load(out.parent / "ckpt" / "latest.pt")
    assert all(torch.isfinite(v).all() for v in last["model"].values()
               if v.is_floating_point())


def test_unknown_config_key_is_named(demos, tmp_path):
    from ript.config import ConfigError

    with pytest.raises(ConfigError, match="autoencoder: unknown key.*d_modle"):
        main(_cli(0, demos, tmp_path / "m.pt", {"d_modle": 32}))


def test_epochs_set_the_step_count_from_the_data(demos, tmp_path):
    """`train.epochs` (the original's unit, spec §3.5) = ceil(epochs × windows / batch)."""
    from ript.data.dataset import SequenceDataset

    windows = len(SequenceDataset(demos, None, seq_len=32))
    out = tmp_path / "model.pt"
    main(_cli(0, demos, out, {**TINY_AE, "train": _train(1, epochs=0.5, batch_size=64)}))
    assert ckpt.load(out)["meta"]["steps"] == int(np.ceil(0.5 * np.ceil(windows / 64)))


def test_few_shot_stage_2_on_tasks_the_prior_never_saw(demos, stage0, tmp_path):
    """QueST's few-shot recipe (spec §4.5): stage 1 on pretraining tasks, stage 2 on others.
    With language embeddings the vocabulary spans both task sets, so the target tasks keep the
    ids (and table rows) stage 1 gave them."""
    from ript.data.language import write_embeddings
    from ript.envs.runner import _task_id

    rng = np.random.default_rng(0)
    emb = [tmp_path / "pre.npz", tmp_path / "target.npz"]
    write_embeddings(emb[0], ["reach-v3"], ["reach"], rng.normal(size=(1, 6)), "minilm")
    write_embeddings(emb[1], ["drawer-close-v3", "reach-v3"], ["close", "reach"],
                     rng.normal(size=(2, 6)), "minilm")
    s1 = tmp_path / "s1" / "model.pt"
    main(_cli(1, demos[:1], s1, {**TINY_PRIOR, "train": _train(4)}, init=stage0,
              extra=["--task-embeddings", *map(str, emb)]))
    s2 = tmp_path / "s2" / "model.pt"
    main(_cli(2, demos[1:], s2, {"enabled": True, "train": _train(4)}, init=s1))
    policy, meta = load_policy(s2)
    assert policy.task_vocab == ["reach-v3", "drawer-close-v3"]  # first file wins, no dupes
    assert meta["task_names"] == ["drawer-close-v3"] and meta["stage"] == 2
    assert _task_id(policy, None, "drawer-close-v3") == 1
    with pytest.raises(ValueError, match="not trained for task 'push-v3'"):
        _task_id(policy, None, "push-v3")
    table = policy.obs_encoder.task_embeddings
    assert torch.equal(table[1], torch.as_tensor(np.load(emb[1])["embeddings"][0]))


# --- weight-decay groups (spec §3.5; train.decay) --------------------------------------------
_AE_LINEAR = {  # Linear/Conv weights of the tiny SkillVAE (1 encoder, 1 decoder layer)
    "encoder.action_proj.weight", "encoder.convs.0.0.conv.weight", "encoder.convs.1.0.conv.weight",
    "encoder.transformer.layers.0.self_attn.out_proj.weight",
    "encoder.transformer.layers.0.linear1.weight", "encoder.transformer.layers.0.linear2.weight",
    "quantizer.project_in.weight", "quantizer.project_out.weight",
    "decoder.transformer.layers.0.self_attn.out_proj.weight",
    "decoder.transformer.layers.0.multihead_attn.out_proj.weight",
    "decoder.transformer.layers.0.linear1.weight", "decoder.transformer.layers.0.linear2.weight",
    "decoder.head.weight"}
_AE_IN_PROJ = {  # nn.MultiheadAttention's fused q/k/v weights: QueST decays them, "linear" not
    "encoder.transformer.layers.0.self_attn.in_proj_weight",
    "decoder.transformer.layers.0.self_attn.in_proj_weight",
    "decoder.transformer.layers.0.multihead_attn.in_proj_weight"}
_PRIOR_DECAYED = {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                  "blocks.0.mlp.0.weight", "blocks.0.mlp.2.weight", "head.weight"}


def _decayed(module, mode, named=None):
    from ript.train.loop import decay_groups

    named = list(module.named_parameters()) if named is None else named
    decay, other = decay_groups(module, named, 0.1, mode)
    assert decay["weight_decay"] == 0.1 and other["weight_decay"] == 0.0
    assert len(decay["params"]) + len(other["params"]) == len(named)
    ids = {id(p) for p in decay["params"]}
    return {n for n, p in named if id(p) in ids}


@pytest.mark.parametrize("mode,extra", [("linear", set()), ("all_weights", _AE_IN_PROJ)])
def test_decay_groups_autoencoder(mode, extra):
    """Biases and GroupNorm/LayerNorm weights never decay; the modes differ by in_proj only."""
    from conftest import tiny_quest_parts

    vae, _, _ = tiny_quest_parts()
    assert _decayed(vae, mode) == _AE_LINEAR | extra


@pytest.mark.parametrize("mode", ["linear", "all_weights"])
def test_decay_groups_prior_and_encoder_agree_in_both_modes(mode):
    """The prior's attention is Linear layers and its token table an Embedding, so both modes
    (and RIPT's optimiser, which keeps "linear") decay exactly these weights."""
    from conftest import tiny_quest_parts

    _, enc, prior = tiny_quest_parts()
    assert _decayed(prior, mode) == _PRIOR_DECAYED
    assert _decayed(enc, mode) == {n for n, _ in enc.named_parameters()
                                   if n.endswith("weight") and "task_encoder" not in n}


def test_decay_groups_stage2_subset_and_bad_mode():
    """Only the parameters handed in are grouped (stage 2: the prior + the decoder)."""
    from conftest import tiny_quest_parts
    from ript.models import QuestPolicy
    from ript.train.loop import decay_groups

    policy = QuestPolicy(*tiny_quest_parts())
    named = policy.trainable_parameters(2)
    got = _decayed(policy, "all_weights", named)
    assert got == ({f"autoencoder.{n}" for n in _AE_LINEAR | _AE_IN_PROJ
                    if n.startswith("decoder.")} | {f"prior.{n}" for n in _PRIOR_DECAYED}
                   | {n for n, _ in named if n.startswith("obs_encoder.")
                      and n.endswith("weight") and "task_encoder" not in n})
    with pytest.raises(ValueError, match="decay mode"):
        decay_groups(policy, named, 0.1, "everything")


def test_parity_switches_reach_the_stages(demos, stage0, tmp_path, monkeypatch):
    """The original's settings through the real CLI: GroupNorm over the chunk, unmasked L1,
    QueST's decay groups, and a stage 2 that leaves the decoder's output layer frozen."""
    import ript.train.sft as sft

    modes = []
    real = sft.decay_groups
    monkeypatch.setattr(sft, "decay_groups",
                        lambda m, named, wd, mode: modes.append(mode) or real(m, named, wd, mode))
    ae = tmp_path / "ae.pt"
    main(_cli(0, demos, ae, {**TINY_AE, "causal_norm": False, "mask_padding": False,
                             "train": _train(2, decay="all_weights")}))
    assert ckpt.load(ae)["arch"]["strict_causal"] is False
    s1 = tmp_path / "s1.pt"
    main(_cli(1, demos, s1, {**TINY_PRIOR, "train": _train(2)}, init=stage0))
    s2 = tmp_path / "s2.pt"
    main(_cli(2, demos, s2, {"enabled": True, "mask_padding": False, "train_output_head": False,
                             "train": _train(3, decay="all_weights")}, init=s1))
    assert modes == ["all_weights", "linear", "all_weights"]
    before, after = ckpt.load(s1)["state_dict"], ckpt.load(s2)["state_dict"]
    changed = {k for k in before if k.startswith("autoencoder.")
               and not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("autoencoder.decoder.transformer.") for k in changed)


def test_input_identity_of_a_folder_follows_every_file_in_it(tmp_path):
    """A VLA checkpoint may be given by its folder: the resume key must see any file change."""
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"weights")
    (d / "sub" / "b.json").write_text("{}")
    first = ckpt.input_identity(d)
    assert ckpt.input_identity(d) == first
    (d / "sub" / "b.json").write_text('{"x": 1}')
    changed = ckpt.input_identity(d)
    assert changed != first
    (d / "sub" / "b.json").rename(d / "b.json")  # same bytes, another name
    assert ckpt.input_identity(d) not in (first, changed)
