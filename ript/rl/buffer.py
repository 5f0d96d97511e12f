"""Episode records and the per-rank rollout buffer used by the PPO phase (spec §5.3, §5.5).

Instead of padding every episode to T_max and carrying a (E, T_max, n) mask (the original's
layout, spec §5.5), a minibatch here is the flat list of *valid* (episode, step) rows only:
steps ≥ ``valid_steps`` and padding episodes are never materialised, so they cannot leak into
the loss or the gradient. ``episode_index`` maps each row back to its episode for the
per-episode aggregation (spec §5.6).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Batch", "Episode", "RolloutBuffer"]


# A decision's stored inputs (ript.policy `Decision.context`) are a tensor of rows, or a dict
# of such tensors for a policy that keeps its observations; these helpers treat both alike.
def rows(x, sl) -> Tensor | dict:
    return {k: v[sl] for k, v in x.items()} if isinstance(x, dict) else x[sl]


def cat_rows(parts: list) -> Tensor | dict:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def n_rows(x) -> int:
    return next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]


def row_shapes(x) -> tuple:
    if isinstance(x, dict):
        return tuple(sorted((k, tuple(v.shape[1:])) for k, v in x.items()))
    return tuple(x.shape[1:])


def to_device(x, device):
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


@dataclass
class Episode:
    """One rollout, as cached during sampling (spec §5.3 "Context caching", §10).

    Shapes: S = replanning steps recorded, n = tokens per step (8 for QueST), d = context width.

    Attributes:
        context_id: index of the context (demo) in D_c; the K episodes of a group share it.
        task_id: task index.
        success: task success flag; the reward is float(success) (spec §5.4).
        contexts: (S, 2, d) float32 prior context per replanning step.
        tokens: (S, n) long sampled token indices.
        logp: (S, n) behaviour log-probs stored at sampling time (ℓ_old).
        valid_steps: replanning steps up to and including the chunk of first success, or S.
        advantage: RLOO advantage of the episode (spec §5.1), broadcast to all its tokens.
        valid: False for padding copies (spec §5.3 step 3).
    """

    context_id: int
    task_id: int
    success: bool
    contexts: Tensor | dict
    tokens: Tensor
    logp: Tensor
    valid_steps: int
    advantage: float = 0.0
    valid: bool = True

    def __post_init__(self) -> None:
        # Fail at construction rather than deep inside a minibatch (cf. spec §8 B3: the
        # original's dummy episode had the wrong rank and crashed the log-prob code).
        S = self.tokens.shape[0]
        # logp is (S, n): one log-prob per scored "token" (QueST: a skill token; OFT: a chunk
        # step, whose token is its 7 action dimensions, vla_spec §4.2), tokens (S, n, ...).
        if self.logp.dim() != 2 or self.tokens.shape[:2] != self.logp.shape:
            raise ValueError(
                f"logp must be (S, n) and tokens (S, n, ...), got {tuple(self.logp.shape)} and "
                f"{tuple(self.tokens.shape)}"
            )
        if n_rows(self.contexts) != S:
            raise ValueError(
                f"contexts must be (S, ...) with S={S}, got {row_shapes(self.contexts)} "
                f"with {n_rows(self.contexts)} rows"
            )
        if not 0 <= self.valid_steps <= S:
            raise ValueError(f"valid_steps={self.valid_steps} outside [0, {S}]")

    @property
    def reward(self) -> float:
        return float(self.success)


@dataclass
class Batch:
    """A minibatch of E episode slots, flattened to N valid (episode, step) rows.

    Attributes:
        contexts: (N, 2, d) contexts of the valid rows.
        tokens: (N, n) long tokens of the valid rows.
        logp_old: (N, n) stored behaviour log-probs.
        advantages: (N,) episode advantage broadcast to each of its rows.
        episode_index: (N,) long, index of each row's episode within this minibatch (0..E-1).
        n_episodes: E, all episode slots in the minibatch, padding included (denominator of
            the per-episode aggregation, spec §5.6).
        valid_episode: (E,) bool, False for padding slots.
    """

    contexts: Tensor | dict
    tokens: Tensor
    logp_old: Tensor
    advantages: Tensor
    episode_index: Tensor
    n_episodes: int
    valid_episode: Tensor

    def __len__(self) -> int:
        """N, the number of valid (episode, step) rows."""
        return int(self.tokens.shape[0])

    @property
    def n_tokens(self) -> int:
        """Number of valid tokens, N × n (the log-probs scored, not the tokens' elements)."""
        return int(self.logp_old.numel())

    def to(self, device: torch.device | str) -> Batch:
        """Copy of the batch with every tensor moved to ``device``."""
        return dataclasses.replace(
            self,
            **{
                f.name: to_device(getattr(self, f.name), device)
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), (Tensor, dict))
            },
        )


