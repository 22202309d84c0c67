"""Decoding as steps over a batch whose rows can finish, leave, join, pause and be extended.

    batch = Batch(lm, state, logits, [Row("a", params), Row("b", params, capture_from=34)])
    for events in batch.steps():          # one list of Token events per step
        ...                               # between steps: batch.remove / add / pause / extend
    batch.results["a"].tokens, batch.results["b"].kv

A step samples the next token of every running row from its pending logits (one host sync for the
batch), then `steps()` yields the events, and when resumed runs one forward for the rows that need
one: running rows feed their new token; a finished row that captures its K/V feeds its last token once
more (so the K/V of every token it holds exist) and leaves with them; a finished row that captures
nothing leaves before the forward; a paused row waits (padding) until `extend` gives it tokens to feed.
Every route decodes here: workers, both synthesis routes, batched evaluation and data generation.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .detok import Detokenizer, StopText
from .forward import State, feed_, row_kv, stack
from .kv import KV
from .model import LM
from .sampling import SamplingParams, generator, sample

GREEDY = SamplingParams()


@dataclass(frozen=True)
class Row:
    """What one row of a batch asks for.

    capture_from: keep the K/V of the row's cached tokens at positions >= this when it finishes.
    close_turn: a row reaching max_new_tokens ends on a stop token, so a branch is a closed turn.
    logprobs: with k > 0, each event carries the top-k ids and log-probabilities it was drawn from.
    text: detokenize as the row decodes (events carry text; always on when there are stop strings).
    adapted: the row's forwards apply the batch's adapter (when it has one); a serving batch mixes rows
    of a trained synthesizer with workers' and text-route rows, which run the base model.
    """

    key: Hashable
    params: SamplingParams = GREEDY
    capture_from: int | None = None
    close_turn: bool = False
    logprobs: int = 0
    text: bool = False
    adapted: bool = True


@dataclass(frozen=True, eq=False)
class Token:
    """One sampled token of row `key`; `finish` is "stop" (stop token or string), "length" or None."""

    key: Hashable
    id: int
    text: str = ""
    logprobs: tuple[torch.Tensor, torch.Tensor] | None = None  # ids [k], log-probabilities [k]
    finish: str | None = None


@dataclass(eq=False)
class Result:
    """A finished row: its tokens (the stop token included when produced), why it ended, its captured
    K/V, and its text when it was detokenized (cut before a stop string)."""

    tokens: tuple[int, ...]
    finish: str
    kv: KV | None = None
    text: str | None = None


@dataclass(eq=False)
class _Live:
    row: Row
    generator: torch.Generator | None
    detok: Detokenizer | None
    stop_text: StopText | None
    tokens: list[int] = field(default_factory=list)
    feed: list[int] = field(default_factory=list)  # tokens to run at the next forward
    status: str = "running"                        # running | paused | finished
    finish: str | None = None


class Batch:
    """Rows decoding together over one `State` (owned by the batch and changed in place).

    `logits` [B, V] are each row's next-token logits after the state's last forward. Not thread-safe:
    one owner drives it (a route, or a serving engine)."""

    def __init__(self, lm: LM, state: State, logits: torch.Tensor, rows: Sequence[Row], *, adapter=None):
        if state.rows != len(rows) or logits.shape[0] != len(rows):
            raise ValueError(f"{len(rows)} rows for a state of {state.rows} and logits of {logits.shape[0]}")
        if len({r.key for r in rows}) != len(rows):
            raise ValueError("row keys must be distinct")
        self.lm, self.state, self.logits = lm, state, logits
        self.adapter = adapter  # trained parts whose `active()` context every forward of this batch runs in
        self.stops = set(lm.stop_ids)
        self.live = [self._live(r) for r in rows]
        self.results: dict[Hashable, Result] = {}

    def _live(self, row: Row) -> _Live:
        text = row.text or bool(row.params.stop)
        return _Live(row, generator(row.params, self.logits.device), Detokenizer(self.lm.tokenizer) if text else None,
                     StopText(row.params.stop) if text else None)

    @property
    def keys(self) -> list[Hashable]:
        return [r.row.key for r in self.live]

    def steps(self) -> Iterator[list[Token]]:
        """Decode until every row has finished (or left); yields each step's events before its forward.
        While every row is paused the steps are empty: the consumer extends or removes rows meanwhile."""
        while self.live:
            yield self.sample_()
            self.advance_()

    def sample_(self) -> list[Token]:
        """Sample the next token of every running row and record it; the forward comes in `advance_`."""
        running = [j for j, r in enumerate(self.live) if r.status == "running"]
        if not running:
            return []
        index = torch.tensor(running, device=self.logits.device)
        logits = self.logits.index_select(0, index) if len(running) < len(self.live) else self.logits
        live = [self.live[j] for j in running]
        ids = sample(logits, [r.row.params for r in live], [r.generator for r in live])
        best = self._topk(logits, live)
        return [self._record(r, tok, best[j] if best else None) for j, (r, tok) in enumerate(zip(live, ids))]

    def _topk(self, logits: torch.Tensor, live: list[_Live]) -> list | None:
        k = max(r.row.logprobs for r in live)
        if not k:
            return None
        top = torch.log_softmax(logits, -1).topk(k, dim=-1)
        return [(top.indices[j, : r.row.logprobs].cpu(), top.values[j, : r.row.logprobs].cpu()) if r.row.logprobs
                else None for j, r in enumerate(live)]

    def _record(self, r: _Live, token: int, logprobs) -> Token:
        limit = r.row.params.max_new_tokens
        if r.row.close_turn and len(r.tokens) == limit - 1 and token not in self.stops:
            token = self.lm.stop_ids[0]
        r.tokens.append(token)
        r.feed = [token]
        finish = "stop" if token in self.stops else "length" if len(r.tokens) >= limit else None
        text = ""
        if r.detok is not None:
            r.detok.add(token)
            text = r.stop_text.release(r.detok.text, final=finish is not None)
            if r.stop_text.cut is not None:
                finish = "stop"
        if finish:
            r.status, r.finish = "finished", finish
        return Token(r.row.key, token, text, logprobs, finish)

    def advance_(self) -> None:
        """Run the forward that the last sampled tokens (and any extensions) need, then let finished rows go."""
        self._leave([j for j, r in enumerate(self.live) if r.status == "finished" and r.row.capture_from is None])
        if not any(r.feed for r in self.live):
            return
        with torch.inference_mode(), self._adapter():
            logits = feed_(self.lm, self.state, [r.feed for r in self.live])
        idle = [j for j, r in enumerate(self.live) if not r.feed]  # e.g. a row that just joined keeps its logits
        if idle:
            keep = torch.zeros(len(self.live), 1, dtype=torch.bool, device=logits.device)
            keep[idle] = True
            logits = torch.where(keep, self.logits, logits)
        self.logits = logits
        for r in self.live:
            r.feed = []
        self._leave([j for j, r in enumerate(self.live) if r.status == "finished"])

    def _adapter(self):
        flags = [r.row.adapted for r in self.live]
        if self.adapter is None or not any(flags):
            return nullcontext()
        return self.adapter.active(None if all(flags) else torch.tensor(flags, device=self.logits.device))

    def _leave(self, gone: list[int]) -> None:
        for j in gone:
            r = self.live[j]
            kv = row_kv(self.state, j, r.row.capture_from) if r.row.capture_from is not None else None
            text = r.detok.text[: r.stop_text.cut] if r.detok is not None else None
            self.results[r.row.key] = Result(tuple(r.tokens), r.finish or "removed", kv, text)
        self._keep([j for j in range(len(self.live)) if j not in set(gone)])

    def _keep(self, kept: list[int]) -> None:
        if len(kept) == len(self.live):
            return
        self.live = [self.live[j] for j in kept]
        if kept:
            index = torch.tensor(kept, device=self.state.key_pos.device)
            self.state.select_(index)
            self.state.trim_()
            self.logits = self.logits.index_select(0, index)

    def remove(self, keys: Sequence[Hashable]) -> None:
        """Drop rows now (a client went away): they leave with what they have, finish "removed"."""
        gone = set(keys)
        self._leave([j for j, r in enumerate(self.live) if r.row.key in gone])

    def pause(self, key: Hashable) -> None:
        """Stop sampling row `key` after its current token (which is still fed, so its K/V exist). A row whose
        last event ended it on a stop token may be paused too, before the next forward: it stays in the batch
        (an agent's turn that called a tool), and its token budget goes on counting."""
        r = self._find(key)
        reopen = r.status == "finished" and r.finish == "stop" and r.feed and r.feed[-1] in self.stops
        if r.status != "running" and not reopen:
            raise ValueError(f"row {key!r} is {r.status}, not running")
        r.status, r.finish = "paused", None

    def extend(self, key: Hashable, ids: Sequence[int]) -> None:
        """Append `ids` (e.g. a tool's output) to paused row `key`: they run at the next forward, after
        which the row samples again from the last of them."""
        r = self._find(key)
        if r.status != "paused" or not ids:
            raise ValueError(f"only a paused row takes new tokens (row {key!r} is {r.status}, {len(ids)} tokens)")
        r.feed = r.feed + list(ids)
        r.status = "running"

    def add(self, *others: Batch) -> None:
        """Take the rows of `others` (each prefilled on its own: other requests) into this batch, in one
        stack of the states."""
        keys = self.keys + [k for o in others for k in o.keys]
        if any(o.lm is not self.lm or o.adapter is not self.adapter for o in others) or len(set(keys)) != len(keys):
            raise ValueError("can only join rows of the same model and adapter, with new keys")
        self.state = stack([self.state, *(o.state for o in others)])
        self.logits = torch.cat([self.logits, *(o.logits for o in others)])
        for o in others:
            self.live += o.live
            o.live = []

    def _find(self, key: Hashable) -> _Live:
        for r in self.live:
            if r.row.key == key:
                return r
        raise KeyError(f"no row {key!r} in the batch")


def decode(lm: LM, state: State, logits: torch.Tensor, rows: Sequence[Row], *, adapter=None) -> list[Result]:
    """Decode `rows` to the end over `state` (consumed); their results in row order."""
    batch = Batch(lm, state, logits, rows, adapter=adapter)
    for _ in batch.steps():
        pass
    return [batch.results[r.key] for r in rows]
