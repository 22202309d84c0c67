"""Faster CPU linear layers for inference: oneDNN weights pre-packed once.

On CPUs where MKL's small-batch GEMM is slow (seen on AMD EPYC: a 3-row matmul cost 3× a 1-row one),
batched decoding of workers gains little. oneDNN's packed-weight linear (the kernel PyTorch's own
compiler uses after freezing) keeps a 3-row step close to a 1-row step. The module stays an
`nn.Linear`, so PEFT can wrap it; with gradients enabled it runs the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
