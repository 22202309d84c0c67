"""Forking workers from a shared prefix: prefill each prefix once, decode all workers as one batch.

Each branch keeps its exact token ids, its text and the K/V of every token it holds (its opening, its
answer and the final end-of-turn token, which `generate()` would never feed back), at the logical
positions it was computed at: right after the prefix.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .chat import ChatFormat
from .decode import Batch, Result, Row, decode
from .forward import State, feed_, prefill_rows, row_kv
from .kv import KV
from .model import LM
from .sampling import SamplingParams, row_seed

WORKER_SAMPLING = SamplingParams(max_new_tokens=128, temperature=0.7, top_p=0.95, seed=0)


@dataclass(frozen=True, eq=False)
class Branch:
    token_ids: tuple[int, ...]  # every token after the prefix: opening, answer, end of turn
    text: str                   # the answer alone
    kv: KV                      # K/V of token_ids, batch 1, positions prefix_len ..
    role: str | None = None
    generated: int = 0          # tokens the worker sampled (0 for a given text)
    tools: tuple[tuple[int, int], ...] = ()  # (offset in token_ids, length) of each tool-result turn in it


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
    cut: tuple[int, ...] = ()  # workers stopped by a quorum or deadline join (not among the branches)


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
    quorum: int | None = None,
    deadline_s: float | None = None,
    executor=None,
) -> Fork:
    """Run `workers` workers on `question`; the prefix (system + question) is prefilled once and shared.

    roles: none, or one instruction per worker. Workers decode as one batch with per-row stopping; worker
    i samples with seed `row_seed(sampling.seed, i)`, so its tokens do not depend on the batch
    (`batched=False` runs them one after another, for comparison). on_token(worker, token) reports progress.
    quorum, deadline_s: a join that does not wait for stragglers (see `fork_many`).
    executor: where the workers decode (see `fork_many`).
    """
    report = None if on_token is None else (lambda _, worker, token: on_token(worker, token))
    return fork_many(lm, [question], workers=workers, roles=roles, system=system, sampling=sampling,
                     batched=batched, on_token=report, quorum=quorum, deadline_s=deadline_s, executor=executor)[0]


def fork_many(
    lm: LM,
    questions: Sequence[str],
    *,
    workers: int = 3,
    roles: Sequence[str] | Sequence[Sequence[str]] = (),
    system: str | None = None,
    sampling: SamplingParams | Sequence[SamplingParams] = WORKER_SAMPLING,
    batched: bool = True,
    on_token: Callable[[int, int, int], None] | None = None,
    quorum: int | None = None,
    deadline_s: float | None = None,
    executor=None,
) -> list[Fork]:
    """Fork several questions in one batch: every prefix prefilled once (together), every question's
    workers decoded together. roles: one list for all questions, or one list per question (then each
    question has as many workers as roles). sampling: one for all, or one per question (a greedy agent
    can decode beside sampled workers). on_token(question, worker, token) reports progress.

    quorum: a question's workers stop once `quorum` of them have finished; deadline_s: once this long has
    passed since decoding began (and one has finished). Stragglers are cut: their rows leave the batch and
    their fork lists them in `cut`; the finished branches are exactly those a full join would hold.

    executor: None decodes here; else an object whose `fork_many` takes these arguments and returns the
    same forks, e.g. `parsyn.dist.RayExecutor` (the workers on Ray actors)."""
    if executor is not None:
        return executor.fork_many(lm, questions, workers=workers, roles=roles, system=system, sampling=sampling,
                                  batched=batched, on_token=on_token, quorum=quorum, deadline_s=deadline_s)
    join = Join(quorum, deadline_s)
    plan = Forking.plan(lm, questions, workers=workers, roles=roles, system=system, sampling=sampling,
                        rows_at_once=None if batched else 1)
    if quorum is not None and quorum > min(map(len, plan.roles)):
        raise ValueError(f"a quorum of {quorum} needs at least {quorum} workers per question")
    if not batched and join.waits_less:
        raise ValueError("a quorum or deadline join needs the workers batched")
    results: dict[tuple[int, int], Result] = {}
    for group in [plan.everyone] if batched else [[w] for w in plan.everyone]:
        state, logits, rows = plan.start(group)
        t2 = time.perf_counter()
        results.update(_decode(lm, state, logits, rows, on_token, join))
        plan.decode_s += time.perf_counter() - t2
    return plan.forks(results)


@dataclass(frozen=True)
class Join:
    """When a question's workers stop waiting for the rest: `quorum` finished, or `deadline_s` passed
    since decoding began once at least one has finished (None: wait for every worker)."""

    quorum: int | None = None
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        if self.quorum is not None and (isinstance(self.quorum, bool) or not isinstance(self.quorum, int)
                                        or self.quorum < 1):
            raise ValueError(f"quorum must be a positive number of workers, got {self.quorum!r}")
        if self.deadline_s is not None and not (isinstance(self.deadline_s, (int, float)) and self.deadline_s > 0):
            raise ValueError(f"deadline must be a positive number of seconds, got {self.deadline_s!r}")

    @property
    def waits_less(self) -> bool:
        return self.quorum is not None or self.deadline_s is not None

    def stops(self, finished: int, elapsed_s: float) -> bool:
        """Whether a question with `finished` workers done, `elapsed_s` into decoding, cuts the rest."""
        late = self.deadline_s is not None and elapsed_s >= self.deadline_s and finished >= 1
        return late or (self.quorum is not None and finished >= self.quorum)


@dataclass(eq=False)
class Forking:
    """Workers on their way: prefixes prefilled (`plan`), rows started (`start`: a decode state, its logits
    and the rows to decode, e.g. by a serving engine's batch), then the forks built from the rows' results."""

    lm: LM
    questions: list[str]
    system: str | None
    prefixes: list[tuple[int, ...]]
    prefix_kv: list[KV]
    shared: State
    openings: list[list[tuple[int, ...]]]
    roles: list[list[str | None]]
    samplings: list[SamplingParams]
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def everyone(self) -> list[tuple[int, int]]:
        return [(q, i) for q, rs in enumerate(self.roles) for i in range(len(rs))]

    @classmethod
    def plan(cls, lm: LM, questions: Sequence[str], *, workers: int = 3,
             roles: Sequence[str] | Sequence[Sequence[str]] = (), system: str | None = None,
             sampling: SamplingParams | Sequence[SamplingParams] = WORKER_SAMPLING,
             rows_at_once: int | None = None, fmt: ChatFormat | None = None) -> Forking:
        """Check the request and prefill every prefix once (one row per question); see `fork_many`.
        `fmt`: the chat format (default the tokenizer's, without tools)."""
        fmt = fmt or ChatFormat(lm.tokenizer)
        if not questions:
            raise ValueError("need at least one question")
        samplings = [sampling] * len(questions) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(samplings) != len(questions):
            raise ValueError(f"got {len(samplings)} sampling settings for {len(questions)} questions")
        most = max(s.max_new_tokens for s in samplings)
        prefixes = [fmt.prefix_ids(_check_question(q), system and _text(system, "the system prompt"))
                    for q in questions]
        per_question = _roles_per_question(roles, len(questions), workers)
        rows_at_once = rows_at_once or sum(map(len, per_question))
        lm.check_memory(rows_at_once, max(map(len, prefixes)) + most)  # before per-worker work
        openings = [[fmt.ids(fmt.turn(q, system, r)) for r in rs] for q, rs in zip(questions, per_question)]
        longest = max(len(p) + max(map(len, o)) for p, o in zip(prefixes, openings)) + most
        lm.check_positions(longest, "the prompt plus the workers' answers")
        lm.check_memory(rows_at_once, longest)
        t0 = time.perf_counter()
        shared, _ = prefill_rows(lm, prefixes)  # one row per question
        prefix_kv = [row_kv(shared, q) for q in range(len(questions))]
        return cls(lm, list(questions), system, prefixes, prefix_kv, shared, openings, per_question, samplings,
                   time.perf_counter() - t0)

    def start(self, group: Sequence[tuple[int, int]] | None = None) -> tuple[State, torch.Tensor, list[Row]]:
        """The state, next-token logits [B, V] and rows of workers `group` ((question, worker); default all),
        their openings fed after their prefixes. Row keys are (question, worker)."""
        group = self.everyone if group is None else list(group)
        t1 = time.perf_counter()
        state = self.shared.pick(torch.tensor([q for q, _ in group], device=self.lm.device))  # a prefix row each
        with torch.inference_mode():
            logits = feed_(self.lm, state, [self.openings[q][i] for q, i in group])
        self.prefill_s += time.perf_counter() - t1
        rows = [Row((q, i), dataclasses.replace(self.samplings[q], seed=row_seed(self.samplings[q].seed, i)),
                    capture_from=len(self.prefixes[q]), close_turn=True) for q, i in group]
        return state, logits, rows

    def forks(self, results: dict) -> list[Fork]:
        """The forks, one per question, from its workers' finished rows (`results[question, worker]`); a
        worker without a result was cut by a join."""
        def branches(q: int) -> tuple[Branch, ...]:
            return tuple(_branch(self.lm, self.openings[q][i], results[q, i], r)
                         for i, r in enumerate(self.roles[q]) if (q, i) in results)

        return [Fork(question, self.system, self.prefixes[q], self.prefix_kv[q], branches(q), self.prefill_s,
                     self.decode_s, tuple(i for i in range(len(self.roles[q])) if (q, i) not in results))
                for q, question in enumerate(self.questions)]


def _decode(lm: LM, state, logits, rows: Sequence[Row], on_token, join: Join) -> dict:
    """Every row's result, the rows a join cut excepted."""
    if on_token is None and not join.waits_less:
        return {r.key: res for r, res in zip(rows, decode(lm, state, logits, rows))}
    batch = Batch(lm, state, logits, rows)
    finished: Counter = Counter()  # workers done, by question
    t0 = time.perf_counter()
    for events in batch.steps():
        for e in events:
            if on_token is not None:
                on_token(*e.key, e.id)
            finished[e.key[0]] += e.finish is not None
        if join.waits_less:
            ending = {e.key for e in events if e.finish}  # they leave at the next forward, their K/V complete
            elapsed = time.perf_counter() - t0
            cut = [key for key in batch.keys if key not in ending and join.stops(finished[key[0]], elapsed)]
            if cut:
                batch.remove(cut)
    return {key: r for key, r in batch.results.items() if r.finish != "removed"}


def _branch(lm: LM, opening: tuple[int, ...], result: Result, role: str | None) -> Branch:
    return Branch(opening + result.tokens, answer_text(lm, result), result.kv, role, len(result.tokens))


def answer_text(lm: LM, result: Result) -> str:
    """The answer a finished row gives: its text without the stop token (cut before a stop string)."""
    if result.text is not None:
        return result.text.strip()
    tokens = result.tokens[:-1] if result.tokens and result.tokens[-1] in lm.stop_ids else result.tokens
    return lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def from_texts(
    lm: LM, question: str, texts: Sequence[str], *, roles: Sequence[str] = (), system: str | None = None
) -> Fork:
    """A fork from ready branch texts (e.g. answers of workers that ran elsewhere): the prefix is
    prefilled once, then every branch (its opening, the text, an end-of-turn token) after it in one batch."""
    prefix_ids, branch_ids = encode_texts(lm, question, texts, roles=roles, system=system)
    return from_ids(lm, question, prefix_ids, branch_ids, texts=texts, roles=roles, system=system)


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
    shared, _ = prefill_rows(lm, [tuple(prefix_ids)])
    prefix = row_kv(shared, 0)
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
    texts = [_text(t, f"branch {i + 1}") for i, t in enumerate(texts)]
    prefix_ids = fmt.prefix_ids(_check_question(question), system and _text(system, "the system prompt"))
    return prefix_ids, [fmt.ids(fmt.branch(question, system, r, t)) for r, t in zip(_roles(roles, len(texts)), texts)]


def _check_question(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty")
    return _text(question, "the question")


def _text(value: str, what: str) -> str:
    """`value` unchanged; ValueError when it holds characters that are not text (e.g. undecodable bytes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8 text") from None
    return value


def _roles(roles: Sequence[str], n: int) -> list[str | None]:
    if n < 1:
        raise ValueError(f"need at least one worker, got {n}")
    if roles and len(roles) != n:
        raise ValueError(f"got {len(roles)} roles for {n} workers; give one role per worker or none")
    return [r and _text(r, f"role {i + 1}") for i, r in enumerate(roles)] if roles else [None] * n  # None: no role


def _roles_per_question(roles, questions: int, workers: int) -> list[list[str | None]]:
    if roles and not isinstance(roles[0], str):
        if len(roles) != questions:
            raise ValueError(f"got role lists for {len(roles)} questions, asked {questions}")
        return [_roles(r, len(r)) for r in roles]
    return [_roles(roles, workers)] * questions
