"""The paper-parity switches of the models (issue #17): each switch's paper value changes the
computation as spec §3-§4.5 says the original's does (config/original.yaml sets them all)."""

from __future__ import annotations

import pytest
import torch

from ript.models import SkillVAE
from test_models import A, D, F_DS, N_TOK, T, sinusoid_batch, small_policy, small_vae


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models gain nothing from intra-op threads (the conftest fixture, for every test)."""


def test_original_groupnorm_leaks_future_actions():
    """strict_causal=False (autoencoder.causal_norm: false) reproduces the original GroupNorm
    over the chunk: a later action changes the first token; the causal norm's does not."""
    torch.manual_seed(0)
    a = torch.rand(2, T, A) * 2 - 1
    b = a.clone()
    b[:, F_DS * (N_TOK - 1)] += 0.7  # the last action any token sees
    vae = small_vae(strict_causal=False).eval()
    assert type(vae.encoder.convs[0][1]) is torch.nn.GroupNorm
    assert not torch.allclose(vae.encoder(b)[:, 0], vae.encoder(a)[:, 0], atol=1e-4)
    causal = small_vae().eval()
    causal.load_state_dict(vae.state_dict())  # same parameters: either norm loads either file
    assert torch.allclose(causal.encoder(b)[:, 0], causal.encoder(a)[:, 0], atol=1e-6)


def test_groupnorm_over_chunk_sees_the_future_by_hand():
    """One group, 2 channels, 3 steps: x = [[1, 2, s], [3, 4, s]].

    Causal statistics at t=0 use {1, 3}: mean 2, var 1, so outputs (-1, +1) whatever s is.
    GroupNorm over the chunk (QueST) at t=0 uses all six values: s = 3 gives mean 16/6 = 8/3
    and var 48/9 / 6 = 8/9, so (1 - 8/3) / sqrt(8/9) = -5 / (2 sqrt 2); changing s moves it.
    """
    from ript.models.autoencoder import CausalGroupNorm

    causal, chunk = CausalGroupNorm(1, 2, eps=0.0), torch.nn.GroupNorm(1, 2, eps=0.0)
    x = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 4.0, 3.0]]])
    y = x.clone()
    y[..., 2] = 10.0  # a future step
    assert torch.allclose(causal(x)[..., 0], torch.tensor([[-1.0, 1.0]]))
    assert torch.allclose(causal(y)[..., :2], causal(x)[..., :2])
    assert torch.allclose(chunk(x)[0, 0, 0], torch.tensor(-5 / (2 * 2 ** 0.5)))
    assert not torch.allclose(chunk(y)[..., 0], chunk(x)[..., 0], atol=1e-3)


def test_autoencoder_config_switches_reach_the_model_and_old_files_build():
    """`autoencoder.causal_norm` is the model's `strict_causal`; training-only keys stay out of
    the arch; an arch written before codebook_dim existed still builds the same model."""
    from ript.settings import AutoencoderConfig

    base = {"chunk_size": T, "downsample": F_DS, "d_model": D, "enc_layers": 1,
            "dec_layers": 1, "heads": 2, "ffn": 64, "codebook_size": 64}
    arch = AutoencoderConfig(**base, causal_norm=False, mask_padding=False).arch(A)
    assert arch["strict_causal"] is False and "causal_norm" not in arch
    assert "mask_padding" not in arch and "train" not in arch
    assert type(SkillVAE(**arch).encoder.convs[0][1]) is torch.nn.GroupNorm
    default = AutoencoderConfig(**base).arch(A)
    assert default["strict_causal"] is True and default["codebook_dim"] is None
    old = {k: v for k, v in default.items() if k != "codebook_dim"}
    torch.manual_seed(0)
    new_vae = SkillVAE(**default)
    torch.manual_seed(0)
    assert set(SkillVAE(**old).state_dict()) == set(new_vae.state_dict())


