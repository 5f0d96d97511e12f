"""The Policy interface that runners, evaluation and RIPT speak to, and loading a policy.

A policy family (QueST today; the OpenVLA family next) implements these methods; nothing else in
the pipeline looks inside it.

`Policy` (every policy; evaluation and the env runner):
    reset(n_envs)            empty the per-slot action queues of a batch of `n_envs` slots
    reset_envs(indices)      empty the queues of slots that start a new episode
    act(obs, task, generator, active) -> (actions (B, A), Decision | None, replanned (B,))
        obs {key: (B, ...)} (float32 low-dim, uint8 (B, 3, H, W) images), task (B,) ids;
        chunked policies pop one action per active slot and replan slots whose queue is empty.
    optional task_vocab      the task names the policy knows, by id

`Decision` (what `act` returns for the replanned rows, in row order): the RL record.
    context      what the policy keeps to recompute the decision's log-probs later: a tensor of
                 rows or a dict of such tensors. QueST keeps its small prior context (the
                 encoders' output, spec §5.3 "Context caching"); a policy whose per-decision
                 state is too large to cache (a 7-B VLA's prompt KV cache) keeps the
                 observations and recomputes its prefix in `log_prob`.
    tokens       (B, n) the decision as the policy scores it (QueST: n skill tokens; continuous
                 actions: n action dimensions)
    logp         (B, n) log-probs of `tokens` under the policy's full distribution (ℓ_old)
    logp_topk    (B, n) log-probs under the distribution rollouts actually sampled from

`RLPolicy` (RIPT, spec §5), an `nn.Module` and a `Policy`:
    prepare_rl() -> [(name, parameter)]    freeze all but what RIPT trains, return that
    log_prob(context, tokens) -> (N, n)    ℓ of stored decisions, with gradient
    log_prob_sampled(context, tokens)      the same under the sampling distribution
    optional entropy(context, tokens)      mean entropy per token (a metric)
    arch, meta                              to write a policy file

Policy files are `{"kind": "policy", "family": ..., "arch", "meta", "state_dict"}`;
`load_policy` builds the family named there (QueST when absent, as in older files).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# family -> builder(payload, path) -> policy in eval mode; tests and new families register
FAMILIES: dict[str, Callable] = {}


def register_family(name: str, build: Callable) -> None:
    FAMILIES[name] = build


def _quest(payload: dict, path):
    from ript.models import QuestPolicy
    from ript.train.checkpoint import load_weights

    policy = QuestPolicy.from_arch(payload["arch"])
    load_weights(path, policy, payload["state_dict"])
    return policy


register_family("quest", _quest)


def _openvla_oft(payload: dict, path):
    from ript.vla.rl import _from_payload  # imported on use: transformers/timm are an extra

    return _from_payload(payload, path)


register_family("openvla_oft", _openvla_oft)  # RIPT-trained OFT: LoRA + heads (ript/vla/rl.py)


def _openvla(payload: dict, path):
    from ript.vla.rl_openvla import _from_payload

    return _from_payload(payload, path)


register_family("openvla", _openvla)  # RIPT-trained OpenVLA: LoRA (ript/vla/rl_openvla.py)


def load_policy(checkpoint: str | Path):
    """A policy file, or `scripted:expert` / `scripted:random` → (policy, meta).

    meta has `obs_spec` (what the policy observes), `task_names` and, for learned policies,
    `data` (which names the benchmark and its held-out contexts)."""
    from ript.train.checkpoint import CheckpointError, load

    if str(checkpoint).startswith("scripted:"):
        from ript.envs.benchmark import of_data

        kind = str(checkpoint).split(":", 1)[1]
        bench = of_data(None)  # the default benchmark: the one with scripted experts
        build = {"expert": bench.scripted_expert, "random": RandomPolicy}
        if kind not in build:
            raise ValueError(f"unknown scripted policy {kind!r}; valid: {sorted(build)}")
        return build[kind](), {"obs_spec": {"image": False},
                               "task_names": bench.one_hot_vocabulary([])}
    payload = load(checkpoint)
    if payload.get("kind") != "policy":
        raise CheckpointError(f"{checkpoint}: not a policy file (kind={payload.get('kind')!r}); "
                              "stage 0 writes an autoencoder, stages 1/2 and RIPT a policy")
    family = payload.get("family", "quest")
    if family not in FAMILIES:
        raise CheckpointError(f"{checkpoint}: unknown policy family {family!r}; "
                              f"known: {sorted(FAMILIES)}")
    policy = FAMILIES[family](payload, checkpoint)
    policy.eval()
    return policy, payload["meta"]


def policy_payload(policy, meta: dict) -> dict:
    """What a policy file holds (`load_policy` reads it back)."""
    return {"kind": "policy", "family": getattr(policy, "family", "quest"),
            "arch": policy.arch, "meta": meta,
            "state_dict": {k: v.cpu() for k, v in policy.state_dict().items()}}


class RandomPolicy:
    """Uniform actions in [-1, 1] drawn from the runner's generator (a baseline and a
    determinism probe); no RL record."""

    def __init__(self, action_dim: int = 4):
        self.action_dim = action_dim

    def reset(self, n_envs: int) -> None:
        self.n_envs = n_envs

    def reset_envs(self, idx) -> None:
        pass

    def act(self, obs, task, generator=None, active=None):
        a = torch.rand(len(task), self.action_dim, generator=generator) * 2 - 1
        active = np.ones(len(task), bool) if active is None else np.asarray(active, bool)
        return a.numpy(), None, active.copy()
