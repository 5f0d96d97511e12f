"""Every paper preset (config/*.yaml) builds its DAG from the repository root exactly as the README
writes the command, with and without the `paper` variant; the config each job receives is the
preset + the stages' defaults, never the embedded default's values; bad settings fail at parse
time with one line naming the key."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_repo, snakemake_in
from ript.experiment import resolve
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


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("presets") / "repo")


def dry_run(repo: Path, *configfiles: str, check: bool = True):
    """`snakemake -n -p --configfile config/A.yaml [config/B.yaml]` from the repository root."""
    return snakemake_in(repo, "-n", "-p", "--configfile",
                        *(f"config/{c}" for c in configfiles), check=check, timeout=300)


def ran_config(proc) -> dict:
    """The whole config the jobs received: the report rule's --full-config argument."""
    line = next(ln for ln in (proc.stdout + proc.stderr).splitlines() if "-m ript.report" in ln)
    args = shlex.split(line)
    return json.loads(args[args.index("--full-config") + 1])


def merged(*configfiles: str) -> dict:
    """The files layered as Snakemake layers --configfile files (nested blocks merged, at any
    depth: config/original.yaml sets single keys of `train` blocks)."""
    def layer(base: dict, top: dict) -> dict:
        return {**base, **{k: layer(base[k], v) if isinstance(v, dict)
                           and isinstance(base.get(k), dict) else v for k, v in top.items()}}

    out: dict = {}
    for c in configfiles:
        out = layer(out, yaml.safe_load((REPO / "config" / c).read_text()))
    return out


# OpenVLA-family presets (issue #14): (family, suite, Hugging Face repo)
VLA_PRESETS = {
    f"{family}_libero_{cell}": (family, suite, f"{owner}/openvla-7b{oft}-finetuned-libero-{repo}")
    for family, owner, oft in (("openvla_oft", "moojink", "-oft"), ("openvla", "openvla", ""))
    for cell, suite, repo in (("spatial", "libero_spatial", "spatial"),
                              ("object", "libero_object", "object"),
                              ("goal", "libero_goal", "goal"), ("long", "libero_10", "10"))
}


def test_every_preset_is_listed():
    found = {p.stem for p in (REPO / "config").glob("*.yaml")}
    # metaworld_random5: the default's settings on a second, random task set (README "Results")
    # metaworld_oft: the CPU-sized OpenVLA-OFT (tests/test_vla_ript_pipeline.py)
    assert found - {"config", "tests", "paper", "original", "metaworld_random5",
                    "metaworld_oft"} == set(PRESETS) | set(VLA_PRESETS)


