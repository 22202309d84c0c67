"""Distillation losses at the answer positions: KL(teacher || student) on the teacher's top-k
next-token distributions, cross-entropy on the teacher's tokens, and per-position weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapter import check_number
from ..scoring import kl_per_position


@dataclass(frozen=True)
class LossConfig:
    kl: float = 1.0            # weight of KL(teacher || student), both renormalized over the teacher's top-k
    ce: float = 0.0            # weight of cross-entropy on the teacher's tokens (the paper's recipe: kl 0, ce 1)
    value_weight: float = 5.0  # positions whose token comes from a branch's content, not the question
    right_weight: float = 2.0  # items where the teacher's answer holds the gold answer

    def __post_init__(self) -> None:
        for name in ("kl", "ce"):
            check_number(f"LossConfig.{name}", getattr(self, name), at_least=0)
        for name in ("value_weight", "right_weight"):
            check_number(f"LossConfig.{name}", getattr(self, name), above=0)
        if self.kl + self.ce == 0:
            raise ValueError(f"LossConfig needs kl or ce above 0, got kl={self.kl}, ce={self.ce}")


def distill_loss(
    logits: torch.Tensor,
    answer_ids: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    value_mask: torch.Tensor,
    teacher_right: bool | None,
    config: LossConfig,
) -> tuple[torch.Tensor, dict]:
    """Weighted mean over answer positions of kl·KL + ce·CE; returns the loss and plain-number stats."""
    kl = kl_per_position(logits, topk_ids, topk_logprobs)
    ce = torch.nn.functional.cross_entropy(logits.float(), answer_ids, reduction="none")
    weights = 1 + (config.value_weight - 1) * value_mask.float()
    if teacher_right:
        weights = weights * config.right_weight
    per = config.kl * kl + config.ce * ce
    loss = (weights * per).sum() / weights.sum()
    return loss, {"kl": kl.mean().item(), "ce": ce.mean().item()}
