"""The KV segment type, and the one boundary where parsyn meets transformers' cache classes.

A `KV` is a value: per-layer keys and values of one run of tokens plus the logical positions its keys
were rotated at. Nothing in parsyn writes into a `KV`'s tensors; operations return new segments.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

FORMAT = "parsyn-kv"


@dataclass(frozen=True, eq=False)
class KV:
    keys: tuple[torch.Tensor, ...]    # per layer: [B, H_kv, T, D], rotated at `positions`
    values: tuple[torch.Tensor, ...]  # per layer: [B, H_kv, T, D_v]
    positions: torch.Tensor           # [T] int64 logical positions

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values) or not self.keys:
            raise ValueError(f"KV needs one key and one value tensor per layer, "
                             f"got {len(self.keys)}/{len(self.values)}")
        t = self.positions.shape[-1]
        for k, v in zip(self.keys, self.values):
            if k.shape[:3] != v.shape[:3] or k.shape[2] != t:
                raise ValueError(f"KV shapes disagree: keys {tuple(k.shape)}, values {tuple(v.shape)}, {t} positions")

    @property
    def length(self) -> int:
        return int(self.positions.shape[-1])

    @property
    def batch(self) -> int:
        return int(self.keys[0].shape[0])

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    def to_bytes(self, model: str) -> bytes:
        """A lossless byte form (safetensors): every layer's keys and values in their dtype, the positions,
        and `model`, the fingerprint of the model that computed them (`LM.fingerprint`)."""
        tensors = {f"keys.{i}": k.detach().cpu().contiguous() for i, k in enumerate(self.keys)}
        tensors |= {f"values.{i}": v.detach().cpu().contiguous() for i, v in enumerate(self.values)}
        tensors["positions"] = self.positions.detach().cpu().contiguous()
        return save(tensors, metadata={"format": FORMAT, "version": "1", "model": model, "layers": str(self.n_layers)})

    @classmethod
    def from_bytes(cls, data: bytes, *, model: str, device: str | torch.device = "cpu") -> KV:
        """The KV `to_bytes` wrote; ValueError when the bytes are not one or another model computed it."""
        meta = _metadata(data)
        if meta.get("format") != FORMAT:
            raise ValueError("not parsyn KV bytes (no parsyn-kv header)")
        if meta.get("model") != model:
            raise ValueError(f"these K/V were computed by model {meta.get('model')}; this model is {model}")
        try:
            tensors = load(bytes(data))
            layers = range(int(meta["layers"]))
            return cls(tuple(tensors[f"keys.{i}"].to(device) for i in layers),
                       tuple(tensors[f"values.{i}"].to(device) for i in layers), tensors["positions"].to(device))
        except (SafetensorError, KeyError, ValueError) as error:
            raise ValueError(f"corrupt KV bytes: {error}") from None

    def with_keys(self, keys: Sequence[torch.Tensor], positions: torch.Tensor) -> KV:
        return KV(tuple(keys), self.values, positions)

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values (positions not counted)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def take(self, index: slice | torch.Tensor) -> KV:
        """The tokens at `index` (a slice, or a LongTensor of token indices: new tensors) as a KV."""
        if isinstance(index, slice):
            return KV(tuple(k[:, :, index] for k in self.keys), tuple(v[:, :, index] for v in self.values),
                      self.positions[index])
        at = index.to(self.keys[0].device)
        return KV(tuple(k.index_select(2, at) for k in self.keys), tuple(v.index_select(2, at) for v in self.values),
                  self.positions.index_select(0, index.to(self.positions.device)))


def _metadata(data: bytes) -> dict:
    """The `__metadata__` of a safetensors byte string: its header is an 8-byte little-endian length, then JSON."""
    try:
        size = struct.unpack("<Q", bytes(data[:8]))[0]
        header = json.loads(bytes(data[8 : 8 + size]))
    except (struct.error, ValueError, UnicodeDecodeError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def cat(segments: Sequence[KV]) -> KV:
    """Concatenate segments along the sequence axis into new tensors (inputs untouched)."""
    if not segments:
        raise ValueError("cat needs at least one KV segment")
    first = segments[0]
    for s in segments[1:]:
        if s.n_layers != first.n_layers or s.batch != first.batch:
            raise ValueError(
                f"cannot concatenate KV of {s.n_layers} layers × batch {s.batch} "
                f"with {first.n_layers} layers × batch {first.batch}"
            )
    layers = range(first.n_layers)
    return KV(
        tuple(torch.cat([s.keys[i] for s in segments], dim=2) for i in layers),
        tuple(torch.cat([s.values[i] for s in segments], dim=2) for i in layers),
        torch.cat([s.positions for s in segments]),
    )


def to_cache(segments: KV | Sequence[KV]) -> DynamicCache:
    """A DynamicCache over one or more KV segments, in order, without copying them now.

    Each layer joins its segments on the model's first update, in the same torch.cat that appends the
    new tokens, so a composed cache costs one copy, not two. Safe for the caller: updates, batch
    selection and cropping all build new tensors, so running the model never writes into a segment.
    Built without a config on purpose: a config makes sliding-window layers truncate to the window.
    """
    segments = [segments] if isinstance(segments, KV) else list(segments)
    if not segments:
        raise ValueError("to_cache needs at least one KV segment")
    cache = DynamicCache()
    cache.layers = [
        _JoinedLayer([s.keys[i] for s in segments], [s.values[i] for s in segments])
        for i in range(segments[0].n_layers)
    ]
    return cache


def _room(used: int) -> int:
    """Spare slots a growing buffer gets past `used`."""
    return max(32, used // 4)


class _JoinedLayer(DynamicLayer):
    """A DynamicLayer whose contents are several tensors until the first operation that needs one, and
    that then grows in place: the first update joins the parts into a buffer with spare slots, and later
    updates write into those slots instead of copying the whole layer (a decode step would otherwise cost
    a copy of the cache). `keys`/`values` are views of the used part of the buffer; a write only touches
    slots past every view handed out before it, so those views never change. `keep_rows_` and
    `drop_front_` reuse the buffer too (parsyn's own decode state, see `State`): they invalidate views
    handed out before them. An operation that replaces `keys` (batch selection, cropping) ends the
    buffer; the next update starts a new one. Autograd keeps the plain copying path whenever gradients
    are on (in-place writes would invalidate tensors saved for backward)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        super().__init__()
        self.lazy_initialization(keys[0], values[0])
        self._parts: tuple[list, list] | None = (keys, values)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._span = (0, 0, 0)  # rows, first slot, end slot of the buffers' used part
        self._handed: torch.Tensor | None = None

    @classmethod
    def stacked(cls, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], width: int) -> _JoinedLayer:
        """The rows of several layers' tensors [B_i, H, T_i, D] in one buffer, each right-aligned in
        `width` slots with zeros in front (one copy, with room to grow)."""
        rows = sum(k.shape[0] for k in keys)
        layer = cls([keys[0][:0]], [values[0][:0]])
        layer._parts = None
        layer._buffers = tuple(_empty_like(ts[0], rows, width + _room(width)) for ts in (keys, values))
        with torch.inference_mode():
            for ts, buf in zip((keys, values), layer._buffers):
                at = 0
                for t in ts:
                    n, pad = t.shape[0], width - t.shape[2]
                    buf[at : at + n, :, :pad].zero_()
                    buf[at : at + n, :, pad:width].copy_(t)
                    at += n
        layer._set(rows, 0, width)
        return layer

    def _set(self, rows: int, start: int, end: int) -> None:
        self._span = (rows, start, end)
        self.keys, self.values = (b[:rows, :, start:end] for b in self._buffers)
        self._handed = self.keys

    def _owned(self) -> bool:
        """The layer still shows the view it made last (nothing replaced it)."""
        return self._buffers is not None and self.keys is self._handed

    def _join(self, new_keys: list = (), new_values: list = ()) -> None:
        keys, values = self._parts
        self._parts = None
        self.keys = torch.cat([*keys, *new_keys], dim=-2)
        self.values = torch.cat([*values, *new_values], dim=-2)

    def update(self, key_states, value_states, *args, **kwargs):
        if torch.is_grad_enabled():  # autograd: no in-place writes
            self._buffers = None
            if self._parts is None:
                return super().update(key_states, value_states, *args, **kwargs)
            self._join([key_states], [value_states])
            return self.keys, self.values
        rows, start, end = self._span
        q = key_states.shape[-2]
        if (not self._owned() or rows != key_states.shape[0] or end + q > self._buffers[0].shape[-2]
                or (self._buffers[0].is_inference() and not torch.is_inference_mode_enabled())):
            keys, values = self._parts if self._parts is not None else ([self.keys], [self.values])
            self._parts = None
            self._grow([*keys, key_states], [*values, value_states])  # (an inference tensor takes in-place
        else:                                                           # writes only in inference mode)
            self._buffers[0][:rows, :, end : end + q] = key_states
            self._buffers[1][:rows, :, end : end + q] = value_states
            self._set(rows, start, end + q)
        return self.keys, self.values

    def _grow(self, keys: list, values: list) -> None:
        keys = [k for k in keys if k.numel()] or keys[-1:]
        values = [v for v in values if v.numel()] or values[-1:]
        used = sum(k.shape[-2] for k in keys)
        self._buffers = tuple(_empty_like(ts[-1], ts[-1].shape[0], used + _room(used)) for ts in (keys, values))
        torch.cat(keys, dim=-2, out=self._buffers[0][:, :, :used])
        torch.cat(values, dim=-2, out=self._buffers[1][:, :, :used])
        self._set(keys[-1].shape[0], 0, used)

    def keep_rows_(self, rows: Sequence[int]) -> None:
        """Keep batch `rows` (ascending indices): kept rows move down inside the buffer, no new memory."""
        if not self._owned() or any(b <= a for a, b in zip(rows, rows[1:])):
            self.batch_select_indices(torch.tensor(list(rows), dtype=torch.long, device=self.keys.device))
            return
        _, start, end = self._span
        with torch.inference_mode():
            for j, i in enumerate(rows):  # j <= i, in order: a source row is read before anything lands on it
                if i != j:
                    for buf in self._buffers:
                        buf[j, :, start:end].copy_(buf[i, :, start:end])
        self._set(len(rows), start, end)

    def drop_front_(self, slots: int) -> None:
        """Forget the first `slots` slots of every row (no copy while the buffer lasts)."""
        if self._owned():
            rows, start, end = self._span
            self._set(rows, start + slots, end)
            return
        self._joined()
        self.keys, self.values = self.keys[:, :, slots:], self.values[:, :, slots:]

    def get_seq_length(self) -> int:
        if self._parts is None:
            return super().get_seq_length()
        return sum(k.shape[-2] for k in self._parts[0])

    def _joined(self) -> None:
        if self._parts is not None:
            self._join()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._joined()
        super().batch_select_indices(indices)
        self._buffers = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._joined()
        super().batch_repeat_interleave(repeats)
        self._buffers = None

    def crop(self, tokens_to_remove: int) -> None:
        self._joined()
        super().crop(tokens_to_remove)
        self._buffers = None  # the cropped view starts where the buffer does: writing after it would
        # change slots that views handed out before the crop still show


