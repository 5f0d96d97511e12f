"""RIPT for the discrete OpenVLA (ript.vla.rl_openvla; vla_spec §2, §4.7) on a tiny FAKE
checkpoint: the top-k distribution by hand, stored log-probs equal the teacher-forced
recomputation, an update moves only the LoRA, greedy evaluation equals the released policy's,
and a RIPT policy file loads through `load_policy`."""

from __future__ import annotations

import math

import pytest
import torch

from ript.rl.buffer import Episode, RolloutBuffer
from ript.rl.ppo import PPOConfig, ppo_update, ratio_check_tolerance
from ript.vla.checkpoint import load_checkpoint
from ript.vla.fake import write_fake_checkpoint
from ript.vla.policy import VLAPolicy
from ript.vla.rl_openvla import OpenVLARLPolicy, _top_k_log_softmax
from test_vla_rl import KEY, TASKS, StubBench, digest, observations

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_fake_checkpoint(tmp_path_factory.mktemp("ovla") / "ckpt", "openvla",
                                 suite="libero_spatial")


def make_policy(folder, **kw) -> OpenVLARLPolicy:
    return OpenVLARLPolicy(load_checkpoint(folder, adapter=None), StubBench(), TASKS, KEY, **kw)


def sample(policy, task, seed=0):
    policy.reset(len(task))
    return policy.act(observations(len(task)), torch.tensor(task),
                      torch.Generator().manual_seed(seed))


def test_top_k_log_softmax_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    # k = 2, T = 1: softmax over {2, 1}: log p = -log(1 + e^-1) = -0.31326, then -1.31326
    out = _top_k_log_softmax(logits, 2, 1.0)
    assert out[0, :2].tolist() == pytest.approx([-0.313262, -1.313262], abs=1e-5)
    assert out[0, 2:].tolist() == [-50.0, -50.0]
    # T = 2 halves the logits: {1, 0.5}: -log(1 + e^-0.5) = -0.474077, then -0.974077
    out = _top_k_log_softmax(logits, 2, 2.0)
    assert out[0, :2].tolist() == pytest.approx([-0.474077, -0.974077], abs=1e-5)


def test_stored_log_probs_equal_the_teacher_forced_recomputation(folder):
    policy = make_policy(folder)
    policy.prepare_rl()
    actions, dec, replanned = sample(policy, [0, 1, 0])
    assert actions.shape == (3, 7) and replanned.all()
    assert dec.tokens.shape == dec.logp.shape == dec.logp_topk.shape == (3, 7)
    assert set(dec.context) == {"images", "input_ids"}  # no proprio token for OpenVLA (§2)
    # top-k at T = 1.2: every sampled token has a top-k probability of at least ~1/k·small
    assert torch.all(dec.logp_topk > -50) and torch.all(dec.logp_topk <= 0)
    with torch.no_grad():
        full = policy.log_prob(dec.context, dec.tokens)
        topk = policy.log_prob_sampled(dec.context, dec.tokens)
    tol = ratio_check_tolerance("cpu")
    assert (full - dec.logp).abs().max() < tol
    assert (topk - dec.logp_topk).abs().max() < tol


def test_evaluation_is_greedy_and_equals_the_released_policy(folder):
    policy = make_policy(folder, sampling=False)
    policy.prepare_rl()  # B = 0: the LoRA changes nothing yet
    a, dec, _ = sample(policy, [0, 1])
    assert dec is None
    released = VLAPolicy(load_checkpoint(folder, adapter=None), StubBench(), TASKS, KEY)
    b, _, _ = sample(released, [0, 1])
    assert (a == b).all()
    # sampling is seeded: the same generator seed, the same tokens
    policy.sampling = True
    t1 = sample(policy, [0, 1], seed=5)[1].tokens
    t2 = sample(policy, [0, 1], seed=5)[1].tokens
    assert torch.equal(t1, t2)


def test_an_update_moves_only_the_lora_and_the_file_loads_back(folder, tmp_path):
    from ript.envs import benchmark
    from ript.policy import load_policy, policy_payload
    from ript.train.checkpoint import save

    policy = make_policy(folder)
    named = policy.prepare_rl()
    groups = policy.param_groups()
    assert groups["head"] == [] and all(".lora_" in n for n, _ in named)
    trainable = {id(p) for _, p in named}
    frozen = {n: digest(t) for n, t in list(policy.named_parameters()) +
              list(policy.named_buffers()) if id(t) not in trainable}
    assert any("lm_head" in n for n in frozen) and any("vision_backbone" in n for n in frozen)
    _, dec, _ = sample(policy, [0, 1, 0, 1])
    episodes = [Episode(context_id=i // 2, task_id=i % 2, success=a > 0,
                        contexts={k: v[i:i + 1] for k, v in dec.context.items()},
                        tokens=dec.tokens[i:i + 1], logp=dec.logp[i:i + 1], valid_steps=1,
                        advantage=a) for i, a in enumerate([1.0, -1.0, -1.0, 1.0])]
    out = ppo_update(policy.log_prob, [p for _, p in named],
                     torch.optim.AdamW([p for _, p in named], lr=1e-3),
                     RolloutBuffer(episodes), PPOConfig(), epochs=1, minibatch_size=4,
                     grad_clip=1.0, generator=torch.Generator().manual_seed(0),
                     group_clips=[(groups["lora"], 1.0)], micro_rows=3)
    assert out["initial_ratio_dev"] < ratio_check_tolerance("cpu") and math.isfinite(out["loss"])
    after = {n: digest(t) for n, t in list(policy.named_parameters()) +
             list(policy.named_buffers()) if id(t) not in trainable}
    assert after == frozen
    assert any(float(p.detach().abs().sum()) > 0 for n, p in named if ".lora_B." in n)
    benchmark.register("stub", StubBench)
    try:
        path = tmp_path / "ript.pt"
        save(path, policy_payload(policy, {"obs_spec": {}}))
        loaded, _ = load_policy(path)
        assert type(loaded).__name__ == "OpenVLARLPolicy" and loaded.family == "openvla"
        a, b = policy.state_dict(), loaded.state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert all(k.startswith("lora.") for k in a)
    finally:
        benchmark.REGISTRY.pop("stub")
