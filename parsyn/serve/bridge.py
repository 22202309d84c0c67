"""Server-sent events, errors and the bridge between the event loop and the engine thread."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections import deque
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from .engine import Busy, Cancelled, Engine
from .forks import ForkGone


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    timeout_s: float = 600.0      # a request's deadline, queue time included
    default_max_tokens: int = 256


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers


def error_body(message: str, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def failure(error: BaseException) -> APIError:
    """The API error for what a job raised."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ForkGone):
        return APIError(404, str(error), "not_found_error", "fork_not_found")
    if isinstance(error, Cancelled):
        late = "deadline" in str(error)
        return APIError(504 if late else 499, f"request cancelled: {error}", "timeout" if late else "cancelled")
    if isinstance(error, ValueError | TypeError):
        return APIError(400, str(error))
    print(f"parsyn serve: internal error: {type(error).__name__}: {error}", file=sys.stderr)
    return APIError(500, "internal error (see the server's log)", "server_error")


class Bridge:
    """One engine request as seen from the event loop: its events in an asyncio queue.

    The engine hands over events as it makes them (a step's tokens for every row of the request); they
    cross to the event loop in batches: one wake-up of the loop carries all events that arrived since the
    last, and a stream writes them in one chunk, so a request with many rows costs the loop little."""

    def __init__(self, engine: Engine, job, timeout_s: float):
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self._arrived: deque = deque()  # filled by the engine thread, emptied on the loop
        self._lock = threading.Lock()
        self._scheduled = False
        try:
            self.request = engine.submit(job, self._sink, timeout_s=timeout_s)
        except Busy as busy:
            raise APIError(429, f"the server is busy ({busy}); retry shortly", "rate_limit_error",
                           "queue_full", {"Retry-After": "1"}) from None
        except RuntimeError as stopping:
            raise APIError(503, str(stopping), "server_error", "shutting_down") from None

    def _sink(self, event: tuple) -> None:  # the engine thread
        self._arrived.append(event)
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # the loop: everything that arrived, in order
        with self._lock:
            self._scheduled = False  # before draining: an event appended from now on schedules again
        while self._arrived:
            self.events.put_nowait(self._arrived.popleft())

    def ready(self) -> list[tuple]:
        """The events already here, without waiting."""
        return [self.events.get_nowait() for _ in range(self.events.qsize())]

    async def next(self, http: Request | None = None) -> tuple:
        """The next event; a client that disconnects meanwhile cancels the request."""
        while True:
            if not self.events.empty():
                return self.events.get_nowait()
            try:
                return await asyncio.wait_for(self.events.get(), 0.25)
            except asyncio.TimeoutError:
                if http is not None and await http.is_disconnected():
                    self.request.cancel("the client disconnected")

    async def result(self, http: Request, on_event=None):
        """Wait for the job's value (its events go to on_event); its error as an APIError."""
        while True:
            event = await self.next(http)
            if event[0] == "done":
                return event[1]
            if event[0] == "error":
                raise failure(event[1])
            if on_event is not None:
                on_event(event)

    def cancel(self, why: str) -> None:
        self.request.cancel(why)


def sse(data) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"



def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else "stop" if reason == "stop" else "length"


async def first_event(bridge: Bridge, http: Request) -> tuple:
    """The first event, before the response starts: an early error still gets its own status."""
    event = await bridge.next(http)
    if event[0] == "error":
        raise failure(event[1])
    return event


async def events(http, bridge: Bridge, first: tuple, deltas, last):
    """Server-sent events of one request; ends with [DONE]. The events waiting at each wake-up go out
    as one write. A client gone mid-stream cancels the request."""
    try:
        arrived = [first]
        while True:
            out: list[str] = []
            for event in arrived:
                if event[0] == "done":
                    out += [sse(chunk) for chunk in last(event[1])]
                elif event[0] == "error":
                    e = failure(event[1])
                    out.append(sse(error_body(e.message, e.kind, e.code)))
                else:
                    out += [sse(chunk) for chunk in deltas(event)]
                    continue
                out.append(sse("[DONE]"))
                yield "".join(out)
                return
            if out:
                yield "".join(out)
            arrived = [await bridge.next(http), *bridge.ready()]
    except asyncio.CancelledError:
        bridge.cancel("the client disconnected")
        raise


async def streamed(http, bridge: Bridge, chunk_of, finished):
    """A fork endpoint's stream: a chunk per token, then the finished object, then [DONE]."""
    first = await first_event(bridge, http)
    deltas = lambda e: [chunk_of(e)] if e[0] == "token" and e[2].text else []
    return StreamingResponse(events(http, bridge, first, deltas, lambda value: [finished(value)]),
                             media_type="text/event-stream")


