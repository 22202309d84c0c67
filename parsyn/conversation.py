"""Synthesis over several turns: follow-up questions over one composed fork, each turn's tokens run over
the same synthesizer state.

    chat = Conversation(lm, fork, route="cache", synthesizer=trained)
    first = chat.ask()                        # the synthesis: the instruction over the branches
    more = chat.ask("And which is cheaper?")  # only the follow-up's tokens are prefilled

The route's context (the composed cache, or the text prompt) is built once, at the first turn; a turn
appends its answer and the next user turn to that state, so a follow-up costs the prefill of its own
tokens. The fork is not modified. Unlike a cache extended in place by a caller, nothing is read twice:
turn k sees the context, every earlier turn and its own tokens at consecutive positions.

With `tools` (those the fork's prefix offers, as `run_agents` forks it), the synthesizer may call them:
a turn whose text holds calls has them run, their results (and `ANSWER_HINT`) appended to the same state,
and the synthesizer goes on, up to `max_tool_turns` tool turns per `ask`; `tool_turns[-1]` holds the last
ask's calls and results, and its answer is the final turn's words.
"""

from __future__ import annotations

import time
from dataclasses import replace

from .agents.loop import ANSWER_HINT, Trajectory, Turn, call_key, parse_calls, run_calls, turn_text
from .chat import DEFAULT_INSTRUCTION, ChatFormat
from .decode import Batch, Row
from .model import LM
from .synthesis import SYNTH_SAMPLING, Synthesis, prepare, settings, top_logprobs
from .tools import Toolbox
from .workers import Fork

_KEY = "answer"


class Conversation:
    """Turns of one synthesis over `fork`; `route` takes `synthesize`'s keyword arguments (route, layout,
    synthesizer, options)."""

    def __init__(self, lm: LM, fork: Fork, *, instruction: str = DEFAULT_INSTRUCTION,
                 sampling=SYNTH_SAMPLING, tools: Toolbox | None = None, max_tool_turns: int = 2, **route):
        if sampling.stop:
            raise ValueError("a conversation ends its turns on the end-of-turn token; stop strings are not supported")
        if max_tool_turns < 0:
            raise ValueError(f"max_tool_turns must be >= 0, got {max_tool_turns}")
        self.lm, self.fork, self.instruction, self.sampling, self.route = lm, fork, instruction, sampling, route
        self.tools, self.max_tool_turns = tools, max_tool_turns
        self.fmt = ChatFormat(lm.tokenizer, tuple(tools.schemas()) if tools is not None else ())
        if tools is not None and self.fmt.prefix_ids(fork.question, fork.system) != fork.prefix_ids:
            raise ValueError("the synthesizer's tools must be the ones the fork's prefix offers "
                             "(fork it with run_agents and the same tools)")
        self.turns: list[Synthesis] = []
        self.tool_turns: list[tuple[Turn, ...]] = []  # per turn: the synthesizer's own calls and their results
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
        tokens, first, calls = [], None, []
        seen: dict[str, str] = {}
        while True:
            ids, finish, first = self._decode_turn(sampling.max_new_tokens - len(tokens), first)
            tokens += ids
            text = turn_text(self.lm, ids)
            found = parse_calls(text) if self.tools is not None and finish == "stop" else []
            room = len(calls) < self.max_tool_turns and len(tokens) < sampling.max_new_tokens - 1
            if not found or not room:
                calls.append(Turn(text, tuple(found)))
                break
            results, _ = run_calls(self.tools, found, seen)
            seen.update({call_key(c): r.text for c, r in zip(found, results)})
            calls.append(Turn(text, tuple(found), results))
            texts = [r.text for r in results[:-1]] + [results[-1].text + ANSWER_HINT]
            self._extend(self.fmt.ids(self.fmt.tool_results(self.fork.question, self.fork.system, texts)),
                         sampling.max_new_tokens - len(tokens))
        stops = set(self.lm.stop_ids)
        said = self.lm.tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True).strip()
        # with tools, the answer is an agent's (calls cut out; a turn that only calls answers with what the
        # tools gave); a turn with neither words nor a tool result answers with what it said
        answer = (Trajectory(None, tuple(calls), "answer", len(tokens), 0.0).answer if self.tools is not None
                  else "") or said
        turn = Synthesis(self.route.get("route", "cache"), self._layout, answer, tuple(tokens), first - t0,
                         time.perf_counter() - t0, prefill, self._spans if not self.turns else (),
                         top_logprobs(self._first_logits, 5))
        self.turns.append(turn)
        self.tool_turns.append(tuple(t for t in calls if t.calls))
        return turn

    def _decode_turn(self, budget: int, first: float | None) -> tuple[list[int], str | None, float]:
        """Sample one assistant turn (to its end-of-turn token or `budget` tokens); the row pauses after
        it, its last token still run, so what follows continues it. Returns its ids, why it ended and the
        time of the ask's first token."""
        ids, done = [], False
        while not done:
            (e,) = self._batch.sample_()
            first = first or time.perf_counter()
            ids.append(e.id)
            done = e.finish is not None or len(ids) >= budget
            if done:
                self._closed = e.finish == "stop"
                self._batch.pause(_KEY)
            self._batch.advance_()
        return ids, e.finish, first

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
