"""Faster CPU inference: oneDNN weights pre-packed once, and attention on grouped K/V heads as they are.

On CPUs where MKL's small-batch GEMM is slow (seen on AMD EPYC: a 3-row matmul cost 3× a 1-row one),
batched decoding of workers gains little. oneDNN's packed-weight linear (the kernel PyTorch's own
compiler uses after freezing) keeps a 3-row step close to a 1-row step. The module stays an
`nn.Linear`, so a LoRA can wrap it; with gradients enabled it runs the plain path.

With an explicit mask, transformers' SDPA attention copies K/V once per query head group on CPU (a
full copy of the cache in every layer); torch's SDPA takes grouped heads with a mask itself, with
identical results. `ATTENTION` is transformers' SDPA attention with that one change, registered under
its own name through transformers' public attention registry (at import, once per process), so no
other model or setting of the process changes.

`observing(fn)` lets a caller see the attention probabilities of the forwards it runs (thread- and
task-local; nothing is computed when no one observes): the SnapKV-style branch compression reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

ATTENTION = "parsyn_cpu_sdpa"
# fn(module, probs): probs [B, H_kv, groups, q, k] float32, the attention of this forward's queries
_OBSERVER: ContextVar[Callable[[nn.Module, torch.Tensor], None] | None] = ContextVar("parsyn_observer", default=None)


@contextmanager
def observing(observer: Callable[[nn.Module, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, every attention call of a model on parsyn's CPU attention reports its attention
    probabilities to `observer(module, probs)` (probs [B, H_kv, groups, q, k], float32)."""
    token = _OBSERVER.set(observer)
    try:
        yield
    finally:
        _OBSERVER.reset(token)


def attention_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float | None,
                    causal: bool) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask) per kv head group: query [B, H, q, D], key [B, H_kv, k, D], an additive
    mask [B, 1, q, k] or None (lower-right causal when `causal`). Returns [B, H_kv, H / H_kv, q, k] float32."""
    b, h, q, d = query.shape
    h_kv, k = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else d ** -0.5
    grouped = query.float().reshape(b, h_kv, h // h_kv, q, d)
    scores = grouped @ key.float()[:, :, None].transpose(-1, -2) * scale  # [B, H_kv, g, q, k]
    if mask is not None:
        scores = scores + mask.float()[:, :, None]
    elif causal:
        later = torch.ones(q, k, dtype=torch.bool, device=query.device).triu(k - q + 1)
        scores = scores.masked_fill(later, float("-inf"))
    return scores.softmax(-1)


def grouped_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention for transformers' interface: query [B, H, q, D], key/value [B, H_kv, k, D], an additive
    mask [B, 1, q, k] or None (then causal when q > 1). Returns [B, q, H, D]."""
    if kwargs.get("softcap") is not None:
        raise ValueError("attention with softcapping is not supported on parsyn's CPU attention; load with eager")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and attention_mask is None and causal
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                         is_causal=causal, enable_gqa=query.shape[1] != key.shape[1])
    observer = _OBSERVER.get()
    if observer is not None:
        observer(module, attention_probs(query, key, attention_mask, scaling, causal))
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, grouped_sdpa)
AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


class PackedLinear(nn.Linear):
    """nn.Linear whose no-grad forward uses a oneDNN packed copy of the weight, repacked when the
    weight changes in place (for example when an adapter is merged)."""

    def _packed(self) -> torch.Tensor:
        version = (self.weight._version, self.weight.data_ptr())
        if getattr(self, "_pack_version", None) != version:
            with torch.no_grad():
                self._pack = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 4)
            self._pack_version = version
        return self._pack

    def prepack(self) -> None:
        """Pack the weight now rather than at the first forward."""
        self._packed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        bias = None if self.bias is None else self.bias.detach()
        y = torch.ops.mkldnn._linear_pointwise(flat, self._packed(), bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_linears_(model: nn.Module) -> int:
    """Turn every fp32 CPU nn.Linear of `model` into a PackedLinear, in place; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu":
            module.__class__ = PackedLinear
            count += 1
    return count
