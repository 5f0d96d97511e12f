"""RIPT's Laplace policy for OpenVLA-OFT (ript.vla.rl; vla_spec §4.2-4.4) on a tiny FAKE
checkpoint: the log-prob maths by hand, ratio 1 at sampling time, the per-chunk-step clipped
surrogate, separate group clipping, which weights an update may move, determinism, and the
evaluation path (μ, no sampling). No simulator: a stub benchmark hands out random renders."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from ript.rl.ppo import ratio_check_tolerance
from ript.rl.ppo_loss import clipped_surrogate
from ript.vla import processing as P
from ript.vla.checkpoint import load_checkpoint
from ript.vla.fake import write_fake_checkpoint
from ript.vla.policy import VLAPolicy
from ript.vla.rl import (OFTRLPolicy, clip_groups, laplace_log_prob, laplace_sample,
                         pixel_values)

TASKS = ["pick up the black bowl", "open the top drawer of the cabinet"]
KEY = "libero_spatial_no_noops"


class StubBench:
    name, suite = "stub", "libero_spatial"
    needs_suite = False

    def __init__(self, suite=None):
        pass

    vla_cameras = ("agentview_rgb", "eye_in_hand_rgb")
    vla_images_upside_down = False

    def instruction(self, task):
        return task

    def vla_state(self, obs, rows):
        return np.asarray(obs["state"])[np.asarray(rows)]

    def vla_env_actions(self, a):
        return a


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models: one thread


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_fake_checkpoint(tmp_path_factory.mktemp("oft") / "ckpt", "openvla_oft",
                                 suite="libero_spatial")


def make_policy(folder, **kw) -> OFTRLPolicy:
    return OFTRLPolicy(load_checkpoint(folder, adapter=None), StubBench(), TASKS, KEY, **kw)


def observations(batch: int, seed: int = 0) -> dict:
    g = np.random.default_rng(seed)
    obs = {c: torch.from_numpy(g.integers(0, 256, (batch, 3, 256, 256), dtype=np.uint8))
           for c in StubBench.vla_cameras}
    obs["state"] = torch.from_numpy(g.uniform(-0.2, 1.2, (batch, 8)).astype(np.float32))
    return obs


def sample(policy, task, seed=0, obs_seed=0):
    policy.reset(len(task))
    return policy.act(observations(len(task), obs_seed), torch.tensor(task),
                      torch.Generator().manual_seed(seed))


def digest(t: torch.Tensor) -> bytes:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy()).digest()


# --- maths --------------------------------------------------------------------------------------

def test_laplace_log_prob_by_hand_with_both_clip_edges():
    a, mu = torch.tensor([0.3, 0.3, 0.3, -0.5]), torch.tensor([0.1, 0.1, 0.1, 0.2])
    log_b = torch.tensor([-3.0, 0.0, 1.0, -1.0])  # below −2, inside, above 0.5, inside
    used = [-2.0, 0.0, 0.5, -1.0]
    want = [-lb - abs(x - m) / math.exp(lb) - math.log(2) for x, m, lb in
            zip(a.tolist(), mu.tolist(), used)]
    assert laplace_log_prob(a, mu, log_b).tolist() == pytest.approx(want, abs=1e-6)
    # no clip: the raw log b (−3 → b = e^-3)
    raw = 3.0 - 0.2 / math.exp(-3.0) - math.log(2)  # −log b = +3
    assert float(laplace_log_prob(a[:1], mu[:1], log_b[:1], clip=None)) == pytest.approx(raw)


def test_laplace_sample_uses_s_times_unclipped_b():
    mu = torch.full((200_000,), 0.25)
    log_b = torch.full_like(mu, -3.0)  # below the clip: sampling must not clamp it
    g = torch.Generator().manual_seed(0)
    a = laplace_sample(mu, log_b, 5.0, g)
    # E|a − μ| = s·b for a Laplace; clipping would give 5 e^-2, no scale e^-3
    assert float((a - mu).abs().mean()) == pytest.approx(5 * math.exp(-3.0), rel=0.01)
    assert float((a - mu).mean()) == pytest.approx(0.0, abs=2e-3)
    std = laplace_sample(torch.zeros(5), torch.zeros(5), 1.0, torch.Generator().manual_seed(1))
    again = laplace_sample(torch.ones(5), torch.full((5,), -3.0), 5.0,
                           torch.Generator().manual_seed(1))
    assert torch.allclose(again, 1 + 5 * math.exp(-3.0) * std)


def test_clip_groups_clips_each_group_to_its_own_norm():
    lora, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    lora.grad, head.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.3, 0.4])
    norms = clip_groups({"lora": [lora], "head": [head]}, {"lora": 1.0, "head": 2.0})
    assert norms == pytest.approx({"lora": 5.0, "head": 0.5})
    assert lora.grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-5)  # 5 → 1
    assert head.grad.tolist() == pytest.approx([0.0, 0.3, 0.4])  # 0.5 < 2: untouched
    head.grad = torch.tensor([0.0, 2.4, 3.2])  # norm 4 → 2, whatever the other group holds
    clip_groups({"lora": [lora], "head": [head]}, {"lora": 1.0, "head": 2.0})
    assert head.grad.tolist() == pytest.approx([0.0, 1.2, 1.6], rel=1e-5)
    assert lora.grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-5)


# --- the policy ---------------------------------------------------------------------------------

def test_recomputed_log_prob_equals_the_stored_one_after_prepare_rl(folder):
    policy = make_policy(folder)
    with torch.no_grad():  # log b on both sides of the clip, and log 5b above 0.5
        policy.scale_head.log_b_head.bias.copy_(torch.linspace(-3.5, -0.5, 7))
    task = [0, 1, 1, 0]  # two prompts of different lengths: PPO batches mix them (padding)
    _, before, _ = sample(policy, task)
    named = policy.prepare_rl()
    assert any(".lora_B." in n for n, _ in named)
    actions, dec, replanned = sample(policy, task)  # same seed: LoRA B = 0 changes nothing
    assert replanned.all() and actions.shape == (4, 7)
    assert dec.tokens.shape == (4, 8, 7) and dec.logp.shape == dec.logp_topk.shape == (4, 8)
    assert dec.context["images"].dtype == torch.uint8
    assert dec.context["images"].shape == (4, 2, 224, 224, 3)
    assert dec.context["input_ids"].shape[0] == 4 and dec.context["proprio"].shape == (4, 8)
    assert torch.equal(dec.tokens, before.tokens)
    assert torch.allclose(dec.logp, before.logp, atol=1e-5)
    # the executed first action is the first step of the sampled chunk, un-normalised
    first = P.unnormalize_actions(dec.tokens[:, 0].numpy(), policy.action_stats, eps=1e-8)
    assert np.allclose(actions, first, atol=1e-6)
    # a mixed-prompt batch: log_prob regroups rows by prompt, as act batched them, so the
    # recomputation repeats the sampling-time arithmetic
    lp = policy.log_prob(dec.context, dec.tokens)
    assert lp.requires_grad
    assert (lp - dec.logp).abs().max() < 1e-5
    assert (policy.log_prob_sampled(dec.context, dec.tokens) - dec.logp_topk).abs().max() < 1e-5
    # other batch sizes (PPO's minibatches are not the rollout's batches) move float32 sums:
    # |Δℓ| ~ 2e-5 here, within PPO's own CPU ratio check
    policy.max_rows = 1
    dev = (policy.log_prob(dec.context, dec.tokens) - dec.logp).abs().max()
    assert dev < ratio_check_tolerance("cpu")
    # by hand from (μ, log b): logp under the clipped unscaled b, logp_topk under 5·b unclipped
    with torch.no_grad():
        mu, log_b = (x.double() for x in policy.distribution(dec.context))
    dev = (dec.tokens.double() - mu).abs()
    lb = log_b.clamp(-2.0, 0.5)
    assert torch.allclose(dec.logp.double(), (-lb - dev / lb.exp() - math.log(2)).sum(-1),
                          atol=1e-4)
    ls = log_b + math.log(5.0)
    assert torch.allclose(dec.logp_topk.double(), (-ls - dev / ls.exp() - math.log(2)).sum(-1),
                          atol=1e-4)
    assert torch.isfinite(policy.entropy(dec.context, dec.tokens))


def test_clipped_surrogate_per_chunk_step_by_hand(folder):
    policy = make_policy(folder)
    policy.prepare_rl()
    _, dec, _ = sample(policy, [0, 1], seed=3)
    with torch.no_grad():
        mu, log_b = policy.distribution(dec.context)
        delta = torch.tensor([0.05, -0.04, 0.03, 0.0, 0.02, -0.01, 0.06])
        policy.action_head.model.fc2.bias += delta  # μ moves by δ at every chunk step
    b = log_b.double().clamp(-2.0, 0.5).exp()
    a, mu = dec.tokens.double(), mu.double()
    # one ratio per chunk step: exp Σ_d (|a − μ| − |a − μ − δ|) / b
    ratio = (((a - mu).abs() - (a - mu - delta.double()).abs()) / b).sum(-1).exp()
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64)
    eps = 0.1
    want = torch.empty_like(ratio)
    for i in range(2):
        for k in range(8):
            r, A = float(ratio[i, k]), float(adv[i])
            want[i, k] = max(-A * r, -A * min(max(r, 1 - eps), 1 + eps))
    loss, got_ratio, _ = clipped_surrogate(policy.log_prob(dec.context, dec.tokens), dec.logp,
                                           adv.float(), eps, eps)
    assert loss.shape == (2, 8)
    assert torch.allclose(got_ratio.double(), ratio, rtol=1e-4)
    assert torch.allclose(loss.double(), want, rtol=1e-4, atol=1e-6)
    assert (ratio - 1).abs().max() > 0.1  # some steps are clipped: the check has teeth


def test_an_update_moves_only_lora_and_the_l1_head(folder):
    policy = make_policy(folder)
    named = policy.prepare_rl()
    groups = policy.param_groups()
    assert all(".lora_" in n or n.startswith("action_head.") for n, _ in named)
    trainable = {id(p) for ps in groups.values() for p in ps}
    assert trainable == {id(p) for _, p in named}
    assert {id(p) for p in groups["head"]} == {id(p) for p in policy.action_head.parameters()}
    frozen = {n: digest(t) for n, t in list(policy.named_parameters()) +
              list(policy.named_buffers()) if id(t) not in trainable}
    assert any(n.startswith("scale_head.") for n in frozen)
    assert any(n.startswith("proprio_projector.") for n in frozen)
    assert any(n.startswith("vla.vision_backbone.") for n in frozen)
    assert any("base_layer" in n for n in frozen)  # the LLM's own weights under the LoRA
    moving = {n: p.detach().clone() for n, p in named}
    _, dec, _ = sample(policy, [0, 1])
    opt = torch.optim.AdamW([{"params": groups["lora"], "lr": 1e-3},
                             {"params": groups["head"], "lr": 1e-3}], weight_decay=1e-4)
    loss, _, _ = clipped_surrogate(policy.log_prob(dec.context, dec.tokens), dec.logp,
                                   torch.tensor([1.0, -1.0]), 0.1, 0.1)
    loss.mean().backward()
    norms = clip_groups(groups, {"lora": 1.0, "head": 1.0})
    assert norms["lora"] > 0 and norms["head"] > 0
    opt.step()
    after = {n: digest(t) for n, t in list(policy.named_parameters()) +
             list(policy.named_buffers()) if id(t) not in trainable}
    assert after == frozen
    changed = {n for n, p in named if not torch.equal(p, moving[n])}
    assert any(".lora_B." in n for n in changed)
    assert any(n.startswith("action_head.") for n in changed)


def test_sampling_is_seeded_and_evaluation_executes_mu(folder):
    policy = make_policy(folder)
    a1, d1, _ = sample(policy, [0, 1], seed=5)
    a2, d2, _ = sample(policy, [0, 1], seed=5)
    a3, d3, _ = sample(policy, [0, 1], seed=6)
    assert np.array_equal(a1, a2) and torch.equal(d1.tokens, d2.tokens)
    assert torch.equal(d1.logp, d2.logp)
    assert not torch.equal(d1.tokens, d3.tokens)
    # evaluation: no sampling, no record; the executed chunk is μ of RIPT's prefix decoding,
    # as the plain VLA policy computes it (its own per-image pixel pipeline)
    policy.sampling = False
    policy.reset(2)
    obs = observations(2)
    actions, dec, _ = policy.act(obs, torch.tensor([0, 1]), torch.Generator().manual_seed(5))
    assert dec is None
    chunks = [policy.queues[i] for i in range(2)]
    plain = VLAPolicy(policy.ckpt, StubBench(), TASKS, KEY, decoding="prefix")
    want = np.stack([plain.predict(obs, [i], i)[0] for i in range(2)])
    got = np.stack([np.stack([actions[i], *chunks[i]]) for i in range(2)])
    assert np.allclose(got, want, atol=1e-5)
    # the batched pixel pipeline equals processing.pixel_values bit for bit
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 2, 224, 224, 3),
                                                             dtype=np.uint8))
    ref = P.pixel_values([img[0, 0].numpy(), img[0, 1].numpy()], policy.ckpt.image_norm)
    assert torch.equal(pixel_values(img, policy.ckpt.image_norm)[0], ref)


def test_state_dict_round_trip_rebuilds_the_policy(folder):
    policy = make_policy(folder)
    policy.prepare_rl()
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if ".lora_B." in n or n.startswith("action_head."):
                p.add_(0.01 * torch.randn_like(p))
    state = policy.state_dict()
    assert {k.split(".")[0] for k in state} == {"lora", "action_head", "scale_head"}
    again = OFTRLPolicy.from_arch(policy.arch, bench=StubBench())
    again.load_state_dict(state)
    _, dec, _ = sample(policy, [1, 0], seed=2)
    assert torch.allclose(again.log_prob(dec.context, dec.tokens), dec.logp, atol=1e-5)
    with pytest.raises(KeyError):
        again.load_state_dict({k: v for k, v in state.items() if not k.startswith("scale")})


def test_scale_head_from_the_released_file_or_fresh(folder):
    # RIPT's released layout {scale_trunk, log_b_head} (vla_spec §4.1)
    released = torch.load(folder / "scale_header.pth", weights_only=True)
    policy = make_policy(folder)
    assert policy.scale_head_file.endswith("scale_header.pth")
    assert torch.equal(policy.scale_head.log_b_head.bias, released["log_b_head"]["bias"])
    assert torch.equal(policy.scale_head.trunk.fc1.weight, released["scale_trunk"]["fc1.weight"])
    fresh = make_policy(folder, scale_head=None)
    assert fresh.scale_head_file is None
    assert torch.equal(fresh.scale_head.log_b_head.bias, torch.full((7,), -3.0))
    assert float(fresh.scale_head.log_b_head.weight.abs().max()) < 0.01


def test_ppo_update_trains_oft_decisions_with_separate_group_clips(folder):
    """RIPT's PPO loop (ript.rl.ppo.ppo_update) on OFT records: one token per chunk step
    (tokens (S, 8, 7), logp (S, 8)), ratio 1 before the first step, LoRA and L1 head clipped
    each to its own norm (vla_spec §4.4, §4.5) and moved."""
    from ript.rl.buffer import Episode, RolloutBuffer
    from ript.rl.ppo import PPOConfig, ppo_update

    policy = make_policy(folder)
    named = policy.prepare_rl()
    groups = policy.param_groups()
    _, dec, _ = sample(policy, [0, 1, 0, 1])
    advantages = [1.0, -1.0, -1.0, 1.0]  # two groups of K = 2 (leave-one-out: ±1)
    episodes = [Episode(context_id=i // 2, task_id=i % 2, success=a > 0,
                        contexts={k: v[i:i + 1] for k, v in dec.context.items()},
                        tokens=dec.tokens[i:i + 1], logp=dec.logp[i:i + 1], valid_steps=1,
                        advantage=a) for i, a in enumerate(advantages)]
    buffer = RolloutBuffer(episodes)
    assert buffer.n_tokens == 4 * 8  # one token per chunk step, not per action dimension
    before = {n: p.detach().clone() for n, p in named}
    # plain SGD with lr 1: a group's step is its clipped gradient, so its norm shows the clip
    opt = torch.optim.SGD([p for _, p in named], lr=1.0)
    seen = []
    out = ppo_update(policy.log_prob, [p for _, p in named], opt, buffer,
                     PPOConfig(clip_low=0.1, clip_high=0.1), epochs=1, minibatch_size=4,
                     grad_clip=1.0, generator=torch.Generator().manual_seed(0),
                     on_minibatch=seen.append,
                     group_clips=[(groups["lora"], 1e-3), (groups["head"], 2e-3)])
    assert out["initial_ratio_dev"] < ratio_check_tolerance("cpu")
    assert math.isfinite(out["loss"]) and seen[0]["n_tokens"] == 32
    assert out["grad_norm"] > 2e-3  # the pre-clip norm over both groups, as reported

    def step_norm(params):
        ids = {id(p) for p in params}
        return math.sqrt(sum(float((p - before[n]).pow(2).sum()) for n, p in named
                             if id(p) in ids))

    assert step_norm(groups["lora"]) == pytest.approx(1e-3, rel=1e-3)
    assert step_norm(groups["head"]) == pytest.approx(2e-3, rel=1e-3)


def test_a_ript_oft_policy_file_loads_through_load_policy(folder, tmp_path):
    """RIPT's OFT checkpoints are policy files of family openvla_oft (ript.policy): LoRA +
    heads, the frozen base rebuilt from the checkpoint folder."""
    from ript.envs import benchmark
    from ript.policy import load_policy, policy_payload
    from ript.train.checkpoint import save

    benchmark.register("stub", StubBench)  # what the file names as its benchmark
    policy = make_policy(folder)
    named = policy.prepare_rl()
    with torch.no_grad():
        for _, p in named:
            p.add_(0.01)
    path = tmp_path / "ript.pt"
    save(path, policy_payload(policy, {"obs_spec": {}}))
    loaded, meta = load_policy(path)
    assert type(loaded).__name__ == "OFTRLPolicy" and loaded.family == "openvla_oft"
    a, b = policy.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    benchmark.REGISTRY.pop("stub")