@needs_libero
@pytest.mark.parametrize("preset", sorted(VLA_PRESETS))
def test_vla_preset_evaluates_the_checkpoint_with_the_originals_settings(preset, repo):
    """The checkpoint replaces stages 0-2 (no QueST job), every task of the suite is evaluated
    50 times with the suite's step limit (vla_spec §2 table), from the preset's repo; OFT's
    presets then run RIPT with the script's values (vla_spec §4, ript_spec §5.11) from RIPT's
    released scale head, the discrete OpenVLA's evaluate the checkpoint as released."""
    from ript.envs.libero import VLA_STEP_LIMITS

    family, suite, hf_repo = VLA_PRESETS[preset]
    cfg = yaml.safe_load((REPO / "config" / f"{preset}.yaml").read_text())
    head = cfg.get("scale_head", {}).get("file")
    if head:  # the released head the preset names (a user puts it there)
        (repo / head).parent.mkdir(parents=True, exist_ok=True)
        (repo / head).write_bytes(b"")
    try:
        proc = dry_run(repo, f"{preset}.yaml")
    finally:
        if head:
            (repo / head).unlink()
    jobs = planned(proc)
    if family == "openvla_oft":
        assert jobs == {"mlflow_init": 1, "vla_checkpoint": 1, "demos": 10, "ript": 1,
                        "evaluate": 20, "aggregate": 2, "report": 1}
    else:
        assert jobs == {"mlflow_init": 1, "vla_checkpoint": 1, "evaluate": 10, "aggregate": 1,
                        "report": 1}
    ran = ran_config(proc)
    assert ran["policy"]["family"] == family and ran["policy"]["hf_repo"] == hf_repo
    assert ran["data"]["suite"] == suite
    assert ran["evaluation"]["episodes_per_task"] == 50
    assert ran["evaluation"]["max_episode_steps"] == VLA_STEP_LIMITS[suite]
    out = proc.stdout + proc.stderr
    assert f"--repo {hf_repo}" in out and "--vla" in out
    assert ran == resolve(cfg)
    if family == "openvla_oft":  # the script's values (vla_spec §4.4-4.6)
        r = ran["ript"]
        assert (r["group_size"], r["contexts_per_iteration"], r["iterations"]) == (8, 24, 12)
        assert (r["ppo_epochs"], r["clip_low"], r["clip_high"]) == (1, 0.1, 0.1)
        assert (r["lr"], r["head_lr"]) == ((1e-5, 1e-5) if suite == "libero_goal"
                                           else (5e-5, 5e-5))
        assert r["scale_factor"] == (2.0 if suite == "libero_spatial" else 5.0)
        assert r["max_episode_steps"] == VLA_STEP_LIMITS[suite]
        assert f"--scale-head {head}" in out
        # Long trains on the script's 4 tasks of the suite (all 10 evaluated); the others on all
        if suite == "libero_10":
            from ript.envs.benchmark import get

            assert len(r["tasks"]) == 4 and set(r["tasks"]) < set(get("libero", suite).tasks("all"))
        else:
            assert r["tasks"] is None


