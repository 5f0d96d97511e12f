"""Validation rollouts during supervised training (issue #17 item 6): stages 1-2 roll the policy
out on training contexts every `train.eval_every` steps, and `train.select: best_validation`
keeps the best evaluation's weights, on real MetaWorld demonstrations through the stage CLI."""

from __future__ import annotations

import pytest
import torch

from ript.config import ConfigError, from_dict
from ript.data.dataset import load_contexts
from ript.envs.benchmark import of_data
from ript.envs.metaworld import variant_split
from ript.settings import AutoencoderConfig, PriorConfig
from ript.tracking import read_jsonl
from ript.train import checkpoint as ckpt
from ript.train import sft
from ript.train.sft import main, validation_contexts

from test_train import TINY_AE, TINY_PRIOR, _cli, _train, demos, stage0  # noqa: F401

# Two tasks x 3 episodes of at most 60 steps, stepped in this process: ~1 s per evaluation.
VAL = {"eval_episodes": 3, "eval_max_episode_steps": 60, "eval_n_envs": 6,
       "eval_n_workers": 0}


def _prior(demos, stage0, out, **train):  # noqa: F811
    main(_cli(1, demos, out, {**TINY_PRIOR, "train": _train(25, **train)}, init=stage0))
    return ckpt.load(out), read_jsonl(out.with_suffix(".jsonl"))


@pytest.fixture
def snapshots(monkeypatch):
    """Wrap Validator.__call__: {step: (weights, validation records)} of every evaluation."""
    seen = {}
    call = sft.Validator.__call__

    def spy(self, step):
        out = call(self, step)
        seen[step] = ({k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()},
                      list(self.last_records))
        return out

    monkeypatch.setattr(sft.Validator, "__call__", spy)
    return seen


def test_keys_are_checked_and_stage_0_refuses_validation():
    with pytest.raises(ConfigError, match="autoencoder.train.eval_every"):
        from_dict(AutoencoderConfig, {"train": {"eval_every": 10}}, "autoencoder")
    with pytest.raises(ConfigError, match="train.select"):
        from_dict(PriorConfig, {"train": {"select": "best_validation"}}, "prior")
    with pytest.raises(ConfigError, match="train.eval_every"):
        from_dict(PriorConfig, {"train": {"eval_every": -1}}, "prior")
    assert from_dict(PriorConfig, {}, "prior").train.eval_every == 0  # off by default


def test_validation_contexts_are_training_variants_no_demo_used(demos):  # noqa: F811
    ctxs = load_contexts(demos)
    meta = sft.data_meta([*demos])
    bench = of_data(meta)
    val = validation_contexts(bench, ctxs, meta, 30, seed=0)
    train, held = variant_split(meta["eval_variants"])
    demo_variants = {(c.task, c.variant) for c in ctxs}
    assert len(val) == 60 and {c.task for c in val} == {"reach-v3", "drawer-close-v3"}
    assert all(c.variant in train and (c.task, c.variant) not in demo_variants for c in val)
    for t in ("reach-v3", "drawer-close-v3"):
        evaluated = {c.variant for c in bench.eval_contexts(t, 50, 0, meta)}
        assert not evaluated & {c.variant for c in val if c.task == t}
    assert val == validation_contexts(bench, ctxs, meta, 30, seed=0)  # deterministic


def test_stage1_logs_validation_on_training_contexts_and_trains_as_without(
        demos, stage0, tmp_path, snapshots, monkeypatch):  # noqa: F811
    on, rows = _prior(demos, stage0, tmp_path / "on" / "model.pt", eval_every=10, **VAL)
    # at every 10th step and the last; the loss rows stay where they were (log_every 10)
    assert [r["step"] for r in rows if "val_success" in r] == [10, 20, 25] == sorted(snapshots)
    assert [r["step"] for r in rows] == [10, 20, 25]
    for r in rows:
        assert {"ce", "val_success", "val_success/reach-v3",
                "val_success/drawer-close-v3"} <= set(r)
    held = set(variant_split(on["meta"]["data"]["eval_variants"])[1])
    ran = {(rec.task, rec.variant) for _, recs in snapshots.values() for rec in recs}
    assert len(ran) >= 2 and not {v for _, v in ran} & held, "validation ran held-out variants"
    assert all(len(recs) == 6 for _, recs in snapshots.values())

    # off (the default) builds no validator and trains the very same weights
    monkeypatch.setattr(sft, "Validator", None)  # calling it would fail
    off, off_rows = _prior(demos, stage0, tmp_path / "off" / "model.pt")
    assert "selected_step" not in on["meta"] and "selected_step" not in off["meta"]
    for k, v in off["state_dict"].items():
        assert torch.equal(v, on["state_dict"][k]), k
    assert [r["ce"] for r in off_rows] == [r["ce"] for r in rows]


def test_best_validation_keeps_the_best_step_and_resumes_to_the_same_choice(
        demos, stage0, tmp_path, snapshots, monkeypatch):  # noqa: F811
    train = {**VAL, "eval_every": 5, "select": "best_validation"}
    best, rows = _prior(demos, stage0, tmp_path / "straight" / "model.pt", **train)
    vals = [(r["step"], r["val_success"]) for r in rows if "val_success" in r]
    assert [s for s, _ in vals] == [5, 10, 15, 20, 25]
    top = max(v for _, v in vals)
    chosen = next(s for s, v in vals if v == top)  # ties: the earlier step
    assert best["meta"]["selected_step"] == chosen == rows[-1]["selected_step"]
    for k, v in snapshots[chosen][0].items():
        assert torch.equal(best["state_dict"][k], v), k

    # killed after the step-10 checkpoint, then resumed: the same selection, the same weights
    save = ckpt.save

    def crash(path, payload):
        save(path, payload)
        if payload.get("step") == 10:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt, "save", crash)
    out = tmp_path / "killed" / "model.pt"
    with pytest.raises(KeyboardInterrupt):
        _prior(demos, stage0, out, **train)
    assert ckpt.load(out.parent / "ckpt" / "latest.pt")["best"]["step"] in (5, 10)
    monkeypatch.setattr(ckpt, "save", save)
    resumed, resumed_rows = _prior(demos, stage0, out, **train)
    assert resumed["meta"]["selected_step"] == chosen
    assert resumed_rows == rows
    for k, v in best["state_dict"].items():
        assert torch.equal(resumed["state_dict"][k], v), k
