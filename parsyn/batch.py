"""Synthesizing many items at once, for evaluation: one batch per route, the same decode loop.

Each item keeps its own context: cache-route contexts of different lengths are left-padded (padding
masked by position) and every prompt is right-aligned, exactly as workers are batched. Per-item time to
first token is not meaningful here; timing programs use `synthesis.synthesize` one item at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .adapter import Synthesizer, lora_on
from .chat import DEFAULT_INSTRUCTION
from .decode import SamplingParams, State, decode_, forward_, prefill_rows
from .kv import KV, cat, to_cache
from .model import LM
from .synthesis import CacheInputs, CacheOptions, cache_inputs, cache_settings, prompt_tokens
from .workers import Fork


def answers(
    lm: LM,
    forks: Sequence[Fork],
    *,
    route: str,
    layout: str | None = None,
    instructions: Sequence[str] | None = None,
    sampling: SamplingParams = SamplingParams(max_new_tokens=32, temperature=0.0),
    synthesizer: Synthesizer | None = None,
    options: CacheOptions | None = None,
    batch: int = 16,
) -> list[tuple[tuple[int, ...], str]]:
    """Greedy (or sampled) answers of every fork by `route`: a list of (token ids, text)."""
    instructions = list(instructions or [DEFAULT_INSTRUCTION] * len(forks))
    layout, options = cache_settings(synthesizer, layout, options)
    out: list[tuple[tuple[int, ...], str]] = []
    for start in range(0, len(forks), batch):
        group = list(zip(forks[start : start + batch], instructions[start : start + batch]))
        prompts = [prompt_tokens(lm, f, i) for f, i in group]
        with torch.inference_mode():
            if route == "text":
                rows = [list(f.prefix_ids) + [t for b in f.branches for t in b.token_ids] + p for (f, _), p in zip(group, prompts)]
                state, logits = prefill_rows(lm, rows)
                decoded = decode_(lm, state, logits, sampling)
            else:
                mapper = synthesizer.mapper if synthesizer else None
                inputs = [cache_inputs(lm, f, p, layout=layout, mapper=mapper, options=options) for (f, _), p in zip(group, prompts)]
                with lora_on(lm, synthesizer):
                    state, logits = _prefill_cache_rows(lm, inputs)
                    decoded = decode_(lm, state, logits, sampling)
        for tokens, stopped in zip(decoded.tokens, decoded.stopped):
            text = lm.tokenizer.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=True).strip()
            out.append((tokens, text))
    return out


def _prefill_cache_rows(lm: LM, inputs: Sequence[CacheInputs]) -> tuple[State, torch.Tensor]:
    """Stack composed contexts (left-padded) and run every row's remaining tokens (right-aligned)."""
    contexts = [cat(x.segments) for x in inputs]
    length = max(c.length for c in contexts)
    dev = lm.device

    def padded(t: torch.Tensor) -> torch.Tensor:  # [1, H, T, D] -> [1, H, length, D], padding in front
        return torch.nn.functional.pad(t, (0, 0, length - t.shape[2], 0))

    layers = range(contexts[0].n_layers)
    stacked = KV(
        tuple(torch.cat([padded(c.keys[i]) for c in contexts]) for i in layers),
        tuple(torch.cat([padded(c.values[i]) for c in contexts]) for i in layers),
        torch.arange(length),
    )
    key_pos = torch.full((len(inputs), length), -1, dtype=torch.long, device=dev)
    for r, x in enumerate(inputs):
        key_pos[r, length - x.state.key_pos.shape[1] :] = x.state.key_pos[0]
    width = max(len(x.ids) for x in inputs)
    pad = lm.stop_ids[0]
    ids = torch.full((len(inputs), width), pad, dtype=torch.long)
    pos = torch.zeros((len(inputs), width), dtype=torch.long)
    new_keys = torch.full((len(inputs), width), -1, dtype=torch.long)
    for r, x in enumerate(inputs):
        n = len(x.ids)
        ids[r, width - n :] = torch.tensor(x.ids)
        pos[r, width - n :] = new_keys[r, width - n :] = torch.tensor(x.positions)
        pos[r, : width - n] = x.positions[0]  # padding queries: finite, unused
    bias = None
    if any(x.state.key_bias is not None for x in inputs):
        bias = torch.zeros((len(inputs), length), dtype=torch.float32, device=dev)
        for r, x in enumerate(inputs):
            if x.state.key_bias is not None:
                bias[r, length - x.state.key_bias.shape[1] :] = x.state.key_bias[0]
    state = State(to_cache(stacked), key_pos, key_pos[:, -1] + 1, bias)
    logits = forward_(lm, state, ids.to(dev), pos.to(dev), new_keys.to(dev))
    return state, logits
