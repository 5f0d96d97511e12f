"""RIPT for OpenVLA-OFT: OFT's L1 head turned into a Laplace policy that RIPT can train
(vla_spec §4; ript_spec §5.5-5.6, §8 B12/B13).

Why: RIPT (ript.rl) speaks `ript.policy.RLPolicy`: `act` returns a Decision whose stored inputs
let `log_prob` recompute the decision's log-probs with gradient, and PPO takes one ratio per
"token". OFT regresses a deterministic chunk, so RIPT-VLA adds a scale head (§4.1) and samples
a ~ Laplace(μ, s·b) (§4.2). This module is that policy:

* Maths (§4.2): `laplace_log_prob` = −log b − |a−μ|/b − ln 2 per dimension, log b clamped to
  `log_scale_clip` [−2, 0.5]; `laplace_sample` draws with s·exp(log b) and the UNCLIPPED log b.
* `OFTRLPolicy.act` (rollouts, `sampling=True`) samples the normalised (8, 7) chunk, executes it
  un-normalised open loop, and returns an `OFTDecision` (rows = replanned slots, row order):
    context   dict: images (B, cams, 224, 224, 3) uint8 (the policy images, after JPEG, resize
              and crop; the pixel values follow deterministically and are 8x larger), proprio
              (B, 8) float32 normalised, input_ids (B, W) long (BOS + prompt, right-padded with
              PAD to the longest prompt of the task vocabulary). Never the KV cache (§4.3, §4.6).
    tokens    (B, 8, 7) float32, the sampled chunk in normalised space.
    logp      (B, 8) per chunk step, summed over the 7 dims (`sum_on_action_dim`), under the
              unscaled clipped b: the original's ratio (§4.2).
    logp_topk (B, 8) the same under the distribution actually sampled (s·b, unclipped): the
              analogue of QueST's `ratio_distribution: sampled_topk` (ript_spec §8 B12).
  `sampling=False` (evaluation, §4.6) executes μ and returns no Decision.
* Decoding is always RIPT's split (§4.3): the prefix without gradient, the 58-token suffix with
  gradient; `log_prob(context, tokens)` recomputes the same way, so at unchanged weights it
  equals the stored logp to float precision. log-probs are computed in float32 (the original:
  bf16, stored as float32).
* `prepare_rl` (§4.4): a fresh LoRA (r 32, alpha 16, dropout 0, gaussian init so B = 0 and the
  function is unchanged) on every Linear of the LLM but its LM head. The original wraps the whole
  VLA ("all-linear"), but its vision/projector adapters sit in the no-grad prefix and never get a
  gradient (§4.3), so leaving them out changes nothing. Trainable: LoRA and the L1 head; the
  scale head only with `train_scale_head` (all suite configs fix it); the proprio projector never.
  `param_groups()` → {"lora", "head"}, clipped separately by `clip_groups` (§4.4).
* Checkpoints: `state_dict()` holds only what RL can change (LoRA weights `lora.*`, the heads
  `action_head.*`, `scale_head.*`), never the frozen 7-B base; `arch` names the base folder and
  settings, so `OFTRLPolicy.from_arch(arch)` + `load_state_dict` rebuilds the policy (also
  registered as policy family "openvla_oft" for `ript.policy.load_policy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ript.vla import processing as P
from ript.vla.heads import LaplaceScaleHead
from ript.vla.policy import VLAPolicy, _hwc
from ript.vla.prismatic import PAD_ID, lora_target_modules

LOG_SCALE_CLIP = (-2.0, 0.5)  # `log_scale_clip` of every suite config (§4.2)
SCALE_HEAD_FILE = "scale_header.pth"  # RIPT's released {scale_trunk, log_b_head} (§4.1)
_LN2 = math.log(2.0)


def laplace_log_prob(a: Tensor, mu: Tensor, log_b: Tensor,
                     clip: tuple[float, float] | None = LOG_SCALE_CLIP) -> Tensor:
    """Per-dimension Laplace log density −log b − |a − μ|/b − ln 2, log b clamped to `clip`."""
    if clip is not None:
        log_b = log_b.clamp(*clip)
    return -log_b - (a - mu).abs() / log_b.exp() - _LN2


def laplace_sample(mu: Tensor, log_b: Tensor, scale_factor: float = 1.0,
                   generator: torch.Generator | None = None) -> Tensor:
    """a ~ Laplace(μ, s·exp(log b)) with the unclipped log b (§4.2); noise drawn on the
    generator's device (the runner's CPU generator), as torch.distributions.Laplace does."""
    dev = generator.device if generator is not None else mu.device
    eps = torch.finfo(torch.float32).eps
    u = torch.rand(mu.shape, generator=generator, device=dev) * (2.0 - eps) + (eps - 1.0)
    noise = (-u.sign() * torch.log1p(-u.abs())).to(mu.device, mu.dtype)
    return mu + scale_factor * log_b.exp() * noise


def clip_groups(groups: dict[str, list[Tensor]], max_norms: dict[str, float] | float
                ) -> dict[str, float]:
    """Clip each group's gradient norm to its own maximum (§4.4: 1.0 for the LoRA, 1.0 for the
    heads); returns the pre-clip norm per group."""
    out = {}
    for name, params in groups.items():
        limit = max_norms if isinstance(max_norms, (int, float)) else max_norms[name]
        out[name] = float(nn.utils.clip_grad_norm_(list(params), float(limit)))
    return out


def pixel_values(images: Tensor, norm: dict) -> Tensor:
    """(N, cams, H, W, 3) uint8 policy images → (N, 6·cams, H, W): per image the DINOv2 then
    the SigLIP normalisation, as `processing.pixel_values` (same ops, batched, any device)."""
    x = images.permute(0, 1, 4, 2, 3).float() / 255.0  # (N, cams, 3, H, W)
    parts = [(x - torch.tensor(m, device=x.device).view(3, 1, 1))
             / torch.tensor(s, device=x.device).view(3, 1, 1)
             for m, s in zip(norm["means"], norm["stds"])]
    n, c, _, h, w = x.shape
    return torch.stack(parts, dim=2).reshape(n, c * 3 * len(parts), h, w)


@dataclass
class OFTDecision:
    """The RL record of one `act` call's replanned rows (shapes in the module doc)."""

    context: dict[str, Tensor]
    tokens: Tensor
    logp: Tensor
    logp_topk: Tensor


