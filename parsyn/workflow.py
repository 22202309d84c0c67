"""Nested fork/join: the branches of one join may come from other forks, other joins and plain texts.

    subs = [parsyn.fork(lm, q, workers=2) for q in sub_questions]          # workers fork sub-workers
    joined = [parsyn.synthesize(lm, f) for f in subs]                     # each sub-fork joined
    outer = gather(lm, "main question", [*joined, subs[0].branches[0], "a note"])
    answer = parsyn.synthesize(lm, outer)                                 # a join of joins

`gather` builds the outer `Fork`: its prefix (system + question) is prefilled once; texts and the answers
of syntheses are prefilled after it, in one batch (they are short: the sub-fork's branches are not read
again); a `Branch` of another fork keeps the K/V its worker computed, its keys re-rotated to follow the
new prefix (like every branch the cache route composes, it was computed without this prefix in view); a
`Fork` contributes all its branches so. Each part's role says where it came from.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .chat import ChatFormat
from .forward import prefill_rows, row_kv
from .model import LM
from .rope import rope_of
from .synthesis import Synthesis
from .workers import Branch, Fork, encode_texts, from_ids

Part = Fork | Synthesis | Branch | str


def gather(lm: LM, question: str, parts: Sequence[Part], *, system: str | None = None) -> Fork:
    """A fork on `question` whose branches are `parts`, in order (see the module docstring)."""
    if not parts:
        raise ValueError("gather needs at least one part")
    texts, roles, order = [], [], []  # order: ("text", j) or ("kv", branch)
    for p in parts:
        if isinstance(p, Fork):
            order += [("kv", b) for b in p.branches]
        elif isinstance(p, Branch):
            order.append(("kv", p))
        elif isinstance(p, (Synthesis, str)):
            text, role = (p.answer, f"synthesis ({p.route})") if isinstance(p, Synthesis) else (p, None)
            if not text.strip():
                raise ValueError("an empty text or synthesis answer cannot be a branch")
            order.append(("text", len(texts)))
            texts.append(text)
            roles.append(role)
        else:
            raise TypeError(f"a part is a Fork, a Synthesis, a Branch or a str, not {type(p).__name__}")
    t0 = time.perf_counter()
    if texts:
        prefix_ids, branch_ids = encode_texts(lm, question, texts, system=system)
        made = from_ids(lm, question, prefix_ids, branch_ids, texts=texts, system=system)
        prefix, made_branches = made.prefix, made.branches
    else:
        if not question.strip():
            raise ValueError("the question is empty")
        prefix_ids = ChatFormat(lm.tokenizer).prefix_ids(question, system)
        prefix, made_branches = row_kv(prefill_rows(lm, [prefix_ids])[0], 0), ()
    start = len(prefix_ids)
    rope = rope_of(lm.model)
    branches = []
    for kind, x in order:
        if kind == "text":
            b = made_branches[x]
            branches.append(Branch(b.token_ids, b.text, b.kv, roles[x], 0))
            continue
        lm.check_positions(start + x.kv.length, "the prefix plus a gathered branch")
        at = start + torch.arange(x.kv.length, device=x.kv.positions.device)
        kv = x.kv.with_keys(rope.rerotate(x.kv.keys, x.kv.positions, at), at)
        branches.append(Branch(x.token_ids, x.text, kv, x.role, x.generated, x.tools))
    return Fork(question, system, tuple(prefix_ids), prefix, tuple(branches), time.perf_counter() - t0)
