"""Composing the synthesizer's cache from the shared prefix and the branches, as a new value."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .kv import KV, cat
from .layout import place
from .rope import Rope

# A mapper calibrates one branch's K/V after re-rotation: (branch kv, branch index, number of branches) -> kv.
Mapper = Callable[[KV, int, int], KV]


@dataclass(frozen=True)
class Span:
    """Provenance of one run of tokens in the synthesizer's context."""

    source: str  # "prefix", "branch", "tool" (a tool's result inside a branch) or "prompt"
    index: int   # branch number (0 for the prefix and the prompt)
    start: int   # first logical position
    length: int
    how: str     # "reused" (K/V as computed), "rerotated" (keys moved), "mapped" (calibrated), "recomputed",
    #              "compressed" (some of its tokens dropped before synthesis; the rest reused or moved)


@dataclass(frozen=True, eq=False)
class Composed:
    """The synthesizer's context: prefix then branches, each placed (and re-rotated or mapped) as a new
    segment where it changed. Segments are joined into one tensor per layer only when the model first
    runs on them (`kv.to_cache`), which saves a full copy of the cache."""

    segments: tuple[KV, ...]
    next_position: int      # first position of the synthesizer's own tokens
    spans: tuple[Span, ...]

    @property
    def positions(self):
        return torch.cat([s.positions for s in self.segments])

    @property
    def kv(self) -> KV:
        """All segments concatenated into one new KV."""
        return cat(self.segments)


def mark_tools(spans: Sequence[Span], tools: Sequence[Sequence[tuple[int, int]]]) -> tuple[Span, ...]:
    """`spans` with the runs of tool results in branch i (`tools[i - 1]`: (offset, length) in the branch's
    tokens) cut out as "tool" spans; a branch's spans follow one another over its tokens in order."""
    out, seen = [], {}
    for span in spans:
        runs = tools[span.index - 1] if span.source == "branch" else ()
        if not runs:
            out.append(span)
            continue
        offset = seen.get(span.index, 0)
        seen[span.index] = offset + span.length
        cuts = sorted({0, span.length} | {min(max(x - offset, 0), span.length) for a, n in runs for x in (a, a + n)})
        for lo, hi in zip(cuts, cuts[1:]):
            tool = any(a <= offset + lo < a + n for a, n in runs)
            out.append(Span("tool" if tool else "branch", span.index, span.start + lo, hi - lo, span.how))
    return tuple(out)


def extent(branch: KV) -> int:
    """Positions a branch spans: its length, or more when compression left holes between its tokens."""
    return int(branch.positions[-1] - branch.positions[0]) + 1 if branch.length else 0


def compose(prefix: KV, branches: Sequence[KV], rope: Rope, *, layout: str = "parallel",
            mapper: Mapper | None = None) -> Composed:
    """Place every branch under `layout`, re-rotate the keys of moved branches and optionally map them:
    the context [prefix, branch 1, ..., branch N]. Moved or mapped branches are new tensors; the inputs
    are never written to."""
    extents = [extent(b) for b in branches]
    placement = place(prefix.length, extents, layout)
    spans = [Span("prefix", 0, 0, prefix.length, "reused")]
    moved = []
    for i, (branch, start, size) in enumerate(zip(branches, placement.starts, extents)):
        if branch.batch != prefix.batch:
            raise ValueError(f"branch {i + 1} has batch {branch.batch}, the prefix {prefix.batch}")
        shift = start - int(branch.positions[0])
        how = "reused"
        if shift:
            new = branch.positions + shift
            branch = branch.with_keys(rope.rerotate(branch.keys, branch.positions, new), new)
            how = "rerotated"
        if mapper is not None:
            branch, how = mapper(branch, i, len(branches)), "mapped"
        moved.append(branch)
        spans.append(Span("branch", i + 1, start, size, "compressed" if branch.length < size else how))
    return Composed((prefix, *moved), placement.next_position, tuple(spans))
