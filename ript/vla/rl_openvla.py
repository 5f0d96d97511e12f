"""RIPT for the discrete OpenVLA: its 7 action tokens as PPO tokens (vla_spec §2, §4.7; issue #15).

RIPT-VLA's OpenVLA runner (§4.7) samples the 7 action tokens top-k (k = 5) at temperature 1.2
after a KV-cached prompt pass, and scores them by a teacher-forced pass with the log-softmax
*without* temperature; no training entry point of the original uses it. Here it runs through
the same token-level PPO as QueST's skill tokens (ript.rl.ppo), one decision per env step:

* `act` (rollouts, `sampling=True`): per instruction one batched, KV-cached generation of the 7
  tokens (top-k at `temperature`, the runner's CPU generator), un-binned, un-normalised
  (BOUNDS_Q99, eps 0, §2), through the benchmark's gripper rule; the record keeps the policy
  image and the prompt (`OFTDecision`: context {images, input_ids}, tokens (B, 7) ids, logp
  (B, 7) under the full softmax of the generation logits, logp_topk (B, 7) under the top-k
  distribution at temperature actually sampled from). `sampling=False`: greedy, no record.
* `log_prob(context, tokens)`: the teacher-forced pass (`action_token_logprobs`) with gradient
  through the LoRA: at unchanged weights the stored logp up to float noise (the generation ran
  with a KV cache). `log_prob_sampled`: the same logits / temperature, truncated to the current
  top k (a token that left it gets −50: ratio ≈ 0, as QueST's `sampled_topk`).
* LoRA, freezing, checkpoints and loading as `OFTRLPolicy` (ript.vla.rl), without heads: the
  policy file holds only the LoRA; the LM head is frozen, as OFT's "all-linear" leaves it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ript.vla import processing as P
from ript.vla.policy import VLAPolicy
from ript.vla.rl import OFTDecision, OFTRLPolicy, pixel_values

TOP_K, TEMPERATURE = 5, 1.2  # RIPT's OpenVLA runner: `beam_size` 5, temperature 1.2 (§4.7)
N_TOKENS = 7


class OpenVLARLPolicy(OFTRLPolicy):
    """An OpenVLA checkpoint as RIPT's RLPolicy (see module doc)."""

    family = "openvla"
    head_names = ()

    def __init__(self, ckpt, bench, task_names: list[str], unnorm_key: str, *,
                 center_crop: bool = True, top_k: int = TOP_K, temperature: float = TEMPERATURE,
                 lora_rank: int = 32, lora_alpha: int = 16, lora_seed: int = 0,
                 sampling: bool = True, max_rows: int = 16):
        nn.Module.__init__(self)
        VLAPolicy.__init__(self, ckpt, bench, task_names, unnorm_key, center_crop=center_crop)
        if ckpt.family != "openvla":
            raise ValueError(f"{ckpt.folder}: the discrete policy needs an OpenVLA checkpoint "
                             f"(no L1 head), got {ckpt.family}")
        self.unnorm_key, self.top_k, self.temperature = unnorm_key, top_k, float(temperature)
        self.sampling, self.max_rows, self.train_scale_head = sampling, max_rows, False
        self.lora = {"r": lora_rank, "alpha": lora_alpha, "seed": lora_seed}
        self.vla = ckpt.model
        self.prompt_width = max(len(self.prompt(t)) for t in range(len(self.task_vocab)))
        self.n_scored = N_TOKENS
        self._peft = None

    def plan(self, context: dict, generator=None) -> tuple[np.ndarray, OFTDecision | None]:
        """One query → (normalised actions (n, 1, 7), record or None if not sampling)."""
        ids, px = self._inputs(context)
        with torch.no_grad():
            if not self.sampling:
                tokens = self.vla.generate_action_tokens(ids, px, n_tokens=N_TOKENS)
                return P.tokens_to_actions(tokens.cpu().numpy())[:, None], None
            tokens, logits = self.vla.generate_action_tokens(
                ids, px, n_tokens=N_TOKENS, top_k=self.top_k, temperature=self.temperature,
                generator=generator, return_logits=True)
            logits = logits.float()
            logp = _gather(logits.log_softmax(-1), tokens)
            logp_topk = _gather(_top_k_log_softmax(logits, self.top_k, self.temperature), tokens)
        actions = P.tokens_to_actions(tokens.cpu().numpy())[:, None]
        return actions, OFTDecision(context, tokens.cpu(), logp.cpu(), logp_topk.cpu())

    def _inputs(self, context: dict) -> tuple[Tensor, Tensor]:
        dev, dtype = self.device, next(self.vla.parameters()).dtype
        px = pixel_values(context["images"].to(dev), self.ckpt.image_norm).to(dtype)
        return context["input_ids"].to(dev), px

    def distribution(self, context: dict) -> dict:
        return context  # the logits need the tokens: computed in the scoring functions

    def _logits(self, context: dict, tokens: Tensor) -> Tensor:
        """Teacher-forced logits (n, 7, V) of `tokens` after each row's prompt, with gradient."""
        ids, px = self._inputs(context)
        model = self.vla
        embeds, valid, lengths = model._causal_prompt(ids, px, None)
        return model._causal_logits(embeds, valid, lengths, tokens[:, :-1].to(ids.device))

    def log_prob(self, context: dict, tokens: Tensor) -> Tensor:
        """(N, 7) log-probs of stored action tokens, full softmax without temperature (§4.7)."""
        return self._chunked(context, tokens, lambda c, t: _gather(
            self._logits(c, t).float().log_softmax(-1), t))

    def log_prob_sampled(self, context: dict, tokens: Tensor) -> Tensor:
        """(N, 7) the same under the top-k distribution at `temperature` rollouts sample from."""
        return self._chunked(context, tokens, lambda c, t: _gather(
            _top_k_log_softmax(self._logits(c, t).float(), self.top_k, self.temperature), t))

    @torch.no_grad()
    def entropy(self, context: dict, tokens: Tensor) -> Tensor:
        """Mean entropy (nats) of the full softmax per action token."""
        def ent(c, t):
            logp = self._logits(c, t).float().log_softmax(-1)
            return -(logp.exp() * logp).sum(-1)
        return self._chunked(context, tokens, ent).mean()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        lora = [p for n, p in self.vla.language_model.named_parameters() if ".lora_" in n]
        return {"lora": lora, "head": []}

    @property
    def arch(self) -> dict:
        return {**self._base_arch(), "top_k": self.top_k, "temperature": self.temperature}

    @classmethod
    def from_arch(cls, arch: dict, bench=None, device="cpu", dtype=None) -> OpenVLARLPolicy:
        from ript.envs.benchmark import get
        from ript.vla.checkpoint import load_checkpoint

        bench = bench or get(arch["benchmark"], arch["suite"])
        ckpt = load_checkpoint(arch["folder"], device=device, dtype=dtype,
                               adapter=arch["adapter"])
        return cls(ckpt, bench, arch["task_names"], arch["unnorm_key"],
                   center_crop=arch["center_crop"], top_k=arch["top_k"],
                   temperature=arch["temperature"], lora_rank=arch["lora"]["r"],
                   lora_alpha=arch["lora"]["alpha"], lora_seed=arch["lora"]["seed"])


def _gather(logp: Tensor, tokens: Tensor) -> Tensor:
    return logp.gather(-1, tokens.to(logp.device).long()[..., None])[..., 0]


def _top_k_log_softmax(logits: Tensor, k: int, temperature: float) -> Tensor:
    """log-softmax of logits / T truncated to the top k; elsewhere −50 (not −inf: no NaN)."""
    scaled = logits / temperature
    kth = scaled.topk(k, dim=-1).values[..., -1:]
    return scaled.masked_fill(scaled < kth, float("-inf")).log_softmax(-1).clamp_min(-50.0)


def _from_payload(payload: dict, path) -> OpenVLARLPolicy:
    policy = OpenVLARLPolicy.from_arch(payload["arch"])
    policy.load_state_dict(payload["state_dict"])
    return policy
