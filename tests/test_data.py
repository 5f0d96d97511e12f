"""Demonstration files and the windowed dataset (real MetaWorld, real HDF5)."""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest

from ript.config import ConfigError, from_dict
from ript.data.dataset import SequenceDataset, load_contexts
from ript.data.hdf5 import DataError
from ript.data.metaworld_demos import DataConfig, generate, main, write_demos
from ript.envs.metaworld import MetaWorldEnv, ObsSpec, variant_split
from ript.utils import atomic_path


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    cfg = from_dict(DataConfig, {"tasks": ["reach-v3"], "demos_per_task": 3,
                                 "max_episode_steps": 150})
    out = tmp_path_factory.mktemp("demos") / "reach-v3.hdf5"
    stats = generate("reach-v3", cfg, seed=0, out=out)
    return out, stats, cfg


def test_same_seed_gives_byte_identical_files(demo_file, tmp_path):
    out, _, cfg = demo_file
    again = tmp_path / "again.hdf5"
    generate("reach-v3", cfg, seed=0, out=again)
    assert _md5(again) == _md5(out)
    other = tmp_path / "other.hdf5"
    generate("reach-v3", cfg, seed=1, out=other)
    assert _md5(other) != _md5(out)


def test_layout_and_attributes(demo_file):
    out, stats, cfg = demo_file
    demo_variants, eval_variants = variant_split(cfg.eval_variants)
    with h5py.File(out) as f:
        attrs = f["data"].attrs
        assert attrs["task"] == "reach-v3" and attrs["env_name"] == "metaworld"
        assert attrs["num_demos"] == 3
        assert 0 < attrs["expert_success_rate"] <= 1
        assert json.loads(attrs["eval_variants_range_json"]) == [25, 50]
        for i in range(3):
            g = f[f"data/demo_{i}"]
            T = int(g.attrs["num_samples"])
            assert g["actions"].shape == (T, 4)
            assert g["obs/obs_gt"].shape == (T, 39)
            assert g["obs/robot_states"].shape == (T, 8)
            assert g["rewards"].shape == (T,) and g["dones"][-1] == 1 and g["dones"][:-1].sum() == 0
            assert g.attrs["success"]  # keep_failed is off
            assert g.attrs["variant"] in demo_variants and g.attrs["variant"] not in eval_variants
            assert np.abs(g["actions"][()]).max() <= 1.0
            # robot_states = hand xyz + gripper of this and the previous frame (spec §2.5)
            gt = g["obs/obs_gt"][()]
            np.testing.assert_allclose(g["obs/robot_states"][()],
                                       np.concatenate([gt[:, 0:4], gt[:, 18:22]], 1))
            np.testing.assert_allclose(g.attrs["init_state"], g["states"][0])
    assert stats["num_demos"] == 3 and stats["attempts"] >= 3


def test_context_reset_reproduces_recorded_first_state(demo_file):
    out, _, _ = demo_file
    contexts = load_contexts([out])
    assert [c.context_id for c in contexts] == [0, 1, 2]
    with MetaWorldEnv("reach-v3", ObsSpec()) as env, h5py.File(out) as f:
        for c in contexts:
            obs = env.reset(c.variant)
            np.testing.assert_allclose(env.sim_state(), np.asarray(c.init_state), atol=1e-8)
            key = c.source.split(":")[1]
            np.testing.assert_allclose(obs["obs_gt"], f[f"data/{key}/obs/obs_gt"][0], atol=1e-6)


def _synthetic_file(path, lengths, task="push-v3", task_id=40):
    """A real HDF5 file whose values encode (demo, t) so windows can be checked by hand."""
    demos = []
    for d, T in enumerate(lengths):
        t = np.arange(T, dtype=np.float32)
        demos.append({"obs": {"robot_states": np.stack([t + 100 * d] * 8, 1)},
                      "actions": np.stack([t + 100 * d] * 4, 1), "states": np.zeros((T, 3)),
                      "rewards": np.zeros(T, np.float32), "dones": np.eye(T, dtype=np.uint8)[-1],
                      "success": True, "rand_vec": np.zeros(6), "variant": d, "seed": d})
    write_demos(path, demos, {"task": task, "task_id": task_id, "image": False}, task, task_id)
    return path


def test_windows_padding_and_pad_mask(tmp_path):
    f = _synthetic_file(tmp_path / "a.hdf5", [5, 3])
    ds = SequenceDataset([f], ["robot_states"], seq_len=4)
    assert len(ds) == 8  # every start index t of both demos
    item = ds[3]  # demo 0, t = 3: actions 3, 4, then the last (4) repeated
    np.testing.assert_array_equal(item["actions"][:, 0], [3, 4, 4, 4])
    np.testing.assert_array_equal(item["pad_mask"], [True, True, False, False])
    np.testing.assert_array_equal(item["obs"]["robot_states"][:, 0], [3])
    item = ds[5]  # demo 1, t = 0
    np.testing.assert_array_equal(item["actions"][:, 0], [100, 101, 102, 102])
    assert int(item["task_id"]) == 40
    no_pad = SequenceDataset([f], ["robot_states"], seq_len=4, pad_seq_length=False)
    assert len(no_pad) == 2 + 1  # T - seq_len + 1 windows, at least one per demo
    np.testing.assert_array_equal(no_pad[2]["pad_mask"], [True, True, True, False])


