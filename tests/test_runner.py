"""EnvRunner on real MetaWorld envs (spec §5.3, §6, §9.6–9.7) and the evaluation stage.

Policies here are real (MetaWorld's scripted experts, seeded random actions, an expert with
seeded noise that replans in chunks and returns ReplanRecords); faults are injected into real
envs by subclassing.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest
import torch

from ript.envs.metaworld import MetaWorldEnv, ObsSpec, task_id, variant_split
from ript.envs.runner import EnvRunner, EpisodeContext, episode_contexts
from ript.envs.metaworld import MetaWorldFactory, MetaWorldRunner, ScriptedExpertPolicy
from ript.policy import RandomPolicy
from ript.models.policy import ReplanRecord

from conftest import tiny_quest_parts

HELD_OUT = list(variant_split(25)[1])


def ctxs(task, variants, seed0=0):
    return [EpisodeContext(i, task, v, seed0 + i) for i, v in enumerate(variants)]


def outcome(records):
    return [(r.task, r.context_id, r.seed, r.success, r.length, r.error) for r in records]


class NoisyChunkExpert:
    """Scripted expert + seeded Gaussian noise, replanned every `h` steps like QueST (§4.4).

    At each replanning it draws the chunk's noise and n "tokens" from the runner's generator and
    returns a ReplanRecord whose context is built from the observation, so a test can check which
    replanning steps the runner kept.
    """

    def __init__(self, h=8, n=3, noise=0.3):
        self.expert, self.h, self.n, self.noise = ScriptedExpertPolicy(), h, n, noise

    def reset(self, n_envs):
        self.expert.reset(n_envs)
        self.left = np.zeros(n_envs, int)
        self.chunk = np.zeros((n_envs, self.h, 4), np.float32)

    def reset_envs(self, idx):
        self.left[idx] = 0

    def act(self, obs, task, generator=None, active=None):
        base, _, _ = self.expert.act(obs, task, None, active)
        replanned = active & (self.left == 0)
        rows = np.flatnonzero(replanned)
        record = None
        if len(rows):
            noise = torch.randn(len(rows), self.h, 4, generator=generator) * self.noise
            self.chunk[rows] = noise.numpy()
            self.left[rows] = self.h
            tokens = torch.randint(0, 1000, (len(rows), self.n), generator=generator)
            gt = obs["obs_gt"][rows]
            logp = torch.full((len(rows), self.n), -math.log(1000.0))
            record = ReplanRecord(torch.stack([gt[:, :4], gt[:, 4:8]], 1), tokens, logp, logp)
        out = base.copy()
        for i in np.flatnonzero(active):
            out[i] = np.clip(base[i] + self.chunk[i, self.h - self.left[i]], -1, 1)
            self.left[i] -= 1
        return out, record, replanned


class FirstObs(RandomPolicy):
    """Random actions; remembers the observation each episode starts from."""

    def reset(self, n_envs):
        self.fresh, self.first = np.ones(n_envs, bool), []

    def reset_envs(self, idx):
        self.fresh[idx] = True

    def act(self, obs, task, generator=None, active=None):
        for i in np.flatnonzero(self.fresh & active):
            self.first.append(obs["obs_gt"][i].clone())
        self.fresh[:] = False
        return super().act(obs, task, generator, active)


class FaultyEnv(MetaWorldEnv):
    """A real env that fails at step `k` of variant `bad` ('raise' or 'hang')."""

    def __init__(self, *a, bad, k, mode, **kw):
        super().__init__(*a, **kw)
        self.bad, self.k, self.mode = bad, k, mode

    def step(self, action):
        if self.variant == self.bad and self.steps + 1 == self.k:
            if self.mode == "hang":
                time.sleep(3600)
            raise RuntimeError("injected MuJoCo fault")
        return super().step(action)


class FaultyFactory(MetaWorldFactory):
    def __init__(self, bad, k, mode="raise"):
        super().__init__(ObsSpec(), 120)
        self.fault = dict(bad=bad, k=k, mode=mode)

    def make(self, task):
        return FaultyEnv(task, self.obs, self.max_episode_steps, **self.fault)


def test_scripted_expert_solves_easy_tasks():
    contexts = ctxs("reach-v3", HELD_OUT[:6]) + ctxs("drawer-close-v3", HELD_OUT[6:12], 100)
    with MetaWorldRunner(ObsSpec(), n_envs=4, n_workers=2, max_episode_steps=200) as r:
        recs = r.run(ScriptedExpertPolicy(), contexts, seed=0)
    assert [(x.task, x.variant) for x in recs] == [(c.task, c.variant) for c in contexts]
    assert all(x.error is None for x in recs)
    assert np.mean([x.success for x in recs]) >= 0.9
    assert all(x.length < 200 for x in recs if x.success)  # ends at the first success


def test_random_policy_fails_hard_task():
    with MetaWorldRunner(ObsSpec(), n_envs=3, n_workers=0, max_episode_steps=80) as r:
        recs = r.run(RandomPolicy(), ctxs("pick-place-v3", HELD_OUT[:6]), seed=1)
    assert sum(x.success for x in recs) <= 1
    assert all(x.length == 80 for x in recs if not x.success)


def test_same_context_same_first_observation():
    a, b = EpisodeContext(0, "push-v3", 30, 5), EpisodeContext(1, "push-v3", 31, 5)
    policy = FirstObs()
    with MetaWorldRunner(ObsSpec(), n_envs=1, n_workers=1, max_episode_steps=15) as r:
        r.run(policy, [a, b, a], seed=0)  # one slot: the env is reused between episodes
    first = policy.first
    assert len(first) == 3
    assert torch.equal(first[0], first[2])
    assert not torch.equal(first[0], first[1])


def test_results_do_not_depend_on_worker_count():
    contexts = ctxs("reach-v3", HELD_OUT[:5]) + ctxs("button-press-topdown-v3", HELD_OUT[:5], 50)
    for pipeline, counts in ((True, (0, 1, 2)), (False, (0, 2))):
        out = {}
        for n_workers in counts:
            with MetaWorldRunner(ObsSpec(), n_envs=3, n_workers=n_workers,
                                 max_episode_steps=120, pipeline=pipeline) as r:
                recs = r.run(NoisyChunkExpert(), contexts, seed=7, capture_rl=True)
            out[n_workers] = recs
            assert len({x.length for x in recs}) > 3  # varied lengths: the schedule matters
        for n_workers in counts[1:]:
            assert outcome(out[n_workers]) == outcome(out[0])
            for x, y in zip(out[n_workers], out[0]):
                assert torch.equal(x.tokens, y.tokens) and torch.equal(x.contexts, y.contexts)


def test_rl_capture_stops_at_chunk_of_first_success():
    h = 8
    contexts = ctxs("reach-v3", HELD_OUT[:4]) + ctxs("pick-place-v3", HELD_OUT[:2], 9)
    with MetaWorldRunner(ObsSpec(), n_envs=3, n_workers=2, max_episode_steps=60) as r:
        recs = r.run(NoisyChunkExpert(h=h), contexts, seed=3, capture_rl=True)
        plain = r.run(NoisyChunkExpert(h=h), contexts, seed=3)
    assert any(x.success for x in recs) and any(not x.success for x in recs)
    for x in recs:
        S = math.ceil(x.length / h)  # replanning steps taken up to the end of the episode
        assert x.valid_steps == S
        assert x.contexts.shape == (S, 2, 4) and x.tokens.shape == (S, 3)
        assert x.tokens.dtype == torch.long and x.logp.shape == (S, 3)
        if x.success:  # the success step lies in the last kept chunk
            assert (S - 1) * h < x.length <= S * h
        else:
            assert x.length == 60
    assert plain[0].tokens is None and outcome(plain) == outcome(recs)
    # each kept context is the observation at the start of its chunk: replay the first episode
    with MetaWorldEnv("reach-v3", ObsSpec(), 60) as env:
        first = env.reset(contexts[0].variant, contexts[0].seed)
    assert np.array_equal(recs[0].contexts[0].numpy().ravel(), first["obs_gt"][:8])


def test_env_exception_fails_only_that_episode():
    contexts = ctxs("reach-v3", HELD_OUT[:5])
    factory = FaultyFactory(bad=HELD_OUT[1], k=10)
    with EnvRunner(factory, n_envs=2, n_workers=2) as r:
        recs = r.run(ScriptedExpertPolicy(), contexts, seed=0)
    assert "injected MuJoCo fault" in recs[1].error and not recs[1].success
    assert recs[1].length == 10
    assert all(x.error is None and x.success for i, x in enumerate(recs) if i != 1)
    # a policy producing NaN is caught before MuJoCo silently resets the simulation
    nan = RandomPolicy()
    nan.act = lambda obs, task, g=None, active=None: (np.full((len(task), 4), np.nan), None,
                                                      active)
    with MetaWorldRunner(ObsSpec(), n_envs=2, n_workers=0, max_episode_steps=20) as r:
        recs = r.run(nan, contexts[:2], seed=0)
    assert all("non-finite action" in x.error and x.length == 1 for x in recs)


def test_killed_and_hung_workers_are_replaced():
    contexts = ctxs("reach-v3", HELD_OUT[:6])
    runner = MetaWorldRunner(ObsSpec(), n_envs=2, n_workers=2, max_episode_steps=120)
    expert, calls = ScriptedExpertPolicy(), [0]

    def act(obs, task, g=None, active=None):
        calls[0] += 1
        if calls[0] == 5:  # kill worker 0 (slot 0) in the middle of its first episode
            os.kill(runner.pool.pids()[0], signal.SIGKILL)
        return expert.act(obs, task, g, active)

    killer = ScriptedExpertPolicy()
    killer.act = act
    with runner:
        old = runner.pool.pids()
        recs = runner.run(killer, contexts, seed=0)
        assert runner.pool.restarts == 1 and runner.pool.pids()[0] != old[0]
    assert "worker 0 died" in recs[0].error
    assert all(x.success and x.error is None for x in recs[1:])
    # a worker stuck inside an env is killed after step_timeout_s
    with EnvRunner(FaultyFactory(bad=HELD_OUT[0], k=3, mode="hang"), 2, 2, step_timeout_s=5) as r:
        t0 = time.monotonic()
        recs = r.run(ScriptedExpertPolicy(), contexts[:3], seed=0)
        assert time.monotonic() - t0 < 30
    assert "no answer within 5 s" in recs[0].error
    assert all(x.success for x in recs[1:])
    assert not mp.active_children()  # closed runners leave no processes behind


def test_context_validation():
    with MetaWorldRunner(ObsSpec(), n_envs=1, n_workers=0, max_episode_steps=10) as r:
        with pytest.raises(ValueError, match="valid tasks: .*reach-v3"):
            r.run(RandomPolicy(), [EpisodeContext(0, "reach-v9", 0, 0)], seed=0)
        with pytest.raises(ValueError, match="variant 50 out of range"):
            r.run(RandomPolicy(), [EpisodeContext(0, "reach-v3", 50, 0)], seed=0)
        with pytest.raises(ValueError, match="expected one of"):
            r.run(RandomPolicy(), ctxs("push-v3", [30]), seed=0, tasks=["reach-v3"])


def test_episode_contexts_from_data():
    from ript.data.dataset import Context

    data = [Context(4, "reach-v3", task_id("reach-v3"), 3, (0.1, 0.2), "f:demo_0")]
    eps = episode_contexts(data, k=3, seed=0)
    assert [(e.context_id, e.variant) for e in eps] == [(4, 3)] * 3
    assert len({e.seed for e in eps}) == 3


@pytest.mark.filterwarnings("ignore:MP4 writing failed")
def test_image_observations_with_forkserver_workers(tmp_path):
    from ript.results import save_videos

    class Shapes(RandomPolicy):
        def act(self, obs, task, generator=None, active=None):
            self.seen = {k: (tuple(v.shape), v.dtype) for k, v in obs.items()}
            return super().act(obs, task, generator, active)

    policy = Shapes()
    with MetaWorldRunner(ObsSpec(image=True, image_size=64), n_envs=2, n_workers=2,
                         max_episode_steps=6) as r:
        assert r.pool._mp.get_start_method() == "forkserver"  # rendering must not fork
        recs = r.run(policy, ctxs("reach-v3", HELD_OUT[:3]), seed=0, video_episodes=1)
    assert policy.seen["corner_rgb"] == ((2, 3, 64, 64), torch.uint8)
    assert policy.seen["obs_gt"] == ((2, 39), torch.float32)
    assert all(x.error is None and x.length == 6 for x in recs)
    assert len(recs[0].frames) == 7 and recs[0].frames[0].shape == (64, 64, 3)
    assert recs[1].frames is None
    (video,) = save_videos(tmp_path, recs)
    assert video.exists() and video.stat().st_size > 0


def test_quest_policy_through_the_runner(one_thread):
    """The real (untrained, tiny) QueST policy: RL capture, per-slot replanning, determinism."""
    from ript.models.policy import QuestPolicy

    vae, enc, prior = tiny_quest_parts()
    h, limit = 3, 10  # 10 % 3 != 0: a restarted slot must not pop the last episode's plan
    contexts = ctxs("reach-v3", HELD_OUT[:5])
    out = []
    for n_workers in (0, 2):
        policy = QuestPolicy(vae, enc, prior, action_horizon=h, top_k=5)  # fresh queues
        with MetaWorldRunner(ObsSpec(), n_envs=2, n_workers=n_workers,
                             max_episode_steps=limit) as r:
            out.append(r.run(policy, contexts, seed=5, capture_rl=True))
    for x in out[0]:
        S = math.ceil(x.length / h)
        assert x.error is None and x.valid_steps == S
        assert x.contexts.shape == (S, 2, 16) and x.tokens.shape == (S, vae.n_tokens)
        assert x.logp.shape == x.tokens.shape and bool((x.logp <= 0).all())
    assert outcome(out[0]) == outcome(out[1])
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(*out))


def test_policy_error_propagates_and_runner_stays_usable():
    calls = [0]
    broken = RandomPolicy()

    def act(obs, task, g=None, active=None):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("policy bug")
        return RandomPolicy.act(broken, obs, task, g, active)

    broken.act = act
    contexts = ctxs("reach-v3", HELD_OUT[:4])
    with MetaWorldRunner(ObsSpec(), n_envs=4, n_workers=2, max_episode_steps=5) as r:
        with pytest.raises(RuntimeError, match="policy bug"):
            r.run(broken, contexts, seed=0)
        recs = r.run(RandomPolicy(), contexts, seed=0)  # no stale replies from the failed run
    assert [(x.length, x.error) for x in recs] == [(5, None)] * 4


_ALONE = """
import sys, numpy as np
from ript.envs.metaworld import MetaWorldEnv, ObsSpec
env = MetaWorldEnv(sys.argv[1], ObsSpec(image=True, image_size=32, render_every=8))
frames = [env.reset(int(sys.argv[2]), int(sys.argv[3]))["corner_rgb"]]
for _ in range(8):
    obs = env.step(np.zeros(4))[0]
