"""The OpenVLA-OFT checkpoint folder on tiny FAKE checkpoints (vla_spec §1.1-1.3, §3): the
official key layout, strict loading with one-line errors for a broken folder, the head files,
side files, a loader that neither writes into the folder nor reaches the network, and the
fake writer itself. The model's maths on the same fake is tests/test_vla_model.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO
from ript.vla.checkpoint import (CheckpointFolderError, image_preprocessing, load_checkpoint,
                                 unnorm_key, weight_shapes)
from ript.vla.fake import TVF_DINO
from ript.vla.heads import L1RegressionActionHead, LaplaceScaleHead, ProprioProjector
from ript.vla.prismatic import official_key
from ript.vla.writer import _write_shards

HEAD = "action_head--150000_checkpoint.pt"


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models: one thread



def files_state(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).digest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- layout and strict loading -----------------------------------------------------------------

def test_fake_has_the_official_key_set(oft_dir, oft):
    shapes, where = weight_shapes(oft_dir)
    assert shapes == {official_key(k): tuple(v.shape) for k, v in oft.model.state_dict().items()}
    assert sorted({f.name for f in where.values()}) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for key in ("vision_backbone.featurizer.blocks.2.ls2.scale_factor",  # unused last block
                "vision_backbone.featurizer.norm.weight", "vision_backbone.featurizer.reg_token",
                "vision_backbone.fused_featurizer.attn_pool.latent",
                "vision_backbone.fused_featurizer.blocks.2.mlp.fc2.weight", "projector.fc3.bias",
                "language_model.lm_head.weight",
                "language_model.model.layers.1.post_attention_layernorm.weight"):
        assert key in shapes, key
    assert not [k for k in shapes if k.endswith("gamma")]
    assert shapes["language_model.model.embed_tokens.weight"] == (32064, 64)
    config = json.loads((oft_dir / "config.json").read_text())
    assert config["model_type"] == "openvla" and "FAKE" in config["ript_fake"]
    assert "rms_norm_eps" not in config["text_config"]  # so LlamaConfig's default applies (§1.3)
    assert oft.model.language_model.config.rms_norm_eps == 1e-6
    assert oft.family == "openvla_oft"
    assert not [n for n, t in [*oft.model.named_parameters(), *oft.model.named_buffers()]
                if t.is_meta]
    assert all(p.requires_grad for p in oft.model.parameters())


def test_layer_scale_is_renamed(oft, oft_dir):
    _, where = weight_shapes(oft_dir)
    key = "vision_backbone.featurizer.blocks.1.ls1.scale_factor"
    with safe_open(where[key], framework="pt") as h:
        stored = h.get_tensor(key).float()
    assert not torch.allclose(stored, torch.full_like(stored, 1e-5))  # not timm's init value
    assert torch.equal(oft.model.vision_backbone.featurizer.blocks[1].ls1.gamma.detach(), stored)


def rewrite_weights(folder, edit):
    state = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        state.update(load_file(f))
        f.unlink()
    _write_shards(folder, edit(state), 2)


def edit_json(path, edit):
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def add_to_head(folder):
    torch.save({**torch.load(folder / HEAD), "module.model.extra.weight": torch.ones(1)},
               folder / HEAD)


INDEX = "model.safetensors.index.json"
BROKEN = {  # case: (how to break a copy of the fake, what the one-line error must say)
    "extra key": (lambda f: rewrite_weights(f, lambda s: {
        **s, "vision_backbone.featurizer.blocks.9.ls1.scale_factor": torch.ones(32)}),
        "unexpected keys 1 (vision_backbone.featurizer.blocks.9.ls1.scale_factor)"),
    "missing key": (lambda f: rewrite_weights(f, lambda s: {
        k: v for k, v in s.items() if k != "projector.fc3.bias"}),
        "missing keys 1 (projector.fc3.bias)"),
    "wrong shape": (lambda f: rewrite_weights(f, lambda s: {
        **s, "projector.fc2.weight": s["projector.fc2.weight"].T.contiguous()}),
        "wrong shapes (file vs model) 1 (projector.fc2.weight (320, 64) vs (64, 320))"),
    "LayerScale not renamed": (lambda f: rewrite_weights(f, lambda s: {
        k.replace("scale_factor", "gamma"): v for k, v in s.items()}), "missing keys 6 ("),
    "not a checkpoint": (lambda f: (f / "config.json").unlink(), "no config.json"),
    "wrong model_type": (lambda f: edit_json(f / "config.json",
                                             lambda c: {**c, "model_type": "llama"}),
                         "model_type 'llama', not 'openvla'"),
    "no weights": (lambda f: [p.unlink() for p in [*f.glob("model-*"), f / INDEX]],
                   "no weights"),
    "missing shard": (lambda f: (f / "model-00002-of-00002.safetensors").unlink(),
                      "names absent shards 1 (model-00002-of-00002.safetensors)"),
    "stale index": (lambda f: edit_json(f / INDEX, lambda i: {"weight_map": {
        k: v for k, v in i["weight_map"].items() if k != "projector.fc1.bias"}}),
        "disagrees with its shards on keys 1 (projector.fc1.bias)"),
    "bad head file": (add_to_head, f"{HEAD} does not match the model its config.json describes: "
                                   "unexpected keys 1 (model.extra.weight)"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_folder_gives_one_line_error(oft_dir, tmp_path, case):
    folder = tmp_path / "ckpt"
    shutil.copytree(oft_dir, folder)
    breaks, expected = BROKEN[case]
    breaks(folder)
    with pytest.raises(CheckpointFolderError) as err:
        load_checkpoint(folder, adapter=None)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(folder)) and expected in msg, msg


def test_head_files_lose_their_module_prefix(oft, oft_dir):
    for name, module in ((HEAD, oft.action_head),
                         ("proprio_projector--150000_checkpoint.pt", oft.proprio_projector)):
        raw = torch.load(oft_dir / name)
        assert raw and all(k.startswith("module.") for k in raw)
        ours = module.state_dict()
        assert sorted(ours) == sorted(k.removeprefix("module.") for k in raw)
        for k, v in raw.items():
            assert torch.equal(ours[k.removeprefix("module.")], v.float()), k
    assert "module.model.mlp_resnet_blocks.1.ffn.1.weight" in torch.load(oft_dir / HEAD)


# --- side files, offline ------------------------------------------------------------------------


def test_loader_is_read_only_and_offline(oft_dir, monkeypatch):
    before = files_state(oft_dir)

    def no_network(*args, **kwargs):
        raise AssertionError("the loader tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    load_checkpoint(oft_dir)
    assert files_state(oft_dir) == before


def test_side_files(oft, oft_dir, tmp_path):
    assert list(oft.norm_stats) == ["libero_spatial_no_noops"]  # replaced the config's stats
    assert list(oft.config["norm_stats"]) == ["bridge_orig"]
    assert oft.norm_stats["libero_spatial_no_noops"]["action"]["mask"] == [True] * 6 + [False]
    assert "mask" not in oft.norm_stats["libero_spatial_no_noops"]["proprio"]
    assert unnorm_key(oft.norm_stats, "libero_spatial") == "libero_spatial_no_noops"
    both = {"libero_goal": {}, "libero_goal_no_noops": {}}
    assert unnorm_key(both, "libero_goal") == "libero_goal"
    with pytest.raises(ValueError, match="'libero_goal'.*has: libero_spatial_no_noops"):
        unnorm_key(oft.norm_stats, "libero_goal")
    assert oft.image.source == "tvf_normalize_params" and oft.image.size == 224
    assert oft.image.means[0] == tuple(TVF_DINO["mean"]) != (0.485, 0.456, 0.406)
    assert oft.image.stds == (tuple(TVF_DINO["std"]), (0.5, 0.5, 0.5))
    assert oft.image_norm == {"means": [TVF_DINO["mean"], [0.5] * 3],
                              "stds": [TVF_DINO["std"], [0.5] * 3]}
    pre = json.loads((oft_dir / "preprocessor_config.json").read_text())
    del pre["tvf_normalize_params"]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    plain = image_preprocessing(tmp_path, oft.config)
    assert plain.source == "means/stds" and plain.means[0] == (0.485, 0.456, 0.406)
    assert image_preprocessing(tmp_path / "none", oft.config).source == "default"


# --- heads and the fake writer -------------------------------------------------------------------

def test_heads():
    torch.manual_seed(0)
    head = L1RegressionActionHead(16)
    assert sorted(head.state_dict())[:4] == ["model.fc1.bias", "model.fc1.weight",
                                             "model.fc2.bias", "model.fc2.weight"]
    assert "model.mlp_resnet_blocks.1.ffn.0.weight" in head.state_dict()
    h = torch.randn(2, 56, 16)
    out = head(h)
    h[:, 7 * 3 + 2] += 1.0  # hidden state 23 belongs to chunk step 3 (states 21..27)
    changed = (head(h) - out).abs().amax(dim=(0, 2))
    assert out.shape == (2, 8, 7) and changed[3] > 0 and changed[torch.arange(8) != 3].max() == 0
    scale = LaplaceScaleHead(16)
    log_b = scale(torch.randn(2, 56, 16))
    assert log_b.shape == (2, 8, 7) and (log_b + 3).abs().max() < 0.1
    copy = LaplaceScaleHead(16)
    copy.load_ript_state(scale.ript_state())
    assert set(scale.ript_state()) == {"scale_trunk", "log_b_head"}
    assert copy.trunk.fc2.weight.shape == (16, 16)
    torch.testing.assert_close(copy(h), scale(h))
    assert ProprioProjector(16)(torch.zeros(3, 8)).shape == (3, 16)


def test_fake_cli_writes_the_same_bytes(oft_dir, tmp_path):
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "ript.vla.fake", str(out), "--family", "openvla_oft",
                    "--suite", "libero_spatial", "--lora"], check=True, cwd=REPO, timeout=300,
                   capture_output=True)
    hashes = {k: v[1] for k, v in files_state(out).items()}
    assert hashes == {k: v[1] for k, v in files_state(oft_dir).items()}
