"""The PPO update loop of the RIPT stage on a tiny exact policy (spec §5.5, §5.6, §8 B12, B15,
B16): probabilities move the right way, padding-only minibatches take no step, ranks stay in
lockstep, the first-step ratio check, and the sampled top-k ratio by hand.

Expected numbers are worked out by hand in the comments, not recomputed with the code under test.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch import nn

from ript.rl.buffer import Episode, RolloutBuffer
from ript.rl.ppo import PPOConfig, ppo_update

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


@pytest.mark.parametrize("token_level_mean,kl_coef", [(True, 0.0), (False, 0.0), (True, 0.1)])
def test_micro_batched_backward_equals_the_whole_minibatch(token_level_mean, kl_coef):
    """A 7-B policy backpropagates a minibatch a few rows at a time (vla_spec §4.5): the same
    gradient, so the same weights and statistics, for both aggregations and with the KL term."""

    def buffer(policy):
        eps = []
        for i, (a, steps) in enumerate([(1.0, 3), (-1.0, 2), (0.5, 3), (-0.5, 1)]):
            ctx = torch.randn(3, 2, D, generator=torch.Generator().manual_seed(i))
            tok = torch.tensor([[(i + j) % V, (i + 2 * j) % V] for j in range(3)])
            with torch.no_grad():
                lp = policy.log_prob(ctx, tok)
            eps.append(Episode(i, 0, a > 0, ctx, tok, lp, valid_steps=steps, advantage=a))
        return RolloutBuffer(eps)

    ref = TinyPolicy().eval()
    runs = []
    for micro in (None, 2):
        pol = TinyPolicy().eval()
        with torch.no_grad():  # a reference policy that differs, so the KL term has a gradient
            ref.lin.weight.mul_(0.5)
        stats = ppo_update(pol.log_prob, list(pol.parameters()),
                           torch.optim.SGD(pol.parameters(), lr=0.5), buffer(pol),
                           PPOConfig(token_level_mean=token_level_mean, kl_coef=kl_coef),
                           epochs=2, minibatch_size=4, grad_clip=100.0,
                           generator=torch.Generator().manual_seed(0),
                           ref_log_prob_fn=ref.log_prob, micro_rows=micro)
        with torch.no_grad():
            ref.lin.weight.mul_(2.0)
        runs.append((pol.lin.weight.detach().clone(), stats))
    (w_full, s_full), (w_micro, s_micro) = runs
    assert not torch.equal(w_full, TinyPolicy().lin.weight)  # it did move
    torch.testing.assert_close(w_micro, w_full, rtol=1e-5, atol=1e-6)
    for k in ("loss", "clip_frac", "ratio_mean", "approx_kl", "grad_norm"):
        assert s_micro[k] == pytest.approx(s_full[k], rel=1e-5, abs=1e-7), k
