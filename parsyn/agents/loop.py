"""Agent workers: rows of one decode batch that call tools over several turns.

A worker decodes until its turn ends. If the turn holds tool calls (`<tool_call>{"name", "arguments"}
</tool_call>`, the tags Qwen2.5's template teaches; `chat.TOOL_PROTOCOL` for templates without tools), the
row pauses (its end-of-turn token is still fed, so its K/V exist), the calls run on a thread pool, and
their results, rendered as the template's tool turn plus the next assistant header, are appended to that
row: they run at the next forward over the row's own cache, nothing before them is recomputed. Other
rows keep decoding meanwhile. A turn without calls is the worker's answer. A turn that is nothing but a bare call object
(`{"name": ..., "arguments": ...}`, what small models often write instead of the tags) counts as a call.

Limits end every loop: `max_turns` tool turns and the token budget (`sampling.max_new_tokens`, over all
turns). A call past the turn limit is not run: the agent is told so and given one last turn to answer
without tools; the trajectory says why it stopped. A call that repeats one the agent made before gets the
same result back. Tool results end with `ANSWER_HINT` in the agent's context (by default every time; the
trajectory records the results without it). A malformed call, an unknown tool, bad
arguments, a raising or hanging tool all come back to the agent as `error: ...` results (`Tool.call`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial

import torch

from ..chat import ChatFormat
from ..decode import Batch
from ..kv import KV, cat
from ..model import LM
from ..rope import rope_of
from ..sampling import SamplingParams
from ..tools import Toolbox, ToolResult
from ..workers import Branch, Fork, Forking

AGENT_SAMPLING = SamplingParams(max_new_tokens=256, temperature=0.0)
HANDOVERS = ("final", "trajectory")
HINTS = ("always", "last", "never")
# The synthesizer reads branches made over a prefix that offers tools; it answers from them, or (given the
# tools, `Conversation(..., tools=...)`) may check what they say with a call of its own first.
AGENT_INSTRUCTION = "Using the answers above, answer the question in words, without calling a tool: {question}"
TOOL_INSTRUCTION = ("Using the answers above, answer the question in words; where they disagree or miss "
                    "something, you may call a tool first: {question}")
# Follows tool results (see `run_agents`' hint): without it, small models (Qwen2.5-Coder-0.5B) go on calling
# tools on a result instead of answering; softer wordings ("if it answers the question...") did not stop them.
ANSWER_HINT = "\n(This is the tool's result. Now answer the question in words; do not call a tool again.)"

_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)
_FENCE = re.compile(r"^\s*```(?:json)?|```\s*$")


@dataclass(frozen=True)
class Call:
    """One tool call as the agent wrote it: `name` and `arguments`, or `error` when it could not be read."""

    name: str
    arguments: dict | str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Turn:
    """One assistant turn: its text (tool-call tags included), the calls in it and their results."""

    text: str
    calls: tuple[Call, ...] = ()
    results: tuple[ToolResult, ...] = ()


@dataclass(frozen=True, eq=False)
class Trajectory:
    role: str | None
    turns: tuple[Turn, ...]
    stopped: str        # "answer"; "max_turns" (it called past the turn limit, and was given a last turn to
                        # answer without tools); "length" (the token budget ran out)
    generated: int      # tokens the agent sampled, all turns
    tool_s: float       # seconds its tools ran

    @property
    def answer(self) -> str:
        """The last turn's text without tool calls; where the agent never answered in words (its last turn
        is a call), the last result a tool gave it, else ""."""
        last = self.turns[-1] if self.turns else None
        words = "" if last is None else _CALL.sub("", last.text).strip()
        if words and not (last.calls and not _CALL.search(last.text)) and not words.startswith("{"):
            return words
        found = [r.text for t in self.turns for r in t.results if r.ok and not r.text.startswith("error:")]
        return found[-1] if found else ""

    @property
    def calls(self) -> int:
        return sum(len(t.calls) for t in self.turns)


@dataclass(frozen=True, eq=False)
class AgentRun:
    """The fork the synthesizer reads (its branches per `handover`) and every worker's trajectory;
    `forks` holds the fork of each handover, both made of the same trajectories."""

    forks: dict[str, Fork]
    trajectories: tuple[Trajectory, ...]
    handover: str

    @property
    def fork(self) -> Fork:
        return self.forks[self.handover]


def parse_calls(text: str) -> list[Call]:
    """The tool calls in an assistant turn's text, in order; unreadable ones carry an `error` for the agent."""
    calls = []
    bodies = _CALL.findall(text)
    if not bodies:  # small models often drop the tags: a turn that is nothing but a call object is one too
        bare = _FENCE.sub("", text).strip()
        try:
            obj = json.loads(bare) if bare.startswith("{") else None
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str) and "arguments" in obj:
            bodies = [bare]
    for body in bodies:
        body = body.strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(Call("", error=f"error: the tool call is not valid JSON ({e.msg} at character {e.pos}); "
                                        'write <tool_call>{"name": ..., "arguments": {...}}</tool_call>'))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(Call("", error='error: a tool call is a JSON object with a "name" and "arguments"'))
            continue
        arguments = obj.get("arguments", obj.get("parameters"))
        if arguments is not None and not isinstance(arguments, (dict, str)):
            calls.append(Call(obj["name"], error='error: "arguments" must be a JSON object'))
            continue
        calls.append(Call(obj["name"], arguments))
    return calls