frames.append(obs["corner_rgb"])
np.save(sys.argv[4], np.stack(frames))
"""


def test_renders_of_many_envs_in_one_process_equal_an_env_rendered_alone(tmp_path):
    """A worker holds many envs, each with its own OpenGL context; gymnasium makes a context
    current only when it creates it, so an env rendered while another's context was current
    drew another camera without textures, and only in a runner's later calls (a VLA policy
    scored 60 % in a runner's first call, 22 % in its second). Every render must equal the
    same env rendered alone in a fresh process."""
    import subprocess
    import sys

    from ript.envs.worker import SlotEnvs

    ctxs = [EpisodeContext(i, t, 25 + i % 2, 100 + i)
            for i, t in enumerate(["coffee-button-v3"] * 2 + ["door-open-v3"] * 2)]
    envs = SlotEnvs(MetaWorldFactory(ObsSpec(image=True, image_size=32, render_every=8), 20),
                    max_idle=8)
    rounds = []
    for _ in range(2):  # the second round reuses the envs, as a runner's next call does
        frames = {s: [envs.reset(s, c)[0]["corner_rgb"].copy()] for s, c in enumerate(ctxs)}
        for _ in range(8):
            last = {s: envs.step(s, np.zeros(4))[0] for s in range(len(ctxs))}
        for s in frames:
            frames[s].append(last[s]["corner_rgb"].copy())
        for s in range(len(ctxs)):
            envs._release(s)
        rounds.append(frames)
    envs.close()
    for s, c in enumerate(ctxs):
        ref = tmp_path / f"{s}.npy"
        subprocess.run([sys.executable, "-c", _ALONE, c.task, str(c.variant), str(c.seed),
                        str(ref)], check=True, capture_output=True, timeout=300)
        alone = np.load(ref)
        for r, frames in enumerate(rounds):
            for k, name in enumerate(("reset", "step 8")):
                assert np.array_equal(frames[s][k], alone[k]), (c.task, f"round {r}", name)
