"""EnvRunner: run episodes from contexts with one batched policy, return episode records.

Used by evaluation (spec §6) and by RIPT's rollout collection (spec §5.3). `n_envs` episode slots
form the policy batch: every tick, one `policy.act` call serves all running slots, then the worker
pool steps them. A slot whose episode ends (first success, step limit or error) takes the next
context, lowest slot first. All randomness lives in the main process — one torch.Generator for the
policy, an env seed inside each context — and the schedule is a pure function of the episode
outcomes, so records are identical for any `n_workers` (spec §9.6). Optionally (`pipeline`) the
slots form two groups stepped alternately, overlapping inference with simulation.

Policy protocol: `ript.policy` (implemented by QuestPolicy, the scripted and random policies);
its `Decision` records are kept per episode with `capture_rl`.
Observations reach the policy as float32 (B, D) low-dim arrays and uint8 (B, 3, H, W) images
(channel-first, like a dataset batch without its frame axis).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ript.envs.worker import EpisodeContext, WorkerPool, unpack
from ript.utils import derived_seed, progress

__all__ = ["EpisodeContext", "EpisodeRecord", "EnvRunner", "episode_contexts"]


@dataclass
class EpisodeRecord:
    """One finished episode (spec §10). RL tensors are set only with `capture_rl=True`."""

    task: str
    context_id: int
    seed: int
    success: bool
    length: int
    """Environment steps taken."""
    error: str | None = None
    """Why the episode was aborted (env exception, dead worker); such an episode is a failure."""
    variant: int = -1
    contexts: Tensor | dict | None = None
    """(S, ...) what the policy keeps per replanning step to recompute its log-probs (the
    Decision's `context`: QueST's (S, 2, d) prior context, spec §5.3 "Context caching")."""
    tokens: Tensor | None = None
    """(S, n) the decisions as the policy scores them (QueST: long skill tokens)."""
    logp: Tensor | None = None
    """(S, n) full-softmax log-probs at sampling time (ℓ_old, spec §5.5)."""
    logp_topk: Tensor | None = None
    """(S, n) log-probs under the truncated top-k sampling distribution (spec §8 B12)."""
    valid_steps: int = 0
    """Replanning steps up to and including the chunk of first success (all if none)."""
    frames: list | None = None
    """(H, W, 3) uint8 frames for videos, when requested."""


@dataclass
class _Running:
    index: int          # position in the run's context list
    ctx: EpisodeContext
    length: int = 0
    steps: list | None = None   # [(context, tokens, logp, logp_topk)] per replanning step
    frames: list | None = None


def episode_contexts(data_contexts, k: int = 1, seed: int = 0) -> list[EpisodeContext]:
    """K episode contexts per `ript.data.dataset.Context` (a RIPT group, spec §5.1); each copy
    gets its own env seed derived from (seed, context_id, copy)."""
    out = []
    for c in data_contexts:
        for j in range(k):
            s = derived_seed(seed, c.context_id, j)
            init = np.asarray(c.init_state, np.float64) if len(c.init_state) else None
            out.append(EpisodeContext(c.context_id, c.task, c.variant, s, init))
    return out


def _task_id(policy, factory, task: str) -> int:
    """The id the policy knows `task` by: its own vocabulary if it has one (a LIBERO policy
    pretrained on one suite and fine-tuned on another), else the benchmark's index."""
    vocab = getattr(policy, "task_vocab", None)
    if vocab is None:
        return factory.task_id(task)
    if task not in vocab:
        raise ValueError(f"the policy was not trained for task {task!r} (it knows "
                         f"{len(vocab)} tasks: {', '.join(vocab[:5])}, ...)")
    return vocab.index(task)


def _reset_slots(policy, idx: list[int]) -> None:
    if hasattr(policy, "reset_envs"):
        policy.reset_envs(np.asarray(idx, dtype=np.int64))
    else:
        raise TypeError(f"{type(policy).__name__} needs reset_envs(indices) so that a slot "
                        f"starting a new episode does not act on the previous episode's plan")


