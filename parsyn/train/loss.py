"""Distillation losses at the answer positions: KL(teacher || student) on the teacher's top-k
next-token distributions, cross-entropy on the teacher's tokens, and per-position weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..scoring import kl_per_position


@dataclass(frozen=True)
class LossConfig:
    kl: float = 1.0            # weight of KL(teacher || student), both renormalized over the teacher's top-k
    ce: float = 0.0            # weight of cross-entropy on the teacher's tokens (the paper's recipe: kl 0, ce 1)
    value_weight: float = 5.0  # positions whose token comes from a branch's content, not the question
    right_weight: float = 2.0  # items where the teacher's answer holds the gold answer

    def __post_init__(self) -> None:
        if self.kl < 0 or self.ce < 0 or self.kl + self.ce == 0:
            raise ValueError(f"LossConfig needs kl, ce >= 0 and not both 0, got kl={self.kl}, ce={self.ce}")
        if self.value_weight <= 0 or self.right_weight <= 0:
            raise ValueError(f"LossConfig weights must be positive, got {self.value_weight}, {self.right_weight}")


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
