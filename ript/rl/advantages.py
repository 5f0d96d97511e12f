"""Leave-one-out (RLOO) advantages and dynamic-sampling bookkeeping (spec §5.1, §5.3).

Everything here is pure bookkeeping on binary (or real) episode rewards; no model code.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DynamicSampler",
    "is_informative",
    "leave_one_out_advantages",
    "should_stop",
]


def leave_one_out_advantages(rewards: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """RLOO advantages A_k = R_k − (1/(K−1)) Σ_{j≠k} R_j (spec §5.1).

    Args:
        rewards: (G, K) rewards of G groups of K rollouts each (any leading shape works;
            the group axis is the last one). NumPy array or torch tensor.

    Returns:
        (G, K) advantages, same container type as the input (float64 for NumPy, the
        input's floating dtype — or float32 for integer/bool input — for torch).

    No division by the group's std: this is RLOO, not GRPO (spec §5.1). With s successes
    among K binary rewards this gives (K−s)/(K−1) for a success and −s/(K−1) for a failure.
    """
    K = rewards.shape[-1] if rewards.ndim > 0 else 0
    if K < 2:
        # The baseline is undefined with a single rollout (division by K−1 = 0).
        raise ValueError(f"leave-one-out advantages need K >= 2 rollouts per group, got {K}")
    if isinstance(rewards, Tensor):
        r = rewards if rewards.is_floating_point() else rewards.to(torch.float32)
        total = r.sum(dim=-1, keepdim=True)
    else:
        r = np.asarray(rewards, dtype=np.float64)
        total = r.sum(axis=-1, keepdims=True)
    # Σ_{j≠k} R_j = total − R_k, so A_k = R_k − (total − R_k)/(K−1) = (K·R_k − total)/(K−1).
    return (K * r - total) / (K - 1)


def is_informative(rewards: np.ndarray | Tensor) -> bool:
    """True iff the K rewards of one group are not all equal (spec §5.1 dynamic sampling).

    Args:
        rewards: (K,) rewards of one group.

    A uniform group (s = 0 or s = K) has all-zero RLOO advantages, hence zero policy
    gradient; the original discards it and draws another context (spec §5.3 step 2c).
    """
    r = rewards.detach().cpu().numpy() if isinstance(rewards, Tensor) else np.asarray(rewards)
    r = r.reshape(-1)
    if r.size == 0:
        raise ValueError("is_informative needs a non-empty reward vector")
    return bool(np.any(r != r[0]))


def should_stop(global_accepted: int, early_stop_fraction: float, global_target: int) -> bool:
    """Cross-rank early stop of rollout collection (spec §5.3 step 2d).

    Returns True once the number of groups accepted by *all* ranks reaches
    ⌊early_stop_fraction × global_target⌋ (scripts: ⌊0.8 × 180⌋ = 144), so fast ranks can
    stop slow ranks. The caller sums the per-rank counts (e.g. with an all-reduce).
    """
    if not 0.0 < early_stop_fraction <= 1.0:
        raise ValueError(f"early_stop_fraction must be in (0, 1], got {early_stop_fraction}")
    if global_target < 0:
        raise ValueError(f"global_target must be >= 0, got {global_target}")
    # Small epsilon so that e.g. 0.29 × 100 = 28.999999999999996 floors to 29, not 28.
    threshold = math.floor(early_stop_fraction * global_target + 1e-9)
    return global_accepted >= threshold


class DynamicSampler:
    """Per-rank accept/reject bookkeeping for one iteration's rollout collection (spec §5.3).

    Usage: for each context, run K rollouts, then ``offer(rewards)``; keep the group iff it
    returns True; stop drawing contexts once ``done`` (or once the caller's cross-rank
    ``should_stop`` fires).

    Fix for spec §8 B3: the original loops forever when every context of a rank yields
    uniform outcomes; here ``max_rejected`` caps the number of discarded groups.

    Args:
        target_groups: accepted groups wanted on this rank (per-rank context batch).
        max_rejected: stop after this many rejected groups (must be >= 1).
        dynamic_sampling: if False, every group is accepted (config ``dynamic_sampling``
            false, as in quest_rl.yaml, spec §5.9); uniform groups then just carry A = 0.
    """

    should_stop = staticmethod(should_stop)

    def __init__(self, target_groups: int, max_rejected: int, dynamic_sampling: bool = True):
        if target_groups < 0:
            raise ValueError(f"target_groups must be >= 0, got {target_groups}")
        if max_rejected < 1:
            # 0 would stop before a single group is tried.
            raise ValueError(f"max_rejected must be >= 1, got {max_rejected}")
        self.target_groups = int(target_groups)
        self.max_rejected = int(max_rejected)
        self.dynamic_sampling = bool(dynamic_sampling)
        self.accepted = 0
        self.rejected = 0
        self.errored = 0

    @property
    def done(self) -> bool:
        """True once the target is reached or the rejected-group cap is hit."""
        return self.stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        """'target', 'rejected_cap' or None (still collecting). Target wins ties."""
        if self.accepted >= self.target_groups:
            return "target"
        if self.rejected >= self.max_rejected:
            return "rejected_cap"
        return None

    @property
    def checked(self) -> int:
        """Groups tried so far, incl. rejected ones (the original's `rollout_checked`)."""
        return self.accepted + self.rejected

    def offer(self, rewards: np.ndarray | Tensor) -> bool:
        """Record one group of K rewards (shape (K,)); return True iff it is kept."""
        if self.done:
            # Offering after the stop condition is a caller bug (it would overshoot the
            # fixed buffer size that keeps ranks in lockstep, spec §5.3 step 3).
            raise RuntimeError(
                f"DynamicSampler.offer called after stop ({self.stop_reason}); "
                "check `done` before drawing another context"
            )
        if not self.dynamic_sampling or is_informative(rewards):
            self.accepted += 1
            return True
        self.rejected += 1
        return False

    def reject_errored(self) -> None:
        """Record a group aborted by a simulator error: it has no usable rewards, and it
        counts as rejected so that the cap bounds a rank whose env always fails."""
        if self.done:
            raise RuntimeError(f"DynamicSampler.reject_errored called after stop "
                               f"({self.stop_reason})")
        self.rejected += 1
        self.errored += 1

    @property
    def only_errors(self) -> bool:
        """Every group tried so far was aborted by a simulator error."""
        return self.errored > 0 and self.errored == self.checked

    def __repr__(self) -> str:
        return (
            f"DynamicSampler(accepted={self.accepted}/{self.target_groups}, "
            f"rejected={self.rejected}/{self.max_rejected}, stop_reason={self.stop_reason!r})"
        )
