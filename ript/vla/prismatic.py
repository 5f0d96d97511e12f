"""The Prismatic VLM of OpenVLA / OpenVLA-OFT, rebuilt from maintained libraries (vla_spec §1-3).

No `trust_remote_code`: the vision towers are timm ViTs and the LLM is transformers'
`LlamaForCausalLM`, laid out so that `state_dict()` keys equal the official safetensors keys
after one rename: DINOv2's LayerScale `ls{1,2}.gamma` is `ls{1,2}.scale_factor` there (§1.1;
`official_key` / `local_key`).

Vision (§1.1, §3.2). Each featurizer gives the output of its second-to-last block (block L-2, no
final norm, prefix tokens dropped: 256 patches at 224 px). On timm 1.0.31
`get_intermediate_layers(x, n={L-2})[0]` still means exactly that; we call
`forward_intermediates(..., stop_early=True)`, the same computation without running the unused
last block (tests check both against a by-hand pass). Fused: channels 0-2 → DINOv2, 3-5 → SigLIP,
concatenated on the feature axis; OFT's several images (6 channels each) are concatenated on the
sequence axis (2 images: 512 tokens).

The LLM is driven layer by layer (`_decode`): embeddings → rotary embeddings of the model →
each `LlamaDecoderLayer` with an explicit additive 4-D mask (0 attend, finfo.min elsewhere) →
final norm. That mask is the only source of (non-)causality, so no transformers release can
re-add a causal mask behind our back. `attn_implementation` "sdpa" (default; is_causal stays
False because a mask is always given) and "eager" both honour it (tested); flash-attention takes
no 4-D mask and is refused.

OFT parallel decoding (§3.3) is fully bidirectional over [BOS, patches (+ proprio token), prompt,
56 zeroed placeholders, stop]; the action states are those at the last prompt token (29871) and
the first 55 placeholders (the one-position shift of §3.3 step 7, openvla-oft#44/#49). RIPT's
split (§4.3): `prefix_cache` runs BOS + patches + the prompt without its last token once, without
gradient, bidirectional within the prefix; `suffix_hidden` runs [last prompt token, 56 zeros,
stop] with gradient, every suffix query seeing all prefix and suffix keys. Prefix tokens never see
the suffix, so the two modes differ by design: on the tiny fake checkpoint (hidden 64, 2 layers,
fp32, ript.vla.fake) the largest |full - prefix| over the 56 action states is about 0.08 where the
states have std 1 and max |h| 2.4 (tests/test_vla_model.py prints the measured value).

OpenVLA's discrete decoding (§2, §4.7) is ordinary causal attention over [BOS, patches, prompt,
action tokens], greedy or top-k sampled, with or without a KV cache.

Batches may mix prompts of different lengths, right-padded with PAD 32000: each row is laid out
as it would be alone (its own positions, pad keys masked), so a batch equals its rows run singly.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from transformers import LlamaConfig, LlamaForCausalLM

BOS_ID, STOP_ID, EMPTY_PIECE_ID, PAD_ID = 1, 2, 29871, 32000
CHUNK, ACTION_DIM, PROPRIO_DIM = 8, 7, 8  # OFT's LIBERO constants (§3.1, §3.2)
N_ACTION_STATES = CHUNK * ACTION_DIM
FUSED_ARCH = "no-align+fused-gelu-mlp"
# config.json fields only our small models carry (fake ones, ript.vla.fake; CPU-sized ones trained
# here, ript.vla.sft): timm overrides shrinking each ViT (§5.1), and OFT's per-platform constants
# (its prismatic/vla/constants.py picks them by robot; absent = LIBERO's, as the official files)
FAKE_OVERRIDES_FIELD = "ript_fake_timm_overrides"
CONSTANTS_FIELD = "ript_oft_constants"


def oft_constants(config: dict) -> tuple[int, int, int]:
    """(NUM_ACTIONS_CHUNK, ACTION_DIM, PROPRIO_DIM) of a checkpoint's config.json."""
    c = config.get(CONSTANTS_FIELD) or {}
    return (int(c.get("NUM_ACTIONS_CHUNK", CHUNK)), int(c.get("ACTION_DIM", ACTION_DIM)),
            int(c.get("PROPRIO_DIM", PROPRIO_DIM)))
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
_LS = ("ls1.gamma", "ls2.gamma")


