"""Training-free variants of the cache route: recomputing some branch tokens, CacheBlend-style selection,
and APE-style attention temperature and scale on branches.

CacheBlend's observation: branches were computed without seeing each other, the tokens whose K/V
deviate most from what full attention would give are few, and an early layer already shows which
ones. So the first layers run over the whole text (a couple of layers out of many), each branch
token's K and V there are compared with the composed cache's, and the top fraction is recomputed
through all layers. Keys are compared at the text's positions (re-rotation is exact), values as they are.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from .compose import Composed, Mapper, Span
from .compress import Compression
from .kv import KV
from .model import LM
from .rope import Rope, rotate


@dataclass(frozen=True)
class CacheOptions:
    """Training-free changes to how the cache route reads the branches.

    recompute: the first k tokens of every branch are run again at synthesis (a structural aid).
    blend: CacheBlend-style — this fraction of all branch tokens, those whose K/V deviate most at
        `check_layer` from a full-attention prefill, is recomputed.
    temperature, branch_bias: APE-style — branch keys are scaled by 1/temperature (sharper or flatter
        attention on branches) and `branch_bias` (a log-scale) is added to every attention logit on a
        branch token.
    keep, keep_by, keep_window, kv_bits: branch-KV compression before synthesis (`parsyn.compress`): each
        branch keeps this fraction of its tokens, ranked by the attention the synthesizer's prompt gives
        them (keep_by="prompt") or that the branch's last `keep_window` tokens give them ("tail"),
        SnapKV-style, and/or its K/V go through int8 with per-channel scales (kv_bits=8). A fork
        synthesized many times is better compressed once, by `compress.compress`.
    """

    recompute: int = 0
    blend: float = 0.0
    check_layer: int = 1
    temperature: float = 1.0
    branch_bias: float = 0.0
    keep: float = 1.0
    keep_by: str = "prompt"
    keep_window: int = 16
    kv_bits: int | None = None

    def __post_init__(self) -> None:
        if self.recompute < 0 or not 0 <= self.blend <= 1 or self.check_layer < 0 or self.temperature <= 0:
            raise ValueError(f"bad CacheOptions: {self}")
        if self.compression.keep < 1 and (self.recompute or self.blend):
            raise ValueError("keeping some branch tokens does not combine with recomputing others (recompute, blend)")

    @property
    def compression(self) -> Compression:
        return Compression(keep=self.keep, by=self.keep_by, window=self.keep_window, bits=self.kv_bits)


def chosen(lm: LM, prefix_ids: Sequence[int], branch_ids: Sequence[Sequence[int]], composed: Composed, rope: Rope,
           options: CacheOptions) -> list[list[int]]:
    """Offsets of the tokens to recompute in each branch (sorted): the first `recompute` ones, and the
    CacheBlend selection when `blend` is set."""
    first = [list(range(min(options.recompute, len(b)))) for b in branch_ids]
    if not options.blend:
        return first
    picked = select(lm, prefix_ids, branch_ids, composed, rope, fraction=options.blend, check_layer=options.check_layer)
    return [sorted(set(a) | set(b)) for a, b in zip(first, picked)]


def split_span(span: Span, offsets: list[int]) -> list[Span]:
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


def sharpened(mapper: Mapper | None, temperature: float) -> Mapper:
    """Scale branch keys by 1/temperature (after any other mapper): attention logits on them scale alike."""

    def scaled(kv: KV, index: int, branches: int) -> KV:
        kv = mapper(kv, index, branches) if mapper else kv
        return KV(tuple(k / temperature for k in kv.keys), kv.values, kv.positions)

    return scaled


def partial_keys_values(lm: LM, ids: Sequence[int], layers: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """K/V of the first `layers` decoder layers for `ids` at positions 0.. (plain causal prefill).

    Runs a decoder of the same class that shares the model's embedding, first layers, norm and rotary
    module (built empty on the meta device); the model itself is not changed."""
    decoder = lm.model.get_decoder()
    config = copy.copy(decoder.config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[:layers])
    with torch.device("meta"):
        partial = type(decoder)(config)
    for name, child in decoder.named_children():
        setattr(partial, name, nn.ModuleList(list(child)[:layers]) if name == "layers" else child)
    cache = DynamicCache()
    with torch.inference_mode():
        partial(input_ids=torch.tensor([list(ids)], device=lm.device), cache=cache, use_cache=True)
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


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
    picked: list[list[int]] = [[] for _ in branch_ids]
    for index in flat.topk(count).indices.tolist():
        branch, offset = owners[index]
        picked[branch].append(offset)
    return [sorted(c) for c in picked]
