"""The `search` tool: BM25 (bm25s) over a local folder of .txt/.md files or a JSONL file of documents.

Documents are split into passages of at most `passage_chars` (whole paragraphs where they fit), so a hit
shows the part of a long document that matched. A passage's id is its document's (a file's path relative to
the folder, or the JSONL `id`), with `#n` added when the document has more than one.
"""

# No `from __future__ import annotations` here: the tool's signature below says `max_k` in an annotation, which
# must be evaluated where `max_k` is in scope for the schema to read it.
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import bm25s

from .base import Tool, ToolError

_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    title: str = ""


def search_tool(source: str | Path, *, k: int = 3, max_k: int = 10, passage_chars: int = 800,
                max_chars: int = 8000, name: str = "search", description: str | None = None) -> Tool:
    """A tool that finds the passages best matching a query (`query`, and how many: `k`, 1 to `max_k`) by
    BM25 over `source`: a folder (its .txt and .md files, searched recursively) or a .jsonl file with one
    `{"id", "text", "title" (optional)}` object a line. The index is built now, in memory.

    Raises ValueError naming the path for a missing source, a malformed JSONL line, a duplicate id, or a
    corpus without text."""
    if not 1 <= k <= max_k:
        raise ValueError(f"search_tool k must be between 1 and max_k={max_k}, got {k!r}")
    if not passage_chars > 0:
        raise ValueError(f"search_tool passage_chars must be positive, got {passage_chars!r}")
    source = Path(source).expanduser().resolve()
    passages = _passages(_documents(source), passage_chars)
    if not passages:
        raise ValueError(f"no text to search in {source}")
    retriever = bm25s.BM25()
    retriever.index(_tokens([f"{p.title}\n{p.text}" for p in passages], return_ids=True), show_progress=False)

    def search(query: Annotated[str, "the words to look for"],
               k: Annotated[int, f"how many passages to return, 1 to {max_k}"] = k) -> str:
        if not 1 <= k <= max_k:
            raise ToolError(f"k must be between 1 and {max_k}, got {k}")
        words = _tokens([query], return_ids=False)[0]
        if not words:
            raise ToolError(f"the query {query!r} has no words to search for")
        ids, scores = retriever.retrieve([words], k=min(k, len(passages)), show_progress=False, n_threads=0,
                                         backend_selection="numpy")
        hits = [(passages[int(i)], float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]
        return _render(hits) if hits else f"no passage matches {query!r}"

    text = description or (f"Search {len(passages)} passages of {source.name} by keywords (BM25) and read the "
                           f"best matches.")
    return Tool.from_function(search, name=name, description=text, timeout_s=30.0, max_chars=max_chars)


def _tokens(texts: list[str], *, return_ids: bool):
    return bm25s.tokenize(texts, stopwords="en", return_ids=return_ids, show_progress=False)


def _documents(source: Path) -> list[Passage]:
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in _SUFFIXES)
        return [Passage(p.relative_to(source).as_posix(), p.read_text(encoding="utf-8", errors="replace"))
                for p in files]
    if source.is_file() and source.suffix.lower() == ".jsonl":
        return _jsonl(source)
    if source.exists():
        raise ValueError(f"{source} is neither a folder of .txt/.md files nor a .jsonl file")
    raise ValueError(f"no folder or .jsonl file at {source}")


def _jsonl(path: Path) -> list[Passage]:
    docs, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or \
                not isinstance(row.get("id"), (str, int)) or not isinstance(row.get("title", ""), str):
            raise ValueError(f"{path}:{number}: expected an object with a string or integer id, a string text "
                             "and optionally a string title")
        doc = Passage(str(row["id"]), row["text"], row.get("title", ""))
        if doc.id in seen:
            raise ValueError(f"{path}:{number}: the id {doc.id!r} is used twice")
        seen.add(doc.id)
        docs.append(doc)
    return docs


def _passages(docs: list[Passage], most: int) -> list[Passage]:
    passages = []
    for doc in docs:
        parts = _split(doc.text, most)
        passages += [Passage(f"{doc.id}#{i}" if len(parts) > 1 else doc.id, part, doc.title)
                     for i, part in enumerate(parts, 1)]
    return passages


def _split(text: str, most: int) -> list[str]:
    """`text` as pieces of at most `most` characters: whole paragraphs packed together where they fit, a longer
    paragraph cut at a space."""
    pieces, current = [], ""
    for paragraph in (p.strip() for p in re.split(r"\n\s*\n", text)):
        while len(paragraph) > most:
            if current:
                pieces.append(current)
                current = ""
            cut = paragraph.rfind(" ", most // 2, most + 1)
            cut = cut if cut > 0 else most
            pieces.append(paragraph[:cut].rstrip())
            paragraph = paragraph[cut:].lstrip()
        if not paragraph:
            continue
        if current and len(current) + 2 + len(paragraph) > most:
            pieces.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    return [*pieces, current] if current else pieces


def _render(hits: list[tuple[Passage, float]]) -> str:
    blocks = []
    for rank, (p, score) in enumerate(hits, 1):
        title = f" — {p.title}" if p.title else ""
        blocks.append(f"[{rank}] {p.id}{title} (score {score:.2f})\n{p.text}")
    return "\n\n".join(blocks)