def test_vq_codebook_dim_projects_the_codebook():
    """QueST's VQ ablation: codebook_dim 512 ≠ d_model; ours defaults to no projection."""
    torch.manual_seed(0)
    vae = small_vae(quantizer="vq", codebook_dim=8, commitment_weight=1.0).eval()
    assert vae.quantizer.codebook.shape[-1] == 8 and vae.arch["codebook_dim"] == 8
    codes, idx, _ = vae.encode(torch.rand(2, T, A))
    assert codes.shape == (2, N_TOK, D)
    assert torch.allclose(vae.indices_to_codes(idx), codes, atol=1e-5)
    assert small_vae(quantizer="vq").quantizer.codebook.shape[-1] == D


# ------------------------------------------------------------------ L1 over padded steps


def test_l1_over_padded_steps_by_hand():
    """k = 2 real steps, then 2 padded repeats of the last action (T = 4, A = 1), prediction 0.

    Masked (ours): mean |a| over the real steps = (1 + 3) / 2 = 2.
    Unmasked (the original's L1Loss, spec §3.5): over all T steps = (1 + 3 + 3 + 3) / 4 = 2.5.
    """
    from ript.models.autoencoder import masked_l1

    target = torch.tensor([[[1.0], [3.0], [3.0], [3.0]]])
    mask = torch.tensor([[True, True, False, False]])
    pred = torch.zeros_like(target)
    assert masked_l1(pred, target, mask).item() == 2.0
    assert masked_l1(pred, target, None).item() == 2.5


def test_mask_padding_switch_in_stage_losses(monkeypatch):
    """Stage 0's reconstruction and stage 2's L1 term weight padded repeats only when
    mask_padding is False (autoencoder.mask_padding / finetune.mask_padding)."""
    torch.manual_seed(0)
    policy = small_policy()
    batch = sinusoid_batch(4, torch.Generator().manual_seed(0))
    batch["actions"][:, T // 2:] = batch["actions"][:, T // 2 - 1: T // 2]  # padded repeats
    batch["pad_mask"] = torch.arange(T)[None].expand(4, T) < T // 2
    # a decoder that outputs zeros: the L1 is then the mean |action| over the averaged steps
    monkeypatch.setattr(policy.autoencoder, "decode_indices",
                        lambda idx: torch.zeros(idx.shape[0], T, A))
    a = batch["actions"].abs()
    _, masked = policy.stage_loss(batch, stage=2, l1_weight=1.0)
    _, unmasked = policy.stage_loss(batch, stage=2, l1_weight=1.0, mask_padding=False)
    assert masked["l1_sampled"] == pytest.approx(a[:, : T // 2].mean().item(), rel=1e-6)
    assert unmasked["l1_sampled"] == pytest.approx(a.mean().item(), rel=1e-6)
    monkeypatch.undo()
    _, m0 = policy.stage_loss(batch, stage=0)
    _, u0 = policy.stage_loss(batch, stage=0, mask_padding=False)
    recon = policy.autoencoder(batch["actions"])[0]
    err = (recon - batch["actions"]).abs()
    assert m0["recon_l1"] == pytest.approx(err[:, : T // 2].mean().item(), rel=1e-5)
    assert u0["recon_l1"] == pytest.approx(err.mean().item(), rel=1e-5)


def test_stage2_output_head_switch():
    """finetune.train_output_head: false freezes the decoder's output layer in stage 2, as
    QueST's optimiser, which holds `autoencoder.decoder` but not its `action_head`."""
    policy = small_policy()
    with_head = {n for n, _ in policy.trainable_parameters(2)}
    without = {n for n, _ in policy.trainable_parameters(2, train_output_head=False)}
    assert with_head - without == {"autoencoder.decoder.head.weight",
                                   "autoencoder.decoder.head.bias"}
    assert any(n.startswith("autoencoder.decoder.transformer.") for n in without)
    policy.freeze_for_stage(2, train_output_head=False)
    assert not any(p.requires_grad for p in policy.autoencoder.decoder.head.parameters())
    assert all(p.requires_grad for p in policy.autoencoder.decoder.transformer.parameters())
