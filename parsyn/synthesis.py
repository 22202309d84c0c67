"""The two synthesis routes over one decode loop.

`text`: the baseline agent frameworks use today. The synthesizer's prompt holds the prefix, every
branch's tokens and its own instruction, prefilled from scratch with full causal attention.
`cache`: the branches' K/V are composed into a new cache (re-rotated under a layout, optionally
mapped) and only the synthesizer's own instruction is prefilled.
Both decode with the same sampler, stopping rules and explicit positions, and both time from the call
to the first sampled token. Trained parts come in through the small `Trained` protocol, so inference
never depends on the trainer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch

from .chat import DEFAULT_INSTRUCTION, ChatFormat
from .compose import Composed, Mapper, Span, compose, mark_tools
from .compress import compress
from .decode import Batch, Result, Row, Token
from .forward import State, feed_, prefill_rows, stack
from .model import LM
from .rope import rope_of
from .sampling import SamplingParams
from .variants import CacheOptions, chosen, sharpened, split_span
from .workers import Fork, answer_text

ROUTES = ("text", "cache")
SYNTH_SAMPLING = SamplingParams(max_new_tokens=128, temperature=0.0)
FIRST_TOP = 16  # first-token alternatives a Synthesis reports (signals for choosing a route)


class Trained(Protocol):
    """What a trained synthesizer gives the cache route (`parsyn.adapter.Synthesizer` is one)."""

    mapper: Mapper | None

    @property
    def layout(self) -> str: ...        # the layout it was trained for: the default at synthesis

    @property
    def recompute(self) -> int: ...     # structural aid: first tokens of every branch recomputed

    def active(self, rows: torch.Tensor | None = None) -> AbstractContextManager: ...  # its LoRA applies inside


@dataclass(frozen=True, eq=False)
class Synthesis:
    route: str
    layout: str | None           # None for the text route
    answer: str
    token_ids: tuple[int, ...]   # the answer's tokens, stop token included when produced
    ttft_s: float                # call -> first sampled token, composition included
    total_s: float               # call -> last token
    prefill_tokens: int          # tokens run through the model before the first token
    provenance: tuple[Span, ...]
    first_top: tuple[tuple[int, float], ...] = ()  # the FIRST_TOP likeliest first tokens: (id, log-probability)
    gate: dict | None = None     # route "auto": the gate's decision (risk, signal, choice)


@dataclass(eq=False)
class Prepared:
    """A route run up to its first token: decode state, first-token logits [1, V] and bookkeeping."""

    state: State
    logits: torch.Tensor
    prefill_tokens: int
    spans: tuple[Span, ...]


@dataclass(eq=False)
class CacheInputs:
    """The cache route before its one prefill: the composed state, and the tokens still to run (tokens
    recomputed by the structural aid, then the synthesizer's prompt) at their positions."""

    state: State
    ids: list[int]
    positions: list[int]
    spans: tuple[Span, ...]


def prompt_tokens(lm: LM, fork: Fork, instruction: str = DEFAULT_INSTRUCTION) -> list[int]:
    """The synthesizer's own prompt after the last branch."""
    return list(ChatFormat(lm.tokenizer).synthesis_ids(fork.question, fork.system, instruction))


def text_row(prefix_ids: Sequence[int], branch_ids: Sequence[Sequence[int]], prompt_ids: Sequence[int]) -> list[int]:
    """The text route's whole prompt: prefix, every branch's tokens, then the synthesizer's prompt."""
    return list(prefix_ids) + [t for b in branch_ids for t in b] + list(prompt_ids)


def settings(trained: Trained | None, layout: str | None, options: CacheOptions | None) -> tuple[str, CacheOptions]:
    """The layout and options a cache route runs with: explicit ones, else the synthesizer's, else defaults."""
    if trained is None:
        return layout or "parallel", options or CacheOptions()
    return layout or trained.layout, options or CacheOptions(recompute=trained.recompute)


def adapter(route: str, trained: Trained | None) -> AbstractContextManager:
    """The context a route's forwards run in: the trained LoRA for the cache route, nothing for text."""
    return trained.active() if route == "cache" and trained is not None else nullcontext()


def prepare(
    lm: LM,
    fork: Fork,
    *,
    route: str = "cache",
    layout: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    synthesizer: Trained | None = None,
    options: CacheOptions | None = None,
    max_new_tokens: int = 0,
) -> Prepared:
    """Build the route's context and prefill the synthesizer's prompt; `fork` is not modified."""
    if route not in ROUTES:
        raise ValueError(f"unknown route '{route}' (choose from {', '.join(ROUTES)})")
    prompt_ids = prompt_tokens(lm, fork, instruction)
    with torch.inference_mode():
        if route == "text":
            ids = text_row(fork.prefix_ids, [b.token_ids for b in fork.branches], prompt_ids)
            lm.check_positions(len(ids) + max_new_tokens, "the text synthesis prompt plus the answer")
            state, logits = prefill_rows(lm, [ids])
            return Prepared(state, logits, len(ids), _marked(fork, _text_spans(fork, prompt_ids)))
        layout, options = settings(synthesizer, layout, options)
        inputs = cache_inputs(lm, fork, prompt_ids, layout=layout, mapper=synthesizer.mapper if synthesizer else None,
                              options=options)
        lm.check_positions(inputs.positions[-1] + 1 + max_new_tokens,
                           f"the composed {layout} cache plus the prompt and the answer")
        with adapter(route, synthesizer):
            state, logits = run_cache(lm, [inputs])
        return Prepared(state, logits, len(inputs.ids), _marked(fork, inputs.spans))


def _marked(fork: Fork, spans: tuple[Span, ...]) -> tuple[Span, ...]:
    return mark_tools(spans, [b.tools for b in fork.branches]) if any(b.tools for b in fork.branches) else spans


def stream(lm: LM, fork: Fork, *, sampling: SamplingParams = SYNTH_SAMPLING, **route) -> Iterator[Token]:
    """The synthesized answer as it decodes: one `Token` per sampled token, its `text` the new piece of the
    answer (an incremental detokenizer; text that may begin a stop string waits). `route` takes the
    keyword arguments of `synthesize` (route, layout, instruction, synthesizer, options)."""
    batch = _start(lm, fork, sampling, route, text=True)[1]
    for events in batch.steps():
        yield from events


def _start(lm: LM, fork: Fork, sampling: SamplingParams, route: dict, *, text: bool = False) -> tuple[Prepared, Batch]:
    """A route prepared up to its first token, as a one-row batch ready to decode."""
    ready = prepare(lm, fork, max_new_tokens=sampling.max_new_tokens, **route)
    trained = route.get("synthesizer") if route.get("route", "cache") == "cache" else None
    return ready, Batch(lm, ready.state, ready.logits, [Row("answer", sampling, text=text)], adapter=trained)


def synthesize(
    lm: LM,
    fork: Fork,
    *,
    route: str = "cache",
    layout: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    sampling: SamplingParams = SYNTH_SAMPLING,
    synthesizer: Trained | None = None,
    options: CacheOptions | None = None,
    on_token=None,
) -> Synthesis:
    """Synthesize one answer from the fork's branches by `route` (text or cache).

    The cache route uses `layout` (default: the synthesizer's, else parallel) and, when given, the trained
    `synthesizer` (its LoRA applies only to the synthesizer's forwards, its mapper calibrates branches,
    its aid recomputes the first tokens of every branch) and `options` (training-free variants; default:
    the synthesizer's aid). The text route always runs the base model. on_token(id) reports each token."""
    t0 = time.perf_counter()
    ready = prepare(lm, fork, route=route, layout=layout, instruction=instruction, synthesizer=synthesizer,
                    options=options, max_new_tokens=sampling.max_new_tokens)
    used = settings(synthesizer, layout, options)[0] if route == "cache" else None
    return finish(lm, ready, sampling, t0, layout=used, synthesizer=synthesizer, on_token=on_token)


def finish(lm: LM, ready: Prepared, sampling: SamplingParams, t0: float, *, layout: str | None,
           synthesizer: Trained | None = None, on_token=None) -> Synthesis:
    """Decode a prepared route to its end; times count from `t0`. `layout` None means the text route
    (which never runs the adapter)."""
    trained = synthesizer if layout is not None else None
    batch = Batch(lm, ready.state, ready.logits, [Row("answer", sampling)], adapter=trained)
    first = None
    for events in batch.steps():
        if first is None:
            first = time.perf_counter()  # the token is on the host: a GPU has finished computing it
        if on_token is not None:
            for e in events:
                on_token(e.id)
    return synthesis_of(lm, ready, batch.results["answer"], layout=layout, ttft_s=first - t0,
                        total_s=time.perf_counter() - t0)


def synthesis_of(lm: LM, ready: Prepared, result: Result, *, layout: str | None, ttft_s: float,
                 total_s: float) -> Synthesis:
    """The Synthesis of a prepared route whose row decoded to `result` (wherever it decoded)."""
    return Synthesis("text" if layout is None else "cache", layout, answer_text(lm, result), result.tokens,
                     ttft_s, total_s, ready.prefill_tokens, ready.spans, top_logprobs(ready.logits[0], FIRST_TOP))


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    """The k likeliest tokens of one distribution's logits [V] as (id, log-probability), likeliest first."""
    values, ids = torch.log_softmax(logits.float(), dim=-1).topk(k)
    return tuple(zip(ids.tolist(), values.tolist()))


def _text_spans(fork: Fork, prompt_ids: Sequence[int]) -> tuple[Span, ...]:
    spans, at = [Span("prefix", 0, 0, len(fork.prefix_ids), "recomputed")], len(fork.prefix_ids)
    for i, b in enumerate(fork.branches):
        spans.append(Span("branch", i + 1, at, len(b.token_ids), "recomputed"))
        at += len(b.token_ids)
    return (*spans, Span("prompt", 0, at, len(prompt_ids), "recomputed"))


def cache_inputs(
    lm: LM, fork: Fork, prompt_ids: Sequence[int], *, layout: str, mapper: Mapper | None = None,
    options: CacheOptions | None = None,
) -> CacheInputs:
    """Compose the branches under `layout` (mapped when a mapper is given) into a new decode state, and
    list the tokens still to run: the branch tokens chosen for recomputation, then the prompt.

    Composition reads the base model's branch caches (no adapter runs here); recomputed tokens see the
    prefix and every branch token at an earlier or equal position, and their old entries are masked out."""
    options = options or CacheOptions()
    fork = compress(lm, fork, options.compression, list(prompt_ids))  # a new fork (this one when nothing is)
    rope = rope_of(lm.model)
    if options.temperature != 1.0:
        mapper = sharpened(mapper, options.temperature)
    composed = compose(fork.prefix, [b.kv for b in fork.branches], rope, layout=layout, mapper=mapper)
    offsets = chosen(lm, fork.prefix_ids, [b.token_ids for b in fork.branches], composed, rope, options)
    key_pos = composed.positions.to(lm.device)[None].clone()
    bias = None
    if options.branch_bias:
        bias = torch.full_like(key_pos, options.branch_bias, dtype=torch.float32)
        bias[:, : fork.prefix.length] = 0
    ids, positions, spans = [], [], [composed.spans[0]]
    at = composed.segments[0].length
    for branch, segment, span, picked in zip(fork.branches, composed.segments[1:], composed.spans[1:], offsets):
        for j in picked:
            key_pos[0, at + j] = -1
            ids.append(branch.token_ids[j])
            positions.append(int(segment.positions[j]))
        spans += split_span(span, picked)
        at += segment.length
    start = composed.next_position
    spans.append(Span("prompt", 0, start, len(prompt_ids), "recomputed"))
    return CacheInputs(State.over(composed.segments, key_pos, bias), ids + list(prompt_ids),
                       positions + list(range(start, start + len(prompt_ids))), tuple(spans))


def run_cache(lm: LM, inputs: Sequence[CacheInputs], extra: Sequence[Sequence[int]] = (), *,
              keep: int = 1) -> tuple[State, torch.Tensor]:
    """Run each composed context's remaining tokens, then its `extra` tokens (e.g. a teacher's answer),
    in one forward; several contexts are stacked as one batch (padded in front). The inputs' states are
    consumed. Returns the state decoding goes on over and the last `keep` columns' logits ([B, V], or
    [B, keep, V] with keep > 1)."""
    state = inputs[0].state if len(inputs) == 1 else stack([x.state for x in inputs])
    rows, positions = [], []
    for i, x in enumerate(inputs):
        more = list(extra[i]) if extra else []
        start = x.positions[-1] + 1
        rows.append(x.ids + more)
        positions.append(x.positions + list(range(start, start + len(more))))
    return state, feed_(lm, state, rows, positions, keep=keep)


def teacher_forced(lm: LM, fork: Fork, prompt_ids: Sequence[int], answer_ids: Sequence[int], *,
                   layout: str | None = None, synthesizer: Trained | None = None,
                   options: CacheOptions | None = None) -> torch.Tensor:
    """Cache-route logits [T, V] predicting each of the T tokens of `answer_ids` from the ones before it
    (teacher forcing): exactly the route `synthesize` runs, one forward, with gradients where enabled."""
    layout, options = settings(synthesizer, layout, options)
    inputs = cache_inputs(lm, fork, prompt_ids, layout=layout, mapper=synthesizer.mapper if synthesizer else None,
                          options=options)
    with adapter("cache", synthesizer):
        _, logits = run_cache(lm, [inputs], [list(answer_ids)[:-1]], keep=len(answer_ids))
    return logits[0] if logits.dim() == 3 else logits


def prefill_over(lm: LM, composed: Composed, prompt_ids: Sequence[int]) -> Prepared:
    """Prefill the synthesizer's prompt over an already composed cache (which is not modified).
    Alone, this is the floor of the cache route's time to first token."""
    state = State.over(composed.segments, composed.positions.to(lm.device)[None])
    start = composed.next_position
    logits = feed_(lm, state, [list(prompt_ids)], [list(range(start, start + len(prompt_ids)))])
    return Prepared(state, logits, len(prompt_ids),
                    (*composed.spans, Span("prompt", 0, start, len(prompt_ids), "recomputed")))
