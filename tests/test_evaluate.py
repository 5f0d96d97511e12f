"""Evaluation stage (spec §6): Wilson interval, CLI end to end, aggregation, infrastructure
errors (never scored as policy failures), the policy's device. The report: tests/test_report.py."""

from __future__ import annotations

import csv
import json
import multiprocessing as mp

import numpy as np
import pytest
import torch

from ript.envs.metaworld import ScriptedExpertPolicy
from ript.evaluate import EvalConfig, error_problem, evaluate
from ript.evaluate import main as eval_main
from ript.results import aggregate, summarize, wilson_interval

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
            "--no-mlflow", "--policy-name", "sft", "--task", "reach-v3"]
    cfg = {"episodes_per_task": 2, "n_envs": 2, "n_workers": 0, "max_episode_steps": 12}
    eval_main([*args, "--out-dir", str(tmp_path / "out"), "--config", json.dumps(cfg)])
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    # the policy's data held out the last 20 variants: evaluation uses exactly those
    assert s["episodes"] == 2 and s["variants"] == [30, 31] and s["errors"] == 0
    assert s["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    # an explicit CPU run: the same sampled episodes as before --device existed (on a CPU-only
    # machine `auto` is that run, so the two files must match byte for byte)
    eval_main([*args, "--out-dir", str(tmp_path / "cpu"), "--config", json.dumps(cfg),
               "--device", "cpu"])
    if not torch.cuda.is_available():
        assert (tmp_path / "out" / "episodes.csv").read_bytes() == \
            (tmp_path / "cpu" / "episodes.csv").read_bytes()
        with pytest.raises(SystemExit, match="no CUDA device"):
            eval_main([*args, "--out-dir", str(tmp_path / "x"), "--config", json.dumps(cfg),
                       "--device", "cuda"])
    else:  # the GPU path: the policy and its sampling on CUDA, simulators on the CPU
        eval_main([*args, "--out-dir", str(tmp_path / "gpu"), "--config", json.dumps(cfg),
                   "--device", "cuda"])
        g = json.loads((tmp_path / "gpu" / "summary.json").read_text())
        assert g["device"] == "cuda" and g["episodes"] == 2 and g["errors"] == 0
    with pytest.raises(ValueError, match="expected one of"):  # a task the policy never saw
        eval_main([*args[:-2], "--task", "push-v3", "--out-dir", str(tmp_path / "x"),
                   "--config", json.dumps(cfg)])


# --- infrastructure errors: counted, reported, never scored as policy failures -------------

def test_evaluation_that_only_errors_fails_and_keeps_its_records(tmp_path):
    """A step timeout no simulator can meet: every episode is lost to a killed worker. The job
    fails naming task, count and error, and the records survive in undeclared files; when the
    user tolerates the errors, they are reported and nothing is scored."""
    cfg = {"episodes_per_task": 3, "n_envs": 3, "n_workers": 1, "max_episode_steps": 60,
           "step_timeout_s": 1e-4}
    out = tmp_path / "eval"
    args = ["--checkpoint", "scripted:expert", "--task", "reach-v3", "--out-dir", str(out),
            "--experiment-dir", str(tmp_path), "--experiment", "errs", "--policy-name", "expert"]
    with pytest.raises(SystemExit) as failure:
        eval_main([*args, "--config", json.dumps(cfg)])
    message = str(failure.value.code)
    assert "evaluation of reach-v3 failed: 3 of 3 episodes" in message
    assert "worker 0 gave no answer within 0.0001 s" in message
    assert str(out / "episodes.failed.csv") in message
    assert not (out / "summary.json").exists() and not (out / "episodes.csv").exists()
    rows = list(csv.DictReader(open(out / "episodes.failed.csv")))
    assert len(rows) == 3 and all("no answer within" in r["error"] for r in rows)
    failed = json.loads((out / "summary.failed.json").read_text())
    assert (failed["episodes"], failed["errors"], failed["error_fraction"]) == (3, 3, 1.0)
    assert failed["first_error"] == rows[0]["error"]
    _, (run,) = mlflow_runs(tmp_path / "mlflow.db", "errs")
    assert run.info.status == "FAILED" and run.data.metrics["error_fraction"] == 1.0
    assert run.data.metrics["errors"] == 3

    eval_main([*args, "--no-mlflow", "--config",
               json.dumps({**cfg, "max_error_fraction": 1.0})])
    s = json.loads((out / "summary.json").read_text())
    # nothing ran without an error: 0 scored episodes, interval [0, 1] (no information)
    assert (s["episodes"], s["errors"], s["successes"]) == (3, 3, 0)
    assert (s["success_rate"], s["wilson_low"], s["wilson_high"]) == (0.0, 0.0, 1.0)
    assert not (out / "summary.failed.json").exists()  # the failed attempt is superseded
    t = aggregate([out / "summary.json"], tmp_path / "t.csv").iloc[0]
    table = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["errors"] for r in table] == ["3", "3"] and t["errors"] == 3
    with pytest.raises(Exception, match="max_error_fraction"):
        eval_main([*args, "--config", json.dumps({**cfg, "max_error_fraction": 1.5})])


