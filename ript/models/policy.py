"""QuestPolicy: ObsEncoder + SkillGPT + SkillVAE with an action queue (spec §4, §5.3, §10).

Stage losses (0: autoencoder, 1: prior, 2: prior + decoder fine-tuning), parameter selection per
stage, and chunked acting with per-env action queues. The AdamW decay split is
``ript.train.loop.decay_groups``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ript.models.autoencoder import SkillVAE, masked_l1
from ript.models.encoders import ObsEncoder
from ript.models.prior import SkillGPT


@dataclass
class ReplanRecord:
    """What one replanning call produced, for RL caching (spec §5.3). CPU tensors.

    context (B, 2, d) float32, tokens (B, n) long, logp (B, n) full-softmax log-probs,
    logp_topk (B, n) log-probs under the truncated top-k sampling distribution.
    """

    context: Tensor
    tokens: Tensor
    logp: Tensor
    logp_topk: Tensor


class QuestPolicy(nn.Module):
    def __init__(
        self,
        autoencoder: SkillVAE,
        obs_encoder: ObsEncoder,
        prior: SkillGPT,
        action_horizon: int = 8,
        top_k: int = 5,
        temperature: float = 1.0,
    ):
        super().__init__()
        # The original hard-codes the prior's vocabulary separately from the FSQ levels (spec
        # §3.1); a mismatch would silently index garbage, so it is checked here.
        if prior.vocab_size != autoencoder.vocab_size:
            raise ValueError(
                f"prior.vocab_size ({prior.vocab_size}) != autoencoder.vocab_size "
                f"({autoencoder.vocab_size})"
            )
        if prior.n_tokens != autoencoder.n_tokens:
            raise ValueError(
                f"prior.n_tokens ({prior.n_tokens}) != autoencoder.n_tokens "
                f"({autoencoder.n_tokens})"
            )
        if prior.d_model != obs_encoder.d_model:
            raise ValueError(
                f"prior.d_model ({prior.d_model}) != obs_encoder.d_model ({obs_encoder.d_model})"
            )
        if not 1 <= action_horizon <= autoencoder.chunk_size:
            raise ValueError(
                f"action_horizon ({action_horizon}) must be in [1, {autoencoder.chunk_size}]"
            )
        self.autoencoder = autoencoder
        self.obs_encoder = obs_encoder
        self.prior = prior
        self.action_horizon = action_horizon
        self.top_k = top_k
        self.temperature = temperature
        self.reset(0)

    # ------------------------------------------------------------------ construction / io

    @property
    def arch(self) -> dict:
        return {
            "autoencoder": dict(self.autoencoder.arch),
            "obs_encoder": dict(self.obs_encoder.arch),
            "prior": dict(self.prior.arch),
            "policy": {"action_horizon": self.action_horizon, "top_k": self.top_k,
                       "temperature": self.temperature},
        }

    @classmethod
    def from_arch(cls, arch: dict) -> QuestPolicy:
        """Rebuild an (untrained) policy from ``arch``, e.g. before ``load_state_dict``."""
        return cls(
            SkillVAE(**arch["autoencoder"]),
            ObsEncoder(**arch["obs_encoder"]),
            SkillGPT(**arch["prior"]),
            **arch.get("policy", {}),
        )

    @property
    def task_vocab(self) -> list[str] | None:
        """Task names by id, if the encoder knows them (runners map env tasks with it)."""
        return self.obs_encoder.task_names

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def plan(self, obs: dict[str, Tensor], task: Tensor, generator: torch.Generator | None = None
             ) -> tuple[Tensor, ReplanRecord]:
        """One replanning call (spec §4.4): obs {key: (B, ...)}, task (B,) / (B, D) ->
        (actions (B, action_horizon, A) clipped to [-1, 1], ReplanRecord).

        Switches the whole policy to eval mode and does NOT switch it back: rollouts, old
        log-probs and PPO scoring must all run without dropout (spec §5.5, §8 B15); a trainer
        that wants train mode must call ``.train()`` itself.
        """
        self.eval()
        context = self.obs_encoder(_to_device(obs, self.device), _as_tensor(task).to(self.device))
        tokens, logp, logp_topk = self.prior.sample(
            context, top_k=self.top_k, temperature=self.temperature, generator=generator,
            use_cache=True,
        )
        actions = self.autoencoder.decode_indices(tokens)[:, : self.action_horizon]
        record = ReplanRecord(
            context=context.float().cpu(), tokens=tokens.cpu(), logp=logp.cpu(),
            logp_topk=logp_topk.cpu(),
        )
        return actions.clamp(-1.0, 1.0), record

    @property
    def replan_period(self) -> int:
        """Steps between a slot's policy calls: the runner aligns streamed episode starts to it."""
        return self.action_horizon

    def reset(self, n_envs: int) -> None:
        """Empty the per-env action queues for ``n_envs`` environments."""
        self._queue = np.zeros((n_envs, self.action_horizon, self.autoencoder.action_dim),
                               dtype=np.float32)
        self._remaining = np.zeros(n_envs, dtype=np.int64)

    def reset_envs(self, idx) -> None:
        """Empty the queues of env slots `idx` (a slot starting a new episode must replan)."""
        self._remaining[np.asarray(idx, dtype=np.int64)] = 0

    def act(self, obs: dict[str, Tensor], task: Tensor, generator: torch.Generator | None = None,
            active: np.ndarray | None = None) -> tuple[np.ndarray, ReplanRecord | None, np.ndarray]:
        """Pop one action per env, replanning envs whose queue is empty (spec §4.4).

        obs {key: (B, ...)}, task (B,) / (B, D); ``active`` (B,) bool (default all): inactive
        envs (e.g. finished episodes) are neither planned for nor popped; their output rows are
        zeros. Returns (actions (B, A) float32 numpy, record or None, replanned (B,) bool).

        Envs reset together drain their queues together, so replanning happens in lockstep for
        all active envs; ``record`` then covers exactly the rows where ``replanned`` is True, in
        row order (record.tokens[j] belongs to env np.flatnonzero(replanned)[j]).
        """
        b = self._remaining.shape[0]
        if b == 0:
            raise RuntimeError("call reset(n_envs) before act()")
        active = np.ones(b, dtype=bool) if active is None else np.asarray(active, dtype=bool)
        if active.shape != (b,):
            raise ValueError(f"active must have shape ({b},), got {active.shape}")
        replanned = active & (self._remaining == 0)
        record = None
        if replanned.any():
            rows = torch.as_tensor(np.flatnonzero(replanned))
            sub_obs = {k: _as_tensor(v)[rows] for k, v in obs.items()}
            chunk, record = self.plan(sub_obs, _as_tensor(task)[rows], generator=generator)
            self._queue[replanned] = chunk.float().cpu().numpy()
            self._remaining[replanned] = self.action_horizon
        out = np.zeros((b, self._queue.shape[2]), dtype=np.float32)
        idx = np.flatnonzero(active)
        out[idx] = self._queue[idx, self.action_horizon - self._remaining[idx]]
        self._remaining[idx] -= 1
        return out, record, replanned

    def log_prob(self, context: Tensor, tokens: Tensor) -> Tensor:
        """context (N, 2, d), tokens (N, n) -> full-softmax token log-probs (N, n) (spec §5.5)."""
        return self.prior.log_prob(context, tokens)

    # ------------------------------------------------------------------ RL (ript.policy)
    family = "quest"

    def prepare_rl(self) -> list[tuple[str, nn.Parameter]]:
        """Freeze all but the prior, which RIPT trains (spec §5.7); return its parameters."""
        self.freeze_for_stage("rl")
        return self.rl_parameters()

    def log_prob_sampled(self, context: Tensor, tokens: Tensor) -> Tensor:
        """Log-probs under the truncated top-k distribution rollouts sample from (§8 B12)."""
        return self.prior.log_prob(context, tokens, top_k=self.top_k,
                                   temperature=self.temperature)

    def entropy(self, context: Tensor, tokens: Tensor) -> Tensor:
        """Mean full-softmax entropy (nats) per token position, a diagnostic (spec §9.3)."""
        from ript.rl.ppo_loss import token_entropy

        return token_entropy(self.prior.logits(context, tokens))

    # ------------------------------------------------------------------ training

    def stage_loss(self, batch: dict, stage: int, l1_weight: float = 0.0,
                   monitor_l1: bool = False, mask_padding: bool = True) -> tuple[Tensor, dict]:
        """Training loss for QueST stage 0, 1 or 2 (spec §3.5, §4.2, §4.5).

        batch: actions (B, T, A) float, obs {key: (B, ...)}, task_id (B,) long (an index into
        the encoder's task vocabulary), optional pad_mask (B, T) bool (True = real step; masks
        the L1 terms unless ``mask_padding`` is False, which averages them over all T steps,
        padded repeats included, as the original, spec §3.5).
        Stage 2 adds ``l1_weight`` * L1(decoder(z_hat), actions) with z_hat sampled per position
        from the prior's full teacher-forced softmax (no gradient through the sampling).
        ``monitor_l1`` computes that L1 as a metric in stage 1 too, without a graph (spec §8 B9).
        NaNs are propagated, never masked.
        """
        actions = batch["actions"]
        pad_mask = batch.get("pad_mask") if mask_padding else None
        if stage == 0:
            return self.autoencoder.loss(actions, pad_mask)
        if stage not in (1, 2):
            raise ValueError(f"stage must be 0, 1 or 2, got {stage}")
        ae = self.autoencoder
        # Targets from the frozen encoder in eval mode: no dropout noise (spec §4.3, §8 B9).
        was_training = ae.training
        ae.eval()
        with torch.no_grad():
            _, targets, _ = ae.encode(actions)
        ae.train(was_training)
        context = self.obs_encoder(batch["obs"], batch["task_id"])
        logits = self.prior.logits(context, targets)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss = ce
        metrics = {
            "ce": ce.item(),
            "token_acc": (logits.argmax(-1) == targets).float().mean().item(),
        }
        if stage == 2 or monitor_l1:
            with torch.no_grad():
                probs = torch.softmax(logits.detach().float(), dim=-1)
                sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1)
                sampled = sampled.view_as(targets)
            with torch.set_grad_enabled(stage == 2 and torch.is_grad_enabled()):
                l1 = masked_l1(ae.decode_indices(sampled), actions, pad_mask)
            metrics["l1_sampled"] = l1.item()
            if stage == 2:
                loss = ce + l1_weight * l1
        metrics["loss"] = loss.item()
        return loss, metrics

    def trainable_parameters(self, stage: int | str, train_output_head: bool = True
                             ) -> list[tuple[str, nn.Parameter]]:
        """Named parameters updated in ``stage`` (spec §1, §4.3, §4.5, §5.7).

        0: autoencoder only; 1: everything but the autoencoder; 2: as 1 plus the autoencoder
        decoder (encoder and quantiser stay frozen), whose output layer only with
        ``train_output_head`` (QueST's stage 2 leaves its ``action_head`` frozen);
        "rl": the prior only.
        """
        frozen_in_2 = ("autoencoder.encoder.", "autoencoder.quantizer.")
        if not train_output_head:
            frozen_in_2 += ("autoencoder.decoder.head.",)
        # (prefixes a name must start with, prefixes it must not start with)
        rules = {
            0: (("autoencoder.",), ()),
            1: (("",), ("autoencoder.",)),
            2: (("",), frozen_in_2),
            "rl": (("prior.",), ()),
        }
        if stage not in rules:
            raise ValueError(f"stage must be 0, 1, 2 or 'rl', got {stage!r}")
        include, exclude = rules[stage]

        def keep(name: str) -> bool:
            return name.startswith(include) and not (exclude and name.startswith(exclude))

        return [(n, p) for n, p in self.named_parameters() if keep(n)]

    def rl_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """RIPT updates only the prior; contexts are cached so encoders cannot change (§5.7)."""
        return self.trainable_parameters("rl")

    def freeze_for_stage(self, stage: int | str, train_output_head: bool = True) -> None:
        """Set requires_grad so that only ``trainable_parameters(stage, ...)`` get gradients."""
        keep = {id(p) for _, p in self.trainable_parameters(stage, train_output_head)}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)

    def param_groups(self, named_params, weight_decay: float, mode: str = "linear"
                     ) -> list[dict]:
        """AdamW groups of ``named_params``: the training loop's ``decay_groups`` (one rule)."""
        from ript.train.loop import decay_groups

        return decay_groups(self, named_params, weight_decay, mode)


def _as_tensor(x) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def _to_device(obs: dict, device: torch.device) -> dict[str, Tensor]:
    return {k: _as_tensor(v).to(device) for k, v in obs.items()}
