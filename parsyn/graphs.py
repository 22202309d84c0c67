"""Synthesis at bucketed static shapes, replayed from CUDA graphs: the prompt's prefill and every decode step.

On a GPU the cache route's short prefill (a ~27-token prompt over the composed cache) and each decode step
are bound by kernel launches, not arithmetic. A CUDA graph launches a whole forward at once, but needs the
same shapes and memory on every replay. So a synthesis runs over one static K/V buffer per layer whose
length is rounded up to `key_bucket` slots: the composed cache (or, for the text route, the prefix) is
copied into its first slots, the prompt is written after it as a row of `prompt_bucket`-rounded width
(padding in front, masked), and each decode step writes its token's K/V into the next slot. Which slot a
forward writes, and the positions every slot holds (-1: empty or padding, masked), are device tensors filled
before a replay, so one graph serves every call of its bucket: one per (buffer length, prompt width) for
prefills and one per buffer length for decode steps, captured on first use.

The static forward is the same arithmetic over masked slots, so its logits equal the plain path's
(`synthesis.prefill_over`, `forward.feed_`); where graphs are off (CPU), the same forward runs eagerly —
that is what the tests check. The raw routes only: no adapter runs in a graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .compose import Composed
from .forward import attention_mask
from .kv import KV
from .model import LM


class _SlotLayer(DynamicLayer):
    """A cache layer over static buffers [1, H, slots, D]: `update` writes the new K/V at the storage slots
    in `slots` (a device tensor filled before each forward) and returns the whole buffers."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values, self.slots = keys, values, slots

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys.index_copy_(2, self.slots, key_states)
        self.values.index_copy_(2, self.slots, value_states)
        return self.keys, self.values


@dataclass(eq=False)
class _Step:
    """The static inputs and output of one forward shape: `width` tokens written at `slots`."""

    ids: torch.Tensor       # [1, width]
    pos: torch.Tensor       # [1, width] query positions (padding: the first real position, unused)
    key_pos: torch.Tensor   # [1, width] positions recorded for the new keys (-1: padding)
    slots: torch.Tensor     # [width] storage slots the new K/V go to
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = field(default=None)  # the graph's output [1, V]


