"""Running the model over a decode state: masks from logical positions, batched prefills, stacking states.

Positions are always explicit: in a composed cache the storage index of a key is not its position, and
rows of one batch hold contexts of different lengths (padding slots carry position -1 and are masked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .kv import KV, drop_front_, from_cache, growing, keep_rows_, layer_tensors, stacked, to_cache
from .model import LM


@dataclass(eq=False)
class State:
    """Mutable decode state owned by one batch: its own cache plus the logical position of every key.
    `key_pos` is -1 where a slot is padding. Functions that change it end in `_` or say so."""

    cache: DynamicCache
    key_pos: torch.Tensor   # [B, T] logical positions of the cached keys, -1 = padding
    next_pos: torch.Tensor  # [B] position of each row's next token
    key_bias: torch.Tensor | None = None  # [B, T] added to every query's attention logit on that key

    @classmethod
    def empty(cls, rows: int, device: torch.device) -> State:
        """A state with an empty cache for `rows` sequences."""
        none = torch.zeros((rows, 0), dtype=torch.long, device=device)
        return cls(DynamicCache(), none, torch.zeros(rows, dtype=torch.long, device=device))

    @classmethod
    def over(cls, segments: Sequence[KV], key_pos: torch.Tensor, key_bias: torch.Tensor | None = None) -> State:
        """A state whose cache holds `segments` (not copied until the model first runs); `key_pos` [B, T]."""
        return cls(to_cache(segments), key_pos, key_pos.max(dim=1).values + 1, key_bias)

    @property
    def rows(self) -> int:
        return int(self.key_pos.shape[0])

    def pick(self, rows: torch.Tensor) -> State:
        """A new state of batch `rows` (repeats allowed), copied; this state is left as it was."""
        layers = [layer_tensors(layer) for layer in self.cache.layers]
        kv = KV(tuple(k.index_select(0, rows) for k, _ in layers), tuple(v.index_select(0, rows) for _, v in layers),
                torch.arange(self.key_pos.shape[1]))
        bias = None if self.key_bias is None else self.key_bias[rows]
        return State(to_cache(kv), self.key_pos[rows], self.next_pos[rows], bias)

    def select_(self, rows: torch.Tensor) -> None:
        """Keep only batch `rows` (ascending; in place on this state, the cache moves them down in its
        own memory)."""
        keep_rows_(self.cache, rows.tolist())
        self.key_pos, self.next_pos = self.key_pos[rows], self.next_pos[rows]
        if self.key_bias is not None:
            self.key_bias = self.key_bias[rows]

    def trim_(self) -> None:
        """Drop the leading slots that are padding in every row (in place). Rows that left a long-lived
        batch leave such slots behind; without trimming, a batch that never empties (a serving engine
        under load) would attend over an ever wider cache. Masked slots carry no weight: exact."""
        used = torch.nonzero((self.key_pos >= 0).any(0))
        first = int(used[0]) if len(used) else self.key_pos.shape[1]
        if first == 0:
            return
        drop_front_(self.cache, first)
        self.key_pos = self.key_pos[:, first:]
        if self.key_bias is not None:
            self.key_bias = self.key_bias[:, first:]


def stack(states: Sequence[State]) -> State:
    """One state holding the rows of every state in order; shorter caches are padded in front (slots at
    position -1, masked). The inputs are left as they were."""
    width = max(s.key_pos.shape[1] for s in states)
    cache = stacked([[layer_tensors(layer) for layer in s.cache.layers] for s in states], width)

    def padded(t: torch.Tensor, fill) -> torch.Tensor:  # [B, T] -> padding in front of T
        return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=fill)

    key_pos = torch.cat([padded(s.key_pos, -1) for s in states])
    bias = None
    if any(s.key_bias is not None for s in states):
        bias = torch.cat([padded(s.key_bias if s.key_bias is not None
                                 else torch.zeros_like(s.key_pos, dtype=torch.float32), 0)
                          for s in states])
    return State(cache, key_pos, torch.cat([s.next_pos for s in states]), bias)


def attention_mask(key_pos: torch.Tensor, query_pos: torch.Tensor, windows: dict, dtype: torch.dtype,
                   key_bias: torch.Tensor | None = None, *, always: bool = False):
    """Additive masks [B, 1, q, k] built from logical positions, or None where the model's own causal
    mask is the same (no padding, no bias, and positions equal storage indices) unless `always`.

    A key is visible when it is not padding, not after the query, and inside the layer's window;
    `key_bias` [B, k] is added on visible keys. Returns one tensor, or a dict by layer type when
    `windows` has several types (Gemma 3, Qwen3).
    """
    b, k = key_pos.shape
    q = query_pos.shape[1]
    storage = torch.arange(k, device=key_pos.device)
    plain = key_bias is None or not bool(key_bias.any())
    if not always and plain and bool((key_pos == storage).all()) and bool((query_pos == storage[k - q :]).all()):
        return None
    bias = 0.0 if plain else key_bias[:, None, None, :].to(dtype)
    kp, qp = key_pos[:, None, None, :], query_pos[:, None, :, None]
    visible = (kp >= 0) & (kp <= qp)
    # finfo.min, not -inf: a padding query that sees nothing then stays finite instead of NaN
    low = torch.finfo(dtype).min
    masks = {
        kind: (torch.zeros(visible.shape, dtype=dtype, device=key_pos.device) + bias).masked_fill(
            ~(visible if w is None else visible & (kp > qp - w)), low
        )
        for kind, w in windows.items()
    }
    return masks[None] if None in masks else masks


def forward_(lm: LM, state: State, ids: torch.Tensor, pos: torch.Tensor, key_pos: torch.Tensor | None = None, *,
             keep: int = 1) -> torch.Tensor:
    """Run `ids` [B, q] at positions `pos` [B, q] over the state's cache, appending their K/V to it (in place).
    `key_pos` gives the positions recorded for the new keys (default `pos`; -1 marks padding).
    Returns the last column's logits [B, V] float32, or with keep > 1 the last `keep` columns' [B, keep, V]."""
    state.key_pos = torch.cat([state.key_pos, pos if key_pos is None else key_pos], dim=1)
    if state.key_bias is not None:
        state.key_bias = torch.cat([state.key_bias, torch.zeros_like(pos, dtype=state.key_bias.dtype)], dim=1)
    mask = attention_mask(state.key_pos, pos, lm.windows, lm.dtype, state.key_bias)
    out = lm.model(
        input_ids=ids, position_ids=pos, attention_mask=mask, cache=state.cache, use_cache=True, logits_to_keep=keep
    )
    state.next_pos = pos[:, -1] + 1
    return out.logits[:, -1].float() if keep == 1 else out.logits.float()


def feed_(lm: LM, state: State, rows: Sequence[Sequence[int]], positions: Sequence[Sequence[int]] | None = None, *,
          keep: int = 1) -> torch.Tensor:
    """One forward of each row's new tokens over the state's cache (in place), right-aligned: padding
    goes before a shorter row and is masked, so the last column holds every row's next-token logits.
    `positions` default to each row's next positions; an empty row only pads (its next position stays)."""
    dev, n = lm.device, len(rows)
    width = max(1, max(map(len, rows)))
    ids = torch.full((n, width), lm.pad_id, dtype=torch.long)
    nxt = state.next_pos.tolist()
    pos = torch.tensor(nxt, dtype=torch.long)[:, None].repeat(1, width)  # padding queries: finite, unused
    key_pos = torch.full((n, width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            at = list(positions[i]) if positions is not None else list(range(nxt[i], nxt[i] + len(row)))
            ids[i, width - len(row) :] = torch.tensor(list(row))
            pos[i, width - len(row) :] = key_pos[i, width - len(row) :] = torch.tensor(at)
    logits = forward_(lm, state, ids.to(dev), pos.to(dev), key_pos.to(dev), keep=keep)
    idle = torch.tensor([not r for r in rows], device=dev)
    state.next_pos = torch.where(idle, torch.tensor(nxt, device=dev), state.next_pos)
    return logits


def prefill_rows(lm: LM, rows: Sequence[Sequence[int]], prefix: KV | None = None) -> tuple[State, torch.Tensor]:
    """A new state: one batched forward of each row's tokens after an optional shared `prefix` (batch 1,
    not modified), rows right-aligned. Returns the state and every row's next-token logits [B, V]."""
    n, dev = len(rows), lm.device
    if prefix is None:
        state = State.empty(n, dev)
    else:
        shared = KV(tuple(k.expand(n, -1, -1, -1) for k in prefix.keys),
                    tuple(v.expand(n, -1, -1, -1) for v in prefix.values), prefix.positions)
        state = State.over([shared], prefix.positions.to(dev)[None].expand(n, -1))
    with torch.inference_mode():
        logits = feed_(lm, state, rows)
    if prefix is None:
        growing(state.cache)
    return state, logits


def row_kv(state: State, row: int, start: int = 0) -> KV:
    """A new batch-1 KV of `row`'s cached tokens at logical positions `start` and later (padding dropped)."""
    pos = state.key_pos[row]
    index = torch.nonzero(pos >= start).squeeze(-1)
    return from_cache(state.cache, pos[index], row=row, index=index)
