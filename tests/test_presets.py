"""Every paper preset (config/*.yaml) builds its DAG: `snakemake -n`, with and without the
`paper` variant, and bad task settings fail at parse time with one clear message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_snakemake
from test_pipeline import planned

needs_libero = pytest.mark.skipif(
    __import__("importlib").util.find_spec("libero") is None, reason="needs the libero extra")

# preset -> (target tasks, pretraining tasks, embedding files, stage 2 on)
PRESETS = {
    "libero_goal": (10, 0, 1, False),
    "libero_spatial": (10, 0, 1, False),
    "libero_object": (10, 0, 1, False),
    "libero_long": (10, 0, 1, False),
    "libero_90": (90, 0, 1, False),
    "libero_long_5shot": (10, 90, 2, True),
    "metaworld_ml45": (45, 0, 0, False),
    "metaworld_ml45_5shot": (5, 45, 0, True),
}


def dry_run(tmp_path: Path, *configfiles: str, check: bool = True):
    return run_snakemake(tmp_path, REPO / "config" / configfiles[0], "-n", "-p",
                         *(["--configfile", *(str(REPO / "config" / c) for c in configfiles)]
                           if len(configfiles) > 1 else []), check=check, timeout=300)


def test_every_preset_is_listed():
    found = {p.stem for p in (REPO / "config").glob("*.yaml")}
    assert found - {"config", "tests", "paper"} == set(PRESETS)


@needs_libero
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_dry_runs(preset, tmp_path):
    targets, pretrain, embeddings, finetune = PRESETS[preset]
    proc = dry_run(tmp_path, f"{preset}.yaml")
    jobs = planned(proc)
    assert jobs["demos"] == targets + pretrain
    assert jobs["evaluate"] == 2 * targets
    assert jobs.get("task_embeddings", 0) == embeddings
    assert ("finetune" in jobs) == finetune
    assert jobs["autoencoder"] == jobs["prior"] == jobs["ript"] == 1
    cfg = yaml.safe_load((REPO / "config" / f"{preset}.yaml").read_text())
    out = proc.stdout + proc.stderr
    # paper model sizes and the shipped scripts' RIPT settings reach the stages
    assert '"d_model":384' in out and '"layers":6' in out
    assert f'"group_size":{cfg["ript"]["group_size"]}' in out
    if pretrain:  # stages 0-1 read the pretraining files, stage 2 and RIPT the target ones
        sft = re.search(r"ript\.train\.sft --stage 0 --data (\S+)", out).group(1)
        assert "/pretrain_data/" in sft
        rl = re.search(r"ript\.rl\.ript --init (\S+) --data (\S+)", out)
        assert rl.group(1).endswith("finetune/model.pt") and "/data/" in rl.group(2)


@needs_libero
@pytest.mark.parametrize("preset", ["libero_goal", "metaworld_ml45_5shot"])
def test_paper_variant_changes_k_and_results_folder(preset, tmp_path):
    out = dry_run(tmp_path, f"{preset}.yaml", "paper.yaml")
    text = out.stdout + out.stderr
    assert '"group_size":16' in text and '"minibatch_episodes":24' in text
    assert f"results/{preset}-paper/ript/model.pt" in text


def _config(tmp_path: Path, data: dict, **extra) -> dict:
    base = yaml.safe_load((REPO / "config" / "tests.yaml").read_text())
    return {**base, "data": data, **extra}


@needs_libero
def test_unknown_libero_task_fails_at_parse_time_listing_valid_ones(tmp_path):
    cfg = _config(tmp_path, {"benchmark": "libero", "suite": "libero_goal",
                             "tasks": ["make_coffee"]})
    proc = run_snakemake(tmp_path, cfg, "-n", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "unknown task 'make_coffee'" in out and "put_the_bowl_on_the_stove" in out


def test_metaworld_keys_are_refused_for_libero_and_pretrain_needs_stage_2(tmp_path):
    cfg = _config(tmp_path, {"benchmark": "libero", "suite": "libero_goal", "tasks": "all",
                             "action_noise": 0.1})
    proc = run_snakemake(tmp_path / "a", cfg, "-n", check=False)
    assert proc.returncode != 0 and "action_noise" in proc.stdout + proc.stderr
    cfg = _config(tmp_path, {"tasks": ["reach-v3"]}, pretrain={"tasks": ["push-v3"]})
    proc = run_snakemake(tmp_path / "b", cfg, "-n", check=False)
    assert proc.returncode != 0 and "finetune.enabled" in proc.stdout + proc.stderr