class _KillsWorker1Once(ScriptedExpertPolicy):
    """The scripted expert, which SIGKILLs env worker 1 (slot 1's) at its first action: a real
    dead simulator process in the middle of an episode."""

    killed = False

    def act(self, obs, task, generator=None, active=None):
        if not self.killed:
            (worker,) = [p for p in mp.active_children() if p.name == "ript-env-worker-1"]
            worker.kill()
            worker.join()
            self.killed = True
        return super().act(obs, task, generator, active)


def test_an_errored_episode_is_reported_not_scored():
    cfg = EvalConfig(episodes_per_task=4, n_envs=2, n_workers=2, max_episode_steps=150)
    records = evaluate(_KillsWorker1Once(), "reach-v3", cfg, 0, {"obs_spec": {"image": False}})
    # slot i runs on worker i: episode 1 (slot 1) dies; slot 1 takes episode 2 on a fresh
    # worker, slot 0 runs episodes 0 and 3. The expert solves reach on every episode that runs.
    assert [r.error is not None for r in records] == [False, True, False, False]
    assert "worker 1 died" in records[1].error
    s = summarize("reach-v3", records, "expert")
    assert (s["episodes"], s["errors"], s["successes"]) == (4, 1, 3)
    assert s["error_fraction"] == 0.25 and s["first_error"] == records[1].error
    # 3 of 3 scored episodes: n = 3, z² = 3.8416, denominator 1 + z²/3 = 2.280533;
    # centre = (1 + z²/6) / 2.280533 = 0.719247, half = 1.96 · (1.96 / 6) / 2.280533 = 0.280753
    assert s["success_rate"] == 1.0
    assert s["wilson_low"] == pytest.approx(0.438494, abs=1e-6) and s["wilson_high"] == 1.0
    assert s["mean_length"] == np.mean([records[i].length for i in (0, 2, 3)])
    assert error_problem(s, 0.25) is None  # 1/4 is not more than a quarter
    assert "reach-v3 failed: 1 of 4 episodes" in error_problem(s, 0.2)


def test_aggregate_counts_errors_hand_written(tmp_path):
    a = {"task": "a-v3", "policy": "sft", "episodes": 10, "errors": 2, "successes": 6,
         "success_rate": 0.75, "wilson_low": 0.0, "wilson_high": 1.0, "mean_length": 100.0}
    b = {"task": "b-v3", "policy": "sft", "episodes": 10, "successes": 5,  # older: no errors
         "success_rate": 0.5, "wilson_low": 0.0, "wilson_high": 1.0, "mean_length": 50.0}
    for name, row in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(row))
    aggregate([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "table.csv")
    table = list(csv.DictReader(open(tmp_path / "table.csv")))
    assert [r["errors"] for r in table] == ["2", "0", "2"]
    mean = table[-1]
    assert (mean["episodes"], mean["successes"]) == ("20", "11")
    assert float(mean["success_rate"]) == pytest.approx((0.75 + 0.5) / 2)
    # Wilson over the 18 scored episodes, 11 successes: p = 0.611111, z²/n = 0.213422,
    # denominator 1.213422, centre = (p + z²/36) / 1.213422 = 0.717822 / 1.213422 = 0.591568,
    # half = 1.96 · sqrt(0.013203 + 0.002964) / 1.213422 = 0.249215 / 1.213422 = 0.205382
    assert float(mean["wilson_low"]) == pytest.approx(0.386187, abs=2e-6)
    assert float(mean["wilson_high"]) == pytest.approx(0.796950, abs=2e-6)
    # mean length over scored episodes: (8 · 100 + 10 · 50) / 18
    assert float(mean["mean_length"]) == pytest.approx(1300 / 18)
