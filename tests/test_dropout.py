"""The CPU dropout of ript/models/dropout.py: the maths by hand, the mask's statistics, seeding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ript.models import SkillGPT, SkillVAE
from ript.models.dropout import Dropout, cpu_dropout, use_cpu_dropout


def test_kept_elements_are_scaled_exactly_and_the_rest_are_zero():
    x = torch.full((1000, 64), 3.0)
    y = cpu_dropout(x, 0.1)
    # p = 0.1 -> cut = round(6553.6) = 6554 of 65536 levels; keep scale 65536 / 58982
    kept = y != 0
    assert torch.equal(y[kept], torch.full_like(y[kept], 3.0 * 65536 / 58982))
    assert y.dtype == x.dtype and y.shape == x.shape


def test_drop_rate_is_p_in_every_int16_lane():
    # Each 64-bit draw feeds four consecutive elements; a draw with its top bit fixed (plain
    # random_()) would never drop every fourth element. Binomial sd at n = 2^20 per lane: 2.9e-4.
    torch.manual_seed(0)
    y = cpu_dropout(torch.ones(4 * 2**20), 0.25)
    rate = (y == 0).float().view(-1, 4).mean(0)
    assert torch.allclose(rate, torch.full((4,), 0.25), atol=2e-3), rate
    assert abs(cpu_dropout(torch.ones(2**20), 0.5).eq(0).float().mean() - 0.5) < 3e-3


def test_expectation_is_kept():
    torch.manual_seed(1)
    x = torch.randn(256)
    mean = torch.stack([cpu_dropout(x, 0.3) for _ in range(4000)]).mean(0)
    # sd of the mean per element: |x| sqrt(p / (1 - p) / 4000) < 0.011 |x|
    assert torch.allclose(mean, x, atol=0.06 * x.abs().max().item())


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(2)
    x = torch.randn(50, 20, requires_grad=True)
    y = cpu_dropout(x, 0.2)
    y.sum().backward()
    scale = 65536 / (65536 - round(0.2 * 65536))
    assert torch.allclose(x.grad, (y != 0).float() * scale)


def test_seeded_masks_repeat_and_differ_across_seeds():
    x = torch.ones(10_000)
    torch.manual_seed(5)
    a = cpu_dropout(x, 0.1)
    torch.manual_seed(5)
    b = cpu_dropout(x, 0.1)
    torch.manual_seed(6)
    c = cpu_dropout(x, 0.1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eval_mode_zero_p_and_bad_p():
    x = torch.randn(100)
    d = Dropout(0.5).eval()
    assert torch.equal(d(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(cpu_dropout(x, 1e-6), x)  # rounds to no level: nothing dropped
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        cpu_dropout(x, 1.0)


def test_models_use_it_and_keep_their_state_dict_keys():
    layer = nn.TransformerEncoderLayer(16, 2, 32, 0.1, batch_first=True)
    keys = list(layer.state_dict())
    use_cpu_dropout(layer)
    assert list(layer.state_dict()) == keys
    for model in (layer, SkillVAE(4, d_model=32, enc_layers=1, dec_layers=1, heads=2, ffn=64),
                  SkillGPT(64, 8, d_model=32, layers=1, heads=2, ffn=64)):
        drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
        assert drops and all(type(m) is Dropout for m in drops)
