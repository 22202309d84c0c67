"""Where each branch and the synthesizer's own tokens sit in the composed sequence of positions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

LAYOUTS = ("parallel", "sequential")


@dataclass(frozen=True)
class Placement:
    starts: tuple[int, ...]  # first position of each branch
    next_position: int       # first position of the synthesizer's own tokens


def place(prefix_len: int, lengths: Sequence[int], layout: str) -> Placement:
    """`parallel`: every branch starts at the branch point (the end of the prefix) and the synthesizer
    starts after the longest branch. `sequential`: branches follow each other as if concatenated."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}' (choose from {', '.join(LAYOUTS)})")
    if not lengths or min(lengths) < 1:
        raise ValueError(f"need at least one non-empty branch, got lengths {list(lengths)}")
    if layout == "parallel":
        return Placement(tuple(prefix_len for _ in lengths), prefix_len + max(lengths))
    starts, at = [], prefix_len
    for n in lengths:
        starts.append(at)
        at += n
    return Placement(tuple(starts), at)
