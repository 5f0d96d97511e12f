"""Rollout collection for one RIPT iteration (spec §5.3, Algorithm 1 steps 2-3).

Per context, K stochastic episodes from the current policy; binary success reward (§5.4);
leave-one-out advantages (§5.1); dynamic sampling drops groups whose K rewards are all equal and
draws further contexts until this rank has its share of informative groups, the global early-stop
fraction is reached across ranks, or the cap on rejected groups is hit (the original had no cap
and could loop forever, §8 B3). A rank with zero groups returns an empty list, not a crash.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from ript.data.dataset import Context
from ript.envs.runner import episode_contexts
from ript.rl.advantages import DynamicSampler, leave_one_out_advantages, should_stop
from ript.rl.buffer import Episode
from ript.utils import derived_seed


class ContextSampler:
    """Endless reshuffled stream over this rank's share of the context set (spec §5.2).

    `position` is all the state there is (the permutation of epoch e is derived from (seed, e)),
    so a resumed run draws exactly the contexts the interrupted one would have drawn.
    """

    def __init__(self, contexts: list[Context], seed: int, rank: int = 0, world: int = 1):
        self.contexts = contexts[rank::world] or contexts[:1]
        self.seed, self.rank = seed, rank
        self.position = 0

    def next(self) -> Context:
        epoch, pos = divmod(self.position, len(self.contexts))
        g = torch.Generator().manual_seed(derived_seed(self.seed, self.rank, epoch))
        perm = torch.randperm(len(self.contexts), generator=g)
        self.position += 1
        return self.contexts[int(perm[pos])]


@dataclass
class CollectStats:
    groups_kept: int = 0
    groups_rejected: int = 0
    episodes: int = 0
    successes: int = 0
    env_steps: int = 0
    errors: int = 0
    groups_errored: int = 0
    stop_reason: str = ""


def collect(runner, policy, sampler: ContextSampler, *, group_size: int, target_groups: int,
            global_target: int, max_rejected: int, dynamic_sampling: bool,
            early_stop_fraction: float, seed: int, iteration: int, dist,
            sampled_logp: bool = False) -> tuple[list[Episode], CollectStats]:
    """Collect this rank's informative groups; `target_groups` is the per-rank share.
    `sampled_logp` stores ℓ_old of the truncated top-k distribution instead of the full one."""
    sampler_state = DynamicSampler(target_groups, max_rejected, dynamic_sampling)
    stats = CollectStats()
    episodes: list[Episode] = []
    # As many contexts per runner call as fill its env slots: one batched policy call per tick.
    per_call = max(1, math.ceil(runner.n_envs / group_size))
    call = 0
    first_error = None
    while True:
        if not sampler_state.done:
            ctxs = [sampler.next() for _ in range(per_call)]
            call_seed = derived_seed(seed, dist.rank, iteration, call)
            records = runner.run(policy, episode_contexts(ctxs, group_size, call_seed),
                                 seed=call_seed, capture_rl=True)
            call += 1
            task_ids = {c.context_id: c.task_id for c in ctxs}
            groups = defaultdict(list)
            for rec in records:
                groups[rec.context_id].append(rec)
                stats.episodes += 1
                stats.successes += int(rec.success)
                stats.env_steps += rec.length
                stats.errors += int(rec.error is not None)
            for ctx in ctxs:
                if sampler_state.done:
                    break  # keep every rank's buffer the same size (padding lines up minibatches)
                group = groups.pop(ctx.context_id, [])
                # An episode aborted by a simulator error has no usable token cache: its whole
                # group is left out of the update and counts toward the rejected cap, so an env
                # that always fails cannot keep collection looping (issue #12).
                errors = [r.error for r in group if r.error]
                if len(group) != group_size or errors:
                    first_error = first_error or (errors[0] if errors else
                                                  f"{len(group)} of {group_size} episodes returned")
                    sampler_state.reject_errored()
                    continue
                rewards = np.array([float(r.success) for r in group])
                if not sampler_state.offer(rewards):
                    continue
                adv = leave_one_out_advantages(rewards[None])[0]
                for rec, a in zip(group, adv):
                    episodes.append(Episode(
                        context_id=rec.context_id, task_id=task_ids[rec.context_id],
                        success=bool(rec.success), contexts=rec.contexts, tokens=rec.tokens,
                        logp=rec.logp_topk if sampled_logp else rec.logp,
                        valid_steps=rec.valid_steps, advantage=float(a)))
        accepted, ranks_done = dist.sum([sampler_state.accepted, float(sampler_state.done)])
        if should_stop(int(accepted), early_stop_fraction, global_target):
            stats.stop_reason = "early_stop"
            break
        if ranks_done >= dist.world:
            stats.stop_reason = sampler_state.stop_reason or "target"
            break
    # A rank that saw nothing but simulator errors has nothing to learn from: every rank stops
    # together (one collective, so no rank waits on a failed one) with the error's text.
    (ranks_failed,) = dist.sum([float(sampler_state.only_errors)])
    if ranks_failed:
        raise SimulatorError(
            f"RIPT rollouts: every group of {int(ranks_failed)} rank(s) hit a simulator error "
            f"({sampler_state.errored} groups on rank {dist.rank}, the rejected-group cap); "
            f"first error on this rank: {first_error or 'none here'}")
    stats.groups_kept = sampler_state.accepted
    stats.groups_rejected = sampler_state.rejected
    stats.groups_errored = sampler_state.errored
    return episodes, stats


class SimulatorError(RuntimeError):
    """Rollouts produced nothing but simulator errors: an infrastructure failure, not a policy
    that fails its tasks."""

