"""How the next token is drawn: greedy or temperature + nucleus, each row with its own seeded generator.

A row's draws depend only on its seed and its own logits, never on which other rows share the batch,
so a request gives the same tokens alone or batched, and rows may join and leave between steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn. temperature 0 is greedy; `seed` makes sampling reproducible; `stop` holds
    strings that end the answer (the text is cut before the first one), besides the model's stop tokens."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")


def row_seed(seed: int, row: int) -> int:
    """The seed of row `row` of a request seeded `seed` (workers, `n` choices): distinct per row."""
    return (seed * 1_000_003 + row) % 2**63


def generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator seeded with `params.seed` for sampled rows; None for greedy ones."""
    if params.temperature == 0:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None]) -> list[int]:
    """Next token of every row from logits [B, V]: one argmax for the batch, then a draw per sampled row.
    Returns plain ints (one host sync for the batch)."""
    tokens = logits.argmax(-1)
    for j, (p, g) in enumerate(zip(params, generators)):
        if p.temperature > 0:
            tokens[j] = draw(logits[j], p, g)
    return tokens.tolist()


def draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """One token from logits [V] at `params.temperature`, within the smallest set of mass `top_p`."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > params.top_p  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(outside, 0))
    return torch.multinomial(probs, 1, generator=generator)[0]
