"""Cache mappers: small learned calibrations of one branch's K/V, applied after re-rotation.

Both kinds are exactly the identity at initialisation (their last layers start at zero) and return a
new KV; the input is never modified.

- `affine`: the paper's length-aware affine map. One MLP shared over layers reads
  [log1p(branch length), log1p(number of branches), layer / (layers - 1)] and gives bounded scalars
  (scale, shift) for K and for V per (branch, layer): about 260 parameters.
- `tagged`: per (layer, kv head, channel) bounded scale and shift for K and V from the same features
  through a low-rank head, plus learned branch-identity tags: an offset per (branch index, layer, kv
  head, channel) added to the values, and one added to the keys as a rotated key at the token's own
  position (so it keeps RoPE's relative meaning). The tags give the synthesizer a signal of which
  branch a token belongs to — in the `parallel` layout, where branches share positions, nothing else does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .kv import KV
from .rope import Rope, rotate

MAPPER_KINDS = ("affine", "tagged")


@dataclass(frozen=True)
class MapperConfig:
    kind: str = "affine"
    hidden: int = 32         # width of the feature MLP
    bound: float = 0.1       # |scale - 1| and |shift| stay below this (the paper's 0.1 for `affine`)
    rank: int = 8            # `tagged`: rank of the per-channel head
    max_branches: int = 8    # `tagged`: branch-identity tags; later branches reuse the last tag

    def __post_init__(self) -> None:
        if self.kind not in MAPPER_KINDS:
            raise ValueError(f"unknown mapper kind '{self.kind}' (choose from {', '.join(MAPPER_KINDS)})")
        for name in ("hidden", "rank", "max_branches"):
            if getattr(self, name) < 1:
                raise ValueError(f"MapperConfig.{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.bound <= 1:
            raise ValueError(f"MapperConfig.bound must be in (0, 1], got {self.bound}")


def _features(length: int, branches: int, layers: int, device) -> torch.Tensor:
    """[layers, 3]: log1p(branch length), log1p(number of branches), layer position in [0, 1]."""
    depth = torch.arange(layers, dtype=torch.float32, device=device) / max(layers - 1, 1)
    return torch.stack([torch.full_like(depth, math.log1p(length)), torch.full_like(depth, math.log1p(branches)),
                        depth], -1)


class AffineMapper(nn.Module):
    def __init__(self, config: MapperConfig, n_layers: int):
        super().__init__()
        self.config, self.n_layers = config, n_layers
        self.net = nn.Sequential(nn.Linear(3, config.hidden), nn.SiLU(), nn.Linear(config.hidden, 4))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, kv: KV, index: int, branches: int) -> KV:
        raw = self.net(_features(kv.length, branches, self.n_layers, kv.keys[0].device))  # [layers, 4]
        b = self.config.bound * torch.tanh(raw)
        keys = tuple(k * (1 + b[i, 0]) + b[i, 1] for i, k in enumerate(kv.keys))
        values = tuple(v * (1 + b[i, 2]) + b[i, 3] for i, v in enumerate(kv.values))
        return KV(keys, values, kv.positions)


class TaggedMapper(nn.Module):
    def __init__(self, config: MapperConfig, n_layers: int, heads: int, head_dim: int, rope: Rope):
        super().__init__()
        self.config, self.n_layers, self.heads, self.head_dim = config, n_layers, heads, head_dim
        self.inv_freq = rope.inv_freq
        self.shared_freq = all(torch.equal(f, rope.inv_freq[0]) for f in rope.inv_freq[1:])
        width = 4 * heads * head_dim  # scale and shift, for K and V
        self.net = nn.Sequential(nn.Linear(3, config.hidden), nn.SiLU(), nn.Linear(config.hidden, config.rank))
        self.head = nn.Parameter(torch.zeros(n_layers, config.rank, width))
        shape = (config.max_branches, n_layers, heads, head_dim)
        self.key_tags = nn.Parameter(torch.zeros(shape))
        self.value_tags = nn.Parameter(torch.zeros(shape))

    def forward(self, kv: KV, index: int, branches: int) -> KV:
        low = self.net(_features(kv.length, branches, self.n_layers, kv.keys[0].device))  # [layers, rank]
        per = self.config.bound * torch.tanh(torch.einsum("lr,lrw->lw", low, self.head))
        per = per.view(self.n_layers, 4, 1, self.heads, 1, self.head_dim)  # broadcast over batch and tokens
        tag = min(index, self.config.max_branches - 1)
        key_tags = self._rotated_key_tags(tag, kv.positions)
        keys, values = [], []
        for i, (k, v) in enumerate(zip(kv.keys, kv.values)):
            keys.append(k * (1 + per[i, 0, 0]) + per[i, 1, 0] + key_tags[i])
            values.append(v * (1 + per[i, 2, 0]) + per[i, 3, 0] + self.value_tags[tag, i][None, :, None, :])
        return KV(tuple(keys), tuple(values), kv.positions)

    def _rotated_key_tags(self, tag: int, positions: torch.Tensor) -> torch.Tensor:
        """[layers, 1, heads, tokens, head_dim]: the branch's key tag as a key at each token's position;
        one rotation for all layers when they share their frequencies (all but Gemma-style models)."""
        tags = self.key_tags[tag][:, :, None, :].expand(-1, -1, positions.numel(), -1)
        zero = torch.zeros_like(positions)
        if self.shared_freq:
            return rotate(tags, self.inv_freq[0], zero, positions)[:, None]
        return torch.stack([rotate(tags[i : i + 1], f, zero, positions) for i, f in enumerate(self.inv_freq)])


def build_mapper(config: MapperConfig, model_config, rope: Rope) -> nn.Module:
    """A mapper for a model with `model_config` (its text config), identity at initialisation."""
    layers = model_config.num_hidden_layers
    if config.kind == "affine":
        return AffineMapper(config, layers)
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return TaggedMapper(config, layers, model_config.num_key_value_heads, head_dim, rope)