def _record_rows(record, replanned: np.ndarray) -> dict[int, int]:
    """slot -> row of `record`: QuestPolicy packs only the replanned rows; a full-batch record
    (B rows) is accepted too."""
    idx = np.flatnonzero(replanned)
    n = record.tokens.shape[0]
    if n == len(idx):
        return {int(s): j for j, s in enumerate(idx)}
    if n == len(replanned):
        return {int(s): int(s) for s in idx}
    raise ValueError(f"ReplanRecord has {n} rows; expected {len(idx)} (replanned envs) or "
                     f"{len(replanned)} (batch)")


def _row(t, j: int):
    """Row j of a Decision field: a tensor, or a dict of tensors (a policy that keeps its
    observations, ript.policy); copied to the CPU."""
    if t is None:
        return None
    if isinstance(t, dict):
        return {k: v[j].detach().cpu().clone() for k, v in t.items()}
    return t[j].detach().cpu().clone()


def _stack(rows: list):
    if isinstance(rows[0], dict):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    return torch.stack(rows)


class _Run:
    """State of one `EnvRunner.run` call (slots, observations, records)."""

    def __init__(self, runner, policy, contexts, B, seed, capture, video, bar):
        self.runner, self.policy, self.contexts = runner, policy, list(contexts)
        self.capture, self.video, self.bar = capture, video, bar
        self.gen = torch.Generator().manual_seed(int(seed))
        policy.reset(B)
        self.slots: list[_Running | None] = [None] * B
        self.obs: dict[str, np.ndarray] = {}  # key -> (B, ...) latest observation per slot
        self.ready = np.zeros(B, bool)  # running and waiting for an action
        self.group = np.arange(B) % 2 if B >= 2 and runner.pipeline else np.zeros(B, int)
        self.task = np.zeros(B, np.int64)
        self.task_ids: dict[str, int] = {}
        self.records: list[EpisodeRecord | None] = [None] * len(self.contexts)
        self.next = 0
        self.finished: list[int] = []  # indices of episodes ended since the last `feed` call
        self.stopped = False
        self.streaming = False

    def add(self, contexts: list[EpisodeContext]) -> None:
        """More contexts at the end of the queue (streaming collection)."""
        self.contexts.extend(contexts)
        self.records.extend([None] * len(contexts))

    def stop(self) -> None:
        """Start nothing more and abandon the running episodes (their records stay None)."""
        self.stopped = True
        self.slots = [None] * len(self.slots)
        self.ready[:] = False

    def finish(self, i: int, success: bool, error: str | None = None) -> None:
        ep = self.slots[i]
        self.records[ep.index] = EnvRunner._record(ep, success, error, self.capture)
        self.finished.append(ep.index)
        self.slots[i] = None
        self.ready[i] = False
        if self.bar is not None:
            self.bar.update(1)

    def lose(self, lost: dict[int, str]) -> None:
        """Fail every running episode of a worker that died or hung (its envs are gone)."""
        for i, ep in enumerate(self.slots):
            w = self.runner.pool.worker_of(i)
            if ep is not None and w in lost:
                self.finish(i, False, lost[w])

    def in_phase(self, g: int) -> bool:
        """Streaming: may a free slot of group g start now? Only where its first policy call
        (next tick, after the reset) coincides with the running slots' next replanning, so that
        a chunked policy keeps planning all slots in one batch instead of one small batch per
        slot phase (issue #16). The running slots' lengths decide it: deterministic."""
        period = getattr(self.policy, "replan_period", 1)
        lengths = [ep.length for i, ep in enumerate(self.slots)
                   if ep is not None and self.group[i] == g]
        return period <= 1 or not lengths or any((n + 1) % period == 0 for n in lengths)

    def start(self, g: int) -> list[tuple]:
        """Next contexts onto the free slots of group g, lowest slot first -> reset items."""
        items = []
        if self.streaming and not self.in_phase(g):
            return items
        for i in np.flatnonzero(self.group == g):
            if self.slots[i] is None and self.next < len(self.contexts) and not self.stopped:
                ctx = self.contexts[self.next]
                self.slots[i] = _Running(self.next, ctx, steps=[] if self.capture else None,
                                         frames=[] if self.next < self.video else None)
                if ctx.task not in self.task_ids:
                    self.task_ids[ctx.task] = _task_id(self.policy, self.runner.factory, ctx.task)
                self.task[i] = self.task_ids[ctx.task]
                self.next += 1
                items.append((int(i), "reset", ctx))
        return items

    def absorb(self, replies: list[tuple]) -> None:
        fresh = []
        for i, o, success, done, err, was_reset in sorted(replies, key=lambda r: r[0]):
            ep = self.slots[i]
            if ep is None:  # abandoned by `stop`: its env is released at the slot's next reset
                continue
            if not was_reset:
                ep.length += 1
                self.runner.env_steps += 1
            if err is not None:
                self.finish(i, False, err)
                continue
            o = unpack(o)
            self._store(i, o)
            EnvRunner._frame(ep, o)
            if done and not was_reset:
                self.finish(i, success)
                continue
            self.ready[i] = True
            if was_reset:
                fresh.append(i)
        if fresh:
            _reset_slots(self.policy, fresh)

    def _store(self, i: int, o: dict[str, np.ndarray]) -> None:
        """Write slot i's observation into the batch buffers: low-dim (B, D), images
        (B, 3, H, W) uint8 (channel-first like a dataset batch). Rows of slots that are not
        acting hold stale values; the policy ignores inactive rows."""
        for k, v in o.items():
            if v.dtype == np.uint8 and v.ndim == 3 and v.shape[-1] == 3:
                v = v.transpose(2, 0, 1)
            if k not in self.obs:
                self.obs[k] = np.zeros((len(self.slots), *v.shape), v.dtype)
            self.obs[k][i] = v

    def act(self, g: int) -> list[tuple]:
        """One batched policy call for the waiting slots of group g -> step items."""
        active = self.ready & (self.group == g)
        if not active.any():
            return []
        # copies: the policy may keep what it is given, the buffers change every step
        obs = {k: torch.from_numpy(v.copy()) for k, v in self.obs.items()}
        actions, record, replanned = self.policy.act(
            obs, torch.from_numpy(self.task.copy()), self.gen, active)
        if self.capture and record is not None:
            for i, j in _record_rows(record, np.asarray(replanned) & active).items():
                self.slots[i].steps.append(tuple(
                    _row(t, j) for t in (record.context, record.tokens, record.logp,
                                         getattr(record, "logp_topk", None))))
        self.ready[active] = False
        actions = np.asarray(actions, dtype=np.float64)
        # lists pickle much faster than small numpy rows; float64 keeps the values exact
        return [(int(i), "step", actions[i].tolist()) for i in np.flatnonzero(active)]


