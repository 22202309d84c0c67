"""Forks kept for later synthesis: a byte budget with least-recently-used eviction and a time to live.

Ids of evicted forks are remembered (a bounded number), so a late caller learns its fork was evicted
rather than that it never existed."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..workers import Fork

REMEMBERED = 4096  # evicted ids kept to say so


class ForkGone(KeyError):
    """No such fork: unknown, deleted, or evicted (the message says which)."""

    def __str__(self) -> str:
        return self.args[0]


def fork_bytes(fork: Fork) -> int:
    """Bytes of a fork's K/V: the prefix and every branch."""
    return fork.prefix.nbytes + sum(b.kv.nbytes for b in fork.branches)


@dataclass(eq=False)
class _Entry:
    fork: Fork
    bytes: int
    created: float
    used: float


class ForkStore:
    """Thread-safe. `put` evicts the least recently used forks until the new one fits the budget."""

    def __init__(self, budget_bytes: int, ttl_s: float = 3600.0, clock: Callable[[], float] = time.monotonic):
        if budget_bytes <= 0 or ttl_s <= 0:
            raise ValueError(f"the fork cache needs a positive budget and time to live, got {budget_bytes}, {ttl_s}")
        self.budget, self.ttl, self.clock = budget_bytes, ttl_s, clock
        self._forks: OrderedDict[str, _Entry] = OrderedDict()
        self._gone: OrderedDict[str, str] = OrderedDict()  # id -> why
        self._lock = threading.Lock()
        self.evictions = 0

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(e.bytes for e in self._forks.values())

    def __len__(self) -> int:
        return len(self._forks)

    def put(self, fork: Fork, fork_id: str | None = None) -> str:
        """Keep `fork` (under a new id, or replacing `fork_id`); returns its id."""
        size = fork_bytes(fork)
        if size > self.budget:
            raise ValueError(f"the fork holds {size / 2**20:.1f} MiB of K/V, more than the whole fork cache "
                             f"({self.budget / 2**20:.1f} MiB)")
        with self._lock:
            self._expire()
            now = self.clock()
            fork_id = fork_id or f"fork-{secrets.token_hex(8)}"
            old = self._forks.pop(fork_id, None)
            self._forks[fork_id] = _Entry(fork, size, old.created if old else now, now)
            while sum(e.bytes for e in self._forks.values()) > self.budget:
                victim, _ = self._forks.popitem(last=False)
                self._forget(victim, "was evicted to keep the fork cache within its budget")
                self.evictions += 1
            return fork_id

    def get(self, fork_id: str) -> Fork:
        """The fork (marked as used); ForkGone when it is unknown, deleted, expired or evicted."""
        with self._lock:
            self._expire()
            entry = self._forks.get(fork_id)
            if entry is None:
                why = self._gone.get(fork_id)
                raise ForkGone(f"fork {fork_id!r} {why}" if why else f"no fork {fork_id!r}")
            entry.used = self.clock()
            self._forks.move_to_end(fork_id)
            return entry.fork

    def info(self, fork_id: str) -> dict:
        fork = self.get(fork_id)
        with self._lock:
            entry = self._forks[fork_id]
            return {"fork": fork, "bytes": entry.bytes, "expires_in_s": entry.used + self.ttl - self.clock()}

    def delete(self, fork_id: str) -> None:
        self.get(fork_id)
        with self._lock:
            self._forks.pop(fork_id, None)
            self._forget(fork_id, "was deleted")

    def _expire(self) -> None:
        now = self.clock()
        for fork_id in [i for i, e in self._forks.items() if now - e.used > self.ttl]:
            del self._forks[fork_id]
            self._forget(fork_id, f"expired (unused for {self.ttl:g} s)")

    def _forget(self, fork_id: str, why: str) -> None:
        self._gone[fork_id] = why
        while len(self._gone) > REMEMBERED:
            self._gone.popitem(last=False)
