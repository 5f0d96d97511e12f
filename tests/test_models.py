"""Behavioural tests for ript.models (spec §3, §4, §5.5). Small sizes: runs in well under 60 s."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from vector_quantize_pytorch import FSQ

from ript.models import (
    FSQ_LEVELS,
    ImageAugment,
    ObsEncoder,
    QuestPolicy,
    ResNetTrunk,
    SkillGPT,
    SkillVAE,
)
from ript.models.encoders import _hsv_to_rgb, _rgb_to_hsv


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models: one thread


A, T, F_DS = 2, 16, 4          # action dim, chunk, downsample -> n = 4 tokens
N_TOK = T // F_DS
D = 32
N_TASKS = 4


def small_vae(**kw) -> SkillVAE:
    args = {"chunk_size": T, "downsample": F_DS, "d_model": D, "enc_layers": 1, "dec_layers": 1,
            "heads": 2, "ffn": 64, "dropout": 0.0, "codebook_size": 64}
    return SkillVAE(A, **{**args, **kw})


def small_policy(vae=None, rgb=(), **prior_kw) -> QuestPolicy:
    vae = vae or small_vae()
    enc = ObsEncoder({"state": 2}, list(rgb), d_model=D, lowdim_width=16, image_width=16,
                     n_tasks=N_TASKS)
    pk = {"vocab_size": vae.vocab_size, "n_tokens": vae.n_tokens, "d_model": D, "layers": 2,
          "heads": 2, "ffn": 64, "dropout": 0.0}
    return QuestPolicy(vae, enc, SkillGPT(**{**pk, **prior_kw}), action_horizon=3, top_k=5)


def sinusoid_batch(b: int, gen: torch.Generator) -> dict:
    """Smooth chunks whose phase is set by the task plus a small observed offset."""
    task = torch.randint(0, N_TASKS, (b,), generator=gen)
    phase = 2 * math.pi * task / N_TASKS + 0.6 * torch.rand(b, generator=gen)
    t = torch.arange(T) * (2 * math.pi / T)
    x = phase[:, None] + t[None]
    actions = 0.8 * torch.stack([torch.sin(x), torch.cos(x)], dim=-1)  # (B, T, 2)
    obs = {"state": torch.stack([torch.sin(phase), torch.cos(phase)], dim=-1)}
    return {"actions": actions, "obs": obs, "task_id": task}


# ------------------------------------------------------------------ SkillVAE construction


def test_codebook_size_to_levels_and_vocab():
    assert FSQ_LEVELS[1024] == [8, 5, 5, 5]
    expected = {16: 15, 64: 64, 256: 240, 512: 512, 1024: 1000, 2048: 1920, 4096: 4375}
    for size, vocab in expected.items():
        assert SkillVAE(2, chunk_size=8, d_model=16, heads=2, ffn=16,
                        codebook_size=size).vocab_size == vocab
    vq = small_vae(quantizer="vq", codebook_size=100)
    assert vq.vocab_size == 100
    assert SkillVAE(2, fsq_levels=[5, 5]).vocab_size == 25


@pytest.mark.parametrize("kw, name", [
    ({"downsample": 3}, "downsample"), ({"downsample": 1}, "downsample"),
    ({"chunk_size": 30}, "chunk_size"), ({"codebook_size": 1000}, "codebook_size"),
    ({"quantizer": "lfq"}, "quantizer"),
])
def test_bad_arguments_raise(kw, name):
    with pytest.raises(ValueError, match=name):
        SkillVAE(7, **kw)


def test_vocab_mismatch_names_both_numbers():
    with pytest.raises(ValueError, match=r"63.*64"):
        small_policy(vocab_size=63)
    with pytest.raises(ValueError, match=r"5.*4"):
        small_policy(n_tokens=5)


# ------------------------------------------------------------------ FSQ / quantiser


def test_fsq_round_trip_all_codes():
    levels = [8, 5, 5, 5]
    fsq = FSQ(levels)  # dim == len(levels): no projections, codes are the raw grid
    idx = torch.arange(1000)
    codes = fsq.indices_to_codes(idx)
    # Hand-computed mixed-radix decode (spec §3.3): digit_i = k // prod(L_<i) % L_i.
    basis = [1, 8, 40, 200]
    half = torch.tensor([4, 2, 2, 2])
    digits = torch.stack([(idx // b) % lv for b, lv in zip(basis, levels)], dim=-1)
    assert torch.allclose(codes, (digits - half) / half)
    assert torch.equal(fsq.codes_to_indices(codes).long(), idx)
    # Re-quantise: feed the pre-image of each grid point through the library's forward pass.
    lv = torch.tensor(levels, dtype=torch.float32)
    half_l = (lv - 1) * (1 + 1e-3) / 2
    offset = torch.where(lv % 2 == 0, 0.5, 0.0)
    q = codes * half
    z = torch.atanh((q + offset) / half_l) - torch.atanh(offset / half_l)
    out, idx2 = fsq(z[None])
    assert torch.equal(idx2[0].long(), idx)
    assert torch.allclose(out[0], codes, atol=1e-6)


@pytest.mark.parametrize("quantizer", ["fsq", "vq"])
def test_vae_index_path_matches_code_path(quantizer):
    torch.manual_seed(0)
    vae = small_vae(quantizer=quantizer).eval()
    a = torch.rand(3, T, A) * 2 - 1
    codes, idx, aux = vae.encode(a)
    assert codes.shape == (3, N_TOK, D) and idx.shape == (3, N_TOK) and idx.dtype == torch.long
    assert aux.ndim == 0 and aux.item() >= 0
    assert torch.allclose(vae.indices_to_codes(idx), codes, atol=1e-5)
    assert torch.allclose(vae.decode_indices(idx), vae.decode_codes(codes), atol=1e-5)
    _, m = vae.loss(a)
    assert set(m) >= {"recon_l1", "codebook_usage"} and 0 < m["codebook_usage"] <= 1


def test_encoder_causality():
    """Token j sees actions 0..F*j only (two stride-2 causal convs: right edge 2*2*j)."""
    torch.manual_seed(0)
    vae = small_vae().eval()
    a = torch.rand(2, T, A) * 2 - 1
    z0 = vae.encoder(a)
    idx0 = vae.encode(a)[1]
    for t in range(T):
        b = a.clone()
        b[:, t] += 0.7
        z = vae.encoder(b)
        for j in range(N_TOK):
            if F_DS * j < t:  # receptive field ends before t
                assert torch.allclose(z[:, j], z0[:, j], atol=1e-6), (t, j)
            elif F_DS * j == t:  # the right edge really is at F*j
                assert not torch.allclose(z[:, j], z0[:, j], atol=1e-4), (t, j)
        unchanged = [j for j in range(N_TOK) if F_DS * j < t]
        assert torch.equal(vae.encode(b)[1][:, unchanged], idx0[:, unchanged])
    # Actions after the last token's right edge, F*(n-1), reach no token (spec §3.2 parity).
    b = a.clone()
    b[:, F_DS * (N_TOK - 1) + 1:] += 0.7
    assert torch.allclose(vae.encoder(b), z0, atol=1e-6)


# ------------------------------------------------------------------ observation encoders


def test_obs_encoder_shapes():
    torch.manual_seed(0)
    assert ResNetTrunk()(torch.rand(1, 3, 128, 128)).shape == (1, 128, 16, 16)
    enc = ObsEncoder({"joint": 7, "grip": 2}, ["cam", "wrist"], d_model=D, lowdim_width=8,
                     image_width=16, n_tasks=3, task_emb_dim=12)
    obs = {"joint": torch.randn(2, 7), "grip": torch.randn(2, 2),
           "cam": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8),
           "wrist": torch.rand(2, 3, 160, 160)}  # float, larger than 128 -> resized
    assert enc(obs, torch.randn(2, 12)).shape == (2, 2, D)
    enc.eval()
    assert enc(obs, torch.randn(2, 12)).shape == (2, 2, D)
    low = ObsEncoder({"state": 3}, [], d_model=D, n_tasks=5)
    ctx = low({"state": torch.randn(4, 3)}, torch.tensor([0, 1, 4, 2]))
    assert ctx.shape == (4, 2, D)
    assert torch.allclose(ctx[:, 0], low.task_encoder.weight[[0, 1, 4, 2]])
    with pytest.raises(KeyError, match="state"):
        low({"other": torch.randn(4, 3)}, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="n_tasks"):
        ObsEncoder({"state": 3}, [], d_model=D, n_tasks=0)
    with pytest.raises(IndexError, match="out of range"):
        low({"state": torch.randn(1, 3)}, torch.tensor([5]))


def test_language_task_token_is_projection_of_the_table_row():
    """Task ids index a frozen embedding table carried by the checkpoint (spec §2.3)."""
    torch.manual_seed(0)
    enc = ObsEncoder({"state": 3}, [], d_model=D, n_tasks=3, task_emb_dim=4)
    table = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    enc.set_task_embeddings(table)
    ctx = enc({"state": torch.randn(2, 3)}, torch.tensor([2, 0]))
    expect = table[[2, 0]] @ enc.task_encoder.weight.T + enc.task_encoder.bias
    assert torch.allclose(ctx[:, 0], expect)
    assert "task_embeddings" in enc.state_dict()
    assert not any(p is enc.task_embeddings for p in enc.parameters())  # frozen buffer
    with pytest.raises(ValueError, match="shape"):
        enc.set_task_embeddings(torch.zeros(2, 4))


def test_augment_identity_in_eval_changes_in_train():
    torch.manual_seed(0)
    img = torch.rand(4, 3, 32, 32)
    aug = ImageAugment()
    assert torch.equal(aug.eval()(img), img)
    out = aug.train()(img)
    assert out.shape == img.shape and not torch.allclose(out, img)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.allclose(_hsv_to_rgb(_rgb_to_hsv(img)), img, atol=1e-5)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert torch.allclose(_rgb_to_hsv(red).flatten(), torch.tensor([0.0, 1.0, 1.0]))


def test_augment_crop_is_a_shift_of_the_padded_image():
    torch.manual_seed(1)
    img = torch.rand(6, 3, 16, 16)
    aug = ImageAugment(brightness=0, contrast=0, saturation=0, hue=0).train()
    out = aug(img)
    padded = torch.nn.functional.pad(img, (2, 2, 2, 2), mode="replicate")
    for i in range(6):
        assert any(torch.equal(out[i], padded[i, :, dy:dy + 16, dx:dx + 16])
                   for dy in range(5) for dx in range(5))


# ------------------------------------------------------------------ training dynamics


@pytest.fixture(scope="module")
def trained_vae():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    vae = small_vae()
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    eval_batch = sinusoid_batch(256, torch.Generator().manual_seed(123))["actions"]
    vae.eval()
    with torch.no_grad():
        first = vae.loss(eval_batch)[1]["recon_l1"]
    vae.train()
    for _ in range(250):
        loss, _ = vae.loss(sinusoid_batch(64, gen)["actions"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        last = vae.loss(eval_batch)[1]["recon_l1"]
    return vae, first, last


def test_stage0_reconstruction_improves(trained_vae):
    _, first, last = trained_vae
    assert last < 0.2 * first, (first, last)  # typically ~0.08x


def test_stage1_ce_falls(trained_vae):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    policy = small_policy(trained_vae[0])
    policy.train()
    opt = torch.optim.Adam([p for _, p in policy.trainable_parameters(1)], lr=3e-3)
    ces = []
    for _ in range(200):
        loss, m = policy.stage_loss(sinusoid_batch(64, gen), stage=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ces.append(m["ce"])
    assert abs(ces[0] - math.log(64)) < 0.3  # near-uniform initial prior
    assert np.mean(ces[-10:]) < 0.25 * ces[0], (ces[0], ces[-10:])  # typically ~0.07x


# ------------------------------------------------------------------ gradients and parameter sets


def test_gradient_isolation_per_stage():
    torch.manual_seed(0)
    policy = small_policy(small_vae(dropout=0.1))
    batch = sinusoid_batch(8, torch.Generator().manual_seed(0))
    policy.train()
    loss, _ = policy.stage_loss(batch, stage=1)
    loss.backward()
    assert all(p.grad is None for p in policy.autoencoder.parameters())
    assert all(p.grad is not None for p in policy.prior.parameters())
    policy.zero_grad(set_to_none=True)
    loss, m = policy.stage_loss(batch, stage=2, l1_weight=1.0)
    assert "l1_sampled" in m and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in policy.autoencoder.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in policy.autoencoder.decoder.parameters())
    names2 = {n for n, _ in policy.trainable_parameters(2)}
    assert any(n.startswith("autoencoder.decoder.") for n in names2)
    assert not any(n.startswith(("autoencoder.encoder.", "autoencoder.quantizer.")) for n in names2)
    assert all(n.startswith("autoencoder.") for n, _ in policy.trainable_parameters(0))
    assert all(n.startswith("prior.") for n, _ in policy.rl_parameters())


def test_stage1_targets_use_eval_mode_autoencoder(monkeypatch):
    torch.manual_seed(0)
    policy = small_policy(small_vae(dropout=0.5))
    batch = sinusoid_batch(16, torch.Generator().manual_seed(0))
    seen = {}
    real = policy.prior.logits

    def spy(context, tokens):
        seen["tokens"] = tokens
        return real(context, tokens)

    monkeypatch.setattr(policy.prior, "logits", spy)
    policy.train()
    policy.stage_loss(batch, stage=1)
    assert policy.autoencoder.training  # mode restored
    expected = policy.autoencoder.eval().encode(batch["actions"])[1]
    assert torch.equal(seen["tokens"], expected)


# ------------------------------------------------------------------ sampling


@pytest.fixture
def sharp_prior():
    torch.manual_seed(0)
    prior = SkillGPT(vocab_size=64, n_tokens=N_TOK, d_model=D, layers=2, heads=2, ffn=64)
    with torch.no_grad():  # spread the logits so top-k has no float-level near-ties
        prior.head.weight.mul_(100)
    return prior.eval(), torch.randn(16, 2, D)


def test_sampling_cache_matches_no_cache(sharp_prior):
    prior, ctx = sharp_prior
    for seed in range(4):
        a = prior.sample(ctx, top_k=5, generator=torch.Generator().manual_seed(seed))
        b = prior.sample(ctx, top_k=5, generator=torch.Generator().manual_seed(seed),
                         use_cache=False)
        assert torch.equal(a[0], b[0])
        assert torch.allclose(a[1], b[1], atol=1e-5) and torch.allclose(a[2], b[2], atol=1e-5)


def test_sample_logps_match_recomputation(sharp_prior):
    prior, ctx = sharp_prior
    tokens, logp, logp_topk = prior.sample(ctx, top_k=5, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (16, N_TOK) and tokens.dtype == torch.long
    assert torch.allclose(prior.log_prob(ctx, tokens), logp, atol=1e-5)
    logits = prior.logits(ctx, tokens)
    top = logits.topk(5, dim=-1).values
    expected = logits.gather(-1, tokens[..., None]).squeeze(-1) - top.logsumexp(-1)
    assert torch.allclose(logp_topk, expected, atol=1e-5)
    assert (logp_topk >= logp).all()  # truncation can only raise a kept token's probability


def test_sampling_deterministic_and_top_k(sharp_prior):
    prior, ctx = sharp_prior
    ctx = ctx.repeat(4, 1, 1)
    a = prior.sample(ctx, top_k=3, generator=torch.Generator().manual_seed(7))[0]
    b = prior.sample(ctx, top_k=3, generator=torch.Generator().manual_seed(7))[0]
    c = prior.sample(ctx, top_k=3, generator=torch.Generator().manual_seed(8))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    top3 = prior.logits(ctx, a).topk(3, dim=-1).indices
    assert (top3 == a[..., None]).any(-1).all()
    greedy = prior.sample(ctx, top_k=1)[0]
    assert torch.equal(greedy[:, 0], prior.logits(ctx, greedy)[:, 0].argmax(-1))
    with pytest.raises(RuntimeError, match="eval"):
        prior.train().sample(ctx)


# ------------------------------------------------------------------ policy acting


def test_plan_and_action_queue():
    torch.manual_seed(0)
    policy = small_policy()
    obs = {"state": torch.randn(3, 2)}
    task = torch.tensor([0, 1, 2])
    policy.train()
    chunk, rec = policy.plan(obs, task, generator=torch.Generator().manual_seed(0))
    assert not policy.training  # plan leaves the policy in eval mode
    assert chunk.shape == (3, 3, A) and chunk.abs().max() <= 1
    assert rec.context.shape == (3, 2, D) and rec.tokens.shape == (3, N_TOK)
    assert torch.allclose(policy.log_prob(rec.context, rec.tokens), rec.logp, atol=1e-5)

    policy.reset(3)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        act, r, replanned = policy.act(obs, task, generator=gen)
        assert replanned.all() == (step == 0) and (r is None) == (step > 0)
        np.testing.assert_allclose(act, chunk[:, step].numpy(), atol=1e-6)
    _, r, replanned = policy.act(obs, task, generator=gen)
    assert replanned.all() and r.tokens.shape == (3, N_TOK)

    policy.reset(3)
    act, r, replanned = policy.act(obs, task, active=np.array([True, False, True]))
    assert replanned.tolist() == [True, False, True] and r.tokens.shape == (2, N_TOK)
    assert np.all(act[1] == 0)


def test_arch_round_trip():
    policy = small_policy(rgb=["cam"])
    arch = json.loads(json.dumps(policy.arch))
    clone = QuestPolicy.from_arch(arch)
    clone.load_state_dict(policy.state_dict())
    policy.eval()
    clone.eval()
    ctx, tok = torch.randn(2, 2, D), torch.randint(0, 64, (2, N_TOK))
    assert torch.equal(clone.log_prob(ctx, tok), policy.log_prob(ctx, tok))