@dataclass(eq=False)
class _Agent:
    role: str | None
    opening: tuple[int, ...]
    tools: Toolbox
    ids: list[int] = field(default_factory=list)   # every token after the opening: turns and tool turns
    turn_at: int = 0                                # where the current turn starts in `ids`
    text: str = ""
    calls: list[Call] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    generated: int = 0
    tool_s: float = 0.0
    stopped: str = "answer"
    seen: dict[str, str] = field(default_factory=dict)  # a call's JSON -> its result text
    hint: bool = False                              # its next tool turn ends with ANSWER_HINT
    tool_runs: list[tuple[int, int]] = field(default_factory=list)  # (offset in ids, length) of tool turns


def run_agents(
    lm: LM,
    question: str,
    tools: Toolbox | Sequence[Toolbox],
    *,
    workers: int = 3,
    roles: Sequence[str] = (),
    system: str | None = None,
    sampling: SamplingParams = AGENT_SAMPLING,
    max_turns: int = 4,
    handover: str = "final",
    hint: str = "always",
    on_turn: Callable[[int, Turn], None] | None = None,
) -> AgentRun:
    """Run `workers` agents on `question` with `tools`, as one batch over a shared prefix (the system
    prompt offers the tools). handover: "final" (a branch is the worker's opening and final turn, its K/V
    re-rotated to follow the opening) or "trajectory" (every turn and tool result, K/V as computed).
    hint: where tool results end with ANSWER_HINT: "always", "last" (the last allowed tool turn and repeated
    calls) or "never".
    on_turn(worker, turn) reports each finished turn (tool results included). `tools` may be one toolbox
    per worker (e.g. search over different shards): their schemas must be the same, as the shared prefix
    offers them to all."""
    boxes = _checked(tools, workers, handover, hint, max_turns)
    fmt = ChatFormat(lm.tokenizer, tuple(boxes[0].schemas()))
    plan = Forking.plan(lm, [question], workers=workers, roles=roles, system=system, sampling=sampling, fmt=fmt)
    state, logits, rows = plan.start()
    agents = {r.key: _Agent(plan.roles[0][i], plan.openings[0][i], boxes[i]) for i, r in enumerate(rows)}
    batch = Batch(lm, state, logits, rows)
    t0 = time.perf_counter()
    _drive(lm, batch, agents, fmt, question, system, max_turns, sampling.max_new_tokens, hint, on_turn)
    decode_s = time.perf_counter() - t0
    keys = [r.key for r in rows]
    trajectories = tuple(Trajectory(agents[k].role, tuple(agents[k].turns), agents[k].stopped, agents[k].generated,
                                    agents[k].tool_s) for k in keys)
    rope = rope_of(lm.model)
    forks = {h: Fork(question, system, plan.prefixes[0], plan.prefix_kv[0],
                     tuple(_branch(agents[k], batch.results[k].kv, h, rope, t.answer)
                           for k, t in zip(keys, trajectories)), plan.prefill_s, decode_s) for h in HANDOVERS}
    return AgentRun(forks, trajectories, handover)


def _drive(lm: LM, batch: Batch, agents: dict, fmt: ChatFormat, question: str, system: str | None, max_turns: int,
           budget: int, hint: str, on_turn) -> None:
    """Decode the agents' rows to the end: a turn with calls pauses its row while a pool thread runs them,
    their results extend it; the other rows go on meanwhile (the loop waits only when none can)."""
    pending: dict[Future, tuple] = {}
    with ThreadPoolExecutor(max_workers=len(agents), thread_name_prefix="parsyn-tool") as pool:
        try:
            while batch.live:
                for e in batch.sample_():
                    a = agents[e.key]
                    a.ids.append(e.id)
                    a.generated += 1
                    if e.finish is not None:
                        job = _end_turn(lm, a, e, max_turns, budget, hint, on_turn)
                        if job is not None:
                            batch.pause(e.key)
                            pending[pool.submit(job)] = e.key
                idle = not any(r.status == "running" or r.feed for r in batch.live)
                if pending:
                    done, _ = wait(pending, timeout=None if idle else 0, return_when=FIRST_COMPLETED)
                    for future in done:
                        key = pending.pop(future)
                        ids = _tool_turn(fmt, agents[key], future.result(), question, system, on_turn, key)
                        batch.extend(key, ids)
                batch.advance_()
        finally:
            for future in pending:
                future.cancel()


def _checked(tools, workers: int, handover: str, hint: str, max_turns: int) -> list[Toolbox]:
    """The settings of `run_agents` checked; one toolbox per worker."""
    if handover not in HANDOVERS:
        raise ValueError(f"unknown handover {handover!r}; choose one of {', '.join(HANDOVERS)}")
    if hint not in HINTS:
        raise ValueError(f"unknown hint {hint!r}; choose one of {', '.join(HINTS)}")
    if max_turns < 0:
        raise ValueError(f"max_turns must be >= 0, got {max_turns}")
    boxes = [tools] * workers if isinstance(tools, Toolbox) else list(tools)
    if len(boxes) != workers or any(b.schemas() != boxes[0].schemas() for b in boxes):
        raise ValueError(f"give one toolbox, or one per worker ({workers}) whose tools have the same names, "
                         "descriptions and parameters (the shared prefix offers them to every worker)")
    return boxes


