"""Where a fork's workers decode, behind the fork contract: here (`LocalExecutor`) or on Ray actors
(`RayExecutor`). `parsyn.fork(lm, question, executor=RayExecutor(address=...))` returns the same `Fork` a
local fork does: the same branch token ids, K/V equal up to float rounding, so the same synthesis.

The driver plans the fork as a local one does (every prefix prefilled once, here: the synthesizer needs
that K/V anyway), splits the worker rows into one contiguous share per actor, puts each prefix's K/V bytes
into the object store once (every actor of a node reads that copy) or lets the actors prefill them again
(`prefix="recompute"`; `"auto"` picks by the measured transfer rate against the driver's measured prefill),
and gathers each branch's token ids, text and K/V bytes (`returns="ids"`: ids only, the driver prefills the
branches itself). `last` says what the last fork moved.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import registry
from ..decode import Result
from ..forward import prefill_rows, row_kv
from ..kv import KV
from ..model import LM
from ..sampling import SamplingParams
from ..workers import WORKER_SAMPLING, Fork, Forking, fork_many
from .actor import Decoded, Replica, Share
from .pool import Calls, Pool, require

PREFIX = ("ship", "recompute", "auto")
RETURNS = ("kv", "ids")


class LocalExecutor:
    """Workers in this process, as one batch: exactly `parsyn.fork_many` without an executor."""

    def fork_many(self, lm: LM, questions: Sequence[str], *, workers: int = 3, roles=(), system: str | None = None,
                  sampling: SamplingParams | Sequence[SamplingParams] = WORKER_SAMPLING, batched: bool = True,
                  on_token: Callable[[int, int, int], None] | None = None, quorum: int | None = None,
                  deadline_s: float | None = None) -> list[Fork]:
        """See `parsyn.fork_many`."""
        return fork_many(lm, questions, workers=workers, roles=roles, system=system, sampling=sampling,
                         batched=batched, on_token=on_token, quorum=quorum, deadline_s=deadline_s)


@dataclass(frozen=True)
class RayOptions:
    """How a `RayExecutor` runs. actors: model replicas (each `cpus` CPUs, `threads` torch threads);
    model: what they load (a name of `parsyn models`, a folder or a .gguf reachable from every node; None:
    the embedded model the driver's LM is); prefix: "ship" | "recompute" | "auto"; returns: "kv" | "ids";
    timeout_s: the longest wait for an actor to start or a fork's shares to come back."""

    address: str = "auto"
    actors: int = 2
    model: str | None = None
    prefix: str = "ship"
    returns: str = "kv"
    timeout_s: float = 600.0
    threads: int = 1
    cpus: float = 1.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.actors, bool) or not isinstance(self.actors, int) or self.actors < 1:
            raise ValueError(f"actors must be a positive number, got {self.actors!r}")
        if self.prefix not in PREFIX:
            raise ValueError(f"prefix must be one of {', '.join(PREFIX)}, got {self.prefix!r}")
        if self.returns not in RETURNS:
            raise ValueError(f"returns must be one of {', '.join(RETURNS)}, got {self.returns!r}")
        if not self.timeout_s > 0 or self.threads < 1 or not self.cpus > 0:
            raise ValueError(f"timeout_s, threads and cpus must be positive, got {self.timeout_s!r}, "
                             f"{self.threads!r}, {self.cpus!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class Shipment:
    """What one fork moved through the object store, in bytes and seconds."""

    actors: int
    rows: int
    prefix: str               # "ship" or "recompute"
    prefix_bytes: int         # K/V bytes of the prefixes, put once each
    prefix_reads: int         # bytes the shares read of them (one read per share and question)
    branch_bytes: int         # K/V bytes of the branches that came back
    branch_tokens: int        # tokens of the branches (openings and answers): their K/V came back or was prefilled
    remote_s: float           # from the first share sent to the last one back (decoding included)
    retried: tuple[str, ...]  # the failures retried on another actor

    @property
    def bytes_shipped(self) -> int:
        return self.prefix_reads + self.branch_bytes


class RayExecutor:
    """Workers on Ray actors that hold replicas of the driver's model (see `RayOptions`). A context
    manager: leaving it (or `close()`) ends the actors, and the local cluster of `address="local"`."""

    def __init__(self, address: str = "auto", *, actors: int = 2, model: str | None = None, prefix: str = "ship",
                 returns: str = "kv", timeout_s: float = 600.0, threads: int = 1, cpus: float = 1.0,
                 device: str = "cpu"):
        self.options = RayOptions(address, actors, model, prefix, returns, timeout_s, threads, cpus, device)
        self.pool: Pool | None = None
        self.rate_Bps: float | None = None  # measured object-store rate, actor to driver (prefix="auto")
        self.last: Shipment | None = None

    def fork_many(self, lm: LM, questions: Sequence[str], *, workers: int = 3, roles=(), system: str | None = None,
                  sampling: SamplingParams | Sequence[SamplingParams] = WORKER_SAMPLING, batched: bool = True,
                  on_token: Callable[[int, int, int], None] | None = None, quorum: int | None = None,
                  deadline_s: float | None = None) -> list[Fork]:
        """`parsyn.fork_many` with the workers on the actors. batched=False sends each worker alone. A
        quorum or deadline join and on_token need the workers' steps here: refused."""
        if on_token is not None or quorum is not None or deadline_s is not None:
            raise ValueError("on_token, quorum and deadline_s need local workers: Ray actors hand back whole branches")
        plan = Forking.plan(lm, questions, workers=workers, roles=roles, system=system, sampling=sampling,
                            rows_at_once=1)  # rows decode on the actors; here only the prefixes are prefilled
        t0 = time.perf_counter()
        results = self.start(plan, batched=batched).wait()
        plan.decode_s = time.perf_counter() - t0
        return plan.forks(results)

    def ready(self, lm: LM) -> RayExecutor:
        """Start the actors now (a server does, before it takes requests) and check they hold `lm`'s model."""
        self._pool(lm).ensure(lm.fingerprint, lm.name)
        return self

    def start(self, plan: Forking, *, batched: bool = True) -> Remote:
        """Send the rows of a planned fork to the actors; returns at once (poll `done()`, then `results()`)."""
        lm = plan.lm
        actors = self._pool(lm).ensure(lm.fingerprint, lm.name)
        rows = plan.everyone
        shares = split(plan, min(len(actors), len(rows)) if batched else len(rows), self.options.returns)
        mode = self._prefix_mode(plan, actors[0])
        prefixes = {}
        if mode == "ship":
            prefixes = {q: plan.prefix_kv[q].to_bytes(lm.fingerprint) for q in range(len(plan.questions))}
        refs = {q: require().put(b) for q, b in prefixes.items()}
        calls = Calls(self.pool, "decode", [(s, *[refs[q] for q in s.keys if q in refs]) for s in shares],
                      describe=lambda n: f"workers {', '.join(f'{q}.{i}' for q, i in _keys(shares[n]))}")
        for n in range(len(shares)):
            calls.submit(n, actors[n % len(actors)])
        reads = sum(len(prefixes[q]) for s in shares for q in s.keys if q in prefixes)
        return Remote(self, plan, calls, mode, sum(map(len, prefixes.values())), reads)

    def _pool(self, lm: LM) -> Pool:
        if self.pool is None:
            o = self.options
            model = source(o.model) if o.model else _model_of(lm)
            self.pool = Pool(o.address, Replica, (model, str(lm.dtype).removeprefix("torch."), o.threads, o.device),
                             size=o.actors, cpus=o.cpus, gpus=1.0 if o.device == "cuda" else 0.0,
                             timeout_s=o.timeout_s)
        return self.pool

    def _prefix_mode(self, plan: Forking, actor) -> str:
        """Whether the prefixes are shipped ("ship") or prefilled again by the actors ("recompute"); with
        "auto", shipped when their bytes move faster (at the measured rate) than the driver prefilled them."""
        if self.options.prefix != "auto":
            return self.options.prefix
        if self.rate_Bps is None:
            self.rate_Bps = transfer_rate(actor)
        size = sum(kv.nbytes for kv in plan.prefix_kv)
        return "ship" if size / self.rate_Bps < plan.prefill_s else "recompute"

    @property
    def pids(self) -> list[int]:
        """Process ids of the live actors (for tests and operators: each is a Ray worker process)."""
        return list(self.pool.pids.values()) if self.pool else []

    def close(self) -> None:
        """End the actors (and the local cluster of address="local"); a later fork starts new ones."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def source(model: str) -> str:
    """What a replica loads for `model`: a path made absolute (actors run in another folder), else the name."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _model_of(lm: LM) -> str:
    names = [m.name for m in registry.MODELS.values() if m.title == lm.name]
    if not names:
        raise ValueError(f"RayExecutor(model=...) must name what the actors load: {lm.name!r} is no embedded model "
                         "(give its folder or .gguf path, reachable from every node)")
    return names[0]


def split(plan: Forking, parts: int, returns: str = "kv") -> list[Share]:
    """The fork's worker rows in `parts` contiguous shares (sizes differ by at most one), each with the
    questions its rows need."""
    everyone = plan.everyone
    cuts = [len(everyone) * k // parts for k in range(parts + 1)]
    shares = []
    for rows in (everyone[a:b] for a, b in zip(cuts, cuts[1:])):
        keys = sorted({q for q, _ in rows})
        local = {q: n for n, q in enumerate(keys)}
        shares.append(Share(tuple(keys), tuple(plan.questions[q] for q in keys), plan.system,
                            tuple(tuple(plan.prefixes[q]) for q in keys),
                            tuple(tuple(tuple(o) for o in plan.openings[q]) for q in keys),
                            tuple(tuple(plan.roles[q]) for q in keys), tuple(plan.samplings[q] for q in keys),
                            tuple((local[q], i) for q, i in rows), returns))
    return shares


def _keys(share: Share) -> list[tuple[int, int]]:
    return [(share.keys[q], i) for q, i in share.rows]


def transfer_rate(actor, size: int = 32 * 2**20) -> float:
    """Bytes per second from `actor`'s object store into this process: a `size`-byte object's round trip
    less a one-byte one's (the call's own latency)."""
    ray = require()
    ray.get(actor.blob.remote(1))
    t0 = time.perf_counter()
    ray.get(actor.blob.remote(1))
    t1 = time.perf_counter()
    ray.get(actor.blob.remote(size))
    t2 = time.perf_counter()
    return size / max(1e-6, (t2 - t1) - (t1 - t0))


@dataclass(eq=False)
class Remote:
    """A planned fork whose rows decode on Ray actors: `done()` polls without blocking, `wait()` blocks
    (within the executor's timeout); both then give `results()`, the rows' results by (question, worker)."""

    executor: RayExecutor
    plan: Forking
    calls: Calls
    prefix: str
    prefix_bytes: int
    prefix_reads: int

    def done(self) -> bool:
        """Whether every share is back (a dead actor's share is sent again first; ValueError when lost)."""
        self.calls.poll(0.0)
        return not self.calls.pending

    def wait(self) -> dict[tuple[int, int], Result]:
        """Block until every share is back; the results."""
        self.calls.wait()
        return self.results()

    def results(self) -> dict[tuple[int, int], Result]:
        """Each worker's result: tokens, finish, text and K/V (from the bytes, or prefilled here)."""
        lm, decoded = self.plan.lm, [d for n in sorted(self.calls.results) for d in self.calls.results[n]]
        out = {d.key: Result(d.tokens, d.finish, d.kv and KV.from_bytes(d.kv, model=lm.fingerprint, device=lm.device),
                             d.text) for d in decoded}
        if any(d.kv is None for d in decoded):
            _prefill_branches(self.plan, out)
        tokens = sum(r.kv.length for r in out.values())
        self.executor.last = Shipment(len(self.executor.pids), len(out), self.prefix, self.prefix_bytes,
                                      self.prefix_reads, sum(len(d.kv or b"") for d in decoded), tokens,
                                      time.monotonic() - self.calls.started, tuple(self.calls.failures))
        return out


def _prefill_branches(plan: Forking, results: dict[tuple[int, int], Result]) -> None:
    """Give every result without K/V the K/V of its opening and tokens, prefilled after its prefix (one
    batch per question), in place."""
    for q in range(len(plan.questions)):
        keys = [k for k in sorted(results) if k[0] == q and results[k].kv is None]
        if not keys:
            continue
        ids = [tuple(plan.openings[q][i]) + results[q, i].tokens for _, i in keys]
        with torch.inference_mode():
            state, _ = prefill_rows(plan.lm, ids, plan.prefix_kv[q])
        for j, key in enumerate(keys):
            results[key].kv = row_kv(state, j, plan.prefix_kv[q].length)


__all__ = ["Decoded", "LocalExecutor", "RayExecutor", "RayOptions", "Remote", "Shipment", "split"]
