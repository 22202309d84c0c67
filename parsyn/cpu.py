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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

ATTENTION = "parsyn_cpu_sdpa"


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
