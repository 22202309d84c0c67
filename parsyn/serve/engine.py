"""The serving engine: one thread owns the model and decodes every request's rows in one batch.

A request is a job: a generator, run on the engine thread, that prefills what it needs and yields a
`Phase` (rows to decode); the engine adds the rows to its batch and resumes the job with their results
when they have all finished (or, for `wait=False`, after the next step, so a job can start a fast route
before it prefills a slow one). Between steps the engine admits waiting jobs, drops the rows of
cancelled or late requests, and hands every event to its request's sink (called on the engine thread;
the HTTP side forwards it to its event loop). Continuous batching is this loop: rows of different
requests (workers, synthesizers, plain chats) join and leave the one decode batch between steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Hashable
from dataclasses import dataclass, field

import torch

from ..decode import Batch, Result, Row
from ..forward import State
from ..model import LM


@dataclass(eq=False)
class Part:
    """Rows over one prefilled state: its next-token logits [B, V] and B rows. `adapted`: the rows run the
    engine's trained synthesizer (the cache route with an adapter); workers and text rows run the base model."""

    state: State
    logits: torch.Tensor
    rows: list[Row]
    adapted: bool = False


@dataclass(eq=False)
class Phase:
    parts: list[Part]
    wait: bool = True  # resume the job when every row it has running has finished; else after one step
    waits_on: object | None = None  # work outside the batch (worker rows on Ray actors): resume once its
    # done() is true, polled between steps without blocking


@dataclass(eq=False)
class Finished:
    """What a resumed job is sent: every finished row of its request so far, with the times (perf_counter)
    of its first and last tokens."""

    results: dict[Hashable, Result] = field(default_factory=dict)
    first: dict[Hashable, float] = field(default_factory=dict)
    last: dict[Hashable, float] = field(default_factory=dict)


Job = Generator[Phase, Finished, object]
Sink = Callable[[tuple], None]  # ("token", key, Token, t) | ("done", value) | ("error", exception)


class Busy(Exception):
    """The queue is full: the caller should retry later."""


class Cancelled(Exception):
    """The request was cancelled (client gone, deadline passed, server stopping)."""


@dataclass(eq=False)
class Request:
    id: int
    job: Job
    sink: Sink
    deadline: float | None = None  # time.monotonic() after which the request is cancelled
    cancelled: str | None = None
    running: set = field(default_factory=set)
    done: Finished = field(default_factory=Finished)
    waits: bool = True
    resume_after_step: bool = False
    waiting_on: object | None = None

    def cancel(self, reason: str) -> None:
        """Ask the engine to stop this request (any thread); its rows leave at the next step."""
        self.cancelled = self.cancelled or reason


