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
from .kv import to_cache
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


def prepare(
    lm: LM,
    fork: Fork,
    *,
    route: str = "cache",
    layout: str = "parallel",
    instruction: str = DEFAULT_INSTRUCTION,
    mapper: Mapper | None = None,
    max_new_tokens: int = 0,
) -> Prepared:
    """Build the route's context and prefill the synthesizer's prompt; `fork` is not modified."""
    if route not in ROUTES:
        raise ValueError(f"unknown route '{route}' (choose from {', '.join(ROUTES)})")
    prompt = ChatFormat(lm.tokenizer).synthesis(fork.question, fork.system, instruction)
    prompt_ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        if route == "text":
            return _prepare_text(lm, fork, prompt_ids, max_new_tokens)
        return _prepare_cache(lm, fork, prompt_ids, layout, mapper, max_new_tokens)


def synthesize(
    lm: LM,
    fork: Fork,
    *,
    route: str = "cache",
    layout: str = "parallel",
    instruction: str = DEFAULT_INSTRUCTION,
    sampling: SamplingParams = SYNTH_SAMPLING,
    mapper: Mapper | None = None,
    on_token=None,
) -> Synthesis:
    """Synthesize one answer from the fork's branches by `route` (text or cache) under `layout`."""
    t0 = time.perf_counter()
    ready = prepare(
        lm, fork, route=route, layout=layout, instruction=instruction, mapper=mapper,
        max_new_tokens=sampling.max_new_tokens,
    )
    out = decode_(lm, ready.state, ready.logits, sampling, on_token=None if on_token is None else (lambda _, t: on_token(t)))
    tokens = out.tokens[0]
    answer = lm.tokenizer.decode(tokens[:-1] if out.stopped[0] else tokens, skip_special_tokens=True).strip()
    return Synthesis(
        route, layout if route == "cache" else None, answer, tokens, out.first_token_time - t0,
        time.perf_counter() - t0, ready.prefill_tokens, ready.spans,
    )


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


def _prepare_cache(lm: LM, fork: Fork, prompt_ids: list[int], layout: str, mapper, max_new: int) -> Prepared:
    composed = compose(fork.prefix, [b.kv for b in fork.branches], rope_of(lm.model), layout=layout, mapper=mapper)
    lm.check_positions(
        composed.next_position + len(prompt_ids) + max_new, f"the composed {layout} cache plus the prompt and the answer"
    )
    return prefill_over(lm, composed, prompt_ids)


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
