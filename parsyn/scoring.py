"""Scoring shared by training and evaluation: answer normalization and containment, and the KL between
next-token distributions."""

from __future__ import annotations

import string
from collections.abc import Sequence

import torch


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(" " if ch in string.punctuation else ch for ch in text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def contains_answer(text: str, gold: Sequence[str]) -> bool:
    """Whether a gold answer appears in `text` as whole words, both normalized."""
    said = f" {normalize_answer(text)} "
    return any(g and f" {g} " in said for g in map(normalize_answer, gold))


def kl_per_position(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position [T] over the teacher's top-k ids [T, K], both renormalized there.
    logits: student logits [T, V]."""
    teacher = torch.log_softmax(topk_logprobs.float(), dim=-1)
    student = torch.log_softmax(logits.float().gather(-1, topk_ids), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1)