class Engine:
    """Owns the model on one thread. `submit` may be called from any thread."""

    def __init__(self, lm: LM, adapter=None, *, max_queue: int = 64, max_rows: int = 64, executor=None):
        self.lm, self.adapter = lm, adapter
        self.executor = executor  # where requests' worker rows decode (None: in this batch; see parsyn.dist)
        self.max_queue, self.max_rows = max_queue, max_rows
        self.waiting: deque[Request] = deque()
        self.active: dict[int, Request] = {}
        self.batch: Batch | None = None
        self._joining: list[Batch] = []  # rows prefilled since the last step: one stack joins them all
        self.steps = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- any thread ------------------------------------------------------------------------------------
    def submit(self, job: Job, sink: Sink, *, timeout_s: float | None = None) -> Request:
        """Queue `job`; raises Busy when `max_queue` requests already wait, RuntimeError when stopping."""
        with self._lock:
            if self._stop:
                raise RuntimeError("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise Busy(f"{len(self.waiting)} requests are waiting")
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            request = Request(next(self._ids), job, sink, deadline)
            self.waiting.append(request)
        self._wake.set()
        return request

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def rows(self) -> int:
        return sum(len(b.live) for b in [self.batch, *self._joining] if b is not None)

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="parsyn-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout_s: float = 60.0) -> None:
        """Refuse new requests; with `drain`, finish those already taken (up to timeout_s), else cancel them."""
        with self._lock:
            self._stop = True
        if not drain:
            for r in [*self.waiting, *self.active.values()]:
                r.cancel("the server is shutting down")
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                for r in [*self.waiting, *self.active.values()]:
                    r.cancel("the server is shutting down")
                self._thread.join(5.0)

    # -- the engine thread -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not (self._stop and not self.waiting and not self.active):
            self._reap()
            self._poll_outside()
            self._admit()
            self._join()
            if self.batch is None:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self._step()

    def _step(self) -> None:
        events = self.batch.sample_()
        now = time.perf_counter()
        for e in events:
            request = self.active.get(e.key[0])
            if request is not None:
                key = e.key[1]
                request.done.first.setdefault(key, now)
                request.done.last[key] = now
                request.sink(("token", key, e, now))
        self.batch.advance_()
        self.steps += 1
        self._collect()
        for request in [r for r in self.active.values() if r.resume_after_step]:
            request.resume_after_step = False
            self._resume(request)

    def _admit(self) -> None:
        while self.waiting and self.rows < self.max_rows:
            with self._lock:
                request = self.waiting.popleft()
            if request.deadline is not None and time.monotonic() > request.deadline:
                request.cancel("the request waited past its deadline")
            if request.cancelled:
                request.sink(("error", Cancelled(request.cancelled)))
                continue
            self.active[request.id] = request
            self._resume(request, first=True)

    def _resume(self, request: Request, first: bool = False) -> None:
        """Run the job to its next phase (its prefills run here) and add the phase's rows to the batch."""
        try:
            phase = next(request.job) if first else request.job.send(request.done)
        except StopIteration as stop:
            self._end(request, ("done", stop.value))
            return
        except Exception as error:  # the job's own error (bad input found late, say): this request only
            self._end(request, ("error", error))
            return
        request.waits, request.waiting_on = phase.wait, phase.waits_on
        for part in phase.parts:
            rows = [dataclasses.replace(r, key=(request.id, r.key), adapted=part.adapted) for r in part.rows]
            request.running.update(r.key for r in rows)
            self._joining.append(Batch(self.lm, part.state, part.logits, rows, adapter=self.adapter))
        if request.waiting_on is not None:
            return
        if not phase.wait or not request.running:
            request.resume_after_step = True
            if self.batch is None and not self._joining:  # nothing decodes: resume now, not after a step
                request.resume_after_step = False
                self._resume(request)

    def _join(self) -> None:
        """Rows that were prefilled since the last step join the batch, all in one stack (a burst of
        arrivals copies the batch's cache once, not once each)."""
        joining, self._joining = self._joining, []
        if not joining:
            return
        if self.batch is None or not self.batch.live:
            self.batch, joining = joining[0], joining[1:]
        if joining:
            self.batch.add(*joining)

    def _collect(self) -> None:
        """Hand finished rows to their jobs; resume the jobs whose awaited rows are all done."""
        batch = self.batch
        for key in list(batch.results):
            result = batch.results.pop(key, None)
            request = self.active.get(key[0])
            if request is None or result is None:  # its request ended meanwhile
                continue
            request.running.discard(key)
            request.done.results[key[1]] = result
            if not request.running and request.waits:
                self._resume(request)
        if self.batch is batch and not batch.live:
            self.batch = None

    def _poll_outside(self) -> None:
        """Resume the jobs whose work outside the batch is done (or failed: the request ends with its error)."""
        for request in [r for r in self.active.values() if r.waiting_on is not None]:
            try:
                ready = request.waiting_on.done()
            except Exception as error:  # the outside work's own error (actors lost, say): this request only
                request.waiting_on = None
                self._end(request, ("error", error))
                continue
            if ready:
                request.waiting_on = None
                self._resume(request)

    def _reap(self) -> None:
        now = time.monotonic()
        for request in list(self.active.values()):
            if request.deadline is not None and now > request.deadline:
                request.cancel("the request ran past its deadline")
            if request.cancelled:
                request.job.close()
                self._end(request, ("error", Cancelled(request.cancelled)))

    def _end(self, request: Request, event: tuple) -> None:
        """The request is over (done, failed or cancelled): rows it still has leave the batch now."""
        if request.running:
            self._join()
        if self.batch is not None and request.running:
            self.batch.remove(list(request.running))
            for key in request.running:
                self.batch.results.pop(key, None)
            if not self.batch.live:
                self.batch = None
        request.running.clear()
        self.active.pop(request.id, None)
        request.sink(event)
