"""A model replica that decodes a share of a fork's workers: what runs inside each Ray actor.

The driver prefills every prefix once and ships its K/V in parsyn's byte form (or, `recompute`, the actor
prefills it again from the same token ids); the replica feeds its workers' openings after them and
decodes its rows with `Forking.start` and the one decode loop, as a local fork does. Worker i of a question
samples with `row_seed(seed, i)` whatever share it lands in, so its tokens do not depend on the split.
Each finished row goes back with its token ids, its text and its K/V bytes (or no K/V, `returns="ids"`:
the driver prefills the branch itself). Nothing here imports Ray: the executor wraps `Replica` as an actor
(`node()` asks the Ray it runs in).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..decode import decode
from ..forward import State, stack
from ..kv import KV
from ..model import load
from ..sampling import SamplingParams
from ..workers import Forking


@dataclass(frozen=True)
class Share:
    """One actor's part of a fork: the questions its rows need (`keys`: their index in the fork) with
    their prefixes, every worker's opening and role, and their sampling; `rows`: (local question, worker)."""

    keys: tuple[int, ...]
    questions: tuple[str, ...]
    system: str | None
    prefixes: tuple[tuple[int, ...], ...]
    openings: tuple[tuple[tuple[int, ...], ...], ...]
    roles: tuple[tuple[str | None, ...], ...]
    samplings: tuple[SamplingParams, ...]
    rows: tuple[tuple[int, int], ...]
    returns: str = "kv"  # "kv": each row's K/V bytes come back; "ids": token ids and text only


@dataclass(frozen=True)
class Decoded:
    """A finished worker row as it travels back: (question in the fork, worker), tokens, why it stopped,
    its text, and its K/V in parsyn's byte form (None with `returns="ids"`)."""

    key: tuple[int, int]
    tokens: tuple[int, ...]
    finish: str
    text: str | None
    kv: bytes | None


class Replica:
    """A replica of the driver's model (same weights and dtype: same `LM.fingerprint`) in its own process.
    `threads`: torch threads; one per actor keeps two actors from oversubscribing two cores."""

    def __init__(self, model: str, dtype: str, threads: int = 1, device: str = "cpu"):
        torch.set_num_threads(threads)
        self.lm = load(model, device=device, dtype=getattr(torch, dtype))

    def identity(self) -> dict:
        """The replica's model name and fingerprint, its process id and its Ray node."""
        return {"name": self.lm.name, "fingerprint": self.lm.fingerprint, "pid": os.getpid(), "node": node()}

    def decode(self, share: Share, *prefixes: bytes) -> list[Decoded]:
        """Decode the share's rows after the prefixes: one byte string per question of the share
        (shipped), or none (the replica prefills them from their token ids)."""
        return decode_share(self.lm, share, [KV.from_bytes(p, model=self.lm.fingerprint, device=self.lm.device)
                                             for p in prefixes])

    def blob(self, size: int) -> bytes:
        """`size` bytes, to time a transfer from this actor to the driver."""
        return os.urandom(size)


def node() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    import ray  # only ever called inside an actor, where Ray is loaded

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def decode_share(lm, share: Share, prefixes: Sequence[KV]) -> list[Decoded]:
    """The rows of `share`, decoded on `lm` over the given prefix K/V (one per question of the share; none:
    prefilled here, as one batch, as the driver prefills them)."""
    if prefixes:
        shared = stack([State.over([kv], kv.positions[None].to(lm.device)) for kv in prefixes])
        plan = Forking(lm, list(share.questions), share.system, [list(p) for p in share.prefixes], list(prefixes),
                       shared, [list(o) for o in share.openings], [list(r) for r in share.roles],
                       list(share.samplings))
    else:
        plan = Forking.plan(lm, share.questions, roles=[list(r) for r in share.roles], system=share.system,
                            sampling=share.samplings)
        if [tuple(p) for p in plan.prefixes] != list(share.prefixes):
            raise ValueError("the replica's tokenizer splits the prompt differently from the driver's")
    state, logits, rows = plan.start(share.rows)
    results = decode(lm, state, logits, rows)
    return [Decoded((share.keys[q], i), r.tokens, r.finish, r.text,
                    r.kv.to_bytes(lm.fingerprint) if share.returns == "kv" else None)
            for (q, i), r in zip(share.rows, results)]
