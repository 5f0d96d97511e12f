"""RL maths of the RIPT stage (spec §5.1, §5.3, §5.5, §5.6, §8 B3/B15/B16).

Expected numbers are worked out by hand in the comments, not recomputed with the code under test.
"""

from __future__ import annotations

import itertools
import math
import threading

import numpy as np
import pytest
import torch
from torch import nn

from ript.rl.advantages import (
    DynamicSampler,
    is_informative,
    leave_one_out_advantages,
    should_stop,
)
from ript.rl.buffer import Batch, Episode, RolloutBuffer
from ript.rl.ppo import (
    PPOConfig,
    aggregate_loss,
    clipped_surrogate,
    ppo_loss,
    ppo_update,
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


# ----------------------------------------------------------------------------- ppo_update

V, N_TOK, D = 5, 2, 4


class TinyPolicy(nn.Module):
    """Linear map from a flattened (2, D) context to N_TOK × V logits; no bias so that episodes
    with orthogonal (one-hot) contexts do not interfere with each other."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(2 * D, N_TOK * V, bias=False)
        self.drop = nn.Dropout(dropout)

    def log_prob(self, contexts, tokens):
        logits = self.lin(self.drop(contexts.flatten(1))).view(-1, N_TOK, V)
        return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _policy_buffer(policy, advs):
    eps = []
    for i, a in enumerate(advs):
        ctx = torch.zeros(1, 2, D)
        ctx.view(1, -1)[0, i] = 1.0  # one-hot → independent rows
        tok = torch.tensor([[i % V, (i + 2) % V]])
        with torch.no_grad():
            lp = policy.log_prob(ctx, tok)
        eps.append(Episode(i, 0, a > 0, ctx, tok, lp, valid_steps=1, advantage=a))
    return RolloutBuffer(eps)


def _logp_of(policy, buf):
    with torch.no_grad():
        return torch.stack([policy.log_prob(e.contexts, e.tokens)[0] for e in buf.episodes[:4]])


def test_ppo_update_moves_probabilities():
    pol = TinyPolicy().eval()
    advs = [1.0, -1.0, 1.0, -1.0]
    buf = _policy_buffer(pol, advs)
    before = _logp_of(pol, buf)
    opt = torch.optim.Adam(pol.parameters(), lr=0.05)
    out = ppo_update(
        pol.log_prob,
        list(pol.parameters()),
        opt,
        buf,
        PPOConfig(),
        epochs=3,
        minibatch_size=2,
        grad_clip=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    after = _logp_of(pol, buf)
    delta = after - before
    assert torch.all(delta[[0, 2]] > 0) and torch.all(delta[[1, 3]] < 0)
    assert out["n_minibatches"] == 6 and out["n_steps_skipped"] == 0
    assert out["grad_norm"] > 0 and math.isfinite(out["loss"]) and out["approx_kl"] >= 0


def test_padding_only_minibatch_takes_no_step():
    pol = TinyPolicy().eval()
    buf = _policy_buffer(pol, [1.0])
    buf.pad_to(2)  # slot 1 is padding → one of the two size-1 minibatches is padding-only
    opt = torch.optim.Adam(pol.parameters(), lr=0.05)
    snaps = []
    out = ppo_update(
        pol.log_prob,
        list(pol.parameters()),
        opt,
        buf,
        PPOConfig(),
        epochs=2,
        minibatch_size=1,
        grad_clip=1.0,
        generator=torch.Generator().manual_seed(0),
        on_minibatch=lambda info: snaps.append((info, pol.lin.weight.detach().clone())),
    )
    assert out["n_minibatches"] == 4 and out["n_steps_skipped"] == 2
    assert int(opt.state[pol.lin.weight]["step"]) == 2
    prev = None
    for info, w in snaps:
        if prev is not None and info["n_tokens"] == 0:
            assert info["skipped"] and torch.equal(w, prev)
        if info["n_tokens"] > 0:
            assert not info["skipped"] and (prev is None or not torch.equal(w, prev))
        prev = w


def test_empty_rank_all_reduce_lockstep():
    pol = TinyPolicy().eval()
    w0 = pol.lin.weight.detach().clone()
    buf = RolloutBuffer([])
    buf.pad_to(3)
    opt = torch.optim.AdamW(pol.parameters(), lr=0.05, weight_decay=0.1)
    seen = []

    def fake_reduce(params):  # peers also had nothing → grads stay zero
        seen.append([p.grad.clone() for p in params])

    out = ppo_update(
        pol.log_prob,
        list(pol.parameters()),
        opt,
        buf,
        PPOConfig(),
        epochs=2,
        minibatch_size=1,
        grad_clip=1.0,
        generator=torch.Generator(),
        all_reduce_grads=fake_reduce,
    )
    assert len(seen) == 6 and all(torch.all(g == 0) for gs in seen for g in gs)
    assert out["n_steps_skipped"] == 6 and torch.equal(pol.lin.weight, w0) and not opt.state
    assert math.isnan(out["loss"])

    def peer_has_signal(params):  # the averaged grad is non-zero → this rank must step too
        for p in params:
            p.grad.add_(0.01)

    ppo_update(
        pol.log_prob,
        list(pol.parameters()),
        opt,
        buf,
        PPOConfig(),
        epochs=1,
        minibatch_size=3,
        grad_clip=1.0,
        generator=torch.Generator(),
        all_reduce_grads=peer_has_signal,
    )
    assert not torch.equal(pol.lin.weight, w0)


def test_ratio_check_and_nan():
    pol = TinyPolicy().eval()
    buf = _policy_buffer(pol, [1.0, -1.0])
    for e in buf.episodes:
        e.logp = e.logp + 0.1  # stored ℓ_old disagrees with the recomputation
    opt = torch.optim.Adam(pol.parameters(), lr=0.05)
    kw = {
        "cfg": PPOConfig(),
        "epochs": 1,
        "minibatch_size": 2,
        "grad_clip": 1.0,
        "generator": torch.Generator().manual_seed(0),
    }
    with pytest.raises(RuntimeError, match="eval"):
        ppo_update(pol.log_prob, list(pol.parameters()), opt, buf, **kw)
    # Dropout left on (train mode) is caught too (spec §8 B15).
    pol_d = TinyPolicy(dropout=0.5).eval()
    buf_d = _policy_buffer(pol_d, [1.0, -1.0])
    pol_d.train()
    with pytest.raises(RuntimeError, match="ratio"):
        ppo_update(pol_d.log_prob, list(pol_d.parameters()), opt, buf_d, **kw)
    # NaN log-probs → FloatingPointError, weights untouched.
    buf_ok = _policy_buffer(pol, [1.0, -1.0])
    w0 = pol.lin.weight.detach().clone()
    with pytest.raises(FloatingPointError, match="PPO loss"):
        ppo_update(
            lambda c, t: pol.log_prob(c, t) * float("nan"),
            list(pol.parameters()),
            opt,
            buf_ok,
            **kw,
        )
    assert torch.equal(pol.lin.weight, w0)


def test_two_ranks_stay_identical_when_one_has_only_padding():
    """Two "ranks" as threads with an averaging all-reduce: rank 1 collected nothing
    (spec §8 B3) yet must apply the same averaged updates as rank 0."""
    pols = [TinyPolicy().eval(), TinyPolicy().eval()]
    w0 = pols[0].lin.weight.detach().clone()
    bufs = [_policy_buffer(pols[0], [1.0, -1.0]), RolloutBuffer([])]
    bufs[1].pad_to(2)
    barrier = threading.Barrier(2, timeout=20)
    grads: list = [None, None]
    results: list = [None, None]

    def make_reduce(rank):
        def reduce(tensors):
            grads[rank] = [t.grad for t in tensors]
            barrier.wait()
            if rank == 0:
                for a, b in zip(*grads, strict=True):
                    avg = (a + b) / 2
                    a.copy_(avg)
                    b.copy_(avg)
            barrier.wait()

        return reduce

    def run(rank):
        try:
            opt = torch.optim.AdamW(pols[rank].parameters(), lr=0.05, weight_decay=0.1)
            results[rank] = ppo_update(
                pols[rank].log_prob,
                list(pols[rank].parameters()),
                opt,
                bufs[rank],
                PPOConfig(),
                epochs=2,
                minibatch_size=1,
                grad_clip=1.0,
                generator=torch.Generator().manual_seed(rank),
                all_reduce_grads=make_reduce(rank),
            )
        except Exception as exc:  # noqa: BLE001 - re-raised by the main thread below
            barrier.abort()
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, dict) for r in results), results
    assert results[0]["n_steps_skipped"] == 0 and results[1]["n_steps_skipped"] == 0
    assert results[1]["n_minibatches"] == 4 and math.isnan(results[1]["loss"])
    assert torch.equal(pols[0].lin.weight, pols[1].lin.weight)
    assert not torch.equal(pols[0].lin.weight, w0)


# ----------------------------------------------------------------------------- sampled top-k ratio


def _fixed_logits_prior(logits: list[float]):
    """A real SkillGPT (n = 1 token) whose logits are `logits` for every context: output
    weights zero, bias = the logits."""
    from ript.models.prior import SkillGPT

    prior = SkillGPT(vocab_size=len(logits), n_tokens=1, d_model=8, layers=1, heads=2, ffn=16,
                     dropout=0.0).eval()
    with torch.no_grad():
        prior.head.weight.zero_()
        prior.head.bias.copy_(torch.tensor(logits))
    return prior


def test_top_k_log_prob_hand_computed():
    """ℓ of the distribution rollouts sample from (spec §5.5, §8 B12): logits / T, truncated to
    the top k, renormalised; a token outside the top k gets the floor -50 (ratio ~ 0)."""
    prior = _fixed_logits_prior([2.0, 1.0, 0.0, -1.0])
    ctx, tok = torch.zeros(4, 2, 8), torch.arange(4)[:, None]

    def lp(**kw):
        return prior.log_prob(ctx, tok, **kw)[:, 0].tolist()

    # k = 2, T = 1: log Z = log(e² + e) = 2 + log(1 + 1/e) = 2.313262
    assert lp(top_k=2) == pytest.approx([2 - 2.313262, 1 - 2.313262, -50.0, -50.0], abs=1e-5)
    # k = 2, T = 2: logits [1, 0.5, 0, -0.5]; log Z = log(e + e^0.5) = 1.474077
    assert lp(top_k=2, temperature=2.0) == pytest.approx(
        [1 - 1.474077, 0.5 - 1.474077, -50.0, -50.0], abs=1e-5)
    # full softmax (the original's ratio): log Z = log(e² + e + 1 + 1/e) = 2.440190
    full = [2 - 2.440190, 1 - 2.440190, 0 - 2.440190, -1 - 2.440190]
    assert lp() == pytest.approx(full, abs=1e-5)
    assert lp(top_k=4) == pytest.approx(full, abs=1e-5)  # k = V truncates nothing

    # The sampler draws from exactly that distribution and stores its log-prob beside the
    # full-softmax one: only tokens 0 and 1 ever come out.
    tokens, logp, logp_topk = prior.sample(torch.zeros(200, 2, 8), top_k=2, temperature=1.0,
                                           generator=torch.Generator().manual_seed(0))
    t = tokens[:, 0]
    assert set(t.tolist()) == {0, 1}
    torch.testing.assert_close(logp_topk[:, 0], torch.where(t == 0, -0.313262, -1.313262),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(logp[:, 0], torch.where(t == 0, -0.440190, -1.440190),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(prior.log_prob(torch.zeros(200, 2, 8), tokens, top_k=2),
                               logp_topk, atol=1e-6, rtol=0)
