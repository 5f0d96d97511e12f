"""RL maths of the RIPT stage: advantages, dynamic sampling, the clipped surrogate, the loss
aggregation and the rollout buffer (spec §5.1, §5.3, §5.5, §5.6, §8 B3/B16); the update loop
itself is in test_ppo_update.py.

Expected numbers are worked out by hand in the comments, not recomputed with the code under test.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ript.rl.advantages import (
    DynamicSampler,
    is_informative,
    leave_one_out_advantages,
    should_stop,
)
from ript.rl.buffer import Batch, Episode, RolloutBuffer
from ript.rl.ppo_loss import (
    PPOConfig,
    aggregate_loss,
    clipped_surrogate,
    ppo_loss,
    token_entropy,
)

# ----------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("K", range(2, 9))
def test_rloo_closed_form_all_k_s(K):
    rng = np.random.default_rng(K)
    for s in range(K + 1):
        r = np.zeros(K)
        r[rng.permutation(K)[:s]] = 1.0
        for adv in (
            leave_one_out_advantages(r[None]),
            leave_one_out_advantages(torch.tensor(r[None])),
        ):
            adv = np.asarray(adv)[0]
            if s in (0, K):
                expected = np.zeros(K)
            else:
                expected = np.where(r == 1.0, (K - s) / (K - 1), -s / (K - 1))
            np.testing.assert_allclose(adv, expected, atol=1e-12)


def test_rloo_hand_example_and_types():
    adv = leave_one_out_advantages(np.array([[1, 0, 0, 1], [0, 0, 0, 1]]))
    assert isinstance(adv, np.ndarray) and adv.shape == (2, 4)
    # group 1: b_0 = (0+0+1)/3 → 1 − 1/3 = 2/3; b_1 = (1+0+1)/3 → −2/3.
    np.testing.assert_allclose(adv[0], [2 / 3, -2 / 3, -2 / 3, 2 / 3])
    # group 2: s = 1, K = 4: success 3/3 = 1, failures −1/3.
    np.testing.assert_allclose(adv[1], [-1 / 3, -1 / 3, -1 / 3, 1.0])
    t = leave_one_out_advantages(torch.tensor([[1.0, 0.0]]))
    assert isinstance(t, torch.Tensor) and torch.allclose(t, torch.tensor([[1.0, -1.0]]))
    with pytest.raises(ValueError):
        leave_one_out_advantages(np.array([[1.0]]))


def test_is_informative():
    assert not is_informative(np.array([0, 0, 0]))
    assert not is_informative(torch.ones(8))
    assert is_informative([0, 1, 0, 0])


def test_dynamic_sampler_target_stop():
    ds = DynamicSampler(target_groups=2, max_rejected=5)
    seq = [[1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 1]]
    assert [ds.offer(np.array(r)) for r in seq] == [False, True, False, True]
    assert (ds.accepted, ds.rejected, ds.done, ds.stop_reason) == (2, 2, True, "target")
    with pytest.raises(RuntimeError):
        ds.offer(np.array([0, 1, 1]))


def test_dynamic_sampler_rejected_cap():
    ds = DynamicSampler(target_groups=5, max_rejected=2)
    assert ds.offer([0, 1]) and not ds.done and ds.stop_reason is None
    assert not ds.offer([0, 0])
    assert not ds.done
    assert not ds.offer([1, 1])
    assert ds.done and ds.stop_reason == "rejected_cap" and ds.accepted == 1


def test_dynamic_sampling_off_accepts_uniform():
    ds = DynamicSampler(target_groups=2, max_rejected=1, dynamic_sampling=False)
    assert ds.offer([0, 0, 0]) and ds.offer([1, 1, 1])
    assert ds.rejected == 0 and ds.stop_reason == "target"


def test_early_stop_threshold():
    # ⌊0.8 × 180⌋ = 144 (spec §5.3 2d).
    assert not should_stop(143, 0.8, 180)
    assert should_stop(144, 0.8, 180)
    assert DynamicSampler.should_stop(150, 0.8, 180)
    # ⌊0.29 × 100⌋ = 29 even though 0.29*100 = 28.999... in floating point.
    assert not should_stop(28, 0.29, 100) and should_stop(29, 0.29, 100)
    assert not should_stop(179, 1.0, 180) and should_stop(180, 1.0, 180)
    # floor, not round/ceil: ⌊0.8 × 181⌋ = ⌊144.8⌋ = 144.
    assert not should_stop(143, 0.8, 181) and should_stop(144, 0.8, 181)


# ----------------------------------------------------------------------------- surrogate


def _surr(ratio, adv, lo=0.2, hi=0.2):
    lp_new = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, rho, clipped = clipped_surrogate(lp_new, torch.zeros(1, 1), torch.tensor([adv]), lo, hi)
    loss.sum().backward()
    return float(loss.detach()), float(rho), bool(clipped), float(lp_new.grad)


@pytest.mark.parametrize(
    "ratio, adv, lo, hi, exp_loss, exp_clipped",
    [
        (1.5, 2.0, 0.2, 0.2, -2.4, True),  # A>0, ρ > 1+ε: −A·1.2 = −2.4 (vs −3.0)
        (0.5, -1.0, 0.2, 0.2, 0.8, True),  # A<0, ρ < 1−ε: −A·0.8 = 0.8 (vs 0.5)
        (1.5, -1.0, 0.2, 0.2, 1.5, False),  # A<0, ρ high: unclipped −A·ρ = 1.5 wins
        (0.5, 1.0, 0.2, 0.2, -0.5, False),  # A>0, ρ low: unclipped −0.5 > −0.8
        (1.1, 3.0, 0.2, 0.2, -3.3, False),  # inside the trust region
        (1.5, 1.0, 0.1, 0.3, -1.3, True),  # asymmetric: ceiling 1.3
        (1.25, 1.0, 0.1, 0.3, -1.25, False),  # would clip at 1.2 with ε_high=0.2
        (0.5, -1.0, 0.1, 0.3, 0.9, True),  # asymmetric: floor 0.9
        (0.85, -2.0, 0.1, 0.3, 1.8, True),  # −A·0.9 = 1.8 (vs 1.7)
        (0.85, -2.0, 0.2, 0.2, 1.7, False),  # floor 0.8 not reached
    ],
)
def test_clipped_surrogate_hand(ratio, adv, lo, hi, exp_loss, exp_clipped):
    loss, rho, clipped, grad = _surr(ratio, adv, lo, hi)
    assert rho == pytest.approx(ratio, rel=1e-6)
    assert loss == pytest.approx(exp_loss, rel=1e-6)
    assert clipped == exp_clipped
    # d(−A·ρ)/dℓ_new = −A·ρ when unclipped; 0 on the clipped (flat) branch.
    assert grad == pytest.approx(0.0 if exp_clipped else -adv * ratio, rel=1e-6, abs=1e-7)


# ----------------------------------------------------------------------------- aggregation

# Episode 0: 1 valid step, episode 1: 3 valid steps, episode 2: padding (its rows present here on
# purpose to check they are masked). n = 2 tokens per step.
_LOSS = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [100.0, 100.0]])
_EIDX = torch.tensor([0, 1, 1, 1, 2])
_VALID = torch.tensor([True, True, False])


def test_aggregate_token_mean():
    # (1+2+…+8) / 8 tokens = 36/8; the padding row is ignored.
    out = aggregate_loss(_LOSS, _EIDX, 3, _VALID, token_level_mean=True)
    assert float(out) == pytest.approx(36 / (8 + 1e-6), rel=1e-7)


def test_aggregate_per_episode_mean():
    # ep0: (1+2)/2 = 1.5; ep1: (3+…+8)/6 = 5.5; ep2 (padding): 0; → (1.5+5.5+0)/3 = 7/3.
    out = aggregate_loss(_LOSS, _EIDX, 3, _VALID, token_level_mean=False)
    assert float(out) == pytest.approx(7 / 3, rel=1e-7)
    # Without the padding slot the denominator is 2: (1.5+5.5)/2 = 3.5.
    out2 = aggregate_loss(_LOSS[:4], _EIDX[:4], 2, _VALID[:2], token_level_mean=False)
    assert float(out2) == pytest.approx(3.5, rel=1e-7)


@pytest.mark.parametrize("token_level", [True, False])
def test_padding_rows_get_zero_gradient(token_level):
    lp = torch.zeros(5, 2, requires_grad=True)
    loss_tok, _, _ = clipped_surrogate(
        lp, torch.zeros(5, 2), torch.tensor([1.0, -1, -1, -1, 5]), 0.2, 0.2
    )
    aggregate_loss(loss_tok, _EIDX, 3, _VALID, token_level).backward()
    assert torch.all(lp.grad[4] == 0)
    assert torch.all(lp.grad[:4] != 0)
    if token_level:  # each valid token: −A/8 (ρ = 1)
        assert float(lp.grad[0, 0]) == pytest.approx(-1 / 8, rel=1e-5)
        assert float(lp.grad[1, 0]) == pytest.approx(1 / 8, rel=1e-5)
    else:  # ep0 token: −A/(2·3); ep1 token: +1/(6·3)
        assert float(lp.grad[0, 0]) == pytest.approx(-1 / 6, rel=1e-6)
        assert float(lp.grad[1, 0]) == pytest.approx(1 / 18, rel=1e-6)


def test_nan_in_padding_row_does_not_leak():
    loss = _LOSS.clone()
    loss[4] = float("nan")
    for tl in (True, False):
        assert math.isfinite(float(aggregate_loss(loss, _EIDX, 3, _VALID, tl)))


def test_ppo_loss_stats_and_kl():
    batch = Batch(
        contexts=torch.zeros(2, 2, 1),
        tokens=torch.zeros(2, 1, dtype=torch.long),
        logp_old=torch.zeros(2, 1),
        advantages=torch.tensor([2.0, -1.0]),
        episode_index=torch.tensor([0, 1]),
        n_episodes=2,
        valid_episode=torch.tensor([True, True]),
    )
    lp = torch.log(torch.tensor([[1.5], [0.5]]))
    loss, st = ppo_loss(lp, batch, PPOConfig())
    # token losses −2.4 and 0.8 (both clipped) → mean −0.8.
    assert st["loss"] == pytest.approx(-0.8, rel=1e-5) and float(loss) == pytest.approx(
        -0.8, rel=1e-5
    )
    assert st["clip_frac"] == 1.0 and st["ratio_mean"] == pytest.approx(1.0)
    # k3: (0.5 − ln 1.5) and (−0.5 − ln 0.5) averaged.
    k3 = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2
    assert st["approx_kl"] == pytest.approx(k3, rel=1e-5)
    # KL penalty: logp_ref = 0 → r = 1/ρ, k3 = (1/ρ − 1) + ln ρ.
    loss_kl, st2 = ppo_loss(lp, batch, PPOConfig(kl_coef=0.5), logp_ref=torch.zeros(2, 1))
    kl = ((1 / 1.5 - 1 + math.log(1.5)) + (2 - 1 + math.log(0.5))) / 2
    assert st2["kl_ref"] == pytest.approx(kl, rel=1e-5)
    assert float(loss_kl) == pytest.approx(-0.8 + 0.5 * kl, rel=1e-5)


def test_token_entropy():
    logits = torch.zeros(3, 2, 5)  # uniform over 5 → ln 5
    assert float(token_entropy(logits)) == pytest.approx(math.log(5), rel=1e-6)
    peaked = torch.full((1, 1, 4), -float("inf"))
    peaked[..., 0] = 0.0
    assert float(token_entropy(peaked)) == 0.0


# ----------------------------------------------------------------------------- buffer


def _ep(S, valid_steps, adv=0.0, cid=0, n=2, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Episode(
        context_id=cid,
        task_id=0,
        success=adv > 0,
        contexts=torch.randn(S, 2, d, generator=g),
        tokens=torch.randint(0, 5, (S, n), generator=g),
        logp=-torch.rand(S, n, generator=g),
        valid_steps=valid_steps,
        advantage=adv,
    )


def test_buffer_mask_from_valid_steps():
    ep = _ep(S=4, valid_steps=2, adv=0.5)
    (b,) = list(RolloutBuffer([ep]).minibatches(4, torch.Generator().manual_seed(0)))
    assert len(b) == 2 and b.n_tokens == 4 and b.n_episodes == 1
    assert torch.equal(b.contexts, ep.contexts[:2]) and torch.equal(b.tokens, ep.tokens[:2])
    assert torch.equal(b.logp_old, ep.logp[:2]) and torch.equal(
        b.advantages, torch.tensor([0.5, 0.5])
    )
    with pytest.raises(ValueError):
        _ep(S=2, valid_steps=3)


def test_buffer_pad_to_and_counts():
    buf = RolloutBuffer([_ep(3, 1, 1.0, cid=0), _ep(4, 3, -1.0, cid=1)])
    assert buf.pad_to(5) == 3 and len(buf) == 5 and buf.n_valid == 2
    assert buf.n_tokens == (1 + 3) * 2
    assert [e.valid for e in buf.episodes] == [True, True, False, False, False]
    assert all(e.context_id == 1 for e in buf.episodes[2:])
    # One minibatch with everything: padding rows excluded, slots still counted.
    (b,) = list(buf.minibatches(5, torch.Generator().manual_seed(0)))
    assert b.n_episodes == 5 and int(b.valid_episode.sum()) == 2 and len(b) == 4
    assert set(b.episode_index[b.valid_episode[b.episode_index]].tolist()) == set(
        b.episode_index.tolist()
    )
    with pytest.raises(ValueError):
        buf.pad_to(3)


def test_empty_buffer():
    buf = RolloutBuffer([])
    assert buf.is_empty and len(buf) == 0 and buf.n_valid == 0 and buf.n_tokens == 0
    assert list(buf.minibatches(2, torch.Generator())) == []
    buf.pad_to(4)
    assert buf.is_empty and buf.episodes == [] and len(buf) == 4
    mbs = list(buf.minibatches(3, torch.Generator()))
    assert [b.n_episodes for b in mbs] == [3, 1] and all(b.n_tokens == 0 for b in mbs)


def test_minibatch_shuffle_deterministic_and_covering():
    eps = [_ep(2, 1, float(i), cid=i) for i in range(7)]
    buf = RolloutBuffer(eps)

    def order(gen):
        out = []
        for b in buf.minibatches(3, gen):
            assert b.n_episodes <= 3
            out.append(b.advantages.tolist())
        return out

    g1, g2 = torch.Generator().manual_seed(123), torch.Generator().manual_seed(123)
    e1a, e1b = order(g1), order(g1)
    assert e1a == order(g2) and e1b == order(g2)  # same seed → same epochs
    assert e1a != e1b  # fresh permutation each epoch
    for epoch in (e1a, e1b):
        assert sorted(itertools.chain.from_iterable(epoch)) == [float(i) for i in range(7)]
