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
from .blend import select
from .kv import KV, to_cache
from .model import LM
from .rope import rope_of
from .workers import Fork

ROUTES = ("text", "cache")


@dataclass(frozen=True)
class CacheOptions:
    """Training-free changes to how the cache route reads the branches.

    recompute: the first k tokens of every branch are run again at synthesis (a structural aid).
    blend: CacheBlend-style — this fraction of all branch tokens, those whose K/V deviate most at
        `check_layer` from a full-attention prefill, is recomputed.
    temperature, branch_bias: APE-style — branch keys are scaled by 1/temperature (sharper or flatter
        attention on branches) and `branch_bias` (a log-scale) is added to every attention logit on a
        branch token.
    """

    recompute: int = 0
    blend: float = 0.0
    check_layer: int = 1
    temperature: float = 1.0
    branch_bias: float = 0.0

    def __post_init__(self) -> None:
        if self.recompute < 0 or not 0 <= self.blend <= 1 or self.check_layer < 0 or self.temperature <= 0:
            raise ValueError(f"bad CacheOptions: {self}")
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
    options: CacheOptions | None = None,
    max_new_tokens: int = 0,
) -> Prepared:
    """Build the route's context and prefill the synthesizer's prompt; `fork` is not modified."""
    if route not in ROUTES:
        raise ValueError(f"unknown route '{route}' (choose from {', '.join(ROUTES)})")
    prompt_ids = prompt_tokens(lm, fork, instruction)
    with torch.inference_mode():
        if route == "text":
            return _prepare_text(lm, fork, prompt_ids, max_new_tokens)
        layout, options = cache_settings(synthesizer, layout, options)
        mapper = synthesizer.mapper if synthesizer else None
        inputs = cache_inputs(lm, fork, prompt_ids, layout=layout, mapper=mapper, options=options)
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
    options: CacheOptions | None = None,
    on_token=None,
) -> Synthesis:
    """Synthesize one answer from the fork's branches by `route` (text or cache).

    The cache route uses `layout` (default: the synthesizer's, else parallel) and, when given, the trained
    `synthesizer` (its LoRA is on only while it runs, its mapper calibrates branches, its aid recomputes
    the first tokens of every branch) and `options` (training-free variants; default: the synthesizer's
    aid). The text route always runs the base model."""
    t0 = time.perf_counter()
    ready = prepare(
        lm, fork, route=route, layout=layout, instruction=instruction, synthesizer=synthesizer,
        options=options, max_new_tokens=sampling.max_new_tokens,
    )
    report = None if on_token is None else (lambda _, t: on_token(t))
    with lora_on(lm, synthesizer if route == "cache" else None):
        out = decode_(lm, ready.state, ready.logits, sampling, on_token=report)
    tokens = out.tokens[0]
    answer = lm.tokenizer.decode(tokens[:-1] if out.stopped[0] else tokens, skip_special_tokens=True).strip()
    used = cache_settings(synthesizer, layout, options)[0] if route == "cache" else None
    return Synthesis(
        route, used, answer, tokens, out.first_token_time - t0, time.perf_counter() - t0, ready.prefill_tokens,
        ready.spans,
    )


def prompt_tokens(lm: LM, fork: Fork, instruction: str = DEFAULT_INSTRUCTION) -> list[int]:
    prompt = ChatFormat(lm.tokenizer).synthesis(fork.question, fork.system, instruction)
    return lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]


def cache_settings(synthesizer: Synthesizer | None, layout: str | None, options: CacheOptions | None) -> tuple[str, CacheOptions]:
    """The layout and options a cache route runs with: explicit ones, else the synthesizer's, else defaults."""
    if synthesizer is None:
        return layout or "parallel", options or CacheOptions()
    return layout or synthesizer.config.layout, options or CacheOptions(recompute=synthesizer.config.recompute)


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
    lm: LM, fork: Fork, prompt_ids: list[int], *, layout: str, mapper: Mapper | None = None,
    options: CacheOptions = CacheOptions(),
) -> CacheInputs:
    """Compose the branches under `layout` (mapped when a mapper is given) into a new decode state, and
    list the tokens still to run: the branch tokens chosen for recomputation, then the prompt.

    Recomputed tokens see the prefix and every branch token at an earlier or equal position; their old
    entries are masked out."""
    rope = rope_of(lm.model)
    if options.temperature != 1.0:
        mapper = _sharpen(mapper, options.temperature)
    composed = compose(fork.prefix, [b.kv for b in fork.branches], rope, layout=layout, mapper=mapper)
    chosen = _chosen(lm, fork, composed, rope, options)
    dev = lm.device
    key_pos = composed.positions.to(dev)[None].clone()
    bias = None
    if options.branch_bias:
        bias = torch.full_like(key_pos, options.branch_bias, dtype=torch.float32)
        bias[:, : fork.prefix.length] = 0
    ids, positions, spans = [], [], [composed.spans[0]]
    at = composed.segments[0].length
    for branch, segment, span, offsets in zip(fork.branches, composed.segments[1:], composed.spans[1:], chosen):
        for j in offsets:
            key_pos[0, at + j] = -1
            ids.append(branch.token_ids[j])
            positions.append(int(segment.positions[j]))
        spans += _split_span(span, offsets)
        at += segment.length
    state = State(to_cache(composed.segments), key_pos, key_pos[:, -1] + 1, bias)
    start = composed.next_position
    spans.append(Span("prompt", 0, start, len(prompt_ids), "recomputed"))
    return CacheInputs(state, ids + list(prompt_ids), positions + list(range(start, start + len(prompt_ids))),
                       tuple(spans), composed.segments)


def _chosen(lm: LM, fork: Fork, composed: Composed, rope, options: CacheOptions) -> list[list[int]]:
    """Offsets of the tokens to recompute in each branch (sorted)."""
    first = [list(range(min(options.recompute, b.kv.length))) for b in fork.branches]
    if not options.blend:
        return first
    picked = select(lm, fork.prefix_ids, [b.token_ids for b in fork.branches], composed, rope,
                    fraction=options.blend, check_layer=options.check_layer)
    return [sorted(set(a) | set(b)) for a, b in zip(first, picked)]


def _split_span(span: Span, offsets: list[int]) -> list[Span]:
    """A branch span cut into runs of recomputed and kept tokens, in order."""
    if not offsets:
        return [span]
    marks = set(offsets)
    out, run_start = [], 0
    for j in range(1, span.length + 1):
        if j == span.length or ((j in marks) != (run_start in marks)):
            how = "recomputed" if run_start in marks else span.how
            out.append(Span(span.source, span.index, span.start + run_start, j - run_start, how))
            run_start = j
    return out


def _sharpen(mapper: Mapper | None, temperature: float) -> Mapper:
    """Scale branch keys by 1/temperature (after any other mapper): attention logits on them scale alike."""

    def scaled(kv: KV, index: int, branches: int) -> KV:
        kv = mapper(kv, index, branches) if mapper else kv
        return KV(tuple(k / temperature for k in kv.keys), kv.values, kv.positions)

    return scaled


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