@needs_libero
def test_oft_preset_without_its_scale_head_stops_before_any_job(repo):
    proc = dry_run(repo, "openvla_oft_libero_goal.yaml", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "scale_head.file" in out and "checkpoints/ript-scale-heads/goal" in out
    assert "Traceback" not in out


@needs_libero
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_dry_runs_from_the_root_with_only_its_own_values(preset, repo):
    targets, pretrain, embeddings, finetune = PRESETS[preset]
    proc = dry_run(repo, f"{preset}.yaml")
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
    # the preset + the stages' defaults, and nothing of config/config.yaml
    assert ran_config(proc) == resolve(cfg)


@needs_libero
@pytest.mark.parametrize("preset", ["libero_goal", "metaworld_ml45_5shot"])
def test_paper_variant_changes_k_and_results_folder(preset, repo):
    out = dry_run(repo, f"{preset}.yaml", "paper.yaml")
    text = out.stdout + out.stderr
    assert '"group_size":16' in text and '"minibatch_episodes":24' in text
    assert f"results/{preset}-paper/ript/model.pt" in text
    assert ran_config(out) == resolve(merged(f"{preset}.yaml", "paper.yaml"))


@needs_libero
@pytest.mark.parametrize("preset", ["libero_goal", "metaworld_ml45_5shot"])
def test_original_overlay_sets_every_parity_switch(preset, repo):
    """config/original.yaml (issue #17) turns each deviation switch to the original's value, and
    the stages receive them in their --config JSON; the preset's own values stay."""
    out = dry_run(repo, f"{preset}.yaml", "original.yaml")
    text = out.stdout + out.stderr
    ae = re.search(r"ript\.train\.sft --stage 0 .*?--config '(\{.*?\})'", text).group(1)
    ae = json.loads(ae)
    assert (ae["causal_norm"], ae["mask_padding"], ae["train"]["decay"]) == \
        (False, False, "all_weights")
    assert ae["commitment_weight"] == 1.0 and ae["codebook_dim"] == 512
    assert ae["train"]["batch_size"] == 256  # one key of the preset's train block replaced
    if PRESETS[preset][3]:
        ft = json.loads(re.search(r"ript\.train\.sft --stage 2 .*?--config '(\{.*?\})'",
                                  text).group(1))
        assert (ft["mask_padding"], ft["train_output_head"], ft["train"]["decay"]) == \
            (False, False, "all_weights")
    assert '"legacy_reset":true' in text
    assert f"results/{preset}-original/ript/model.pt" in text
    assert ran_config(out) == resolve(merged(f"{preset}.yaml", "original.yaml"))


def test_no_configfile_runs_the_embedded_default(repo):
    proc = snakemake_in(repo, "-n", "-p", timeout=300)  # the README's command 1
    assert ran_config(proc) == resolve(merged("config.yaml"))


def refused(repo: Path, config: dict, *overlays: str):
    """`snakemake -n --configfile <config> [overlays]` from the root, expected to fail."""
    (repo / "bad.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    proc = dry_run(repo, "../bad.yaml", *overlays, check=False)
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def _tests_config(**blocks) -> dict:
    """config/tests.yaml with blocks changed (keys merged; `data` replaced whole)."""
    cfg = yaml.safe_load((REPO / "config" / "tests.yaml").read_text())
    for name, block in blocks.items():
        cfg[name] = block if name == "data" else {**cfg.get(name, {}), **block}
    return cfg


# The late config errors of issue #12: each used to fail inside a job after data and SFT.
LATE_ERRORS = {
    "ript.max_episode_steps": {"ript": {"max_episode_steps": 800}},
    "evaluation.max_episode_steps": {"evaluation": {"max_episode_steps": 600}},
    "prior.lowdim_keys": {"prior": {"lowdim_keys": ["joint_states"]}},
    "prior.rgb_keys": {"prior": {"rgb_keys": ["corner_rgb"]}},  # data.image is false
    "autoencoder.chunk_size": {"autoencoder": {"chunk_size": 30, "downsample": 4}},
}


@pytest.mark.parametrize("key", sorted(LATE_ERRORS))
def test_late_config_errors_fail_the_dry_run_with_one_line_naming_the_key(key, repo):
    out = refused(repo, _tests_config(**LATE_ERRORS[key]))
    lines = [ln for ln in out.splitlines() if ln.startswith(f"config error: {key}:")]
    assert len(lines) == 1, out[-3000:]


@needs_libero
def test_variant_contexts_are_refused_for_libero(repo):
    cfg = yaml.safe_load((REPO / "config" / "libero_goal.yaml").read_text())
    cfg["ript"]["contexts"] = "train_variants"
    out = refused(repo, cfg)
    assert "config error: ript.contexts: train_variants exists for benchmarks with task " \
           "variants only" in out


@needs_libero
def test_unknown_libero_task_fails_at_parse_time_listing_valid_ones(repo):
    out = refused(repo, _tests_config(data={"benchmark": "libero", "suite": "libero_goal",
                                            "tasks": ["make_coffee"]}))
    assert "config error: data.tasks:" in out
    assert "unknown task 'make_coffee'" in out and "put_the_bowl_on_the_stove" in out


def test_metaworld_keys_are_refused_for_libero_and_pretrain_needs_stage_2(repo):
    out = refused(repo, _tests_config(data={"benchmark": "libero", "suite": "libero_goal",
                                            "tasks": "all", "action_noise": 0.1}))
    assert "action_noise" in out
    out = refused(repo, _tests_config(pretrain={"tasks": ["push-v3"]}))
    assert "config error: finetune.enabled:" in out


def _threads(proc, rule: str) -> int:
    """Threads Snakemake plans for the first job of `rule` (a dry run prints them when > 1)."""
    lines = (proc.stdout + proc.stderr).splitlines()
    start = lines.index(f"rule {rule}:")
    block = lines[start + 1:lines.index("", start)]
    return next((int(ln.split(":")[1]) for ln in block if ln.strip().startswith("threads:")), 1)


def test_simulator_jobs_reserve_the_cores_their_workers_keep_busy(repo):
    # the default's RIPT (2 workers) holds both cores; its evaluations (1 worker) run two at once
    default = snakemake_in(repo, "-n", timeout=300)
    assert _threads(default, "ript") == 2 and _threads(default, "evaluate") == 1
    # a LIBERO preset's 8 workers: 8 cores where the machine has them (SLURM's --cpus-per-task)
    libero = snakemake_in(repo, "-n", "--cores", "16", "--configfile", "config/libero_goal.yaml",
                          timeout=300)
    assert _threads(libero, "ript") == 8 and _threads(libero, "evaluate") == 8
