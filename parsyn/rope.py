"""Re-rotating cached RoPE keys to new positions, as pure functions.

Keys are stored after rotation: k(p) = s·R(θ·p)·k_raw, with s the attention scaling some rope types use.
Rotations compose, so moving a key from position p to p' is one more rotation by θ·p' − θ·p; the scale
s commutes with it. The angles are formed exactly as the model forms them (fp32 position × fp32
inverse frequency) and their difference is taken in float64, so a re-rotated key matches the key the
model itself would store at the new position to fp32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from .model import rotary_module

# Rope types whose inverse frequencies are fixed at load time. "dynamic" and "longrope" change them
# with the sequence length, so a stored key's rotation cannot be recovered from its position alone.
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})

# Families whose attention applies RoPE in the rotate-half layout, which `rotate` implements.
ROTATE_HALF_FAMILIES = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
     "gemma3", "gemma3_text", "phi3", "olmo2", "granite", "smollm3"}
)


@dataclass(frozen=True, eq=False)
class Rope:
    """The model's own inverse frequencies, one tensor per layer (layer types may differ, as in Gemma 3)."""

    inv_freq: tuple[torch.Tensor, ...]  # per layer: [D_rot / 2] float32

    def rerotate(self, keys: Sequence[torch.Tensor], old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """New per-layer keys moved from positions `old` to `new` ([T] each); the inputs are not modified."""
        if len(keys) != len(self.inv_freq):
            raise ValueError(f"got keys for {len(keys)} layers, the model has {len(self.inv_freq)}")
        return tuple(rotate(k, f, old, new) for k, f in zip(keys, self.inv_freq))


def rope_of(model: PreTrainedModel) -> Rope:
    """Read the per-layer inverse frequencies from the model's rotary module; ValueError if unsupported."""
    config = model.config.get_text_config()
    family = getattr(config, "model_type", "?")
    if family not in ROTATE_HALF_FAMILIES:
        raise ValueError(
            f"model type '{family}' is not supported for RoPE re-rotation (supported: "
            f"{', '.join(sorted(ROTATE_HALF_FAMILIES))})"
        )
    rotary = rotary_module(model)
    kinds = rotary.rope_type.values() if isinstance(rotary.rope_type, dict) else [rotary.rope_type]
    for kind in kinds:
        if kind not in STATIC_ROPE_TYPES:
            raise ValueError(
                f"rope type '{kind}' is not supported: its frequencies depend on the sequence length "
                f"(supported: {', '.join(sorted(STATIC_ROPE_TYPES))})"
            )
    layer_types = getattr(config, "layer_types", None) or [None] * config.num_hidden_layers
    per_layer = []
    for kind in layer_types:
        freq = getattr(rotary, f"{kind}_inv_freq", None) if kind else None
        per_layer.append((freq if freq is not None else rotary.inv_freq).detach().float())
    return Rope(tuple(per_layer))


def rotate(keys: torch.Tensor, inv_freq: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Keys [B, H, T, D] rotated at positions `old` [T], re-rotated to positions `new` [T].

    Only the first 2·len(inv_freq) channels rotate (partial rotary models leave the rest alone).
    """
    if old.shape != new.shape or old.shape[-1] != keys.shape[2]:
        raise ValueError(f"positions {tuple(old.shape)} -> {tuple(new.shape)} do not fit keys {tuple(keys.shape)}")
    freq = inv_freq.to(keys.device, torch.float32)
    # the model's own angles: fp32 position × fp32 frequency; their difference in float64
    delta = ((new.to(keys.device).float()[:, None] * freq).double()
             - (old.to(keys.device).float()[:, None] * freq).double())
    delta = torch.cat([delta, delta], dim=-1)  # [T, D_rot], rotate-half layout
    d = delta.shape[-1]
    k = keys[..., :d].double()
    half = d // 2
    turned = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    out = (k * delta.cos() + turned * delta.sin()).to(keys.dtype)
    return out if d == keys.shape[-1] else torch.cat([out, keys[..., d:]], dim=-1)
