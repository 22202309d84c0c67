"""Self-distillation data: branches from offline datasets, synthetic facts and real workers; the teacher
is the *text* route of the same base model, whose answers and next-token distributions the cache
route (the student) learns to reproduce. No labels are needed.

Branch structures (as in the paper's training mix): facts spread over branches; an evidence passage
split across branches (SQuAD / DROP / BoolQ, training halves); in-context examples as branches (MMLU
validation, ARC validation); earlier chat rounds as branches (chitchat); worker answers to one question
(real batched workers). The set is written as JSON lines with token ids and is reused; a killed
generation resumes after the last complete line.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import datasets as D
from ..chat import DEFAULT_INSTRUCTION, ChatFormat
from ..decode import Batch, Row
from ..files import Records, read_json, read_records, write_json
from ..forward import prefill_rows
from ..model import LM
from ..probe import TRAIN_SEEDS, fact_item
from ..sampling import ITEM_SEEDS, SamplingParams, item_seed
from ..scoring import contains_answer
from ..synthesis import text_row
from ..workers import Fork, answer_text, encode_texts, fork_many

KINDS = ("facts", "evidence", "icl", "chat", "workers")
DEFAULT_MIX = (("facts", 0.4), ("evidence", 0.2), ("icl", 0.1), ("chat", 0.15), ("workers", 0.15))
SPLIT_RULES = {
    "facts": "probe.TRAIN_SEEDS (the retrieval probe draws from probe.PROBE_SEEDS)",
    "evidence": "SQuAD, DROP and BoolQ even positions (evaluation reads odd positions)",
    "icl": "MMLU validation and dev, ARC-Easy/Challenge validation (evaluation reads test splits)",
    "chat": "chitchat-dataset conversations (not evaluated)",
    "workers": "questions from MMLU validation and ARC validation",
}
ROLES = ("Answer briefly.", "Think step by step, then answer.", "Check each option before answering.",
         "Explain your reasoning in one or two sentences.")


@dataclass(frozen=True)
class Spec:
    """What one item will hold before any model runs."""

    id: str
    kind: str
    question: str
    texts: tuple[str, ...] = ()     # branch texts; empty for `workers` items (workers write them)
    roles: tuple[str, ...] = ()
    instruction: str = DEFAULT_INSTRUCTION
    gold: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataConfig:
    items: int = 2000
    mix: tuple[tuple[str, float], ...] = DEFAULT_MIX
    seed: int = 0
    answer_tokens: int = 24      # teacher's greedy answer limit
    topk: int = 64               # teacher distribution kept per answer position
    batch: int = 16              # items the workers and the teacher decode together
    worker_tokens: int = 40
    worker_temperature: float = 0.7

    def __post_init__(self) -> None:
        for kind, share in self.mix:
            if kind not in KINDS or share < 0:
                raise ValueError(f"bad mix entry ({kind!r}, {share}); kinds are {', '.join(KINDS)}")
        if sum(share for _, share in self.mix) <= 0:
            raise ValueError(f"the mix {self.mix} has no positive share")
        if min(self.items, self.topk, self.answer_tokens, self.batch, self.worker_tokens) < 1:
            raise ValueError(f"DataConfig needs positive sizes, got {self}")
        SamplingParams(self.worker_tokens, self.worker_temperature, 0.95, self.seed)  # the workers' sampling: valid


# ---------------------------------------------------------------- specs (no model)


def specs(config: DataConfig) -> list[Spec]:
    """The deterministic list of item specs for `config`."""
    rng = random.Random(config.seed)
    total = sum(s for _, s in config.mix)
    counts = {k: round(config.items * s / total) for k, s in config.mix}
    out: list[Spec] = []
    for kind, count in counts.items():
        out += BUILDERS[kind](count, random.Random(rng.randrange(2**31)))
    random.Random(config.seed + 1).shuffle(out)
    return out[: config.items]


def _facts(n: int, rng: random.Random) -> list[Spec]:
    seeds = rng.sample(TRAIN_SEEDS, n)
    return [Spec(f.id, "facts", f.question, f.branches, gold=(f.answer,)) for f in map(fact_item, seeds)]


def _evidence(n: int, rng: random.Random) -> list[Spec]:
    pool = [(r, "squad") for r in D.squad("train")] + [(r, "drop") for r in D.drop("train")]
    pool += [(r, "boolq") for r in D.boolq("train")]
    out = []
    for r, src in rng.sample(pool, min(n, len(pool))):
        parts = [p for p in D.split_passage(r["passage"][:1200], rng.randint(2, 4)) if p]
        gold = (r["answer"],) if src == "boolq" else tuple(r["answers"])
        question = r["question"] + ("?" if src == "boolq" and not r["question"].endswith("?") else "")
        out.append(Spec(f"{src}-{r['id']}", "evidence", question, tuple(parts), gold=gold))
    return out


def _mc(r: dict) -> str:
    labels = r.get("labels") or list("ABCDE")
    return r["question"] + "\n" + "\n".join(f"{label}. {c}" for label, c in zip(labels, r["choices"]))


def _mc_pool() -> list[dict]:
    return D.mmlu("validation") + D.mmlu("dev") + D.arc_validation("ARC-Easy") + D.arc_validation("ARC-Challenge")


def _icl(n: int, rng: random.Random) -> list[Spec]:
    pool = [r for r in _mc_pool() if len(_mc(r)) < 400]  # short examples keep items short
    out = []
    for i in range(n):
        target, *shots = rng.sample(pool, rng.randint(3, 5))
        texts = tuple(f"Example {j + 1}. {_mc(s)}\nAnswer: {s['answer']}" for j, s in enumerate(shots))
        out.append(Spec(f"icl-{target['id']}-{i}", "icl", _mc(target) + "\nAnswer with the letter.", texts,
                        gold=(target["answer"],)))
    return out


def _chat(n: int, rng: random.Random) -> list[Spec]:
    convs = D.chats(min_rounds=6)
    out = []
    for i, turns in enumerate(rng.sample(convs, min(n, len(convs)))):
        rounds = rng.randint(2, min(4, (len(turns) - 2) // 2))
        first, body = turns[0][:400], turns[1 : 1 + 2 * rounds]
        roles = tuple(t[:400] for t in body[1::2])  # the user's message opens each round...
        texts = tuple(t[:400] for t in body[0::2])  # ...after the partner's reply to the previous one
        last = turns[1 + 2 * rounds][:400]
        out.append(Spec(f"chat-{i}", "chat", first, texts, roles, instruction=last))
    return out


def _workers(n: int, rng: random.Random) -> list[Spec]:
    pool = _mc_pool()
    out = []
    for r in rng.sample(pool, min(n, len(pool))):
        k = rng.randint(2, 3)
        out.append(Spec(f"workers-{r['id']}", "workers", _mc(r), roles=tuple(rng.sample(ROLES, k)),
                        gold=(r["answer"],)))
    return out


BUILDERS: dict[str, Callable[[int, random.Random], list[Spec]]] = {
    "facts": _facts, "evidence": _evidence, "icl": _icl, "chat": _chat, "workers": _workers,
}


# ---------------------------------------------------------------- generation (model)


def generate(lm: LM, out: Path, config: DataConfig, *, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write `config.items` items to out/items.jsonl plus a manifest of the config and the split rules;
    returns the JSONL path. A stopped generation resumes: items are made in fixed batches, and a batch
    with any item missing is made again whole (its finished items are not written twice), so every item
    is computed exactly as in an uninterrupted run."""
    order = specs(config)  # validates the config and the data sources before anything is written
    order.sort(key=lambda s: (s.kind == "workers", sum(len(t) for t in s.texts) + len(s.question)))  # less padding
    out.mkdir(parents=True, exist_ok=True)
    path = out / "items.jsonl"
    _check_manifest(out / "manifest.json", {"config": asdict(config), "model": lm.name, "splits": SPLIT_RULES,
                                            "worker_seeds": ITEM_SEEDS})
    done = {item["id"] for item in read_items(path, on_error="skip")}
    with Records(path) as records:
        for start in range(0, len(order), config.batch):
            batch = order[start : start + config.batch]
            if any(s.id not in done for s in batch):
                for record in _teach(lm, batch, config):
                    if record["id"] not in done:
                        records.append(record)
            if progress:
                progress(min(start + config.batch, len(order)), len(order))
    return path