def test_frame_stack_at_start_repeats_first_frame(tmp_path):
    f = _synthetic_file(tmp_path / "a.hdf5", [6])
    ds = SequenceDataset([f], ["robot_states"], seq_len=2, frame_stack=3)
    np.testing.assert_array_equal(ds[0]["obs"]["robot_states"][:, 0], [0, 0, 0])
    np.testing.assert_array_equal(ds[1]["obs"]["robot_states"][:, 0], [0, 0, 1])
    np.testing.assert_array_equal(ds[4]["obs"]["robot_states"][:, 0], [2, 3, 4])
    fut = SequenceDataset([f], ["robot_states"], seq_len=2, obs_seq_len=2)
    np.testing.assert_array_equal(fut[5]["obs"]["robot_states"][:, 0], [5, 5])


def test_multi_task_indexing(tmp_path):
    a = _synthetic_file(tmp_path / "a.hdf5", [4], "push-v3", 40)
    b = _synthetic_file(tmp_path / "b.hdf5", [2, 3], "reach-v3", 43)
    ds = SequenceDataset([a, b], ["robot_states"], seq_len=2)
    assert len(ds) == 9
    assert [int(ds[i]["task_id"]) for i in range(len(ds))] == [40] * 4 + [43] * 5
    assert ds.locate(4) == (1, 0) and ds.locate(6) == (2, 0) and ds.locate(8) == (2, 2)
    with pytest.raises(IndexError):
        ds[9]
    assert [c.task for c in load_contexts([a, b])] == ["push-v3", "reach-v3", "reach-v3"]


def test_actions_only_dataset_for_stage0(tmp_path):
    f = _synthetic_file(tmp_path / "a.hdf5", [3])
    assert SequenceDataset([f], None, seq_len=2)[0]["obs"] == {}


# -- bad input ------------------------------------------------------------------------------

def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="valid tasks:.*reach-v3"):
        from_dict(DataConfig, {"tasks": ["reach-v9"]})
    with pytest.raises(ConfigError, match="data.demos_per_task"):
        from_dict(DataConfig, {"tasks": ["reach-v3"], "demos_per_task": 0}, "data")
    with pytest.raises(ConfigError, match="unknown key.*demo_per_task"):
        from_dict(DataConfig, {"tasks": ["reach-v3"], "demo_per_task": 3}, "data")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="missing.hdf5: file not found"):
        SequenceDataset([tmp_path / "missing.hdf5"], ["robot_states"])


def test_truncated_file(demo_file, tmp_path):
    out, _, _ = demo_file
    cut = tmp_path / "cut.hdf5"
    cut.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.hdf5: .*truncated or corrupt"):
        SequenceDataset([cut], ["robot_states"])


def test_missing_key(demo_file, tmp_path):
    out, _, _ = demo_file
    broken = tmp_path / "broken.hdf5"
    broken.write_bytes(out.read_bytes())
    with h5py.File(broken, "a") as f:
        del f["data/demo_1/actions"]
    with pytest.raises(DataError, match="broken.hdf5: missing key 'data/demo_1/actions'"):
        SequenceDataset([broken], ["robot_states"])
    with pytest.raises(DataError, match="missing key 'data/demo_0/obs/corner_rgb'"):
        SequenceDataset([out], ["corner_rgb"])


def test_settings_mismatch_is_refused(demo_file):
    out, _, cfg = demo_file
    wanted = from_dict(DataConfig, {"tasks": ["reach-v3"], "image": True}).file_settings()
    with pytest.raises(DataError, match="other settings.*image: file has False, config asks True"):
        SequenceDataset([out], ["robot_states"], expect=wanted)
    SequenceDataset([out], ["robot_states"], expect=cfg.file_settings())  # matching: fine


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.hdf5"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_unknown_task_before_work(tmp_path):
    with pytest.raises(ValueError, match="unknown MetaWorld task 'nope-v3'"):
        main(["--task", "nope-v3", "--config", json.dumps({"tasks": ["reach-v3"]}),
              "--out", str(tmp_path / "x.hdf5"), "--experiment-dir", str(tmp_path),
              "--no-mlflow"])
    assert not (tmp_path / "x.hdf5").exists()


@pytest.mark.slow
def test_image_observations_recorded_upright(tmp_path):
    cfg = from_dict(DataConfig, {"tasks": ["reach-v3"], "demos_per_task": 1,
                                 "max_episode_steps": 60, "image": True, "keep_failed": True})
    out = tmp_path / "img.hdf5"
    generate("reach-v3", cfg, seed=0, out=out)
    ds = SequenceDataset([out], ["robot_states", "corner_rgb"], seq_len=4,
                         expect=cfg.file_settings())
    img = ds[0]["obs"]["corner_rgb"]
    assert img.shape == (1, 3, 128, 128) and img.dtype.is_floating_point is False
    # upright: the table (bottom of the picture) is darker-brown than the wall/sky at the top
    assert img[0, :, :20].float().mean() > img[0, :, -20:].float().mean()


def test_tracking_leaves_the_users_mlflow_variable_alone(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a stage must not leak its store
    into the environment of later stages (they would log into the wrong experiment folder)."""
    import os

    from ript.tracking import StageTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with StageTracker(experiment_dir=tmp_path, experiment="x", stage="data", pipeline_id="p",
                      metrics_path=tmp_path / "m.jsonl", params={}) as tr:
        tr.log_metrics({"a": 1.0}, step=0)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert (tmp_path / "mlflow.db").exists()
