"""How the next token is drawn: greedy or temperature + nucleus, each row with its own seeded generator.

A row's draws depend only on its seed and its own logits, never on which other rows share the batch,
so a request gives the same tokens alone or batched, and rows may join and leave between steps.
"""

from __future__ import annotations

import hashlib
import math
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
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")


NUCLEUS_CANDIDATES = 512


def row_seed(seed: int, row: int) -> int:
    """The seed of row `row` of a request seeded `seed` (workers, `n` choices): distinct per row."""
    return (seed * 1_000_003 + row) % 2**63


ITEM_SEEDS = "per item"  # recorded by runs that seed each item with item_seed; runs made otherwise are not resumed


def item_seed(seed: int, key: str) -> int:
    """The seed of one item among many sampled under `seed` (an evaluation's question, a training item),
    from `seed` and the item's key. With one seed for all, worker i of every item would draw the same
    random numbers: its choices would move together across items (the same quantile of every item's
    distribution at each step) instead of being independent draws."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 2**63


def alone_seed(seed: int, row: int) -> int:
    """The seed a one-worker request needs to sample as row `row` of a request seeded `seed` does:
    row_seed(alone_seed(s, i), 0) == row_seed(s, i) (the multiplier is odd, so it has an inverse)."""
    return row_seed(seed, row) * pow(1_000_003, -1, 2**63) % 2**63


def generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator seeded with `params.seed` for sampled rows; None for greedy ones."""
    if params.temperature == 0:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None]) -> list[int]:
    """Next token of every row from logits [B, V]: one argmax for the batch, then one draw per sampled row
    with that row's generator. Returns plain ints (one host sync for the batch)."""
    tokens = logits.argmax(-1)
    hot = [j for j, p in enumerate(params) if p.temperature > 0]
    if hot:
        rows = torch.tensor(hot, device=logits.device)
        tokens[rows] = draw(logits[rows], [params[j] for j in hot], [generators[j] for j in hot])
    return tokens.tolist()


def draw(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of logits [n, V] at each row's temperature, from the smallest set of its most
    likely tokens whose mass reaches its top_p (nucleus sampling). Each row's draw reads only its own
    logits and generator. The nucleus is found among the NUCLEUS_CANDIDATES most likely tokens when it
    lies inside them (almost always), else over the whole sorted vocabulary: the same set either way."""
    temperature = torch.tensor([p.temperature for p in params], device=logits.device, dtype=logits.dtype)
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device, dtype=probs.dtype)
    best, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)  # sorted, most likely first
    inside = (best.sum(-1) > top_p).tolist()
    out = []
    for j, p in enumerate(params):
        if p.top_p >= 1:
            out.append(torch.multinomial(probs[j], 1, generator=generators[j])[0])
            continue
        sorted_p, index = (best[j], order[j]) if inside[j] else probs[j].sort(descending=True)
        kept = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > p.top_p, 0)  # mass before a token <= top_p
        out.append(index[torch.multinomial(kept, 1, generator=generators[j])[0]])  # drawn among the candidates
    return torch.stack(out)
