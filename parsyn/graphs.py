"""The synthesizer's prompt prefill at bucketed static shapes, replayed from a CUDA graph.

On a GPU the cache route's short prefill (a ~27-token prompt over the composed cache) is bound by kernel
launches, not arithmetic. A CUDA graph launches the whole forward at once, but needs the same shapes and
memory on every replay. So the composed cache is copied into static K/V buffers whose length is rounded up
to `key_bucket` slots (padding slots in front, position -1: masked), the prompt into a row of
`prompt_bucket` tokens (padding in front, masked for every other token), and one graph per bucket is
captured on first use and replayed after. The padded forward is the same arithmetic over masked slots, so
its logits equal `synthesis.prefill_over`'s; where graphs are off (CPU), the same padded forward runs eagerly
— that is what the tests check. The raw cache route only: no adapter runs in the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .compose import Composed
from .forward import attention_mask
from .kv import KV, to_cache
from .model import LM


@dataclass(eq=False)
class _Bucket:
    keys: list[torch.Tensor]    # per layer [1, H_kv, slots, D], the composed cache right-aligned
    values: list[torch.Tensor]
    ids: torch.Tensor           # [1, prompt slots]
    pos: torch.Tensor           # [1, prompt slots]
    masks: dict                 # layer type -> additive mask [1, 1, prompt slots, slots + prompt slots]
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = field(default=None)  # the graph's output [1, V]


class GraphedPrefill:
    """`graphed(composed, prompt_ids)` -> next-token logits [1, V] float32, as `prefill_over` gives them.
    graphs: capture and replay CUDA graphs (default: on a CUDA device); off, the padded forward runs eagerly.
    Buckets live as long as this object (each holds a copy-sized K/V buffer); not thread-safe."""

    def __init__(self, lm: LM, *, key_bucket: int = 256, prompt_bucket: int = 32, graphs: bool | None = None):
        if key_bucket < 1 or prompt_bucket < 1:
            raise ValueError(f"buckets must be positive, got key_bucket={key_bucket}, prompt_bucket={prompt_bucket}")
        self.graphs = lm.device.type == "cuda" if graphs is None else graphs
        if self.graphs and lm.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {lm.device}")
        self.lm, self.key_bucket, self.prompt_bucket = lm, key_bucket, prompt_bucket
        self.buckets: dict[tuple[int, int], _Bucket] = {}

    def __call__(self, composed: Composed, prompt_ids: Sequence[int]) -> torch.Tensor:
        keys, q = int(composed.positions.numel()), len(prompt_ids)
        slots, width = _round_up(keys, self.key_bucket), _round_up(q, self.prompt_bucket)
        self.lm.check_positions(composed.next_position + q, "the composed cache plus the prompt")
        b = self.buckets.get((slots, width)) or self._bucket(composed.segments[0], slots, width)
        self.buckets[slots, width] = b
        self._fill(b, composed, list(prompt_ids))
        if not self.graphs:
            with torch.inference_mode():
                return self._forward(b)
        if b.graph is None:
            self._capture(b)
        b.graph.replay()
        return b.logits.clone()

    def _bucket(self, like: KV, slots: int, width: int) -> _Bucket:
        dev = self.lm.device
        keys = [k.new_zeros(1, k.shape[1], slots, k.shape[3], device=dev) for k in like.keys]
        values = [v.new_zeros(1, v.shape[1], slots, v.shape[3], device=dev) for v in like.values]
        ids = torch.full((1, width), self.lm.pad_id, dtype=torch.long, device=dev)
        pos = torch.zeros(1, width, dtype=torch.long, device=dev)
        masks = {kind: torch.zeros(1, 1, width, slots + width, dtype=self.lm.dtype, device=dev)
                 for kind in self.lm.windows}
        return _Bucket(keys, values, ids, pos, masks)

    def _fill(self, b: _Bucket, composed: Composed, prompt: list[int]) -> None:
        """Copy the composed cache, the prompt and their mask into the bucket's static tensors."""
        dev, slots, width = self.lm.device, b.keys[0].shape[2], b.ids.shape[1]
        n, q, start = int(composed.positions.numel()), len(prompt), composed.next_position
        for i in range(len(b.keys)):
            for buf, part in ((b.keys[i], "keys"), (b.values[i], "values")):
                buf[:, :, : slots - n].zero_()  # padding: masked, zeros keep it finite
                at = slots - n
                for s in composed.segments:
                    buf[:, :, at : at + s.length].copy_(getattr(s, part)[i])
                    at += s.length
        own = torch.arange(start, start + q, device=dev)
        query_pos = torch.cat([torch.full((width - q,), start, device=dev), own])[None]
        key_pos = torch.cat([torch.full((slots - n,), -1, device=dev), composed.positions.to(dev),
                             torch.full((width - q,), -1, device=dev), own])[None]
        b.ids[0, : width - q] = self.lm.pad_id
        b.ids[0, width - q :] = torch.tensor(prompt, device=dev)
        b.pos.copy_(query_pos)
        masks = attention_mask(key_pos, query_pos, self.lm.windows, self.lm.dtype, always=True)
        for kind, m in (masks.items() if isinstance(masks, dict) else [(None, masks)]):
            b.masks[kind].copy_(m)

    def _forward(self, b: _Bucket) -> torch.Tensor:
        slots = b.keys[0].shape[2]
        cache = to_cache(KV(tuple(b.keys), tuple(b.values), torch.arange(slots)))
        mask = b.masks[None] if None in b.masks else b.masks
        out = self.lm.model(input_ids=b.ids, position_ids=b.pos, attention_mask=mask, cache=cache, use_cache=True,
                            logits_to_keep=1)
        return out.logits[:, -1].float()

    def _capture(self, b: _Bucket) -> None:
        """Warm the bucket up on a side stream (as torch's CUDA graph notes ask), then capture its forward."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self._forward(b)
        torch.cuda.current_stream().wait_stream(side)
        b.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(b.graph):
            b.logits = self._forward(b)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step
