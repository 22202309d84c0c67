"""A join that does not wait, without losing the stragglers.

`fork_early` returns at a quorum or deadline join with the branches finished by then — the fork that
`fork(..., quorum=...)` returns — while the cut workers' rows stay in their batch, suspended between two
steps. `Early.rest()` decodes them on to their end and returns the fork of every worker: the fork a full
join holds (the same batch ran every step, so the same tokens and K/V). A follow-up synthesis over it folds
the stragglers in; on the cache route the early branches' K/V are read again, not recomputed, so the
follow-up costs one synthesizer prompt, not a re-read of every branch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .decode import Batch, Token
from .model import LM
from .sampling import SamplingParams
from .workers import WORKER_SAMPLING, Fork, Forking, Join


@dataclass(eq=False)
class Early:
    """A fork joined early: `fork` holds the workers finished at the join (`fork.cut`: those still
    decoding); `rest()` finishes them. Owns its batch: not thread-safe."""

    fork: Fork
    plan: Forking
    batch: Batch
    steps: Iterator[list[Token]]
    waiting: list[Token]  # the events of the step past the join, not yet reported
    on_token: Callable[[int, int], None] | None = None
    full: Fork | None = None

    @property
    def done(self) -> bool:
        """Whether every worker has finished (then `rest()` returns at once)."""
        return self.full is not None

    def rest(self) -> Fork:
        """Decode the stragglers to their end; the fork of every worker (the same value on every call)."""
        if self.full is None:
            t0 = time.perf_counter()
            _report(self.waiting, self.on_token)
            for events in self.steps:
                _report(events, self.on_token)
            self.plan.decode_s += time.perf_counter() - t0
            self.full = self.plan.forks(self.batch.results)[0]
        return self.full


def fork_early(
    lm: LM,
    question: str,
    *,
    workers: int = 3,
    roles=(),
    system: str | None = None,
    sampling: SamplingParams = WORKER_SAMPLING,
    quorum: int | None = None,
    deadline_s: float | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> Early:
    """Run `workers` workers on `question` (as `parsyn.fork` does) until `quorum` of them have finished or
    `deadline_s` has passed (with one finished); returns the early fork and the suspended stragglers."""
    join = Join(quorum, deadline_s)
    if not join.waits_less:
        raise ValueError("fork_early needs a quorum or a deadline (without one, parsyn.fork waits for every worker)")
    plan = Forking.plan(lm, [question], workers=workers, roles=roles, system=system, sampling=sampling)
    if quorum is not None and quorum > len(plan.roles[0]):
        raise ValueError(f"a quorum of {quorum} needs at least {quorum} workers")
    state, logits, rows = plan.start()
    batch = Batch(lm, state, logits, rows)
    steps = batch.steps()
    finished, waiting, t0 = 0, [], time.perf_counter()
    for events in steps:
        _report(events, on_token)
        finished += sum(e.finish is not None for e in events)
        if join.stops(finished, time.perf_counter() - t0):
            waiting = next(steps, [])  # its forward completes the K/V of the rows that just finished
            break
    plan.decode_s = time.perf_counter() - t0
    early = Early(plan.forks(dict(batch.results))[0], plan, batch, steps, waiting, on_token)
    if not batch.live:
        early.rest()
    return early


def _report(events: list[Token], on_token: Callable[[int, int], None] | None) -> None:
    if on_token is not None:
        for e in events:
            on_token(e.key[1], e.id)
