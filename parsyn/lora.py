"""The synthesizer's LoRA: low-rank updates on chosen projections, active only where a caller says so.

parsyn owns this small layer instead of injecting PEFT's, by choice: the base model is shared by
workers, the text route and the synthesizer, possibly inside one decode batch, so whether the LoRA
applies must be a property of the call (and of each batch row), not a flag on the model. A forward
reads the active adapter from a context variable, which is private to the thread (or task) that set
it; `active(rows=...)` limits the update to some batch rows. Nothing on the model changes after
`attach`. Where a forward's whole batch is the synthesizer's and nothing is being trained (a synthesis
prefill, its lone decode), each layer runs one matmul with a merged copy of its weight (W + scale · B A,
built once: about the targeted projections' size again in memory); workers keep the base weights.
The arithmetic and the tensor names are PEFT's (`<module>.lora_A.weight`, `<module>.lora_B.weight`,
scale alpha / rank, A initialised as nn.Linear, B at zero), tested against the pinned PEFT release.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

# (the LoRA whose layers apply, the indices of the batch rows they apply to or None for all rows)
_ACTIVE: ContextVar[tuple[LoRA, torch.Tensor | None] | None] = ContextVar("parsyn_lora_active", default=None)


class LoRALinear(nn.Module):
    """A linear layer plus its low-rank update, applied only while its LoRA is active."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, owner: LoRA):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self._owner = (owner,)  # a tuple, so the owner is not registered as a submodule
        self._merge, self._merge_version = (), None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = _ACTIVE.get()
        if active is None or active[0] is not self._owner[0]:
            return self.base_layer(x)
        rows = active[1]
        if rows is None:
            if not self._training(x):  # the whole batch is the synthesizer's: one matmul with the merged weight
                return self._merged()(x)
            return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling
        # x: [B, T, in]; rows: indices of the batch rows it applies to (the others' compute is skipped); in a
        # mixed batch the low-rank update on those rows costs less than a second full matmul over them
        update = self.lora_B(self.lora_A(x.index_select(0, rows))) * self.scaling
        return self.base_layer(x).index_add(0, rows, update)

    def _training(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.lora_A.weight.requires_grad
                                            or self.lora_B.weight.requires_grad)

    def _merged(self) -> nn.Linear:
        """A synthesizer-only copy of the base layer with the update folded in (W + scale · B A), of the base
        layer's own class (so a packed CPU linear stays packed). Built on first use and again whenever a
        weight changed in place; it is no parameter of the model, and the base layer is never modified."""
        weights = (self.base_layer.weight, self.lora_A.weight, self.lora_B.weight)
        version = tuple((w._version, w.data_ptr()) for w in weights)  # as cpu.PackedLinear tracks its pack
        if self._merge_version != version:
            base = self.base_layer
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor: its version can be read
                weight = torch.addmm(base.weight, self.lora_B.weight, self.lora_A.weight, alpha=self.scaling)
            merged = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
            merged.weight = nn.Parameter(weight, requires_grad=False)
            merged.bias = base.bias
            merged.__class__ = type(base)
            self._merge, self._merge_version = (merged,), version  # a tuple: not registered as a submodule
        return self._merge[0]


def detach(model: nn.Module) -> int:
    """Put every LoRA-wrapped layer of `model` back to its base layer (setup, not during a request);
    returns how many. A LoRA attached before no longer applies anywhere."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.base_layer)
            count += 1
    return count


class LoRA:
    """The LoRA layers attached to one model (at most one LoRA per model)."""

    def __init__(self, model: nn.Module, targets: Sequence[str], rank: int, alpha: float):
        if rank < 1 or alpha <= 0:
            raise ValueError(f"LoRA needs rank >= 1 and alpha > 0, got rank={rank}, alpha={alpha}")
        self.rank, self.alpha = rank, alpha
        self.layers: dict[str, LoRALinear] = {}
        if any(isinstance(m, LoRALinear) for m in model.modules()):
            raise ValueError("the model already holds a LoRA; detach it first")
        for name, module in list(model.named_modules()):
            if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear):
                parent, _, child = name.rpartition(".")
                layer = LoRALinear(module, rank, alpha, self)
                setattr(model.get_submodule(parent) if parent else model, child, layer)
                self.layers[name] = layer
        if not self.layers:
            raise ValueError(f"no linear layer of the model is named {', '.join(targets)}")

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.lora_A.weight, layer.lora_B.weight)]

    def merge(self) -> None:
        """Build every layer's merged copy now (and its packed CPU form), so that the first synthesis does
        not pay for it; a later change of the weights rebuilds a copy at its next use."""
        for layer in self.layers.values():
            merged = layer._merged()
            if hasattr(merged, "prepack"):
                merged.prepack()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors by PEFT's names: `<module path>.lora_A.weight` and `.lora_B.weight`."""
        out = {}
        for name, layer in self.layers.items():
            out[f"{name}.lora_A.weight"] = layer.lora_A.weight
            out[f"{name}.lora_B.weight"] = layer.lora_B.weight
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors named as `state_dict` names them; ValueError when the names or shapes do not fit."""
        mine = self.state_dict()
        if set(tensors) != set(mine):
            raise ValueError(f"LoRA tensors do not fit the model ({len(tensors)} given, {len(mine)} expected)")
        with torch.no_grad():
            for name, weight in mine.items():
                if tensors[name].shape != weight.shape:
                    raise ValueError(f"LoRA tensor {name} has shape {tuple(tensors[name].shape)}, "
                                     f"the model needs {tuple(weight.shape)}")
                weight.copy_(tensors[name])

    @contextmanager
    def active(self, rows: torch.Tensor | None = None) -> Iterator[None]:
        """Within the block, in this thread or task only, forwards apply this LoRA: to every batch row,
        or to the rows where the bool mask `rows` [B] is true."""
        token = _ACTIVE.set((self, None if rows is None else torch.nonzero(rows).squeeze(-1)))
        try:
            yield
        finally:
            _ACTIVE.reset(token)
