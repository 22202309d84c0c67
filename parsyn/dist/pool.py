"""Actors that hold a model replica, and calls on them that survive an actor's death.

A `Pool` starts its actors when first needed (spread over the cluster's nodes), checks that each holds
the driver's model (the same `LM.fingerprint`: same weights, same dtype) and replaces those that died.
`Calls` tracks calls in flight: polled without blocking (a serving engine's loop) or waited on, each call
whose actor dies is retried once on another live actor, and a call past the deadline ends as a ValueError
naming what was lost. Nothing waits without a timeout, so a dead node can never hang the driver.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .cluster import LocalCluster, check_address, connect, require


class Pool:
    """`size` actors of class `cls`, built with `args`, each on `cpus` CPUs (and `gpus` GPUs) of the Ray
    cluster at `address` ("local": a throwaway two-node cluster on this machine, ended by `close()`).
    `cls` must have `identity() -> {"name", "fingerprint", "pid", "node"}`."""

    def __init__(self, address: str, cls: type, args: tuple, *, size: int, cpus: float = 1.0, gpus: float = 0.0,
                 timeout_s: float = 600.0):
        self.address, self.cls, self.args = check_address(address), cls, args
        self.size, self.cpus, self.gpus, self.timeout_s = size, cpus, gpus, timeout_s
        self.cluster: LocalCluster | None = None
        self.connected = False
        self.actors: list = []
        self.pids: dict = {}  # actor -> process id
        self.nodes: dict = {}  # actor -> Ray node id
        self.fingerprint: str | None = None

    def ensure(self, fingerprint: str, name: str) -> list:
        """The live actors, `size` of them (missing ones started now), all holding the model `fingerprint`
        (`name` for messages); ValueError when an actor cannot start or holds another model."""
        ray = self._connect()
        remote = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0)(self.cls)
        new = [remote.options(scheduling_strategy="SPREAD").remote(*self.args)
               for _ in range(self.size - len(self.actors))]
        self.actors += new
        if new:
            self._check(new)
        if self.fingerprint != fingerprint:
            raise ValueError(f"the Ray actors hold another model (fingerprint {self.fingerprint}) than this one, "
                             f"{name} ({fingerprint}): a replica must load the same weights in the same dtype")
        return list(self.actors)

    def _connect(self):
        ray = require()
        if self.address == "local" and self.cluster is None:
            self.cluster = LocalCluster.start(2, cpus=max(1, int(self.cpus)))
        elif not ray.is_initialized():
            self.connected = connect(self.address)
        return ray

    def _check(self, new: list) -> None:
        ray = require()
        try:
            seen = ray.get([a.identity.remote() for a in new], timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.close_actors()
            raise ValueError(f"{len(new)} Ray actor(s) of {self.cpus:g} CPU(s) did not start within "
                             f"{self.timeout_s:.0f} s: does the cluster have the room?") from None
        except ray.exceptions.RayError as error:
            self.close_actors()
            raise ValueError(f"a Ray actor could not load its model replica: {reason(error)}") from None
        self.pids.update({a: s["pid"] for a, s in zip(new, seen)})
        self.nodes.update({a: s["node"] for a, s in zip(new, seen)})
        prints = {s["fingerprint"] for s in seen} | ({self.fingerprint} if self.fingerprint else set())
        if len(prints) > 1:
            self.close_actors()
            raise ValueError(f"the Ray actors hold different models ({', '.join(sorted(prints))})")
        self.fingerprint = prints.pop()

    def drop(self, actor) -> None:
        """Forget `actor` (dead or stuck) and make sure it is gone; `ensure` starts a replacement."""
        if actor in self.actors:
            self.actors.remove(actor)
        self.pids.pop(actor, None)
        self.nodes.pop(actor, None)
        require().kill(actor)

    def close_actors(self) -> None:
        for actor in list(self.actors):
            self.drop(actor)
        self.fingerprint = None

    def close(self) -> None:
        """End the actors; disconnect if this pool connected; end the local cluster if it started one."""
        if self.actors:
            self.close_actors()
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
        elif self.connected:
            require().shutdown()
            self.connected = False


def reason(error: Exception) -> str:
    """The first line of what a Ray error says (an actor's own exception where it carries one)."""
    cause = getattr(error, "cause", None)
    text = str(cause if isinstance(cause, Exception) else error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass(eq=False)
class Calls:
    """Calls of `method` on a pool's actors: `jobs[n]` are the arguments of call n. `describe(n)` names
    what call n computes, for messages. Results land in `results[n]`."""

    pool: Pool
    method: str
    jobs: list[tuple]
    describe: Callable[[int], str] = str
    pending: dict = field(default_factory=dict)  # object ref -> (call, actor)
    tries: Counter = field(default_factory=Counter)
    results: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def submit(self, n: int, actor) -> None:
        """Start call n on `actor` (queued behind the actor's earlier calls)."""
        self.pending[getattr(actor, self.method).remote(*self.jobs[n])] = (n, actor)
        self.tries[n] += 1

    def load(self, actor) -> int:
        return sum(a is actor for _, a in self.pending.values())

    def poll(self, timeout_s: float = 0.0) -> list[int]:
        """The calls that finished within `timeout_s` (0: never blocks); a call whose actor died is sent
        again to another actor. ValueError when a call fails twice, fails in its own code, or the
        pool's deadline passes."""
        if not self.pending:
            return []
        ray = require()
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout_s)
        done = []
        for ref in ready:
            n, actor = self.pending.pop(ref)
            try:
                self.results[n] = ray.get(ref, timeout=self.pool.timeout_s)
                done.append(n)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.ObjectLostError) as error:
                self._retry(n, actor, error)
            except ray.exceptions.RayTaskError as error:
                raise _as_value_error(error, self.describe(n)) from None
        if self.pending and time.monotonic() - self.started > self.pool.timeout_s:
            self._expire()
        return done

    def _retry(self, n: int, actor, error: Exception) -> None:
        pid = self.pool.pids.get(actor, "?")
        self.failures.append(f"the Ray actor (pid {pid}) running {self.describe(n)} died: {reason(error)}")
        self.pool.drop(actor)
        others = self.pool.actors
        if self.tries[n] >= 2 or not others:
            why = "it failed twice" if self.tries[n] >= 2 else "no other actor is left to retry on"
            raise ValueError(f"{self.failures[-1]}; {why}")
        self.submit(n, min(others, key=self.load))

    def _expire(self) -> None:
        stuck = sorted({n for n, _ in self.pending.values()})
        for _, actor in list(self.pending.values()):
            self.pool.drop(actor)  # a stuck actor would hold its CPU and queue later calls
        self.pending.clear()
        raise ValueError(f"no answer from the Ray actors within {self.pool.timeout_s:.0f} s for "
                         f"{', '.join(self.describe(n) for n in stuck)}")

    def wait(self) -> dict:
        """Block until every call has finished (polling each second); the results by call."""
        while self.pending:
            self.poll(1.0)
        return self.results


def _as_value_error(error: Exception, what: str) -> Exception:
    cause = getattr(error, "cause", None)
    if isinstance(cause, (ValueError, TypeError)):
        return type(cause)(f"{what}: {cause}")
    return ValueError(f"{what} failed on a Ray actor: {reason(error)}")