def _end_turn(lm: LM, a: _Agent, e, max_turns: int, budget: int, hint: str,
              on_turn) -> Callable | None:
    """Close the turn a row just finished. Returns the job that gives its tool results (run it, then
    extend the row), or None when the agent is done. An agent past its turn limit gets one last turn,
    told to answer without tools; past that, or out of tokens, its calls are not run."""
    a.text = turn_text(lm, a.ids[a.turn_at :])
    calls = parse_calls(a.text) if e.finish == "stop" else []
    if not calls:
        _close(a, on_turn, e.key)
        return None
    a.calls = calls
    if a.stopped == "answer" and len(a.turns) < max_turns and a.generated < budget - 1:
        a.hint = (hint == "always" or len(a.turns) + 1 >= max_turns
                  or any(call_key(c) in a.seen for c in calls)) and hint != "never"
        return partial(run_calls, a.tools, calls, dict(a.seen))
    if a.stopped == "answer" and a.generated < budget - 1:
        a.stopped = "max_turns"
        refusal = (f"error: not run: the agent reached its limit of {max_turns} tool turns; "
                   "answer now from what you have, without calling a tool")
        return partial(_refuse, calls, refusal)
    a.stopped = "length" if a.generated >= budget - 1 else a.stopped
    limit = f"its budget of {budget} tokens" if a.stopped == "length" else f"its limit of {max_turns} tool turns"
    _close(a, on_turn, e.key, calls, _refuse(calls, f"error: not run: the agent reached {limit}")[0])
    return None


def _tool_turn(fmt: ChatFormat, a: _Agent, outcome, question, system, on_turn, key) -> list[int]:
    """Record a finished tool run on its agent; the ids of the tool turn to append to its row."""
    results, seconds = outcome
    a.tool_s += seconds
    for c, r in zip(a.calls, results):
        a.seen.setdefault(call_key(c), r.text)
    _close(a, on_turn, key, a.calls, results)
    texts = [r.text for r in results]
    if a.hint:
        texts[-1] += ANSWER_HINT
    ids = fmt.ids(fmt.tool_results(question, system, texts))
    a.tool_runs.append((len(a.ids), len(ids)))
    a.ids += ids
    a.turn_at = len(a.ids)
    return ids


def run_calls(tools: Toolbox, calls: list[Call], seen: dict[str, str]) -> tuple[tuple[ToolResult, ...], float]:
    """Run the calls in order; one that repeats an earlier call of this agent gets that result again."""
    t0 = time.perf_counter()
    results = []
    for c in calls:
        if c.error:
            results.append(ToolResult(c.error, False, 0.0))
        elif call_key(c) in seen:
            results.append(ToolResult(seen[call_key(c)], True, 0.0))
        else:
            results.append(tools.call(c.name, c.arguments))
    return tuple(results), time.perf_counter() - t0


def _refuse(calls: list[Call], text: str) -> tuple[tuple[ToolResult, ...], float]:
    return tuple(ToolResult(text, False, 0.0) for _ in calls), 0.0


def call_key(c: Call) -> str:
    return json.dumps([c.name, c.arguments], sort_keys=True, ensure_ascii=False)


def turn_text(lm: LM, ids: Sequence[int]) -> str:
    """A turn's text with the tool-call tags (added tokens that skip_special_tokens would drop), without
    its end-of-turn token."""
    stops = set(lm.stop_ids)
    return lm.tokenizer.decode([i for i in ids if i not in stops], skip_special_tokens=False)


def _close(a: _Agent, on_turn, key, calls=(), results=()) -> None:
    turn = Turn(a.text, tuple(calls), tuple(results))
    a.turns.append(turn)
    a.text, a.calls = "", []
    if on_turn is not None:
        on_turn(key[1], turn)


def _branch(a: _Agent, kv: KV, handover: str, rope, answer: str) -> Branch:
    """The worker's branch: K/V of [opening, every turn] (trajectory) or [opening, final turn] (final)."""
    ids = tuple(a.opening) + tuple(a.ids)
    if handover == "trajectory" or a.turn_at == 0:
        runs = tuple((len(a.opening) + at, n) for at, n in a.tool_runs)
        return Branch(ids, answer, kv, a.role, a.generated, runs)
    o, final = len(a.opening), len(a.opening) + a.turn_at
    head = kv.take(slice(0, o))
    tail = kv.take(slice(final, kv.length))
    at = head.positions[-1] + 1 + torch.arange(tail.length, device=tail.positions.device)
    tail = tail.with_keys(rope.rerotate(tail.keys, tail.positions, at), at)
    return Branch(tuple(a.opening) + tuple(a.ids[a.turn_at :]), answer, cat([head, tail]), a.role, a.generated)