def official_key(key: str) -> str:
    """Our state-dict key → the official one (DINOv2 LayerScale `gamma` → `scale_factor`)."""
    if key.startswith("vision_backbone.featurizer.") and key.endswith(_LS):
        return key[: -len("gamma")] + "scale_factor"
    return key


def local_key(key: str) -> str:
    """The official key → ours (inverse of `official_key`)."""
    if key.startswith("vision_backbone.featurizer.") and key.endswith(
            ("ls1.scale_factor", "ls2.scale_factor")):
        return key[: -len("scale_factor")] + "gamma"
    return key


def lora_target_modules(model: nn.Module) -> list[str]:
    """OFT's LoRA `target_modules="all-linear"` (§3.6): every nn.Linear except the LM head.
    Spelled out because peft drops the output layer only for a transformers PreTrainedModel."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not name.endswith("lm_head")]


def _vit(timm_id: str, image_size: int, act_layer, overrides: dict | None) -> nn.Module:
    return timm.create_model(timm_id, pretrained=False, img_size=image_size, num_classes=0,
                             act_layer=act_layer, **(overrides or {}))


class VisionBackbone(nn.Module):
    """DINOv2 (`featurizer`) + SigLIP (`fused_featurizer`), second-to-last block, 256 patches."""

    def __init__(self, timm_ids: list[str], image_size: int = 224, fused: bool = True,
                 act_layers=(None, None), overrides: dict | None = None):
        super().__init__()
        overrides = overrides or {}
        self.fused = fused
        self.featurizer = _vit(timm_ids[0], image_size, act_layers[0], overrides.get("featurizer"))
        self.fused_featurizer = (_vit(timm_ids[1], image_size, act_layers[1],
                                      overrides.get("fused_featurizer")) if fused else None)
        self.embed_dim = self.featurizer.embed_dim + (
            self.fused_featurizer.embed_dim if fused else 0)
        self.channels = 6 if fused else 3

    @staticmethod
    def patch_features(vit: nn.Module, x: Tensor) -> Tensor:
        """(B, 3, H, W) → (B, patches, D): block L-2 output, no final norm, no prefix tokens."""
        return vit.forward_intermediates(x, indices=[len(vit.blocks) - 2], norm=False,
                                         stop_early=True, output_fmt="NLC",
                                         intermediates_only=True)[0]

    def forward(self, pixel_values: Tensor) -> Tensor:
        if pixel_values.shape[1] % self.channels:
            raise ValueError(f"pixel_values has {pixel_values.shape[1]} channels, not a multiple "
                             f"of {self.channels} (one image per {self.channels} channels)")
        images = []
        for img in pixel_values.split(self.channels, dim=1):
            feats = self.patch_features(self.featurizer, img[:, :3])
            if self.fused:
                feats = torch.cat([feats, self.patch_features(self.fused_featurizer, img[:, 3:])],
                                  dim=-1)
            images.append(feats)
        return torch.cat(images, dim=1)


class Projector(nn.Module):
    """`fused-gelu-mlp` (§1.1): fc1 D→4D, GELU, fc2 4D→llm, GELU, fc3 llm→llm."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class _KV:
    """Per-layer keys/values, duck-typing the `update` of transformers' Cache that LlamaAttention
    calls: returns cached + new; appends the new ones only if `grow`."""

    def __init__(self, keys=(), values=(), grow: bool = True):
        self.keys, self.values, self.grow = list(keys), list(values), grow

    def update(self, k: Tensor, v: Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx < len(self.keys):
            k = torch.cat([self.keys[layer_idx], k], dim=-2)
            v = torch.cat([self.values[layer_idx], v], dim=-2)
            if self.grow:
                self.keys[layer_idx], self.values[layer_idx] = k, v
        elif self.grow:
            self.keys.append(k)
            self.values.append(v)
        return k, v


@dataclass
class PrefixCache:
    """RIPT's no-grad prefix (§4.3): per-layer keys/values (B, kv_heads, L, head_dim), which
    prefix keys are real (B, L), each row's prefix length (= its suffix's first position) and
    the last prompt token that opens its suffix."""

    keys: list[Tensor]
    values: list[Tensor]
    valid: Tensor
    lengths: Tensor
    last_ids: Tensor

    def select(self, rows: Tensor | list[int]) -> PrefixCache:
        """The cache of some rows (repeats allowed: one prefix for K rollouts)."""
        rows = torch.as_tensor(rows, device=self.valid.device)
        return PrefixCache([k[rows] for k in self.keys], [v[rows] for v in self.values],
                           self.valid[rows], self.lengths[rows], self.last_ids[rows])


def _stack_rows(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Right-pad per-row (L_b, H) sequences: (B, L, H) and the real-token mask (B, L)."""
    lengths = torch.tensor([len(r) for r in rows], device=rows[0].device)
    embeds = pad_sequence(rows, batch_first=True)
    return embeds, torch.arange(embeds.shape[1], device=embeds.device) < lengths[:, None]


class PrismaticVLA(nn.Module):
    """vision_backbone → projector → language_model, keys as in the official checkpoints."""

    def __init__(self, config: dict, *, dtype: torch.dtype | None = None,
                 attn_implementation: str = "sdpa"):
        super().__init__()
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation {attn_implementation!r}: use one of "
                             f"{ATTN_IMPLEMENTATIONS} (the decoding relies on a 4-D mask)")
        if config.get("arch_specifier", FUSED_ARCH) != FUSED_ARCH:
            raise ValueError(f"arch_specifier {config['arch_specifier']!r}: only {FUSED_ARCH}")
        self.vla_config = config
        self.chunk, self.action_dim, self.proprio_dim = oft_constants(config)
        self.n_action_states = self.chunk * self.action_dim
        text = LlamaConfig(**config["text_config"])  # absent fields: LlamaConfig defaults (§1.3)
        text._attn_implementation = attn_implementation
        self.vision_backbone = VisionBackbone(
            config["timm_model_ids"], config.get("image_sizes", [224])[0],
            config.get("use_fused_vision_backbone", True),
            config.get("timm_override_act_layers") or (None, None),
            config.get(FAKE_OVERRIDES_FIELD))
        self.projector = Projector(self.vision_backbone.embed_dim, text.hidden_size)
        self.language_model = LlamaForCausalLM(text)
        if dtype is not None:
            self.to(dtype)

    @property
    def hidden_size(self) -> int:
        return self.language_model.config.hidden_size

    def _embed(self, ids: Tensor) -> Tensor:
        return self.language_model.model.embed_tokens(ids)

    def visual_tokens(self, pixel_values: Tensor, proprio: Tensor | None = None,
                      proprio_projector: nn.Module | None = None) -> Tensor:
        """Projected patches of every image (B, 256·n, H), then the proprio token if given."""
        p = self.projector.fc1.weight
        tokens = self.projector(self.vision_backbone(pixel_values.to(p.device, p.dtype)))
        if proprio is not None:
            if proprio_projector is None:
                raise ValueError("proprio given without a proprio_projector")
            q = next(proprio_projector.parameters())
            tok = proprio_projector(proprio.to(q.device, q.dtype)).to(tokens.dtype)
            tokens = torch.cat([tokens, tok[:, None]], dim=1)
        return tokens

    @staticmethod
    def _prompt_lengths(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Ids per row (BOS + prompt); rows must be right-padded."""
        valid = input_ids.ne(PAD_ID) if attention_mask is None else attention_mask.bool()
        n = valid.sum(1)
        if not torch.equal(valid, torch.arange(valid.shape[1], device=n.device) < n[:, None]):
            raise ValueError("input_ids must be right-padded (pads only after each prompt)")
        if int(n.min()) < 2:
            raise ValueError("every row needs BOS and at least one prompt token")
        return n

    def _decode(self, embeds: Tensor, positions: Tensor, allowed: Tensor,
                kv: _KV | None = None) -> Tensor:
        """All decoder layers + final norm over `embeds` (B, Q, H) at `positions` (B, Q).
        `allowed` (B, Q, K) says which keys (cached ones first) each query attends to."""
        lm = self.language_model.model
        mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device)
        mask = mask.masked_fill(~allowed, torch.finfo(embeds.dtype).min)[:, None]
        rope = lm.rotary_emb(embeds, positions)
        h = embeds
        for layer in lm.layers:
            h = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=rope,
                      cache=kv, is_causal=False)
        return lm.norm(h)

    # OpenVLA-OFT: parallel decoding (§3.3) and RIPT's prefix/suffix split (§4.3)
    def action_hidden(self, input_ids: Tensor, pixel_values: Tensor, proprio: Tensor | None = None,
                      proprio_projector: nn.Module | None = None, mode: str = "full",
                      attention_mask: Tensor | None = None) -> Tensor:
        """The 56 action hidden states (B, 56, H) the L1 head reads. `input_ids` = BOS + prompt
        (ending in 29871). mode "full": OFT's single bidirectional pass; "prefix": RIPT's."""
        if mode == "prefix":
            return self.suffix_hidden(self.prefix_cache(input_ids, pixel_values, proprio,
                                                        proprio_projector, attention_mask))
        if mode != "full":
            raise ValueError(f"mode {mode!r}: 'full' or 'prefix'")
        n = self._prompt_lengths(input_ids, attention_mask)
        visual = self.visual_tokens(pixel_values, proprio, proprio_projector)
        text = self._embed(input_ids)
        zeros = text.new_zeros(self.n_action_states, text.shape[-1])
        stop = self._embed(input_ids.new_tensor([STOP_ID]))
        embeds, valid = _stack_rows([torch.cat([text[b, :1], visual[b], text[b, 1:n[b]], zeros,
                                                stop]) for b in range(len(n))])
        B, L = valid.shape
        positions = torch.arange(L, device=valid.device).expand(B, L)
        h = self._decode(embeds, positions, valid[:, None, :].expand(B, L, L))
        idx = (visual.shape[1] + n - 1)[:, None] + torch.arange(self.n_action_states,
                                                                device=n.device)
        return h[torch.arange(B, device=n.device)[:, None], idx]

    @torch.no_grad()
    def prefix_cache(self, input_ids: Tensor, pixel_values: Tensor, proprio: Tensor | None = None,
                     proprio_projector: nn.Module | None = None,
                     attention_mask: Tensor | None = None) -> PrefixCache:
        """No-grad pass over BOS + patches (+ proprio) + prompt without its last token."""
        n = self._prompt_lengths(input_ids, attention_mask)
        visual = self.visual_tokens(pixel_values, proprio, proprio_projector)
        text = self._embed(input_ids)
        embeds, valid = _stack_rows([torch.cat([text[b, :1], visual[b], text[b, 1:n[b] - 1]])
                                     for b in range(len(n))])
        B, L = valid.shape
        kv = _KV()
        self._decode(embeds, torch.arange(L, device=n.device).expand(B, L),
                     valid[:, None, :].expand(B, L, L), kv)
        last = input_ids[torch.arange(B, device=n.device), n - 1]
        return PrefixCache(kv.keys, kv.values, valid, valid.sum(1), last)

    def suffix_hidden(self, cache: PrefixCache) -> Tensor:
        """[last prompt token, 56 zeros, stop] after the cached prefix → (B, 56, H)."""
        B, L = cache.valid.shape
        last = self._embed(cache.last_ids)[:, None]
        stop = self._embed(cache.last_ids.new_full((B, 1), STOP_ID))
        embeds = torch.cat([last, last.new_zeros(B, self.n_action_states, last.shape[-1]), stop], 1)
        q = embeds.shape[1]
        positions = cache.lengths[:, None] + torch.arange(q, device=cache.valid.device)
        keys = torch.cat([cache.valid, cache.valid.new_ones(B, q)], dim=1)
        h = self._decode(embeds, positions, keys[:, None, :].expand(B, q, L + q),
                         _KV(cache.keys, cache.values, grow=False))
        return h[:, :-2]

    # OpenVLA: discrete action tokens, causal (§2, §4.7)
    def _causal_prompt(self, input_ids, pixel_values, attention_mask):
        n = self._prompt_lengths(input_ids, attention_mask)
        visual = self.visual_tokens(pixel_values)
        text = self._embed(input_ids)
        embeds, valid = _stack_rows([torch.cat([text[b, :1], visual[b], text[b, 1:n[b]]])
                                     for b in range(len(n))])
        return embeds, valid, valid.sum(1)

    def _causal_logits(self, embeds: Tensor, valid: Tensor, lengths: Tensor,
                       tokens: Tensor) -> Tensor:
        """Uncached: logits after each row's prompt and after each of `tokens` (B, k+1, V)."""
        B, L = valid.shape
        k = tokens.shape[1]
        dev = valid.device
        seq = torch.cat([embeds, self._embed(tokens)], dim=1)
        positions = torch.cat([torch.arange(L, device=dev).expand(B, L),
                               lengths[:, None] + torch.arange(k, device=dev)], dim=1)
        keys = torch.cat([valid, valid.new_ones(B, k)], dim=1)
        causal = torch.ones(L + k, L + k, dtype=torch.bool, device=dev).tril()
        h = self._decode(seq, positions, causal[None] & keys[:, None, :])
        h = torch.cat([h[torch.arange(B, device=dev), lengths - 1][:, None], h[:, L:]], dim=1)
        return self.language_model.lm_head(h)

    @staticmethod
    def _pick(logits: Tensor, top_k: int | None, temperature: float, generator) -> Tensor:
        if top_k is None:
            return logits.argmax(-1)
        vals, idx = (logits.float() / temperature).topk(top_k, dim=-1)
        probs = vals.softmax(-1)
        if generator is not None and generator.device != probs.device:
            # the runners' seeded CPU generator: draw there, the same tokens on any device
            choice = torch.multinomial(probs.to(generator.device), 1, generator=generator)
            return idx.gather(-1, choice.to(idx.device))[:, 0]
        choice = torch.multinomial(probs, 1, generator=generator)
        return idx.gather(-1, choice)[:, 0]

    @torch.no_grad()
    def generate_action_tokens(self, input_ids: Tensor, pixel_values: Tensor, n_tokens: int = 7,
                               top_k: int | None = None, temperature: float = 1.0,
                               generator: torch.Generator | None = None, use_cache: bool = True,
                               attention_mask: Tensor | None = None, return_logits: bool = False):
        """(B, n_tokens) ids, unconstrained over the whole vocabulary (§2): greedy if `top_k` is
        None, else top-k sampling at `temperature` with `generator` (on the model's device).
        With `return_logits`, also the (B, n_tokens, V) logits each token was picked from."""
        embeds, valid, lengths = self._causal_prompt(input_ids, pixel_values, attention_mask)
        B, L = valid.shape
        dev = valid.device
        head = self.language_model.lm_head
        tokens = input_ids.new_zeros(B, 0)
        picked = []
        if use_cache:
            kv = _KV()
            causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
            h = self._decode(embeds, torch.arange(L, device=dev).expand(B, L),
                             causal[None] & valid[:, None, :], kv)
            logits = head(h[torch.arange(B, device=dev), lengths - 1])
        for t in range(n_tokens):
            if not use_cache:
                logits = self._causal_logits(embeds, valid, lengths, tokens)[:, -1]
            nxt = self._pick(logits, top_k, temperature, generator)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            picked.append(logits)
            if use_cache and t + 1 < n_tokens:
                keys = torch.cat([valid, valid.new_ones(B, t + 1)], dim=1)[:, None, :]
                h = self._decode(self._embed(nxt[:, None]), (lengths + t)[:, None], keys, kv)
                logits = head(h[:, -1])
        return (tokens, torch.stack(picked, dim=1)) if return_logits else tokens

    def action_token_logprobs(self, input_ids: Tensor, pixel_values: Tensor, tokens: Tensor,
                              attention_mask: Tensor | None = None) -> Tensor:
        """Teacher-forced log-probs (B, n) of `tokens` after the prompt, log-softmax without
        temperature (RIPT's OpenVLA runner, §4.7); with gradient."""
        embeds, valid, lengths = self._causal_prompt(input_ids, pixel_values, attention_mask)
        logits = self._causal_logits(embeds, valid, lengths, tokens[:, :-1])
        return logits.float().log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
