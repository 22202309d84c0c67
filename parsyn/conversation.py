"""Synthesis over several turns: follow-up questions over one composed fork, each turn's tokens run over
the same synthesizer state.

    chat = Conversation(lm, fork, route="cache", synthesizer=trained)
    first = chat.ask()                        # the synthesis: the instruction over the branches
    more = chat.ask("And which is cheaper?")  # only the follow-up's tokens are prefilled

The route's context (the composed cache, or the text prompt) is built once, at the first turn; a turn
appends its answer and the next user turn to that state, so a follow-up costs the prefill of its own
tokens. The fork is not modified. Unlike a cache extended in place by a caller, nothing is read twice:
turn k sees the context, every earlier turn and its own tokens at consecutive positions.
"""

from __future__ import annotations

import time
from dataclasses import replace

from .chat import DEFAULT_INSTRUCTION, ChatFormat
from .decode import Batch, Row
from .model import LM
from .synthesis import SYNTH_SAMPLING, Synthesis, prepare, settings, top_logprobs
from .workers import Fork

_KEY = "answer"


class Conversation:
    """Turns of one synthesis over `fork`; `route` takes `synthesize`'s keyword arguments (route, layout,
    synthesizer, options)."""

    def __init__(self, lm: LM, fork: Fork, *, instruction: str = DEFAULT_INSTRUCTION,
                 sampling=SYNTH_SAMPLING, **route):
        if sampling.stop:
            raise ValueError("a conversation ends its turns on the end-of-turn token; stop strings are not supported")
        self.lm, self.fork, self.instruction, self.sampling, self.route = lm, fork, instruction, sampling, route
        self.fmt = ChatFormat(lm.tokenizer)
        self.turns: list[Synthesis] = []
        self._batch: Batch | None = None
        self._closed = True  # the last turn ended on its end-of-turn token

    def ask(self, follow_up: str | None = None, *, sampling=None) -> Synthesis:
        """The next turn: the synthesis itself first (no text), then follow-ups. Returns the turn's answer;
        its `prefill_tokens` are the tokens this turn ran before its first sampled token."""
        sampling = sampling or self.sampling
        t0 = time.perf_counter()
        if self._batch is None:
            if follow_up is not None:
                raise ValueError("the first turn is the synthesis itself: call ask() without a follow-up first")
            prefill = self._start(sampling)
        else:
            if not follow_up or not follow_up.strip():
                raise ValueError("a follow-up needs a question")
            ids = self.fmt.ids(self.fmt.follow_up(self.fork.question, self.fork.system, follow_up))
            prefill = self._extend(ids, sampling.max_new_tokens)
        tokens, first, done = [], None, False
        while not done:
            (e,) = self._batch.sample_()
            first = first or time.perf_counter()
            tokens.append(e.id)
            done = e.finish is not None or len(tokens) >= sampling.max_new_tokens
            if done:
                self._closed = e.finish == "stop"
                self._batch.pause(_KEY)  # its last token still runs: the next turn follows it
            self._batch.advance_()
        stops = set(self.lm.stop_ids)
        answer = self.lm.tokenizer.decode([t for t in tokens if t not in stops], skip_special_tokens=True).strip()
        turn = Synthesis(self.route.get("route", "cache"), self._layout, answer, tuple(tokens), first - t0,
                         time.perf_counter() - t0, prefill, self._spans if not self.turns else (),
                         top_logprobs(self._first_logits, 5))
        self.turns.append(turn)
        return turn

    def _start(self, sampling) -> int:
        limit = self.lm.config.max_position_embeddings  # the row's budget is the conversation's; turns are cut here
        ready = prepare(self.lm, self.fork, instruction=self.instruction, max_new_tokens=sampling.max_new_tokens,
                        **self.route)
        cache = self.route.get("route", "cache") == "cache"
        trained = self.route.get("synthesizer") if cache else None
        self._layout = settings(trained, self.route.get("layout"), self.route.get("options"))[0] if cache else None
        self._spans, self._first_logits = ready.spans, ready.logits[0]
        row = Row(_KEY, replace(sampling, max_new_tokens=limit), capture_from=0)
        self._batch = Batch(self.lm, ready.state, ready.logits, [row], adapter=trained)
        return ready.prefill_tokens

    def _extend(self, ids, answer_tokens: int) -> int:
        ids = ([] if self._closed else [self.lm.stop_ids[0]]) + list(ids)  # a turn cut by its budget is closed
        at = int(self._batch.state.next_pos.max())
        self.lm.check_positions(at + len(ids) + answer_tokens, "the conversation plus the next turn")
        self._batch.extend(_KEY, ids)
        self._batch.advance_()
        self._first_logits = self._batch.logits[0]
        return len(ids)
