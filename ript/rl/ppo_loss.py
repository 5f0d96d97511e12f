"""Token-level PPO: the clipped surrogate and its aggregation over a minibatch (spec §5.1, §5.6).

The update loop that applies it is ript.rl.ppo. Shapes: N = valid (episode, step) rows of a
minibatch, n = tokens per step (8 for QueST), E = episode slots in the minibatch, V = vocabulary
size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ript.rl.buffer import Batch

__all__ = [
    "PPOConfig",
    "aggregate_loss",
    "EPS_COUNT",
    "clipped_surrogate",
    "k3",
    "ppo_loss",
    "row_weights",
    "token_entropy",
]


EPS_COUNT = 1e-6  # denominator guard of the token-level mean, as in spec §5.6


@dataclass
class PPOConfig:
    """Loss settings; defaults reproduce the shipped scripts (spec §5.6, §5.9)."""

    clip_low: float = 0.2  # ε_low: ratio floor 1 − ε_low (`ppo_clip_range`)
    clip_high: float = 0.2  # ε_high: ratio ceiling 1 + ε_high (`ppo_clip_high`)
    token_level_mean: bool = True  # True: mean over all valid tokens; False: per-episode mean
    kl_coef: float = 0.0  # weight of the optional k3 KL(π_θ‖π_ref) penalty (spec §9.9); 0 = off

    def __post_init__(self) -> None:
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.kl_coef < 0.0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")


def clipped_surrogate(
    logp_new: Tensor, logp_old: Tensor, advantages: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token PPO clipped surrogate (spec §5.6).

    ρ = exp(ℓ_new − ℓ_old),  L = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)).

    Args:
        logp_new: (N, n) log-probs under the current policy (carries the gradient).
        logp_old: (N, n) behaviour log-probs (treated as constants).
        advantages: (N,) per-row advantage, broadcast over the n tokens of the row.

    Returns:
        loss_per_token (N, n), ratio (N, n) detached, clipped_mask (N, n) bool — True where
        the clipped branch strictly wins the max, i.e. where the token gets no gradient.
    """
    ratio = torch.exp(logp_new - logp_old.detach())
    adv = advantages.detach().to(ratio.dtype).unsqueeze(-1)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    # max = pessimistic bound: A > 0 is capped above 1 + ε_high, A < 0 below 1 − ε_low.
    loss = torch.maximum(unclipped, clipped)
    clipped_mask = clipped > unclipped
    return loss, ratio.detach(), clipped_mask


def aggregate_loss(
    loss_per_token: Tensor,
    episode_index: Tensor,
    n_episodes: int,
    valid_episode: Tensor,
    token_level_mean: bool,
) -> Tensor:
    """Reduce per-token losses of a minibatch to a scalar (spec §5.6, both aggregations).

    Args:
        loss_per_token: (N, n) per-token loss of the minibatch rows.
        episode_index: (N,) long, episode slot (0..E-1) of each row.
        n_episodes: E, episode slots in the minibatch, padding included.
        valid_episode: (E,) bool; rows of invalid episodes are masked out in both modes.
        token_level_mean: True → Σ valid tokens / (count + 1e-6) (longer episodes weigh
            more); False → mean over each episode's tokens, invalid episodes 0, then a plain
            mean over all E slots (padding still counts in the denominator, as the original).
    """
    if valid_episode.shape != (n_episodes,):
        raise ValueError(f"valid_episode must be ({n_episodes},), got {tuple(valid_episode.shape)}")
    dev = loss_per_token.device
    episode_index = episode_index.to(dev)
    row_valid = valid_episode.to(dev)[episode_index]  # (N,)
    # torch.where rather than a multiply: a NaN in a masked row must not leak (NaN·0 = NaN).
    masked = torch.where(row_valid.unsqueeze(-1), loss_per_token, 0.0)
    n_tok = loss_per_token.shape[-1] if loss_per_token.dim() == 2 else 0
    if token_level_mean:
        count = row_valid.sum().to(masked.dtype) * n_tok
        return masked.sum() / (count + EPS_COUNT)
    if n_episodes == 0:
        return masked.sum() * 0.0
    zeros = torch.zeros(n_episodes, dtype=masked.dtype, device=dev)
    ep_sum = zeros.index_add(0, episode_index, masked.sum(-1))
    ep_cnt = zeros.index_add(0, episode_index, torch.full_like(masked[:, 0], float(n_tok)))
    # Invalid episodes have ep_sum = 0 (their rows were masked above) and so contribute 0;
    # clamp: an episode slot without rows also gives 0 instead of 0/0.
    ep_mean = ep_sum / ep_cnt.clamp_min(1.0)
    return ep_mean.sum() / n_episodes