def _cat_rows(parts: list[tuple[np.ndarray, OFTDecision]]) -> OFTDecision:
    """Per-instruction records → one record in slot order."""
    order = torch.as_tensor(np.argsort(np.concatenate([r for r, _ in parts]), kind="stable"))
    decs = [d for _, d in parts]
    return OFTDecision({k: torch.cat([d.context[k] for d in decs])[order]
                        for k in decs[0].context},
                       *(torch.cat([getattr(d, f) for d in decs])[order]
                         for f in ("tokens", "logp", "logp_topk")))


class OFTRLPolicy(VLAPolicy, nn.Module):
    """An OpenVLA-OFT checkpoint as RIPT's RLPolicy (see module doc).

    scale_head: "auto" (the folder's scale_header.pth if there, else fresh), None (fresh: bias
    −3, weights xavier gain 0.01, §4.1) or a path to a {scale_trunk, log_b_head} file.
    max_rows: rows per model call inside `log_prob` / `entropy` (bounds no-grad memory).
    """

    family = "openvla_oft"
    head_names = ("action_head", "scale_head")  # modules a policy file stores beside the LoRA

    def __init__(self, ckpt, bench, task_names: list[str], unnorm_key: str, *,
                 center_crop: bool = True, scale_factor: float = 5.0,
                 log_scale_clip: tuple[float, float] | None = LOG_SCALE_CLIP,
                 scale_head: str | Path | None = "auto", train_scale_head: bool = False,
                 lora_rank: int = 32, lora_alpha: int = 16, lora_seed: int = 0,
                 sampling: bool = True, max_rows: int = 16):
        nn.Module.__init__(self)
        VLAPolicy.__init__(self, ckpt, bench, task_names, unnorm_key, center_crop=center_crop,
                           decoding="prefix")
        if ckpt.family != "openvla_oft":
            raise ValueError(f"{ckpt.folder}: RIPT's Laplace policy needs an OpenVLA-OFT "
                             f"checkpoint (L1 head), got {ckpt.family}")
        self.unnorm_key, self.scale_factor = unnorm_key, float(scale_factor)
        self.log_scale_clip = tuple(log_scale_clip) if log_scale_clip is not None else None
        self.train_scale_head, self.sampling, self.max_rows = train_scale_head, sampling, max_rows
        self.lora = {"r": lora_rank, "alpha": lora_alpha, "seed": lora_seed}
        self.vla, self.action_head = ckpt.model, ckpt.action_head
        self.proprio_projector = ckpt.proprio_projector
        p = next(self.action_head.parameters())
        head = LaplaceScaleHead(self.vla.hidden_size, self.vla.action_dim)
        if scale_head == "auto":
            scale_head = ckpt.folder / SCALE_HEAD_FILE
            scale_head = scale_head if scale_head.is_file() else None
        self.scale_head_file = str(scale_head) if scale_head is not None else None
        if scale_head is not None:
            head.load_ript_state(torch.load(scale_head, map_location="cpu", weights_only=True))
        self.scale_head = head.to(p.device, p.dtype).eval()
        self.prompt_width = max(len(self.prompt(t)) for t in range(len(self.task_vocab)))
        self.n_scored = self.chunk  # PPO tokens per decision: one per chunk step
        self._peft = None  # the PeftModel around the LLM once `attach_lora` ran (not a child)

    # -- nn.Module, not VLAPolicy's no-op versions ---------------------------------------------
    to, eval, train = nn.Module.to, nn.Module.eval, nn.Module.train

    @property
    def device(self) -> torch.device:
        return next(self.vla.parameters()).device

    # -- acting -------------------------------------------------------------------------------
    def act(self, obs: dict, task, generator=None, active=None):
        task = np.asarray(task)
        B = len(task)
        active = np.ones(B, bool) if active is None else np.asarray(active, bool)
        replan = active & np.array([len(q) == 0 for q in self.queues[:B]])
        parts = []
        for tid in np.unique(task[replan]):  # sorted: a fixed order of generator draws
            rows = np.flatnonzero(replan & (task == tid))
            chunk, dec = self.plan(self.observe(obs, rows, int(tid)), generator)
            env = self.bench.vla_env_actions(
                P.unnormalize_actions(chunk, self.action_stats, eps=1e-8 if self.oft else 0.0))
            for r, actions in zip(rows, env):
                self.queues[r].extend(actions)
            parts.append((rows, dec))
        out = np.zeros((B, self.ckpt.model.action_dim))
        for i in np.flatnonzero(active):
            out[i] = self.queues[i].popleft()
        decision = _cat_rows(parts) if parts and self.sampling else None
        return out, decision, replan

    def observe(self, obs: dict, rows, tid: int) -> dict[str, Tensor]:
        """What a decision keeps to be recomputed: policy images, normalised proprio, prompt."""
        cams = self.bench.vla_cameras[:2 if self.oft else 1]  # OFT: both cameras (§3.2)
        flip = self.bench.vla_images_upside_down
        size = self.ckpt.image.size
        images = np.stack([[P.policy_image(_hwc(obs[c][r]), size, crop=self.center_crop,
                                           upside_down=flip) for c in cams] for r in rows])
        ids = torch.full((len(rows), self.prompt_width), PAD_ID, dtype=torch.long)
        prompt = self.prompt(tid)
        ids[:, :len(prompt)] = prompt
        out = {"images": torch.from_numpy(images), "input_ids": ids}
        if self.oft:  # OpenVLA has no proprio token (§2)
            state = P.normalize_proprio(self.bench.vla_state(obs, rows), self.proprio_stats)
            out["proprio"] = torch.as_tensor(state, dtype=torch.float32)
        return out

    def plan(self, context: dict, generator=None) -> tuple[np.ndarray, OFTDecision | None]:
        """One replanning call → (normalised chunk (n, 8, 7), record or None if not sampling)."""
        with torch.no_grad():
            mu, log_b = (x.cpu() for x in self.distribution(context))
        if not self.sampling:
            return mu.numpy(), None
        a = laplace_sample(mu, log_b, self.scale_factor, generator)
        return a.numpy(), OFTDecision(context, a, self._logp(a, mu, log_b),
                                      self._logp(a, mu, log_b, sampled=True))

    def distribution(self, context: dict) -> tuple[Tensor, Tensor]:
        """(μ, log b), each (N, 8, 7) float32: RIPT's prefix (no grad) / suffix (grad) split."""
        dev, dtype = self.device, next(self.vla.parameters()).dtype
        px = pixel_values(context["images"].to(dev), self.ckpt.image_norm).to(dtype)
        cache = self.vla.prefix_cache(context["input_ids"].to(dev), px,
                                      context["proprio"].to(dev, dtype), self.proprio_projector)
        hidden = self.vla.suffix_hidden(cache)
        return self.action_head(hidden).float(), self.scale_head(hidden).float()

    def _logp(self, a: Tensor, mu: Tensor, log_b: Tensor, sampled: bool = False) -> Tensor:
        """Σ over the 7 dims → (N, 8): one PPO token per chunk step (§4.2)."""
        a = a.to(mu.device, torch.float32).reshape(mu.shape)
        if sampled:
            return laplace_log_prob(a, mu, log_b + math.log(self.scale_factor), None).sum(-1)
        return laplace_log_prob(a, mu, log_b, self.log_scale_clip).sum(-1)

    def _chunked(self, context: dict, tokens: Tensor, fn) -> Tensor:
        """fn((μ, log b), tokens) per model call over rows sharing a prompt (as `act` batches
        them: no padding, §4.3), at most `max_rows` at a time; rows back in input order."""
        if tokens.shape[0] == 0:
            return tokens.new_zeros(0, self.n_scored)
        groups = torch.unique(context["input_ids"], dim=0, return_inverse=True)[1].cpu()
        idx = []
        for g in range(int(groups.max()) + 1):
            rows = torch.nonzero(groups == g)[:, 0]
            idx += [rows[i:i + self.max_rows] for i in range(0, len(rows), self.max_rows)]
        out = [fn(self.distribution({k: v[r] for k, v in context.items()}), tokens[r])
               for r in idx]
        return torch.cat(out)[torch.argsort(torch.cat(idx))]

    # -- RLPolicy -----------------------------------------------------------------------------
    def log_prob(self, context: dict, tokens: Tensor) -> Tensor:
        """(N, 8) per-step log-probs of stored chunks (N, 8, 7) under the unscaled clipped b,
        with gradient through the suffix (LoRA, L1 head; the scale head if trained)."""
        return self._chunked(context, tokens, lambda d, t: self._logp(t, *d))

    def log_prob_sampled(self, context: dict, tokens: Tensor) -> Tensor:
        """(N, 8) the same under the sampling distribution Laplace(μ, s·b), log b unclipped."""
        return self._chunked(context, tokens, lambda d, t: self._logp(t, *d, sampled=True))

    @torch.no_grad()
    def entropy(self, context: dict, tokens: Tensor) -> Tensor:
        """Mean entropy (nats) per chunk step of the scored distribution: Σ_d 1 + ln 2b."""
        clip = self.log_scale_clip or (-math.inf, math.inf)
        ent = self._chunked(context, tokens, lambda d, t: (1 + _LN2 + d[1].clamp(*clip)).sum(-1))
        return ent.mean()

    def attach_lora(self) -> None:
        """A fresh LoRA on the LLM's Linears (but lm_head); B = 0, so nothing changes yet."""
        if self._peft is not None:
            return
        from peft import LoraConfig, get_peft_model

        lm = self.vla.language_model
        cfg = LoraConfig(r=self.lora["r"], lora_alpha=self.lora["alpha"], lora_dropout=0.0,
                         init_lora_weights="gaussian", target_modules=lora_target_modules(lm))
        with torch.random.fork_rng(devices=[]):  # peft draws A from the global RNG
            torch.manual_seed(self.lora["seed"])
            peft_model = get_peft_model(lm, cfg)  # injects into `lm` in place
        object.__setattr__(self, "_peft", peft_model)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"lora": the LLM's LoRA weights, "head": the L1 head (+ scale head if trained)}."""
        lora = [p for n, p in self.vla.language_model.named_parameters() if ".lora_" in n]
        heads = [self.action_head] + ([self.scale_head] if self.train_scale_head else [])
        return {"lora": lora, "head": [p for h in heads for p in h.parameters()]}

    def prepare_rl(self) -> list[tuple[str, nn.Parameter]]:
        """Attach the LoRA, freeze everything else but the heads RIPT trains; → those."""
        self.attach_lora()
        keep = {id(p) for ps in self.param_groups().values() for p in ps}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)
        return [(n, p) for n, p in self.named_parameters() if id(p) in keep]

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs) -> dict[str, Tensor]:
        """What RL can change: `lora.<LLM param name>` (once attached), `action_head.*`,
        `scale_head.*`. The frozen base comes from `arch["folder"]`."""
        out = {f"lora.{n}": p.detach() for n, p in self.vla.language_model.named_parameters()
               if ".lora_" in n}
        for name in self.head_names:
            out.update({f"{name}.{k}": v for k, v in getattr(self, name).state_dict().items()})
        return out

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        lora = {k[5:]: v for k, v in state.items() if k.startswith("lora.")}
        if lora:
            self.attach_lora()
        mine = self.state_dict()
        if strict and set(state) != set(mine):
            raise KeyError(f"state keys differ: missing {sorted(set(mine) - set(state))[:4]}, "
                           f"unexpected {sorted(set(state) - set(mine))[:4]}")
        with torch.no_grad():
            for k, v in state.items():
                if k in mine:
                    mine[k].copy_(v)
        return None

    def _base_arch(self) -> dict:
        """What every RIPT VLA file needs to rebuild its frozen base (both families)."""
        return {"folder": _portable(self.ckpt.folder),
                "adapter": str(self.ckpt.adapter) if self.ckpt.adapter else None,
                "benchmark": getattr(self.bench, "name", None),
                "suite": getattr(self.bench, "suite", None), "task_names": self.task_vocab,
                "unnorm_key": self.unnorm_key, "center_crop": self.center_crop,
                "lora": dict(self.lora)}

    @property
    def arch(self) -> dict:
        return {**self._base_arch(), "scale_factor": self.scale_factor,
                "log_scale_clip": self.log_scale_clip, "train_scale_head": self.train_scale_head,
                "scale_head_file": self.scale_head_file and _portable(self.scale_head_file)}

    @property
    def meta(self) -> dict:
        """As `ript.vla.policy.load_vla` returns it."""
        return {"obs_spec": self.bench.vla_obs_spec(self.ckpt.image.size, self.replan_period),
                "task_names": self.task_vocab, "family": self.family,
                "data": {"benchmark": self.arch["benchmark"], "suite": self.arch["suite"]},
                "unnorm_key": self.unnorm_key}

    @classmethod
    def from_arch(cls, arch: dict, bench=None, device="cpu", dtype=None) -> OFTRLPolicy:
        """Rebuild from `arch` (the base folder is read again); then `load_state_dict`."""
        from ript.vla.checkpoint import load_checkpoint

        if bench is None:
            from ript.envs.benchmark import get

            bench = get(arch["benchmark"], arch["suite"])
        ckpt = load_checkpoint(arch["folder"], device=device, dtype=dtype,
                               adapter=arch["adapter"])
        return cls(ckpt, bench, arch["task_names"], arch["unnorm_key"],
                   center_crop=arch["center_crop"], scale_factor=arch["scale_factor"],
                   log_scale_clip=arch["log_scale_clip"], scale_head=arch["scale_head_file"],
                   train_scale_head=arch["train_scale_head"], lora_rank=arch["lora"]["r"],
                   lora_alpha=arch["lora"]["alpha"], lora_seed=arch["lora"]["seed"])


def _portable(path) -> str:
    """A path under the working directory (the repository root) as a relative one, so results
    stay valid when the repository moves; others as they are."""
    import os

    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def _from_payload(payload: dict, path) -> OFTRLPolicy:
    policy = OFTRLPolicy.from_arch(payload["arch"])
    policy.load_state_dict(payload["state_dict"])
    return policy