class EnvRunner:
    """Runs episodes for any env factory (see `ript.envs.worker`)."""

    def __init__(self, factory, n_envs: int, n_workers: int, step_timeout_s: float = 60.0,
                 start_method: str | None = None, pipeline: bool = False):
        """pipeline: step half of the slots while the policy acts for the other half. Pays off
        when inference is slow and has its own device (a GPU); costs twice the pipe messages,
        so with a cheap policy on few cores the default lockstep (one policy call for all
        waiting slots) is faster. Records depend on it (it changes the policy's batches),
        never on `n_workers`."""
        if n_envs < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        self.factory = factory
        self.n_envs = n_envs
        self.pool = WorkerPool(factory, n_workers, step_timeout_s, start_method)
        self.env_steps = 0
        self.pipeline = pipeline

    def close(self) -> None:
        self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def check(self, contexts: Sequence[EpisodeContext], tasks: Sequence[str] | None) -> None:
        for c in contexts:
            self.factory.check(c)
            if tasks is not None and c.task not in tasks:
                raise ValueError(f"context {c.context_id} is for task {c.task!r}, expected one "
                                 f"of {list(tasks)}")

    def run(self, policy, contexts: Sequence[EpisodeContext], seed: int, capture_rl: bool = False,
            progress_desc: str | None = None, tasks: Sequence[str] | None = None,
            video_episodes: int = 0, feed=None) -> list[EpisodeRecord | None]:
        """Run one episode per context; records come back in the order of `contexts`.

        tasks: if given, the tasks the policy was trained for (other contexts are refused).
        video_episodes: keep the image frames of the first n contexts (needs image obs).
        feed: streaming (RIPT's collection, issue #16). Called after every batch of worker
            replies with the records that ended, as [(index, record)] in the order they ended
            (slot order within a batch); returns further contexts to queue (a list, possibly
            empty) or None to stop: nothing more starts and the running episodes are abandoned
            (their records stay None). The calls happen at points fixed by the episodes'
            outcomes, never by timing or `n_workers`, so the records stay deterministic.
        """
        contexts = list(contexts)
        self.check(contexts, tasks)
        if not contexts:
            return []
        B = min(self.n_envs, len(contexts)) if feed is None else self.n_envs
        # Pipelined: two groups of slots (i % 2) take turns, the workers step one group while
        # the main process runs the policy for the other. The groups do not depend on the
        # worker count, hence neither does the schedule.
        G = 2 if B >= 2 and self.pipeline else 1
        W = max(self.pool.n_workers, 1)
        self.pool.assign((lambda i: (i // G) % W) if B >= G * W else (lambda i: i % W))
        bar = progress(total=len(contexts), desc=progress_desc) if progress_desc else None
        run = _Run(self, policy, contexts, B, seed, capture_rl, video_episodes, bar)
        run.streaming = feed is not None
        inflight: list = [None] * G
        try:
            for g in range(G):
                inflight[g] = self.pool.send(run.start(g))
            while any(t is not None for t in inflight):
                for g in range(G):
                    if inflight[g] is None:
                        continue
                    replies, lost = self.pool.collect(inflight[g])
                    inflight[g] = None
                    run.absorb(replies)
                    run.lose(lost)
                    if feed is not None and not run.stopped:
                        self._feed(run, feed, tasks)
                    items = run.start(g) + run.act(g)
                    inflight[g] = self.pool.send(items) if items else None
        except BaseException:
            # e.g. a policy error: drain the replies still in the pipes so that the next run
            # does not read them as its own
            for t in inflight:
                if t is not None:
                    self.pool.collect(t)
            raise
        finally:
            if bar is not None:
                bar.close()
        return run.records

    def _feed(self, run: _Run, feed, tasks) -> None:
        ended = [(i, run.records[i]) for i in run.finished]
        run.finished = []
        more = feed(ended)
        if more is None:
            run.stop()
        elif more:
            more = list(more)
            self.check(more, tasks)
            run.add(more)

    @staticmethod
    def _frame(ep: _Running, o: dict) -> None:
        if ep.frames is not None:
            img = [v for v in o.values() if v.dtype == np.uint8 and v.ndim == 3]
            if img:
                ep.frames.append(img[0])

    @staticmethod
    def _record(ep: _Running, success: bool, error: str | None, capture: bool) -> EpisodeRecord:
        c = ep.ctx
        rec = EpisodeRecord(c.task, c.context_id, c.seed, bool(success), ep.length, error,
                            c.variant, frames=ep.frames)
        if capture and ep.steps:
            # Episodes end at their first success, so every recorded replanning step is at or
            # before the successful chunk: valid_steps = S (spec §5.3 "Context caching").
            rec.valid_steps = len(ep.steps)
            cols = list(zip(*ep.steps))
            rec.contexts, rec.tokens, rec.logp = (_stack(cols[i]) for i in range(3))
            if all(t is not None for t in cols[3]):
                rec.logp_topk = _stack(cols[3])
        return rec
