"""What the engine runs for each kind of request, as jobs (see engine.py): each prefills on the engine
thread, yields its rows and builds its answer from their results. Nothing here touches HTTP."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..auto import Gate, decide
from ..chat import DEFAULT_INSTRUCTION, ChatFormat
from ..decode import Result, Row
from ..forward import prefill_rows, row_kv
from ..model import LM
from ..sampling import SamplingParams, row_seed
from ..synthesis import Synthesis, prepare, settings, synthesis_of
from ..workers import Branch, Fork, Forking, answer_text, encode_texts, from_texts
from .engine import Finished, Job, Part, Phase

Emit = Callable[[tuple], None]  # a job's own events, e.g. ("fork", fork) once its workers are done


@dataclass(frozen=True)
class Choice:
    text: str
    tokens: int
    finish: str


def chat(lm: LM, messages: list[dict], sampling: SamplingParams, n: int = 1) -> Job:
    """A plain chat completion: the prompt prefilled once, `n` rows sharing its K/V (row i seeded
    row_seed(seed, i)). Returns (prompt tokens, [Choice])."""
    ids = list(ChatFormat(lm.tokenizer).chat_ids(messages))
    lm.check_positions(len(ids) + sampling.max_new_tokens, "the prompt plus max_tokens")
    lm.check_memory(n, len(ids) + sampling.max_new_tokens)
    state, logits = prefill_rows(lm, [ids])
    if n > 1:
        state = state.pick(torch.zeros(n, dtype=torch.long, device=lm.device))
        logits = logits.expand(n, -1).contiguous()
    rows = [Row(i, dataclasses.replace(sampling, seed=row_seed(sampling.seed, i)), text=True) for i in range(n)]
    done = yield Phase([Part(state, logits, rows)])
    return len(ids), [_choice(lm, done.results[i]) for i in range(n)]


def _choice(lm: LM, result: Result) -> Choice:
    return Choice(answer_text(lm, result), len(result.tokens), "stop" if result.finish == "stop" else "length")


def workers(lm: LM, question: str, *, system: str | None, roles: Sequence[str | None], sampling: SamplingParams,
            emit: Emit, executor=None) -> Job:
    """Workers on `question` as rows of the engine's batch (keys ("worker", i)), or, with an `executor`
    (`parsyn.dist.RayExecutor`), on its actors while the engine decodes other requests; returns the Fork."""
    if executor is not None:
        plan = Forking.plan(lm, [question], roles=[list(roles)], system=system, sampling=sampling, rows_at_once=1)
        t0 = time.perf_counter()
        remote = executor.start(plan)
        yield Phase([], waits_on=remote)
        results = remote.results()
    else:
        plan = Forking.plan(lm, [question], roles=[list(roles)], system=system, sampling=sampling)
        state, logits, rows = plan.start()
        rows = [dataclasses.replace(r, key=("worker", r.key[1]), text=True) for r in rows]
        t0 = time.perf_counter()
        done = yield Phase([Part(state, logits, rows)])
        results = {(0, i): done.results["worker", i] for i in range(len(rows))}
    plan.decode_s = time.perf_counter() - t0
    fork = plan.forks(results)[0]
    emit(("fork", fork))
    return fork


def given(lm: LM, question: str, texts: Sequence[str], *, system: str | None, roles: Sequence[str | None]) -> Job:
    """A fork from ready branch texts (agents that ran elsewhere): prefilled, nothing decoded."""
    return from_texts(lm, question, list(texts), roles=list(roles) if any(roles) else (), system=system)
    yield  # a job that never decodes


def extend(lm: LM, fork: Fork, text: str, role: str | None) -> Job:
    """A new fork: `fork`'s branches and one more from a ready text, prefilled after the shared prefix."""
    _, (ids,) = encode_texts(lm, fork.question, [text], roles=[role], system=fork.system)
    lm.check_positions(len(fork.prefix_ids) + len(ids), "the prompt plus the branch text")
    state, _ = prefill_rows(lm, [ids], fork.prefix)
    branch = Branch(tuple(ids), text.strip(), row_kv(state, 0, fork.prefix.length), role)
    return dataclasses.replace(fork, branches=(*fork.branches, branch))
    yield  # a job that never decodes


def synthesize(lm: LM, fork: Fork, routes: Sequence[str], *, sampling: SamplingParams, layout: str | None = None,
               instruction: str = DEFAULT_INSTRUCTION, synthesizer=None, gate: Gate | None = None) -> Job:
    """Every route in `routes` on `fork`, racing: each is prepared and starts decoding before the next is
    prepared (the cache route first: its prefill is short). Each TTFT counts from the synthesis' start.
    Returns {route: Synthesis}. Routes ["auto"]: the route `gate` picks (see `gated`)."""
    if list(routes) == ["auto"]:
        return (yield from gated(lm, fork, gate, sampling=sampling, instruction=instruction, synthesizer=synthesizer))
    t0 = time.perf_counter()
    ready = {}
    for route in sorted(routes, key=lambda r: r != "cache"):
        trained = synthesizer if route == "cache" else None
        ready[route] = prepare(lm, fork, route=route, layout=layout, instruction=instruction, synthesizer=trained,
                               max_new_tokens=sampling.max_new_tokens)
        yield Phase([Part(ready[route].state, ready[route].logits, [Row(route, sampling, text=True)],
                          adapted=trained is not None)], wait=False)
    done: Finished = yield Phase([])
    used = settings(synthesizer, layout, None)[0]
    return {route: synthesis_of(lm, ready[route], done.results[route], layout=used if route == "cache" else None,
                                ttft_s=done.first[route] - t0, total_s=done.last[route] - t0) for route in routes}


def gated(lm: LM, fork: Fork, gate: Gate, *, sampling: SamplingParams, instruction: str, synthesizer) -> Job:
    """Route "auto": the gate's prefills run here on the engine thread, then the route it chose decodes as
    the row "auto" (adapted unless it chose text). Returns {"auto": Synthesis}, the decision in its `gate`."""
    t0 = time.perf_counter()
    ready, layout, decision = decide(lm, fork, gate, synthesizer=synthesizer, instruction=instruction,
                                     max_new_tokens=sampling.max_new_tokens)
    adapted = layout is not None and synthesizer is not None
    done: Finished = yield Phase([Part(ready.state, ready.logits, [Row("auto", sampling, text=True)], adapted=adapted)])
    s = synthesis_of(lm, ready, done.results["auto"], layout=layout, ttft_s=done.first["auto"] - t0,
                     total_s=done.last["auto"] - t0)
    return {"auto": dataclasses.replace(s, gate=decision)}


def workflow(lm: LM, question: str, *, system: str | None, roles: Sequence[str | None], worker_sampling: SamplingParams,
             routes: Sequence[str], sampling: SamplingParams, layout: str | None, instruction: str, synthesizer,
             emit: Emit, executor=None, gate: Gate | None = None) -> Job:
    """Workers (here, or on `executor`'s actors), then the synthesis of their branches; returns (Fork,
    {route: Synthesis})."""
    fork = yield from workers(lm, question, system=system, roles=roles, sampling=worker_sampling, emit=emit,
                              executor=executor)
    answers: dict[str, Synthesis] = yield from synthesize(lm, fork, routes, sampling=sampling, layout=layout,
                                                          instruction=instruction, synthesizer=synthesizer,
                                                          gate=gate)
    return fork, answers
