"""CacheBlend-style selection: which branch tokens to recompute at synthesis time.

Branches were computed without seeing each other. CacheBlend's observation is that the tokens whose
K/V deviate most from what full attention would give are few, and that an early layer already shows
which ones: compute the first layers over the whole text (cheap: a couple of layers out of many),
compare each branch token's K and V there with the composed cache's, and recompute the top fraction
through all layers. Keys are compared at the text's positions (re-rotation is exact), values as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from .compose import Composed
from .model import LM
from .rope import Rope, rotate


def partial_keys_values(lm: LM, ids: Sequence[int], layers: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """K/V of the first `layers` decoder layers for `ids` at positions 0.. (plain causal prefill)."""
    decoder = lm.model.get_decoder()
    everything = decoder.layers
    cache = DynamicCache()
    try:
        decoder.layers = everything[:layers]  # the decoder iterates over its own list: stop early
        with torch.inference_mode():
            decoder(input_ids=torch.tensor([list(ids)], device=lm.device), cache=cache, use_cache=True)
    finally:
        decoder.layers = everything
    return [l.keys for l in cache.layers], [l.values for l in cache.layers]


def select(lm: LM, prefix_ids: Sequence[int], branch_ids: Sequence[Sequence[int]], composed: Composed, rope: Rope,
           *, fraction: float, check_layer: int = 1) -> list[list[int]]:
    """Per branch, the token offsets to recompute: the `fraction` of all branch tokens whose K/V at
    `check_layer` deviate most from a full-attention prefill of the concatenated text."""
    if not 0 < fraction <= 1:
        raise ValueError(f"blend fraction must be in (0, 1], got {fraction}")
    if not 0 <= check_layer < len(rope.inv_freq):
        raise ValueError(f"check layer {check_layer} is outside the model's {len(rope.inv_freq)} layers")
    text = list(prefix_ids) + [t for b in branch_ids for t in b]
    keys, values = partial_keys_values(lm, text, check_layer + 1)
    full_k, full_v = keys[check_layer], values[check_layer]
    scores, owners = [], []
    at = len(prefix_ids)
    for i, segment in enumerate(composed.segments[1:]):
        n = segment.length
        text_pos = torch.arange(at, at + n)
        k = rotate(segment.keys[check_layer], rope.inv_freq[check_layer], segment.positions, text_pos)
        k_dev = (k - full_k[:, :, at : at + n]).float().pow(2).sum((0, 1, 3))
        v_dev = (segment.values[check_layer] - full_v[:, :, at : at + n]).float().pow(2).sum((0, 1, 3))
        scores.append((k_dev + v_dev).sqrt())
        owners += [(i, j) for j in range(n)]
        at += n
    flat = torch.cat(scores)
    count = max(1, round(fraction * flat.numel()))
    chosen = [[] for _ in branch_ids]
    for index in flat.topk(count).indices.tolist():
        branch, offset = owners[index]
        chosen[branch].append(offset)
    return [sorted(c) for c in chosen]
