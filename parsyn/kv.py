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


class _JoinedLayer(DynamicLayer):
    """A DynamicLayer whose contents are several tensors until the first operation that needs one, and
    that then grows in place: the first update joins the parts into a buffer with spare slots, and later
    updates write into those slots instead of copying the whole layer (a decode step would otherwise cost
    a copy of the cache). `keys`/`values` are always views of the used slots; a write only touches slots
    past every view handed out before it, so earlier views never change. An operation that replaces
    `keys` (batch selection, cropping) ends the buffer; the next update starts a new one. Autograd keeps
    the plain copying path whenever gradients are on (in-place writes would invalidate tensors saved for
    backward)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        super().__init__()
        self.lazy_initialization(keys[0], values[0])
        self._parts: tuple[list, list] | None = (keys, values)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _join(self, new_keys: list = (), new_values: list = ()) -> None:
        keys, values = self._parts
        self._parts = None
        self.keys = torch.cat([*keys, *new_keys], dim=-2)
        self.values = torch.cat([*values, *new_values], dim=-2)

    def update(self, key_states, value_states, *args, **kwargs):
        if torch.is_grad_enabled():  # autograd: no in-place writes, no cat(out=)
            self._buffers = None
            if self._parts is None:
                return super().update(key_states, value_states, *args, **kwargs)
            self._join([key_states], [value_states])
            return self.keys, self.values
        keys, values = self._parts if self._parts is not None else ([self.keys], [self.values])
        self._parts = None
        if not self._owns_views() or self.keys.shape[0] != key_states.shape[0] or (
            self._buffers[0].is_inference() and not torch.is_inference_mode_enabled()
        ):  # (an inference tensor takes in-place writes only in inference mode)
            self._buffers = None
        q = key_states.shape[-2]
        if self._buffers is None or self.keys.shape[-2] + q > self._buffers[0].shape[-2]:
            self._grow([*keys, key_states], [*values, value_states])
        else:
            used = self.keys.shape[-2]
            self._buffers[0][:, :, used : used + q] = key_states
            self._buffers[1][:, :, used : used + q] = value_states
            self._view(used + q)
        return self.keys, self.values

    def _owns_views(self) -> bool:
        b = self._buffers
        return b is not None and self.keys.data_ptr() == b[0].data_ptr() and self.values.data_ptr() == b[1].data_ptr()

    def _grow(self, keys: list, values: list) -> None:
        keys = [k for k in keys if k.numel()] or keys[-1:]
        values = [v for v in values if v.numel()] or values[-1:]
        used = sum(k.shape[-2] for k in keys)
        room = used + max(32, used // 4)
        k0, v0 = keys[-1], values[-1]
        kbuf = k0.new_empty((k0.shape[0], k0.shape[1], room, k0.shape[3]))
        vbuf = v0.new_empty((v0.shape[0], v0.shape[1], room, v0.shape[3]))
        torch.cat(keys, dim=-2, out=kbuf[:, :, :used])
        torch.cat(values, dim=-2, out=vbuf[:, :, :used])
        self._buffers = (kbuf, vbuf)
        self._view(used)

    def _view(self, used: int) -> None:
        self.keys, self.values = self._buffers[0][:, :, :used], self._buffers[1][:, :, :used]

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
