"""The two synthesis routes over one decode loop.

`text`: the baseline agent frameworks use today. The synthesizer's prompt holds the prefix, every
branch's tokens and its own instruction, prefilled from scratch with full causal attention.
`cache`: the branches' K/V are composed into a new cache (re-rotated under a layout, optionally
mapped) and only the synthesizer's own instruction is prefilled.
Both decode with the same sampler, stopping rules, batch size (one) and explicit positions, and both
time from the call to the first sampled token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .chat import DEFAULT_INSTRUCTION, ChatFormat
from .compose import Composed, Mapper, Span, compose
from .decode import SamplingParams, State, decode_, forward_
from .adapter import Synthesizer, lora_on
from .kv import KV, to_cache
from .model import LM
from .rope import rope_of
from .workers import Fork

ROUTES = ("text", "cache")
SYNTH_SAMPLING = SamplingParams(max_new_tokens=128, temperature=0.0)


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
    segments: tuple[KV, ...]  # the composed context the state's cache holds


def prepare(
    lm: LM,
    fork: Fork,
    *,
    route: str = "cache",
    layout: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    synthesizer: Synthesizer | None = None,
    recompute: int | None = None,
    max_new_tokens: int = 0,
) -> Prepared:
    """Build the route's context and prefill the synthesizer's prompt; `fork` is not modified."""
    if route not in ROUTES:
        raise ValueError(f"unknown route '{route}' (choose from {', '.join(ROUTES)})")
    prompt_ids = prompt_tokens(lm, fork, instruction)
    with torch.inference_mode():
        if route == "text":
            return _prepare_text(lm, fork, prompt_ids, max_new_tokens)
        layout, recompute = _cache_settings(synthesizer, layout, recompute)
        mapper = synthesizer.mapper if synthesizer else None
        inputs = cache_inputs(lm, fork, prompt_ids, layout=layout, mapper=mapper, recompute=recompute)
        last = inputs.positions[-1] + 1 + max_new_tokens
        lm.check_positions(last, f"the composed {layout} cache plus the prompt and the answer")
        with lora_on(lm, synthesizer):
            logits = _run(lm, inputs)
        return Prepared(inputs.state, logits, len(inputs.ids), inputs.spans)


def synthesize(
    lm: LM,
    fork: Fork,
    *,
    route: str = "cache",
    layout: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    sampling: SamplingParams = SYNTH_SAMPLING,
    synthesizer: Synthesizer | None = None,
    recompute: int | None = None,
    on_token=None,
) -> Synthesis:
    """Synthesize one answer from the fork's branches by `route` (text or cache).

    The cache route uses `layout` (default: the synthesizer's, else parallel) and, when given, the trained
    `synthesizer` (its LoRA is on only while it runs, its mapper calibrates branches, its aid recomputes
    the first `recompute` tokens of every branch). The text route always runs the base model."""
    t0 = time.perf_counter()
    ready = prepare(
        lm, fork, route=route, layout=layout, instruction=instruction, synthesizer=synthesizer,
        recompute=recompute, max_new_tokens=sampling.max_new_tokens,
    )
    report = None if on_token is None else (lambda _, t: on_token(t))
    with lora_on(lm, synthesizer if route == "cache" else None):
        out = decode_(lm, ready.state, ready.logits, sampling, on_token=report)
    tokens = out.tokens[0]
    answer = lm.tokenizer.decode(tokens[:-1] if out.stopped[0] else tokens, skip_special_tokens=True).strip()
    used = _cache_settings(synthesizer, layout, recompute)[0] if route == "cache" else None
    return Synthesis(
        route, used, answer, tokens, out.first_token_time - t0, time.perf_counter() - t0, ready.prefill_tokens,
        ready.spans,
    )


def prompt_tokens(lm: LM, fork: Fork, instruction: str = DEFAULT_INSTRUCTION) -> list[int]:
    prompt = ChatFormat(lm.tokenizer).synthesis(fork.question, fork.system, instruction)
    return lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]


def _cache_settings(synthesizer: Synthesizer | None, layout: str | None, recompute: int | None) -> tuple[str, int]:
    default_layout, default_recompute = (synthesizer.config.layout, synthesizer.config.recompute) if synthesizer else ("parallel", 0)
    return layout or default_layout, default_recompute if recompute is None else recompute


def _prepare_text(lm: LM, fork: Fork, prompt_ids: list[int], max_new: int) -> Prepared:
    ids = list(fork.prefix_ids)
    spans = [Span("prefix", 0, 0, len(ids), "recomputed")]
    for i, b in enumerate(fork.branches):
        spans.append(Span("branch", i + 1, len(ids), len(b.token_ids), "recomputed"))
        ids += b.token_ids
    spans.append(Span("prompt", 0, len(ids), len(prompt_ids), "recomputed"))
    ids += prompt_ids
    lm.check_positions(len(ids) + max_new, "the text synthesis prompt plus the answer")
    dev = lm.device
    state = State.empty(1, dev)
    logits = forward_(lm, state, torch.tensor([ids], device=dev), torch.arange(len(ids), device=dev)[None])
    return Prepared(state, logits, len(ids), tuple(spans))


def cache_inputs(
    lm: LM, fork: Fork, prompt_ids: list[int], *, layout: str, mapper: Mapper | None = None, recompute: int = 0
) -> CacheInputs:
    """Compose the branches under `layout` (mapped when a mapper is given) into a new decode state.

    With `recompute` k > 0, the first k tokens of every branch are run again at synthesis time, seeing
    the prefix and every branch token at an earlier or equal position; their old entries are masked out."""
    composed = compose(fork.prefix, [b.kv for b in fork.branches], rope_of(lm.model), layout=layout, mapper=mapper)
    dev = lm.device
    key_pos = composed.positions.to(dev)[None].clone()
    ids, positions, spans = [], [], [composed.spans[0]]
    at = composed.segments[0].length
    for branch, segment, span in zip(fork.branches, composed.segments[1:], composed.spans[1:]):
        k = min(recompute, segment.length)
        if k:
            key_pos[0, at : at + k] = -1
            ids += branch.token_ids[:k]
            positions += segment.positions[:k].tolist()
            spans.append(Span(span.source, span.index, span.start, k, "recomputed"))
        if span.length > k:
            spans.append(Span(span.source, span.index, span.start + k, span.length - k, span.how))
        at += segment.length
    state = State(to_cache(composed.segments), key_pos, key_pos[:, -1] + 1)
    start = composed.next_position
    spans.append(Span("prompt", 0, start, len(prompt_ids), "recomputed"))
    return CacheInputs(state, ids + list(prompt_ids), positions + list(range(start, start + len(prompt_ids))),
                       tuple(spans), composed.segments)


def _run(lm: LM, inputs: CacheInputs) -> torch.Tensor:
    dev = lm.device
    return forward_(lm, inputs.state, torch.tensor([inputs.ids], device=dev), torch.tensor([inputs.positions], device=dev))


def prefill_over(lm: LM, composed: Composed, prompt_ids: list[int]) -> Prepared:
    """Prefill the synthesizer's prompt over an already composed cache (which is not modified).
    Alone, this is the floor of the cache route's time to first token."""
    dev = lm.device
    start, m = composed.next_position, len(prompt_ids)
    key_pos = composed.positions.to(dev)[None]
    state = State(to_cache(composed.segments), key_pos, key_pos[:, -1] + 1)
    pos = torch.arange(start, start + m, device=dev)[None]
    logits = forward_(lm, state, torch.tensor([prompt_ids], device=dev), pos)
    return Prepared(state, logits, m, composed.spans + (Span("prompt", 0, start, m, "recomputed"),))