class RolloutBuffer:
    """The per-rank list of episodes collected in one iteration (spec §5.3, §5.6).

    Args:
        episodes: accepted episodes (K per kept group), advantages already filled in.
    """

    def __init__(self, episodes: list[Episode]):
        self.episodes: list[Episode] = list(episodes)
        # Slot count for a rank that collected nothing but still has to walk the same number
        # of minibatches as its peers (spec §8 B3 / §5.3 step 3); see pad_to.
        self._empty_slots = 0
        if self.episodes:
            n0 = self.episodes[0].tokens.shape[1]
            ctx0 = row_shapes(self.episodes[0].contexts)
            for i, ep in enumerate(self.episodes):
                if ep.tokens.shape[1] != n0 or row_shapes(ep.contexts) != ctx0:
                    raise ValueError(f"episode {i} has a different token/context shape")

    # ------------------------------------------------------------------ bookkeeping
    def __len__(self) -> int:
        """Episode slots, padding included (for an empty padded buffer: the padded size)."""
        return len(self.episodes) if self.episodes else self._empty_slots

    @property
    def is_empty(self) -> bool:
        """True when the rank collected no episode at all."""
        return not self.episodes

    @property
    def n_valid(self) -> int:
        """Number of real (non-padding) episodes."""
        return sum(ep.valid for ep in self.episodes)

    @property
    def n_tokens(self) -> int:
        """Valid tokens over the whole buffer: Σ_valid episodes valid_steps × n."""
        return sum(ep.valid_steps * ep.logp.shape[1] for ep in self.episodes if ep.valid)

    def pad_to(self, n_episodes: int) -> int:
        """Pad to ``n_episodes`` slots by repeating the last episode with valid=False.

        Equal buffer sizes keep every rank's PPO loop the same length so per-minibatch
        gradient all-reduces line up (spec §5.3 step 3). The copies share tensors with the
        original (no memory cost). An empty buffer creates no episode (there is nothing to
        copy, spec §8 B3) but records ``n_episodes`` empty slots, so ``minibatches`` still
        yields the same number of (row-less) minibatches as on the other ranks.

        Returns the number of padding slots added.
        """
        current = len(self)
        if n_episodes < current:
            raise ValueError(f"cannot pad {current} episodes down to {n_episodes}")
        n_pad = n_episodes - current
        if self.episodes:
            last = self.episodes[-1]
            self.episodes.extend(dataclasses.replace(last, valid=False) for _ in range(n_pad))
        else:
            self._empty_slots = n_episodes
        return n_pad

    # ------------------------------------------------------------------ minibatches
    def minibatches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """Yield the buffer in minibatches of ``batch_size`` episode slots.

        A fresh permutation is drawn from ``generator`` at every call (one call per PPO
        epoch, spec §5.6), so results are reproducible under a seeded generator; every slot
        appears exactly once per call. The last minibatch may be smaller.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n_slots = len(self)
        perm = torch.randperm(n_slots, generator=generator)
        for start in range(0, n_slots, batch_size):
            idx = perm[start : start + batch_size].tolist()
            if self.episodes:
                yield self._collate([self.episodes[i] for i in idx])
            else:
                yield self._empty_batch(len(idx))

    @staticmethod
    def _collate(eps: list[Episode]) -> Batch:
        ctx, tok, lp, adv, eidx = [], [], [], [], []
        for e, ep in enumerate(eps):
            # Mask from valid_steps (spec §5.5): only steps < valid_steps of valid episodes.
            T = ep.valid_steps if ep.valid else 0
            if T == 0:
                continue
            ctx.append(rows(ep.contexts, slice(0, T)))
            tok.append(ep.tokens[:T])
            lp.append(ep.logp[:T])
            adv.append(torch.full((T,), float(ep.advantage), dtype=torch.float32))
            eidx.append(torch.full((T,), e, dtype=torch.long))
        valid_episode = torch.tensor([ep.valid for ep in eps], dtype=torch.bool)
        if not ctx:
            # Padding-only minibatch: zero rows but the right trailing shapes.
            ref = eps[0]
            return Batch(
                contexts=rows(ref.contexts, slice(0, 0)),
                tokens=ref.tokens[:0],
                logp_old=ref.logp[:0],
                advantages=torch.zeros(0, dtype=torch.float32),
                episode_index=torch.zeros(0, dtype=torch.long),
                n_episodes=len(eps),
                valid_episode=valid_episode,
            )
        return Batch(
            contexts=cat_rows(ctx),
            tokens=torch.cat(tok),
            logp_old=torch.cat(lp),
            advantages=torch.cat(adv),
            episode_index=torch.cat(eidx),
            n_episodes=len(eps),
            valid_episode=valid_episode,
        )

    @staticmethod
    def _empty_batch(n_slots: int) -> Batch:
        # No episode to take shapes from: trailing dims are unknown (0). ppo_update never
        # calls the policy on a row-less batch, so these placeholders are never consumed.
        return Batch(
            contexts=torch.zeros(0, 2, 0),
            tokens=torch.zeros(0, 0, dtype=torch.long),
            logp_old=torch.zeros(0, 0),
            advantages=torch.zeros(0),
            episode_index=torch.zeros(0, dtype=torch.long),
            n_episodes=n_slots,
            valid_episode=torch.zeros(n_slots, dtype=torch.bool),
        )
