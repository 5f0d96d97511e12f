"""Evaluation stage (spec §6): Wilson interval, CLI end to end, aggregation."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from ript.evaluate import main as eval_main
from ript.evaluate import wilson_interval

from conftest import mlflow_runs, tiny_quest_parts


def test_wilson_interval_hand_computed():
    # z = 1.96, n = 10: z²/n = 0.38416, denominator 1.38416.
    # 0/10: centre = half = 0.19208 / 1.38416 = 0.138770 -> [0, 0.277540]
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.277540, abs=1e-6))
    # 10/10 mirrors it: [1 - 0.277540, 1]
    assert wilson_interval(10, 10) == (pytest.approx(0.722460, abs=1e-6), 1.0)
    # 5/10: centre 0.5, half = 1.96 * sqrt(0.025 + 0.009604) / 1.38416 = 0.263410
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.236590, abs=1e-6) and hi == pytest.approx(0.763410, abs=1e-6)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_evaluate_cli_end_to_end(tmp_path):
    from ript.data.dataset import load_contexts
    from ript.data.metaworld_demos import DataConfig, generate

    generate("reach-v3", DataConfig(tasks=["reach-v3"], demos_per_task=3), 0,
             tmp_path / "reach.hdf5")
    demo_variants = {c.variant for c in load_contexts([tmp_path / "reach.hdf5"])}
    cfg = '{"episodes_per_task": 4, "n_envs": 2, "n_workers": 1, "max_episode_steps": 150}'
    common = ["--task", "reach-v3", "--config", cfg, "--experiment-dir", str(tmp_path),
              "--seed", "3", "--experiment", "e2e"]
    for name, ckpt, flags in (("expert", "scripted:expert", []),
                              ("again", "scripted:expert", ["--no-mlflow"]),
                              ("random", "scripted:random", ["--no-mlflow"])):
        eval_main(["--checkpoint", ckpt, "--out-dir", str(tmp_path / name),
                   "--policy-name", name, *common, *flags])
    metrics = json.loads((tmp_path / "expert" / "metrics.jsonl").read_text())
    assert metrics["success_rate"] == 1.0 and (tmp_path / "mlflow.db").exists()
    _, (run,) = mlflow_runs(tmp_path / "mlflow.db", "e2e")
    assert run.data.tags["stage"] == "eval-expert" and run.data.metrics["success_rate"] == 1.0
    rows = list(csv.DictReader(open(tmp_path / "expert" / "episodes.csv")))
    assert [r["variant"] for r in rows] == ["25", "26", "27", "28"]
    assert not demo_variants & {int(r["variant"]) for r in rows}
    assert (tmp_path / "expert" / "episodes.csv").read_text() == \
        (tmp_path / "again" / "episodes.csv").read_text()  # deterministic under a seed
    s = json.loads((tmp_path / "expert" / "summary.json").read_text())
    assert s["episodes"] == 4 and s["successes"] == 4 and s["policy"] == "expert"
    assert (s["wilson_low"], s["wilson_high"]) == wilson_interval(4, 4)
    assert s["mean_length"] == np.mean([int(r["length"]) for r in rows])
    eval_main(["aggregate", "--inputs", str(tmp_path / "expert" / "summary.json"),
               str(tmp_path / "random" / "summary.json"), "--out", str(tmp_path / "t.csv")])
    table = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [t["task"] for t in table] == ["reach-v3", "reach-v3", "mean"]
    rnd = json.loads((tmp_path / "random" / "summary.json").read_text())
    assert float(table[-1]["success_rate"]) == pytest.approx((1 + rnd["success_rate"]) / 2)
    assert float(table[-1]["wilson_low"]) == pytest.approx(
        wilson_interval(4 + rnd["successes"], 8)[0])


def test_evaluate_cli_with_policy_checkpoint(tmp_path, one_thread):
    """A final policy file as the training stages write it, loaded by ript.train.checkpoint."""
    from ript.models.policy import QuestPolicy
    from ript.train.checkpoint import save

    policy = QuestPolicy(*tiny_quest_parts(), action_horizon=4)
    meta = {"obs_spec": {"image": False, "image_size": 128}, "task_names": ["reach-v3"],
            "data": {"eval_variants": 20}}
    save(tmp_path / "model.pt", {"kind": "policy", "arch": policy.arch, "meta": meta,
                                 "state_dict": policy.state_dict()})
    args = ["--checkpoint", str(tmp_path / "model.pt"), "--experiment-dir", str(tmp_path),
            "--no-mlflow", "--policy-name", "sft", "--out-dir", str(tmp_path / "out")]
    cfg = {"episodes_per_task": 2, "n_envs": 2, "n_workers": 0, "max_episode_steps": 12}
    eval_main([*args, "--task", "reach-v3", "--config", json.dumps(cfg)])
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    # the policy's data held out the last 20 variants: evaluation uses exactly those
    assert s["episodes"] == 2 and s["variants"] == [30, 31] and s["errors"] == 0
    with pytest.raises(ValueError, match="expected one of"):  # a task the policy never saw
        eval_main([*args, "--task", "push-v3", "--config", json.dumps(cfg)])
