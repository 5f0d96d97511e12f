"""The 'vla-checkpoint' stage (ript/vla/fetch.py, vla_spec §1.2-§1.4, §3.6) on a tiny checkpoint
with the official file layout. Downloads run the real huggingface_hub client against a fake Hub on
127.0.0.1 (tests/fake_hub.py); no test uses the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys

import pytest
from conftest import REPO, mlflow_runs
from fake_hub import COMMIT, FakeHub, closed_endpoint

MODEL_REPO = "moojink/openvla-7b-oft-finetuned-libero-spatial"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def safetensors(n: int) -> bytes:
    """A valid safetensors file holding one float32 tensor of n values."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}})
    return (struct.pack("<Q", len(header)) + header.encode()
            + struct.pack(f"<{n}f", *range(n)))


def checkpoint_files() -> dict[str, bytes]:
    """An OFT checkpoint as the LIBERO repos publish it (merged model, heads, statistics)."""
    stats = {"libero_spatial_no_noops": {"action": {"q01": [-1] * 7, "q99": [1] * 7}}}
    index = {"metadata": {"total_size": 400}, "weight_map": {"a.weight": SHARDS[0],
                                                             "b.weight": SHARDS[1]}}
    return {"config.json": json.dumps({"model_type": "openvla", "norm_stats": stats}).encode(),
            SHARDS[0]: safetensors(40), SHARDS[1]: safetensors(60),
            "model.safetensors.index.json": json.dumps(index).encode(),
            "tokenizer_config.json": b'{"model_max_length": 2048}', "tokenizer.model": b"sp" * 80,
            "dataset_statistics.json": json.dumps(stats).encode(),
            "action_head--150000_checkpoint.pt": b"head" * 50,
            "proprio_projector--150000_checkpoint.pt": b"proj" * 50,
            "lora_adapter/adapter_config.json": b'{"r": 32}'}


