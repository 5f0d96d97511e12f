"""The clean OpenVLA / OpenVLA-OFT model on tiny FAKE checkpoints (vla_spec §1-2, §4.3, §5.1):
the vision layer and fusion order, bidirectional OFT decoding, RIPT's prefix/suffix split, causal
OpenVLA decoding, LoRA merging and a bf16 load. The checkpoint folder itself (layout, strict
loading, side files, offline) is tests/test_vla_checkpoint.py; both share conftest's fake."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ript.vla.checkpoint import load_checkpoint
from ript.vla.fake import write_fake_checkpoint
from ript.vla.prismatic import N_ACTION_STATES, PAD_ID, PrismaticVLA, VisionBackbone

PROMPT = "In: What action should the robot take to {}?\nOut:"


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models: one thread


@pytest.fixture(scope="module")
def ov(tmp_path_factory):
    folder = write_fake_checkpoint(tmp_path_factory.mktemp("ov") / "ckpt", family="openvla",
                                   suite="libero_goal", seed=1)
    return load_checkpoint(folder)


def prompt_ids(tok, *tasks: str) -> torch.Tensor:
    """BOS + prompt ending in 29871 per task, right-padded with PAD (§1.4)."""
    rows = [tok(PROMPT.format(t)).input_ids for t in tasks]
    rows = [r if r[-1] == 29871 else r + [29871] for r in rows]
    width = max(map(len, rows))
    return torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])


def images(batch: int, n_images: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 6 * n_images, 224, 224, generator=g),
            torch.rand(batch, 8, generator=g) * 2 - 1)


# --- vision --------------------------------------------------------------------------------------

def test_second_to_last_block_without_norm_or_prefix(oft):
    vb = oft.model.vision_backbone
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    assert (vb.featurizer.num_prefix_tokens, vb.fused_featurizer.num_prefix_tokens) == (5, 0)
    with torch.no_grad():
        for vit in (vb.featurizer, vb.fused_featurizer):
            L, cut = len(vit.blocks), vit.num_prefix_tokens
            h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
            for block in vit.blocks[:L - 1]:  # blocks 0 .. L-2
                h = block(h)
            hand = h[:, cut:]
            ours = VisionBackbone.patch_features(vit, x)
            assert ours.shape == (2, 256, vit.embed_dim)
            torch.testing.assert_close(ours, hand)
            torch.testing.assert_close(vit.get_intermediate_layers(x, n={L - 2})[0], hand)
            # the last block and the final norm change the features, so the choice is observable
            assert (vit.blocks[-1](h)[:, cut:] - hand).abs().max() > 1e-2
            assert (vit.norm(h)[:, cut:] - hand).abs().max() > 1e-2


def test_fusion_channel_and_sequence_order(oft):
    model, vb = oft.model, oft.model.vision_backbone
    pix, proprio = images(2)
    d = vb.featurizer.embed_dim
    with torch.no_grad():
        out = vb(pix)
        assert out.shape == (2, 512, d + vb.fused_featurizer.embed_dim)
        for i in range(2):
            img, rows = pix[:, 6 * i:6 * i + 6], slice(256 * i, 256 * (i + 1))
            torch.testing.assert_close(out[:, rows, :d], vb.patch_features(vb.featurizer,
                                                                           img[:, :3]))
            torch.testing.assert_close(out[:, rows, d:], vb.patch_features(vb.fused_featurizer,
                                                                           img[:, 3:]))
        tokens = model.visual_tokens(pix, proprio, oft.proprio_projector)
        assert tokens.shape == (2, 513, 64)  # 512 patches, then the proprio token
        torch.testing.assert_close(tokens[:, -1], oft.proprio_projector(proprio))
        torch.testing.assert_close(tokens[:, :512], model.projector(out))
    with pytest.raises(ValueError, match="multiple of 6"):
        vb(pix[:, :9])


# --- OFT decoding --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def oft_batch(oft):
    ids = prompt_ids(oft.tokenizer, "put the black bowl on the plate")
    return (ids, *images(1))


def test_decoder_mask_is_the_only_causality(oft):
    """Changing the LAST input changes EARLIER outputs under the bidirectional mask, and does not
    under a causal one: the layers honour our 4-D mask, nothing re-adds causality."""
    model = oft.model
    x = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, -1] += 1.0
    pos = torch.arange(12)[None]
    full, causal = torch.ones(1, 12, 12, dtype=torch.bool), torch.ones(12, 12).tril().bool()[None]
    with torch.no_grad():
        bi = (model._decode(y, pos, full) - model._decode(x, pos, full))[:, :-1].abs().max()
        ca = (model._decode(y, pos, causal) - model._decode(x, pos, causal))[:, :-1].abs().max()
    assert bi > 1e-3 and ca < 1e-6


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_oft_pass_is_bidirectional(oft_dir, oft, oft_batch, impl):
    ck = load_checkpoint(oft_dir, adapter=None, attn_implementation=impl)
    assert ck.model.language_model.config._attn_implementation == impl
    ids, pix, proprio = oft_batch
    emb = ck.model.language_model.model.embed_tokens.weight
    with torch.no_grad():
        base = {m: ck.model.action_hidden(ids, pix, proprio, ck.proprio_projector, mode=m)
                for m in ("full", "prefix")}
        emb[2] += 1.0  # the stop token comes after every action state
        for mode, before in base.items():
            after = ck.model.action_hidden(ids, pix, proprio, ck.proprio_projector, mode=mode)
            assert (after - before).abs().max() > 1e-3, mode
        emb[2] -= 1.0
        ref = oft.model.action_hidden(ids, pix, proprio, oft.proprio_projector)
    torch.testing.assert_close(base["full"], ref, atol=1e-4, rtol=1e-4)  # eager == sdpa


def test_prefix_split_differs_only_by_prefix_to_suffix_attention(oft, oft_batch):
    model, proj = oft.model, oft.proprio_projector
    ids, pix, proprio = oft_batch
    with torch.no_grad():
        full = model.action_hidden(ids, pix, proprio, proj, mode="full")
        split = model.action_hidden(ids, pix, proprio, proj, mode="prefix")
        # a hand-built reference: one pass where prefix queries may not see the suffix keys
        text, visual = model._embed(ids), model.visual_tokens(pix, proprio, proj)
        seq = torch.cat([text[:, :1], visual, text[:, 1:], torch.zeros(1, N_ACTION_STATES, 64),
                         model._embed(torch.tensor([[2]]))], dim=1)
        n = seq.shape[1]
        prefix = 1 + visual.shape[1] + ids.shape[1] - 2  # BOS + 513 + prompt without its 29871
        assert n == prefix + 58
        pos, allowed = torch.arange(n)[None], torch.ones(1, n, n, dtype=torch.bool)
        actions = slice(prefix, prefix + N_ACTION_STATES)  # the 29871 and 55 placeholders
        torch.testing.assert_close(full, model._decode(seq, pos, allowed)[:, actions])
        allowed[:, :prefix, prefix:] = False
        torch.testing.assert_close(split, model._decode(seq, pos, allowed)[:, actions],
                                   atol=1e-5, rtol=1e-5)
    diff = (full - split).abs().max().item()
    print(f"\nmax |full - prefix| over the 56 action states: {diff:.4f} "
          f"(states: max |h| {full.abs().max():.2f}, std {full.std():.2f})")
    assert 1e-4 < diff < 0.5 * full.abs().max()


def test_suffix_has_gradient_and_prefix_has_none(oft, oft_batch):
    model = oft.model
    ids, pix, proprio = oft_batch
    cache = model.prefix_cache(ids, pix, proprio, oft.proprio_projector)
    assert not any(k.requires_grad for k in cache.keys)
    assert cache.keys[0].shape[2] == int(cache.lengths[0]) == 1 + 513 + ids.shape[1] - 2
    two = cache.select([0, 0])
    out = model.suffix_hidden(two)
    assert out.shape == (2, N_ACTION_STATES, 64)
    torch.testing.assert_close(out[0], out[1])
    model.zero_grad()
    out.square().sum().backward()
    lm = model.language_model.model.layers[0].self_attn.q_proj.weight
    assert lm.grad is not None and lm.grad.abs().sum() > 0
    assert model.projector.fc1.weight.grad is None
    model.zero_grad()


def test_batch_of_different_prompts_equals_each_row_alone(oft):
    model, proj = oft.model, oft.proprio_projector
    ids = prompt_ids(oft.tokenizer, "put the bowl on the plate",
                     "open the top drawer and put the black bowl inside")
    assert (ids == PAD_ID).any()
    pix, proprio = images(2, seed=4)
    with torch.no_grad():
        for mode in ("full", "prefix"):
            both = model.action_hidden(ids, pix, proprio, proj, mode=mode)
            for b in range(2):
                row = ids[b:b + 1, : int((ids[b] != PAD_ID).sum())]
                alone = model.action_hidden(row, pix[b:b + 1], proprio[b:b + 1], proj, mode=mode)
                torch.testing.assert_close(both[b:b + 1], alone, atol=1e-5, rtol=1e-5)


# --- OpenVLA decoding ----------------------------------------------------------------------------

def test_openvla_cached_equals_uncached(ov):
    model = ov.model
    assert ov.family == "openvla" and ov.action_head is None and ov.proprio_projector is None
    ids = prompt_ids(ov.tokenizer, "turn on the stove", "put the wine bottle on top of the cabinet")
    pix, _ = images(2, n_images=1, seed=5)
    cached, lc = model.generate_action_tokens(ids, pix, return_logits=True)
    plain, lp = model.generate_action_tokens(ids, pix, use_cache=False, return_logits=True)
    assert cached.shape == (2, 7) and torch.equal(cached, plain)
    torch.testing.assert_close(lc, lp, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        logp = model.action_token_logprobs(ids, pix, cached)
    torch.testing.assert_close(logp, lc.log_softmax(-1).gather(-1, cached[..., None])[..., 0],
                               atol=1e-4, rtol=1e-4)
    row = ids[1:, : int((ids[1] != PAD_ID).sum())]
    assert torch.equal(model.generate_action_tokens(row, pix[1:]), cached[1:])
    draws = [model.generate_action_tokens(ids, pix, top_k=5, temperature=1.2,
                                          generator=torch.Generator().manual_seed(s))
             for s in (0, 0, 1)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    plain_top5 = lc.topk(5, dim=-1).indices
    assert (draws[0][:, :1, None] == plain_top5[:, :1]).any(-1).all()  # first token in the top 5


# --- adapter, side files, offline ----------------------------------------------------------------

def test_lora_adapter_is_merged(oft_dir, oft, oft_batch):
    merged = load_checkpoint(oft_dir)
    assert merged.adapter == oft_dir / "lora_adapter" and oft.adapter is None
    assert type(merged.model) is PrismaticVLA
    cfg = json.loads((oft_dir / "lora_adapter" / "adapter_config.json").read_text())
    lora = load_file(oft_dir / "lora_adapter" / "adapter_model.safetensors")
    name = "language_model.model.layers.0.self_attn.q_proj"
    a, b = (lora[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
    base = oft.model.get_submodule(name).weight
    expected = base + cfg["lora_alpha"] / cfg["r"] * b @ a
    torch.testing.assert_close(merged.model.get_submodule(name).weight, expected)
    ids, pix, proprio = oft_batch
    with torch.no_grad():
        diff = (merged.model.action_hidden(ids, pix, proprio, merged.proprio_projector)
                - oft.model.action_hidden(ids, pix, proprio, oft.proprio_projector))
    assert diff.abs().max() > 1e-3


def test_tokenizer_has_the_real_special_ids(oft):
    tok = oft.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, PAD_ID)
    assert tok.convert_tokens_to_ids("▁") == 29871 and len(tok) == 32001
    assert tok.padding_side == "right"
    ids = tok(PROMPT.format("put the bowl on the plate")).input_ids
    assert ids[0] == 1 and ids.count(1) == 1 and ids[-1] != 29871


def test_bf16_load_tracks_float32(oft_dir, oft, oft_batch):
    ck = load_checkpoint(oft_dir, adapter=None, dtype=torch.bfloat16)
    assert ck.model.projector.fc1.weight.dtype == torch.bfloat16
    assert ck.action_head.model.fc1.weight.dtype == torch.bfloat16
    ids, pix, proprio = oft_batch
    with torch.no_grad():
        lo = ck.action_head(ck.model.action_hidden(ids, pix, proprio, ck.proprio_projector))
        hi = oft.action_head(oft.model.action_hidden(ids, pix, proprio, oft.proprio_projector))
    assert lo.dtype == torch.bfloat16 and (lo.float() - hi).abs().max() < 0.25