@dataclass(eq=False)
class _Buffers:
    """One static cache: K/V per layer [1, H_kv, size, D], each slot's position, and its captured forwards."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_pos: torch.Tensor                               # [1, size], -1 where nothing (visible) is stored
    steps: dict[int, _Step] = field(default_factory=dict)  # by width: prompt widths, and 1 for decode steps


class GraphedSynthesis:
    """A synthesis row at static shapes: `prefill(composed, prompt_ids, room=)` -> next-token logits [1, V]
    float32 as `prefill_over` gives them, then `step(token)` -> the logits after `token`, one decode step at
    a time (at most `room` of them). `generate` decodes greedily. The text route runs the same way over the
    prefix alone (`text_context`), its branches' tokens part of the prompt.
    graphs: capture and replay CUDA graphs (default: on a CUDA device); off, the same forwards run eagerly.
    Buffers live as long as this object (each holds a K/V cache of its size); one row at a time, not
    thread-safe; runs in inference mode."""

    def __init__(self, lm: LM, *, key_bucket: int = 256, prompt_bucket: int = 32, graphs: bool | None = None):
        if key_bucket < 1 or prompt_bucket < 1:
            raise ValueError(f"buckets must be positive, got key_bucket={key_bucket}, prompt_bucket={prompt_bucket}")
        self.graphs = lm.device.type == "cuda" if graphs is None else graphs
        if self.graphs and lm.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {lm.device}")
        self.lm, self.key_bucket, self.prompt_bucket = lm, key_bucket, prompt_bucket
        self.buffers: dict[int, _Buffers] = {}
        self._live: tuple[_Buffers, int, int] | None = None  # buffers, next slot, next position

    @torch.inference_mode()
    def prefill(self, composed: Composed, prompt_ids: Sequence[int], *, room: int = 0) -> torch.Tensor:
        """Prefill `prompt_ids` over `composed` (not modified), leaving slots for `room` decode steps."""
        n, q = int(composed.positions.numel()), len(prompt_ids)
        if q < 1 or room < 0:
            raise ValueError(f"a prefill needs at least one prompt token and room >= 0, got {q} and {room}")
        start, width = composed.next_position, _round_up(q, self.prompt_bucket)
        self.lm.check_positions(start + q + room, "the composed cache plus the prompt and the answer")
        b = self._buffers(_round_up(n + width + room, self.key_bucket), composed.segments[0])
        at = 0
        for s in composed.segments:
            for i in range(len(b.keys)):
                b.keys[i][:, :, at : at + s.length].copy_(s.keys[i])
                b.values[i][:, :, at : at + s.length].copy_(s.values[i])
            at += s.length
        b.key_pos[0, :n] = composed.positions.to(self.lm.device)
        b.key_pos[0, n:] = -1
        own = list(range(start, start + q))
        logits = self._run(b, width, [self.lm.pad_id] * (width - q) + list(prompt_ids),
                           [start] * (width - q) + own, [-1] * (width - q) + own, n)
        self._live = (b, n + width, start + q)
        return logits

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Feed the last sampled `token` after a prefill (or the previous step); its next-token logits."""
        if self._live is None:
            raise ValueError("step() follows a prefill()")
        b, slot, position = self._live
        if slot >= b.key_pos.shape[1]:
            raise ValueError(f"no room left for another decode step: pass a larger room to prefill() "
                             f"(buffer of {b.key_pos.shape[1]} slots is full)")
        logits = self._run(b, 1, [int(token)], [position], [position], slot)
        self._live = (b, slot + 1, position + 1)
        return logits

    def generate(self, composed: Composed, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy decoding: up to `max_new_tokens` tokens, the first stop token included."""
        logits, out = self.prefill(composed, prompt_ids, room=max_new_tokens), []
        while len(out) < max_new_tokens:
            out.append(int(logits.argmax(-1)))
            if out[-1] in self.lm.stop_ids or len(out) == max_new_tokens:
                break
            logits = self.step(out[-1])
        return out

    def _buffers(self, size: int, like: KV) -> _Buffers:
        if size not in self.buffers:
            dev = self.lm.device
            self.buffers[size] = _Buffers(
                [k.new_zeros(1, k.shape[1], size, k.shape[3], device=dev) for k in like.keys],
                [v.new_zeros(1, v.shape[1], size, v.shape[3], device=dev) for v in like.values],
                torch.full((1, size), -1, dtype=torch.long, device=dev))
        return self.buffers[size]

    def _run(self, b: _Buffers, width: int, ids: list[int], pos: list[int], key_pos: list[int],
             slot: int) -> torch.Tensor:
        """Fill the static inputs of `width` tokens written from `slot` on, then run (or replay) the forward."""
        dev = self.lm.device
        s = b.steps.get(width)
        if s is None:
            s = b.steps[width] = _Step(*(torch.zeros(1, width, dtype=torch.long, device=dev) for _ in range(3)),
                                       torch.zeros(width, dtype=torch.long, device=dev))
        s.ids.copy_(torch.tensor([ids]))
        s.pos.copy_(torch.tensor([pos]))
        s.key_pos.copy_(torch.tensor([key_pos]))
        s.slots.copy_(torch.arange(slot, slot + width))
        if not self.graphs:
            return self._forward(b, s)
        if s.graph is None:
            self._capture(b, s)
        s.graph.replay()
        return s.logits.clone()

    def _forward(self, b: _Buffers, s: _Step) -> torch.Tensor:
        """One forward at static shapes (no host sync: it can be captured). Writing the same tokens at the
        same slots again is harmless, so warm-up and capture may run it more than once."""
        b.key_pos.index_copy_(1, s.slots, s.key_pos)
        mask = attention_mask(b.key_pos, s.pos, self.lm.windows, self.lm.dtype, always=True)
        cache = DynamicCache()
        cache.layers = [_SlotLayer(k, v, s.slots) for k, v in zip(b.keys, b.values)]
        out = self.lm.model(input_ids=s.ids, position_ids=s.pos, attention_mask=mask, cache=cache, use_cache=True,
                            logits_to_keep=1)
        return out.logits[:, -1].float()

    def _capture(self, b: _Buffers, s: _Step) -> None:
        """Warm the forward up on a side stream (as torch's CUDA graph notes ask), then capture it."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(b, s)
        torch.cuda.current_stream().wait_stream(side)
        s.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(s.graph):
            s.logits = self._forward(b, s)


def text_context(prefix: KV, branch_ids: Sequence[Sequence[int]],
                 prompt_ids: Sequence[int]) -> tuple[Composed, list[int]]:
    """The text route as a static prefill: the prefix alone as context, and the branches' tokens followed by
    the synthesizer's prompt as the prompt (`synthesis.text_row` without the prefix)."""
    context = Composed((prefix,), int(prefix.positions.max()) + 1 if prefix.length else 0, ())
    return context, [t for b in branch_ids for t in b] + list(prompt_ids)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step