def _empty_like(t: torch.Tensor, rows: int, slots: int) -> torch.Tensor:
    return t.new_empty((rows, t.shape[1], slots, t.shape[3]))


def stacked(layers: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]], width: int) -> DynamicCache:
    """One cache holding the rows of several caches in order (`layers[s][i]`: cache s's layer i keys and
    values), each right-aligned in `width` slots, zeros in front: one copy into buffers that grow in place."""
    cache = DynamicCache()
    cache.layers = [
        _JoinedLayer.stacked([ls[i][0] for ls in layers], [ls[i][1] for ls in layers], width)
        for i in range(len(layers[0]))
    ]
    return cache


def keep_rows_(cache: DynamicCache, rows: Sequence[int]) -> None:
    """Keep batch `rows` (ascending) of `cache`, in place."""
    for layer in cache.layers:
        if isinstance(layer, _JoinedLayer):
            layer.keep_rows_(rows)
        else:
            layer.batch_select_indices(torch.tensor(list(rows), dtype=torch.long, device=layer.keys.device))


def drop_front_(cache: DynamicCache, slots: int) -> None:
    """Forget the first `slots` slots of every layer of `cache`, in place."""
    for layer in cache.layers:
        if isinstance(layer, _JoinedLayer):
            layer.drop_front_(slots)
        else:
            layer.keys, layer.values = layer.keys[:, :, slots:], layer.values[:, :, slots:]


def growing(cache: DynamicCache) -> DynamicCache:
    """`cache` with every plain DynamicLayer replaced by one that grows in place (no copy now)."""
    cache.layers = [
        _JoinedLayer([layer.keys], [layer.values]) if type(layer) is DynamicLayer and layer.is_initialized else layer
        for layer in cache.layers
    ]
    return cache


def from_cache(cache: DynamicCache, positions: torch.Tensor, *, row: int | None = None, index=None) -> KV:
    """Copy cached entries into a new KV: every batch row, or only `row` (kept as batch 1); the tokens at
    `index` (a LongTensor of storage indices, default all). `positions` are the logical positions of those tokens."""

    def take(t: torch.Tensor) -> torch.Tensor:
        t = t if row is None else t[row : row + 1]
        return t.clone() if index is None else t.index_select(2, index.to(t.device))

    layers = [layer_tensors(layer) for layer in cache.layers]
    return KV(tuple(take(k) for k, _ in layers), tuple(take(v) for _, v in layers), positions.clone())


def layer_tensors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache layer's keys and values [B, H, T, D] as single tensors (a joined layer joins its parts now)."""
    if isinstance(layer, _JoinedLayer):
        layer._joined()
    return layer.keys, layer.values
