"""The held-out curve: the training loss on items kept out of training, logged at every checkpoint
(run/held_out.jsonl), so the number of steps can be read from it rather than guessed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

CURVE_ITEMS = 32  # held-out items scored at each checkpoint (the first by id hash order of the data file)


def held_out_loss(student: nn.Module, items: Sequence[dict], layouts: Sequence[str]) -> dict:
    """Mean loss parts of `student` over `items` (layouts taken in turn), with no gradients and the random
    state left as it was, so a curve changes nothing about the run it watches."""
    totals = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
    with torch.no_grad(), torch.random.fork_rng():
        for i, item in enumerate(items):
            loss, parts = student(item, layouts[i % len(layouts)])
            totals["loss"] += loss.item()
            totals["kl"] += parts["kl"]
            totals["ce"] += parts["ce"]
    return {f"held_out_{k}": v / len(items) for k, v in totals.items()} | {"held_out_items": len(items)}
