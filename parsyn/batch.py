"""Synthesizing many forks at once, for evaluation: one batch per route, the same decode loop.

Each fork keeps its own context: cache-route contexts of different lengths are padded in front (padding
masked by position) and every prompt is right-aligned, exactly as workers are batched. The answers are
the ones `synthesis.synthesize` gives one fork at a time (tested); per-item time to first token is not
meaningful here, so timing programs synthesize one item at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .chat import DEFAULT_INSTRUCTION
from .decode import Row, decode
from .forward import prefill_rows
from .model import LM
from .sampling import SamplingParams
from .synthesis import (
    ROUTES,
    CacheOptions,
    Trained,
    adapter,
    cache_inputs,
    prompt_tokens,
    run_cache,
    settings,
    text_row,
)
from .workers import Fork, answer_text

ANSWER_SAMPLING = SamplingParams(max_new_tokens=32)


def answers(
    lm: LM,
    forks: Sequence[Fork],
    *,
    route: str,
    layout: str | None = None,
    instructions: Sequence[str] | None = None,
    sampling: SamplingParams = ANSWER_SAMPLING,
    synthesizer: Trained | None = None,
    options: CacheOptions | None = None,
    batch: int = 16,
) -> list[tuple[tuple[int, ...], str]]:
    """The answer of every fork by `route` (greedy by default): a list of (token ids, text)."""
    if route not in ROUTES:
        raise ValueError(f"unknown route '{route}' (choose from {', '.join(ROUTES)})")
    instructions = list(instructions or [DEFAULT_INSTRUCTION] * len(forks))
    layout, options = settings(synthesizer, layout, options)
    trained = synthesizer if route == "cache" else None
    out: list[tuple[tuple[int, ...], str]] = []
    for start in range(0, len(forks), batch):
        group = list(zip(forks[start : start + batch], instructions[start : start + batch]))
        prompts = [prompt_tokens(lm, f, i) for f, i in group]
        with torch.inference_mode():
            if route == "text":
                rows = [text_row(f.prefix_ids, [b.token_ids for b in f.branches], p)
                        for (f, _), p in zip(group, prompts)]
                state, logits = prefill_rows(lm, rows)
            else:
                mapper = synthesizer.mapper if synthesizer else None
                inputs = [cache_inputs(lm, f, p, layout=layout, mapper=mapper, options=options)
                          for (f, _), p in zip(group, prompts)]
                with adapter(route, trained):
                    state, logits = run_cache(lm, inputs)
        results = decode(lm, state, logits, [Row(i, sampling) for i in range(len(group))], adapter=trained)
        out += [(r.tokens, answer_text(lm, r)) for r in results]
    return out
