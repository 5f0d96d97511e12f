"""Environment worker pool shared by every EnvRunner (MetaWorld, LIBERO).

Workers are plain processes talking over `multiprocessing.Pipe`s; each one owns a fixed set of
episode *slots* and keeps a small cache of environments per task (an env is lent to a slot for one
episode and returned afterwards, so concurrent episodes of one task get different envs). The pool
knows nothing about policies or randomness: the runner decides everything in the main process and
only ships (slot, context) resets and (slot, action) steps here — so results cannot depend on how
many workers there are (spec §9.6).

This module avoids importing torch: spawned/forkserver workers import it to unpickle factories.
Failure handling (spec §9.7): an exception inside an env is reported for that slot only and the env
is dropped; a worker that dies or does not answer within `timeout_s` is killed and replaced, and
every episode it held is reported as failed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import traceback
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class EpisodeContext:
    """Where one episode starts (spec §5.2, App. B "context")."""

    context_id: int
    task: str
    variant: int
    """MetaWorld task variant (spec §9.1), or the LIBERO init-state index."""
    seed: int
    """Seed of the environment's own RNG for this episode."""
    init_state: np.ndarray | None = None
    """LIBERO: the flattened MuJoCo state to start from (overrides `variant` when given)."""


def _check_finite(obs: dict) -> None:
    # MuJoCo does not raise on instability: it warns and silently resets the simulation, which
    # would hand the policy a teleported robot. Non-finite values are the visible symptom.
    for k, v in obs.items():
        if v.dtype.kind == "f" and not np.isfinite(v.sum()):
            raise FloatingPointError(f"simulation unstable: non-finite values in obs[{k!r}]")


def pack(obs: dict | None):
    """Observation -> plain bytes for the pipe: pickling small numpy arrays costs ~5x more."""
    if obs is None:
        return None
    return {k: (v.tobytes(), v.dtype.str, v.shape) for k, v in obs.items()}


def unpack(packed) -> dict[str, np.ndarray]:
    return {k: np.frombuffer(b, dtype=d).reshape(s) for k, (b, d, s) in packed.items()}


class SlotEnvs:
    """The envs of one worker (or of the main process when there are no workers).

    An env is lent to a slot for one episode; idle envs are kept for reuse (building one costs
    ~0.3 s for MetaWorld, ~10 s for LIBERO), at most `max_idle` (the factory's
    `max_idle_envs`, else 32), least recently used dropped first, so many-task runs (ML45) do
    not accumulate hundreds of simulators.
    """

    def __init__(self, factory, max_idle: int = 32):
        self.factory = factory
        self.max_idle = max_idle
        self.idle: OrderedDict[int, tuple[str, object]] = OrderedDict()  # id -> (task, env)
        self.busy: dict[int, tuple] = {}  # slot -> (task, env)

    def _take(self, task: str):
        for key in reversed(self.idle):
            if self.idle[key][0] == task:
                return self.idle.pop(key)[1]
        return self.factory.make(task)

    def _release(self, slot: int, broken: bool = False) -> None:
        task, env = self.busy.pop(slot, (None, None))
        if env is None:
            return
        if broken:  # an env that raised may be in any state: never reuse it
            _close(env)
            return
        self.idle[id(env)] = (task, env)
        while len(self.idle) > self.max_idle:
            _close(self.idle.popitem(last=False)[1][1])

    def reset(self, slot: int, ctx: EpisodeContext):
        self._release(slot)
        try:
            env = self._take(ctx.task)
            self.busy[slot] = (ctx.task, env)
            obs = self.factory.reset(env, ctx)
            _check_finite(obs)
            return obs, None
        except Exception as e:  # noqa: BLE001 - reported as a failed episode
            self._release(slot, broken=True)
            return None, _error_text(e)

    def step(self, slot: int, action: np.ndarray):
        """-> (obs, success, done, error)."""
        try:
            if slot not in self.busy:
                raise RuntimeError(f"slot {slot} has no running episode")
            action = np.asarray(action, dtype=np.float64)
            if not np.all(np.isfinite(action)):
                raise FloatingPointError(f"non-finite action {action.tolist()}")
            obs, success, done, _ = self.busy[slot][1].step(action)
            _check_finite(obs)
            if done:
                self._release(slot)
            return obs, bool(success), bool(done), None
        except Exception as e:  # noqa: BLE001 - one env's crash must not stop the others
            self._release(slot, broken=True)
            return None, False, True, _error_text(e)

    def handle(self, items: list[tuple]) -> list[tuple]:
        """items (slot, "reset", ctx) | (slot, "step", action) ->
        replies (slot, obs, success, done, error, was_reset)."""
        out = []
        for slot, kind, payload in items:
            if kind == "reset":
                obs, err = self.reset(slot, payload)
                out.append((slot, pack(obs), False, err is not None, err, True))
            else:
                obs, success, done, err = self.step(slot, payload)
                out.append((slot, pack(obs), success, done, err, False))
        return out

    def close(self) -> None:
        for slot in list(self.busy):
            self._release(slot)
        for _, env in self.idle.values():
            _close(env)
        self.idle.clear()