def row_weights(batch: Batch, token_level_mean: bool) -> Tensor:
    """(N,) w such that `aggregate_loss` = Σ_rows w_row · Σ_tokens loss: both aggregations are
    linear in the per-token losses, which lets a minibatch be backpropagated in row chunks."""
    n_tok = batch.logp_old.shape[-1] if batch.logp_old.dim() == 2 else 0
    valid = batch.valid_episode[batch.episode_index].to(batch.logp_old.dtype)
    if token_level_mean:
        return valid / (valid.sum() * n_tok + EPS_COUNT)
    per_ep = torch.zeros(batch.n_episodes, dtype=valid.dtype).index_add(
        0, batch.episode_index.cpu(), torch.full_like(valid.cpu(), float(n_tok)))
    return valid / (per_ep.to(valid.device)[batch.episode_index].clamp_min(1.0)
                    * max(batch.n_episodes, 1))


def k3(log_r: Tensor) -> Tensor:
    """k3 KL estimator per sample: (r − 1) − log r, r = exp(log_r); ≥ 0, unbiased."""
    return torch.expm1(log_r) - log_r


def ppo_loss(
    logp_new: Tensor, batch: Batch, cfg: PPOConfig, logp_ref: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Scalar PPO loss of one minibatch plus diagnostics.

    Args:
        logp_new: (N, n) current-policy log-probs of ``batch.tokens``.
        batch: minibatch from RolloutBuffer.minibatches (rows are valid tokens only).
        cfg: loss settings.
        logp_ref: optional (N, n) reference-policy log-probs; used only if cfg.kl_coef > 0.

    Returns:
        loss (scalar tensor with grad) and stats {loss, clip_frac, ratio_mean, approx_kl
        [, kl_ref]}. approx_kl is the k3 estimate of KL(π_old‖π_θ) (samples come from π_old).
    """
    if logp_new.shape != batch.logp_old.shape:
        raise ValueError(
            f"logp_new {tuple(logp_new.shape)} != logp_old {tuple(batch.logp_old.shape)}"
        )
    loss_tok, ratio, clipped = clipped_surrogate(
        logp_new, batch.logp_old, batch.advantages, cfg.clip_low, cfg.clip_high
    )
    loss = aggregate_loss(
        loss_tok, batch.episode_index, batch.n_episodes, batch.valid_episode, cfg.token_level_mean
    )
    stats: dict[str, float] = {}
    n_tok = ratio.numel()
    if cfg.kl_coef > 0.0 and logp_ref is not None:
        # KL(π_θ‖π_ref) via k3 with r = π_ref/π_θ, averaged over valid tokens. The tokens were
        # drawn from π_old, not π_θ: exact at ratio 1, mildly off-policy afterwards.
        kl = k3(logp_ref.detach() - logp_new).sum() / (n_tok + EPS_COUNT)
        loss = loss + cfg.kl_coef * kl
        stats["kl_ref"] = float(kl.detach())
    with torch.no_grad():
        log_ratio = logp_new.detach() - batch.logp_old
        stats["loss"] = float(loss.detach())
        stats["clip_frac"] = float(clipped.float().mean()) if n_tok else 0.0
        stats["ratio_mean"] = float(ratio.mean()) if n_tok else 1.0
        stats["approx_kl"] = float(k3(log_ratio).mean()) if n_tok else 0.0
    return loss, stats


def token_entropy(logits: Tensor) -> Tensor:
    """Mean entropy (nats) of the categorical distributions in ``logits`` (N, n, V) → scalar.

    Logged as a diagnostic (spec §9.3); −inf logits (e.g. masked entries) contribute 0.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, 0.0)
    return -plogp.sum(-1).mean()
