"""An evaluation's item groups sharded over Ray actors: each actor holds a replica of the model (and resolves
the same synthesizer) and evaluates whole groups exactly as `run` evaluates them in one process; each
group's records come back when it is done and are written at once, so a stopped run resumes as a local
one does (a finished group is on disk whole; nothing is written twice).

Groups are handed out two at a time per actor (one decoding, one queued), so a fast actor takes more of
them; a group whose actor dies is evaluated again on another one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch

from ..adapter import resolve
from ..dist.actor import node
from ..dist.cluster import check_address
from ..dist.executor import source
from ..dist.pool import Calls, Pool
from ..model import LM, load
from . import tasks as T
from .run import TRAINED, EvalConfig, evaluate_items

IN_FLIGHT = 2  # groups per actor at a time


class Evaluator:
    """A model replica (and its synthesizer, when the methods need one) that evaluates groups of items."""

    def __init__(self, model: str, dtype: str, threads: int, adapter: str, trained: bool):
        torch.set_num_threads(threads)
        self.lm = load(model, dtype=getattr(torch, dtype))
        self.trained = resolve(self.lm, adapter) if trained else None

    def identity(self) -> dict:
        """The replica's model name and fingerprint, its process id and its Ray node."""
        return {"name": self.lm.name, "fingerprint": self.lm.fingerprint, "pid": os.getpid(), "node": node()}

    def evaluate(self, items: Sequence[T.Item], config: EvalConfig, methods: Sequence[str]) -> list[dict]:
        """The records of one group, as `evaluate_items` makes them."""
        return evaluate_items(self.lm, items, config, methods, self.trained)


class Shards:
    """Evaluation groups on `actors` Ray actors of the cluster at `address` ("local": a throwaway two-node
    cluster). `model`: what the actors load (a name of `parsyn models`, or a path every node reaches)."""

    def __init__(self, address: str, *, model: str, actors: int = 2, threads: int = 1, timeout_s: float = 3600.0):
        if isinstance(actors, bool) or not isinstance(actors, int) or actors < 1:
            raise ValueError(f"actors must be a positive number, got {actors!r}")
        self.address, self.model = check_address(address), source(model)
        self.actors, self.threads, self.timeout_s = actors, threads, timeout_s
        self.pool: Pool | None = None

    def evaluate(self, lm: LM, groups: Sequence[Sequence[T.Item]], config: EvalConfig, methods: Sequence[str]
                 ) -> Iterator[tuple[Sequence[T.Item], list[dict]]]:
        """(group, its records) for every group, in the order they finish."""
        if not groups:
            return
        args = (self.model, str(lm.dtype).removeprefix("torch."), self.threads, config.adapter,
                bool(TRAINED.keys() & set(methods)))
        self.pool = self.pool or Pool(self.address, Evaluator, args, size=self.actors, timeout_s=self.timeout_s)
        self.pool.ensure(lm.fingerprint, lm.name)
        calls = Calls(self.pool, "evaluate", [(list(g), config, list(methods)) for g in groups],
                      describe=lambda n: f"items {', '.join(item.id for item in groups[n])}")
        sent = 0
        while sent < len(groups) or calls.pending:
            for actor in self.pool.actors:
                while sent < len(groups) and calls.load(actor) < IN_FLIGHT:
                    calls.submit(sent, actor)
                    sent += 1
            if not self.pool.actors:
                raise ValueError(f"every Ray actor of the evaluation died ({'; '.join(calls.failures)})")
            for n in calls.poll(1.0):
                yield groups[n], calls.results.pop(n)

    def close(self) -> None:
        """End the actors (and the local cluster of address="local")."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> Shards:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
