"""Forking workers from one shared prefix: prefill the prefix once, decode all workers as one batch.

Each branch keeps its exact token ids, its text and the K/V of every token it holds (its opening, its
answer and the final end-of-turn token, which `generate()` would never feed back), at the logical
positions it was computed at: right after the prefix.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .chat import ChatFormat
from .decode import SamplingParams, State, decode_, forward_, prefill_rows, row_kv
from .kv import KV, from_cache
from .model import LM

WORKER_SAMPLING = SamplingParams(max_new_tokens=128, temperature=0.7, top_p=0.95, seed=0)


@dataclass(frozen=True, eq=False)
class Branch:
    token_ids: tuple[int, ...]  # every token after the prefix: opening, answer, end of turn
    text: str                   # the answer alone
    kv: KV                      # K/V of token_ids, batch 1, positions prefix_len ..
    role: str | None = None
    generated: int = 0          # tokens the worker sampled (0 for a given text)


@dataclass(frozen=True, eq=False)
class Fork:
    """The shared prefix and the branches forked from it; the input of every synthesis route."""

    question: str
    system: str | None
    prefix_ids: tuple[int, ...]
    prefix: KV
    branches: tuple[Branch, ...]
    prefill_s: float = 0.0  # prefix + branch openings (or whole given branches)
    decode_s: float = 0.0   # worker decoding


def fork(
    lm: LM,
    question: str,
    *,
    workers: int = 3,
    roles: Sequence[str] = (),
    system: str | None = None,
    sampling: SamplingParams = WORKER_SAMPLING,
    batched: bool = True,
    on_token: Callable[[int, int], None] | None = None,
) -> Fork:
    """Run `workers` workers on `question`; the prefix (system + question) is prefilled once and shared.

    roles: none, or one instruction per worker. Workers decode as one batch with per-row stopping
    (`batched=False` runs them one after another, for comparison). on_token(worker, token) reports progress.
    """
    fmt = ChatFormat(lm.tokenizer)
    prefix_ids = _encode(lm, fmt.prefix(_check_question(question), system))
    lm.check_memory(workers if batched else 1, len(prefix_ids) + sampling.max_new_tokens)  # before any per-worker work
    roles = _roles(roles, workers)
    openings = [_encode(lm, fmt.turn(question, system, r)) for r in roles]
    longest = len(prefix_ids) + max(map(len, openings)) + sampling.max_new_tokens
    lm.check_positions(longest, "the prompt plus the workers' answers")
    lm.check_memory(workers if batched else 1, longest)
    t0 = time.perf_counter()
    prefix = _prefill_prefix(lm, prefix_ids)
    groups = [list(range(workers))] if batched else [[i] for i in range(workers)]
    branches: list[Branch] = []
    prefill_s = time.perf_counter() - t0
    decode_s = 0.0
    for group in groups:
        t1 = time.perf_counter()
        state, logits = prefill_rows(lm, [openings[i] for i in group], prefix)
        t2 = time.perf_counter()
        report = None if on_token is None else (lambda row, tok, g=group: on_token(g[row], tok))
        out = decode_(lm, state, logits, sampling, capture_from=prefix.length, close_turn=True, on_token=report)
        decode_s += time.perf_counter() - t2
        prefill_s += t2 - t1
        for j, i in enumerate(group):
            answer = out.tokens[j]
            text = lm.tokenizer.decode(answer[:-1] if out.stopped[j] else answer, skip_special_tokens=True)
            branches.append(Branch(openings[i] + answer, text.strip(), out.kv[j], roles[i], len(answer)))
    return Fork(question, system, prefix_ids, prefix, tuple(branches), prefill_s, decode_s)


def from_texts(
    lm: LM,
    question: str,
    texts: Sequence[str],
    *,
    roles: Sequence[str] = (),
    system: str | None = None,
) -> Fork:
    """A fork from ready branch texts (answers of workers run elsewhere): each is prefilled after the
    shared prefix, all in one batch."""
    prefix_ids, segments = encode_texts(lm, question, texts, roles=roles, system=system)
    return from_ids(lm, question, prefix_ids, segments, texts=texts, roles=roles, system=system)


def from_ids(
    lm: LM,
    question: str,
    prefix_ids: Sequence[int],
    branch_ids: Sequence[Sequence[int]],
    *,
    texts: Sequence[str] = (),
    roles: Sequence[str] = (),
    system: str | None = None,
) -> Fork:
    """A fork from exact token ids: the prefix prefilled once, then every branch after it in one batch."""
    if not branch_ids or min(map(len, branch_ids)) < 1:
        raise ValueError("need at least one non-empty branch")
    roles = _roles(roles, len(branch_ids))
    texts = list(texts) or [lm.tokenizer.decode(b, skip_special_tokens=True) for b in branch_ids]
    longest = len(prefix_ids) + max(map(len, branch_ids))
    lm.check_positions(longest, "the prompt plus the branch texts")
    lm.check_memory(len(branch_ids), longest)
    t0 = time.perf_counter()
    prefix = _prefill_prefix(lm, prefix_ids)
    state, _ = prefill_rows(lm, [tuple(b) for b in branch_ids], prefix)
    branches = tuple(
        Branch(tuple(b), t.strip(), row_kv(state, i, prefix.length), r)
        for i, (b, t, r) in enumerate(zip(branch_ids, texts, roles))
    )
    return Fork(question, system, tuple(prefix_ids), prefix, branches, time.perf_counter() - t0)


def encode_texts(
    lm: LM, question: str, texts: Sequence[str], *, roles: Sequence[str] = (), system: str | None = None
) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """Token ids of the shared prefix and of each branch built from a ready text (nothing is run)."""
    if not texts:
        raise ValueError("need at least one branch text")
    fmt = ChatFormat(lm.tokenizer)
    prefix_ids = _encode(lm, fmt.prefix(_check_question(question), system))
    return prefix_ids, [_encode(lm, fmt.branch(question, system, r, t)) for r, t in zip(_roles(roles, len(texts)), texts)]


def _check_question(question: str) -> str:
    if not question or not question.strip():
        raise ValueError("the question is empty")
    return question


def _roles(roles: Sequence[str], n: int) -> list[str | None]:
    if n < 1:
        raise ValueError(f"need at least one worker, got {n}")
    if roles and len(roles) != n:
        raise ValueError(f"got {len(roles)} roles for {n} workers; give one role per worker or none")
    return list(roles) if roles else [None] * n


def _encode(lm: LM, text: str) -> tuple[int, ...]:
    return tuple(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefill_prefix(lm: LM, ids: Sequence[int]) -> KV:
    """K/V of the shared prefix at positions 0 .. len-1 (batch 1)."""
    state = State.empty(1, lm.device)
    pos = torch.arange(len(ids), device=lm.device)[None]
    with torch.inference_mode():
        forward_(lm, state, torch.tensor([ids], device=lm.device), pos)
    return from_cache(state.cache, pos[0])