def write(folder, files):
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def snapshot(folder):
    """Every path under `folder` with its mtime and content hash."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes())
                                         .hexdigest() if p.is_file() else None)
            for p in folder.rglob("*")}


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ript.vla.fetch", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def fetch(tmp_path, folder, *extra):
    """The stage run in this process (so the fake Hub's log can be read), without MLflow."""
    from ript.vla.fetch import main

    main(["--folder", str(folder), "--repo", MODEL_REPO, "--out", str(tmp_path / "m.json"),
          "--experiment-dir", str(tmp_path), "--no-mlflow", *extra])
    return json.loads((tmp_path / "m.json").read_text())


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub(checkpoint_files(), MODEL_REPO, "model")
    monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
    yield fake
    fake.close()


def test_missing_files_names_what_a_folder_lacks(tmp_path):
    from ript.vla.fetch import family, missing_files

    d = write(tmp_path / "ckpt", checkpoint_files())
    assert missing_files(d) == [] and family(d) == "openvla_oft"
    (d / "dataset_statistics.json").unlink()  # optional: config.json's norm_stats remain
    assert missing_files(d) == []
    (d / SHARDS[1]).write_bytes(safetensors(60)[:-5])
    (d / "proprio_projector--150000_checkpoint.pt").unlink()
    (d / "tokenizer.model").unlink()
    got = missing_files(d)
    assert got[0].startswith(f"{SHARDS[1]} (") and "truncated" in got[0]
    assert got[1:] == ["tokenizer.json (or tokenizer.model)",
                       "proprio_projector--150000_checkpoint.pt"]
    (d / "model.safetensors.index.json").unlink()
    (d / "config.json").write_text('{"model_type": "llama"}')
    assert missing_files(d)[:2] == [
        "config.json (model_type 'llama', expected 'openvla')",
        "model.safetensors.index.json and its shards (or model.safetensors)"]
    (d / "model.safetensors").write_bytes(safetensors(3))  # the single-file layout
    (d / "config.json").write_text('{"model_type": "openvla"}')  # and no norm_stats anywhere
    assert missing_files(d) == ["tokenizer.json (or tokenizer.model)",
                                "proprio_projector--150000_checkpoint.pt",
                                "dataset_statistics.json (config.json has no norm_stats to "
                                "unnormalise actions)"]
    for p in d.glob("*_checkpoint.pt"):
        p.unlink()
    (d / "tokenizer.json").write_text("{}")
    (d / "config.json").write_text('{"model_type": "openvla", "norm_stats": {"x": {}}}')
    assert missing_files(d) == [] and family(d) == "openvla"
    assert len(missing_files(tmp_path / "absent")) == 4


def test_complete_folder_gives_manifest_and_stays_untouched(tmp_path):
    d = write(tmp_path / "ckpt", checkpoint_files())
    before = snapshot(d)
    out = tmp_path / "exp" / "checkpoint" / "manifest.json"
    # a closed HF_ENDPOINT: a complete folder needs no network
    proc = cli("--folder", d, "--repo", MODEL_REPO, "--out", out, "--experiment-dir",
               tmp_path / "exp", "--experiment", "fetch", env={"HF_ENDPOINT": closed_endpoint()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert snapshot(d) == before
    m = json.loads(out.read_text())
    files = checkpoint_files()
    assert m["files"] == {k: len(v) for k, v in sorted(files.items())}
    assert list(m["files"]) == sorted(files)
    assert m["folder"] == str(d) and m["family"] == "openvla_oft"
    assert m["norm_stats"] == "dataset_statistics.json" and m["commit"] is None
    assert m["config_sha256"] == hashlib.sha256(files["config.json"]).hexdigest()
    assert m["repo"] == MODEL_REPO and m["revision"] == "main"
    assert m["total_bytes"] == sum(map(len, files.values()))
    _, runs = mlflow_runs(tmp_path / "exp" / "mlflow.db", "fetch")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params == {"folder": str(d), "repo": MODEL_REPO, "revision": "main",
                                   "family": "openvla_oft"}
    assert runs[0].data.metrics["total_bytes"] == m["total_bytes"]
    assert json.loads((out.parent / "metrics.jsonl").read_text())["total_bytes"] == m["total_bytes"]


def test_download_completes_an_incomplete_folder(hub, tmp_path):
    files = checkpoint_files()
    d = write(tmp_path / "ckpt", {"config.json": files["config.json"]})  # a started hand copy
    m = fetch(tmp_path, d)
    assert {k: (d / k).read_bytes() for k in files} == files
    assert m["files"] == {k: len(v) for k, v in sorted(files.items())}  # no .cache/ bookkeeping
    assert m["family"] == "openvla_oft" and m["commit"] == COMMIT
    gets = sorted(p.rsplit(f"/resolve/{COMMIT}/", 1)[1] for meth, p, _ in hub.log if meth == "GET")
    assert gets == sorted(k for k in files if k != "config.json")  # the hand copy was kept
    n = len(hub.log) + len(hub.api_log)
    fetch(tmp_path, d)  # complete now: not one request
    assert len(hub.log) + len(hub.api_log) == n


def test_interrupted_download_completes_on_rerun(hub, tmp_path):
    d = tmp_path / "ckpt"
    hub.mode, hub.target = "cut_then_fail", SHARDS[1]  # the connection drops, the hub goes away
    with pytest.raises(SystemExit) as e:
        fetch(tmp_path, d)
    msg = str(e.value.code)
    assert f"missing: {SHARDS[1]}" in msg and "download from" in msg and "500" in msg
    assert "config.json;" not in msg and "tokenizer" not in msg  # present files are not listed
    assert not (d / SHARDS[1]).exists() and (d / SHARDS[0]).is_file()
    assert not (tmp_path / "m.json").exists()
    hub.log.clear()
    hub.mode = None
    m = fetch(tmp_path, d)
    assert (d / SHARDS[1]).read_bytes() == checkpoint_files()[SHARDS[1]]
    assert [p.rsplit("/", 1)[1] for meth, p, _ in hub.log if meth == "GET"] == [SHARDS[1]]
    assert m["total_bytes"] == sum(map(len, checkpoint_files().values()))


@pytest.mark.parametrize("case, match", [
    ("corrupt", "SHA-256 differs"), ("gated", "accept its conditions"),
    ("unknown", "RepositoryNotFoundError")])
def test_bad_hub_answers_are_explained(hub, tmp_path, case, match):
    if case == "corrupt":
        hub.mode, hub.target = "corrupt", SHARDS[0]
    hub.gated = case == "gated"
    hub.repo_id = "someone/else" if case == "unknown" else MODEL_REPO
    with pytest.raises(SystemExit) as e:
        fetch(tmp_path, tmp_path / "ckpt")
    assert match in str(e.value.code) and MODEL_REPO in str(e.value.code)
    assert not (tmp_path / "ckpt" / SHARDS[0]).exists()


def test_no_network_or_no_download_gives_one_hint(tmp_path):
    d = write(tmp_path / "ckpt", {"config.json": checkpoint_files()["config.json"]})
    before = snapshot(d)
    endpoint = closed_endpoint()
    base = ["--folder", d, "--repo", MODEL_REPO, "--out", tmp_path / "m.json",
            "--experiment-dir", tmp_path, "--no-mlflow"]
    for extra, reason in (([], f"looking up {MODEL_REPO} at {endpoint} failed: ConnectError"),
                          (["--no-download"], "--no-download given")):
        proc = cli(*base, *extra, env={"HF_ENDPOINT": endpoint})
        err = proc.stderr.strip()
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert len(err.splitlines()) == 1 and err.startswith(f"vla-checkpoint: checkpoint folder "
                                                             f"{d} is incomplete ({reason}")
        assert ("missing: model.safetensors.index.json and its shards (or model.safetensors); "
                "tokenizer_config.json; tokenizer.json (or tokenizer.model); for OpenVLA-OFT "
                "also action_head--<step>_checkpoint.pt and proprio_projector--<step>_") in err
        assert f"https://huggingface.co/{MODEL_REPO}" in err
        assert f"download {MODEL_REPO} --revision main --local-dir {d}`" in err
    assert snapshot(d) == before and not (tmp_path / "m.json").exists()
