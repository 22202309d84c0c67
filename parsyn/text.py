"""Text rules shared by training data and evaluation: answer normalization, containment, passage splits."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(" " if ch in string.punctuation else ch for ch in text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def contains_answer(text: str, gold: Sequence[str]) -> bool:
    """Whether a gold answer appears in `text` as whole words, both normalized."""
    said = f" {normalize_answer(text)} "
    return any(g and f" {g} " in said for g in map(normalize_answer, gold))


def split_passage(passage: str, parts: int) -> tuple[str, ...]:
    """`passage` cut into `parts` consecutive chunks of whole sentences (whole words when it has fewer
    sentences than parts), as even in count as possible; joined with spaces they give the passage back."""
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    units = re.split(r"(?<=[.!?])\s+", passage.strip())
    if len(units) < parts:
        units = passage.split()
    n = len(units)
    return tuple(" ".join(units[i * n // parts:(i + 1) * n // parts]) for i in range(parts))