def _check_manifest(path: Path, manifest: dict) -> None:
    if path.exists():
        old, new = read_json(path, "data manifest"), json.loads(json.dumps(manifest))
        if any(old.get(k) != new[k] for k in ("config", "model", "worker_seeds")):
            raise ValueError(f"{path.parent} holds data made with another config or model; use a new folder")
    else:
        write_json(path, manifest)


def _worker_branches(lm: LM, batch: Sequence[Spec], config: DataConfig) -> dict[str, Fork]:
    """Run the workers of every `workers` item in the batch as one decode (`fork_many`)."""
    asked = [spec for spec in batch if spec.kind == "workers"]
    if not asked:
        return {}
    sampling = [SamplingParams(config.worker_tokens, config.worker_temperature, 0.95, item_seed(config.seed, s.id))
                for s in asked]  # each item its own random stream
    forks = fork_many(lm, [s.question for s in asked], roles=[list(s.roles) for s in asked], sampling=sampling)
    return {spec.id: f for spec, f in zip(asked, forks)}


def _teach(lm: LM, batch: Sequence[Spec], config: DataConfig) -> Iterator[dict]:
    """The teacher (text route, base model, greedy) on a batch of items, with its top-k distributions."""
    fmt = ChatFormat(lm.tokenizer)
    worked = _worker_branches(lm, batch, config)
    rows, parts = [], []
    for spec in batch:
        if spec.kind == "workers":
            f = worked[spec.id]
            prefix, branches, texts = f.prefix_ids, [b.token_ids for b in f.branches], [b.text for b in f.branches]
        else:
            prefix, branches = encode_texts(lm, spec.question, spec.texts, roles=spec.roles)
            texts = list(spec.texts)
        prompt = fmt.synthesis_ids(spec.question, None, spec.instruction)
        rows.append(text_row(prefix, branches, prompt))
        parts.append((prefix, branches, texts, prompt))
    state, logits = prefill_rows(lm, rows)
    rows = [Row(j, SamplingParams(config.answer_tokens), logprobs=config.topk) for j in range(len(batch))]
    batch_run = Batch(lm, state, logits, rows)
    dists: dict[int, list] = {j: [] for j in range(len(batch))}
    for events in batch_run.steps():
        for e in events:
            dists[e.key].append(e.logprobs)
    for j, (spec, (prefix, branches, texts, prompt)) in enumerate(zip(batch, parts)):
        result = batch_run.results[j]
        answer, text = list(result.tokens), answer_text(lm, result)
        yield {
            "id": spec.id, "kind": spec.kind, "question": spec.question, "instruction": spec.instruction,
            "roles": list(spec.roles), "branch_texts": texts, "gold": list(spec.gold),
            "prefix_ids": list(prefix), "branch_ids": [list(b) for b in branches], "prompt_ids": list(prompt),
            "answer_ids": answer, "answer": text,
            "topk_ids": [ids.tolist() for ids, _ in dists[j]],
            "topk_logprobs": [[round(x, 4) for x in logprobs.tolist()] for _, logprobs in dists[j]],
            "value_mask": value_mask(answer, branches, list(prefix) + list(prompt), lm.stop_ids),
            "teacher_right": contains_answer(text, spec.gold) if spec.gold else None,
        }


def value_mask(answer: Sequence[int], branches: Sequence[Sequence[int]], context: Sequence[int], stops) -> list[int]:
    """1 where an answer token comes from a branch's content and not from the question or prompt."""
    in_branches = {t for b in branches for t in b}
    elsewhere = set(context) | set(stops)
    return [int(t in in_branches and t not in elsewhere) for t in answer]


# ---------------------------------------------------------------- reading

REQUIRED = ("id", "prefix_ids", "branch_ids", "prompt_ids", "answer_ids", "topk_ids", "topk_logprobs", "value_mask")


def read_items(path: Path, *, on_error: str = "stop") -> list[dict]:
    """Items of a JSONL file. Malformed lines stop with their line numbers (`on_error="stop"`) or are
    skipped with a warning that names them (`"skip"`); never silently."""
    return read_records(path, check=_check_item, on_error=on_error)


def _check_item(item: dict) -> None:
    missing = [k for k in REQUIRED if k not in item]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    if not item["branch_ids"] or len(item["topk_ids"]) != len(item["answer_ids"]):
        raise ValueError("no branches, or answer and distributions differ in length")