def _close(env) -> None:
    try:
        env.close()
    except Exception:  # noqa: BLE001 - closing a broken env may fail too
        pass


def _error_text(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


def _worker_main(conn, factory) -> None:
    envs = SlotEnvs(factory, getattr(factory, "max_idle_envs", 32))
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            conn.send(envs.handle(msg))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        envs.close()
        conn.close()


class _Worker:
    def __init__(self, ctx, factory, index: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, factory), daemon=True,
                                name=f"ript-env-worker-{index}")
        self.proc.start()
        child.close()  # so that recv() sees EOF when the worker dies
        # one poll object per pipe: Connection.poll() builds a selector on every call
        self._poller = select.poll()
        self._poller.register(self.conn.fileno(), select.POLLIN)

    def wait(self, timeout_s: float) -> bool:
        """True when a reply (or EOF from a dead worker) is ready within `timeout_s`."""
        return bool(self._poller.poll(timeout_s * 1000))

    def kill(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)


class WorkerPool:
    """`n_workers` processes (0 = in-process) stepping env slots; see module docstring.

    `send` is asynchronous and `collect` waits (at most `timeout_s`) for one request's replies, so
    the runner can step one group of slots while it computes the actions of another. Each worker
    answers its requests in order; the runner collects them in the order it sent them.
    """

    def __init__(self, factory, n_workers: int, timeout_s: float = 60.0,
                 start_method: str | None = None):
        if n_workers < 0:
            raise ValueError(f"n_workers must be >= 0, got {n_workers}")
        if timeout_s <= 0:
            raise ValueError(f"step timeout must be > 0, got {timeout_s}")
        self.factory = factory
        self.n_workers = n_workers
        self.timeout_s = timeout_s
        self._mp = mp.get_context(start_method or factory.start_method) if n_workers else None
        self._workers: list[_Worker | None] = [None] * n_workers
        self._generation = [0] * n_workers  # bumped when a worker is replaced
        self._local = (SlotEnvs(factory, getattr(factory, "max_idle_envs", 32))
                       if n_workers == 0 else None)
        self.worker_of = lambda slot: 0
        self.restarts = 0

    def assign(self, worker_of) -> None:
        """Set the slot -> worker map (a function of the slot index)."""
        self.worker_of = worker_of if self.n_workers else (lambda slot: 0)

    def _get(self, w: int) -> _Worker:
        if self._workers[w] is None:
            self._workers[w] = _Worker(self._mp, self.factory, w)
        return self._workers[w]

    def send(self, items: list[tuple]) -> dict:
        """Dispatch (slot, kind, payload) items to their workers; returns a ticket."""
        if self._local is not None:
            return {"replies": self._local.handle(items), "lost": {}}
        by_worker: dict[int, list] = {}
        for it in items:
            by_worker.setdefault(self.worker_of(it[0]), []).append(it)
        ticket = {"gen": {}, "lost": {}}
        for w, its in by_worker.items():
            try:
                self._get(w).conn.send(its)
                ticket["gen"][w] = self._generation[w]
            except (OSError, EOFError) as e:  # died between two requests
                ticket["lost"][w] = self._lose(w, f"worker {w} died ({type(e).__name__})")
        return ticket

    def collect(self, ticket: dict) -> tuple[list[tuple], dict[int, str]]:
        """Replies of a ticket, and {worker: error} for workers that died or timed out.

        A lost worker is killed (a fresh one starts on next use); every episode it held, in any
        group, is gone. Requests sent to a worker that has since been replaced get no replies.
        """
        if self._local is not None:
            return ticket["replies"], {}
        replies, lost = [], dict(ticket["lost"])
        for w, gen in ticket["gen"].items():
            if self._generation[w] != gen:
                continue  # replaced while this request was queued; already reported
            worker = self._workers[w]
            try:
                if not worker.wait(self.timeout_s):
                    lost[w] = self._lose(w, f"worker {w} gave no answer within "
                                            f"{self.timeout_s:g} s and was killed")
                    continue
                replies.extend(worker.conn.recv())
            except (OSError, EOFError):
                worker.proc.join(1)
                lost[w] = self._lose(w, f"worker {w} died (exit code {worker.proc.exitcode})")
        return replies, lost

    def _lose(self, w: int, why: str) -> str:
        self._workers[w].kill()
        self._workers[w] = None
        self._generation[w] += 1
        self.restarts += 1
        return why

    def pids(self) -> list[int | None]:
        return [w.proc.pid if w else None for w in self._workers]

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
        for i, w in enumerate(self._workers):
            if w is None:
                continue
            try:
                w.conn.send(None)
            except (OSError, EOFError):
                pass
            w.proc.join(5)
            w.kill()  # no-op when it already exited; join() reaps it: no zombies
            self._workers[i] = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
