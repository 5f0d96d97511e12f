"""RIPT rollout collection is bounded when the simulator fails (issue #12): a real MetaWorld env
whose `step` raises, in a real worker process, behind the real runner and collection loop."""

from __future__ import annotations

import time

import pytest

from ript.data.dataset import Context
from ript.envs.metaworld import MetaWorldEnv, ObsSpec, task_id
from ript.envs.runner import EnvRunner
from ript.envs.metaworld import MetaWorldFactory
from ript.models import QuestPolicy
from ript.rl.collect import ContextSampler, SimulatorError, collect
from ript.rl.distributed import Dist

from conftest import tiny_quest_parts

TASK = "reach-v3"
ERROR = "simulated MuJoCo failure: mjWARN_BADQACC"


class BrokenEnv(MetaWorldEnv):
    """A real MetaWorld env that resets fine and fails on its `fail_at`-th step."""

    fail_at = 3

    def step(self, action):
        self._n = getattr(self, "_n", 0) + 1
        if self._n >= self.fail_at:
            raise RuntimeError(ERROR)
        return super().step(action)


class BrokenFactory(MetaWorldFactory):
    def make(self, task: str):
        return BrokenEnv(task, self.obs, self.max_episode_steps)


class CountingRunner(EnvRunner):
    calls = 0
    queued = 0  # episodes handed to the runner, at the start and by streaming

    def run(self, policy, contexts, *args, **kwargs):
        self.calls += 1
        self.queued += len(contexts)
        return super().run(policy, contexts, *args, **kwargs)

    def _feed(self, run, feed, tasks):
        before = len(run.contexts)
        super()._feed(run, feed, tasks)
        self.queued += len(run.contexts) - before


@pytest.fixture
def policy(one_thread):
    vae, enc, prior = tiny_quest_parts()
    return QuestPolicy(vae, enc, prior).eval()


def _collect(runner, policy, max_rejected: int, streaming: bool = True):
    contexts = [Context(i, TASK, task_id(TASK), i, (), f"v{i}") for i in range(5)]
    return collect(runner, policy, ContextSampler(contexts, seed=0), group_size=2,
                   target_groups=4, global_target=4, max_rejected=max_rejected,
                   dynamic_sampling=True, early_stop_fraction=1.0, seed=0, iteration=0,
                   dist=Dist(), streaming=streaming)


def test_env_that_always_raises_ends_collection_at_the_cap_with_its_error(policy):
    runner = CountingRunner(BrokenFactory(ObsSpec(), 50), n_envs=4, n_workers=1)
    t0 = time.perf_counter()
    with runner, pytest.raises(SimulatorError, match=ERROR) as err:
        _collect(runner, policy, max_rejected=5, streaming=False)
    # two groups per runner call (4 slots / K = 2): the cap of 5 errored groups is hit on the
    # third call; before the fix collection looped forever (tens of thousands of calls)
    assert runner.calls == 3
    assert "5 groups" in str(err.value)
    assert time.perf_counter() - t0 < 60


def test_streaming_collection_ends_at_the_cap_too(policy):
    runner = CountingRunner(BrokenFactory(ObsSpec(), 50), n_envs=4, n_workers=1)
    t0 = time.perf_counter()
    with runner, pytest.raises(SimulatorError, match=ERROR) as err:
        _collect(runner, policy, max_rejected=5)
    # one streaming call; the cap of 5 errored groups ends it with at most the slots' worth of
    # groups queued beyond (4 slots + 1 queued group of K = 2); before the fix collection
    # looped forever (tens of thousands of runner calls)
    assert runner.calls == 1
    assert 10 <= runner.queued <= 10 + 4 + 2
    assert "5 groups" in str(err.value)
    assert time.perf_counter() - t0 < 60


class OddVariantsBroken(BrokenEnv):
    """Fails only in odd task variants: some groups error, the others run normally."""

    def reset(self, variant: int, seed: int = 0):
        self._n, self.fail_at = 0, 3 if variant % 2 else 10**9
        return super().reset(variant, seed)


class OddVariantsFactory(MetaWorldFactory):
    def make(self, task: str):
        return OddVariantsBroken(task, self.obs, self.max_episode_steps)


def test_errored_groups_count_toward_the_cap_next_to_healthy_ones(policy):
    runner = CountingRunner(OddVariantsFactory(ObsSpec(), 12), n_envs=4, n_workers=1)
    with runner:
        episodes, stats = _collect(runner, policy, max_rejected=5)
    # an untrained policy never reaches in 12 steps: healthy groups are uniform (rejected) too,
    # so collection ends at the cap, counting both kinds, without failing the stage
    assert 0 < stats.groups_errored < stats.groups_rejected
    assert stats.groups_rejected == 5 and stats.groups_kept == 0 and episodes == []
    assert stats.errors == 2 * stats.groups_errored  # both episodes of an errored group
