"""The one training loop: one process or many (data parallel through Accelerate / DDP).

Each step takes one item per process and micro-batch: the frozen base model prefills its branches
(LoRA off), the student composes them (mapper, layout drawn per step, structural aid) and runs the
synthesizer's prompt plus the teacher's answer (LoRA on); the loss compares its next-token
distributions with the teacher's. AdamW, warm-up + cosine, gradient accumulation and clipping.
A run folder holds the latest checkpoint, the trainer state and a JSONL metrics log; a killed run
continues from its last checkpoint (at most one interval is redone).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from ..adapter import AdapterConfig, Synthesizer, attach, save
from ..adapter import load as load_checkpoint
from ..files import Records, atomic_write, write_json
from ..kv import KV
from ..layout import LAYOUTS
from ..mapper import MapperConfig
from ..model import LM
from ..synthesis import CacheOptions, teacher_forced
from ..workers import Fork, from_ids
from .data import read_items
from .loss import LossConfig, distill_loss


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    lr: float = 3e-4
    mapper_lr: float = 3e-3
    warmup: float = 0.05            # fraction of steps
    accumulate: int = 1
    clip: float = 1.0
    seed: int = 0
    layouts: tuple[str, ...] = ("parallel", "sequential")  # drawn per step
    checkpoint_every: int = 100
    log_every: int = 10
    holdout_percent: int = 4        # items held out (by id hash) for the fidelity gates
    loss: LossConfig = field(default_factory=LossConfig)
    adapter: AdapterConfig = field(default_factory=lambda: AdapterConfig(mapper=MapperConfig()))

    def __post_init__(self) -> None:
        if self.steps < 1 or self.accumulate < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError(f"TrainConfig needs positive steps/accumulate/intervals, got {self}")
        if not self.layouts or any(layout not in LAYOUTS for layout in self.layouts):
            raise ValueError(f"TrainConfig.layouts must be drawn from {', '.join(LAYOUTS)}, got {self.layouts}")
        if not 0 <= self.holdout_percent < 100 or not 0 <= self.warmup < 1 or self.lr <= 0:
            raise ValueError(f"TrainConfig: bad holdout_percent, warmup or lr in {self}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        data = dict(data)
        data["loss"] = LossConfig(**data.get("loss", {}))
        data["adapter"] = AdapterConfig.from_dict(data.get("adapter", {}))
        data["layouts"] = tuple(data.get("layouts", cls.layouts))
        return cls(**data)


def held_out(item_id: str, percent: int) -> bool:
    return int(hashlib.sha1(item_id.encode()).hexdigest()[:8], 16) % 100 < percent


def split(items: Sequence[dict], percent: int) -> tuple[list[dict], list[dict]]:
    """(training items, held-out items), decided by a hash of each id so every run agrees."""
    train = [i for i in items if not held_out(i["id"], percent)]
    return train, [i for i in items if held_out(i["id"], percent)]


class Student(nn.Module):
    """The cache route with gradients: one forward is one item's weighted distillation loss."""

    def __init__(self, lm: LM, synthesizer: Synthesizer, loss: LossConfig):
        super().__init__()
        self.model = lm.model
        self.mapper = synthesizer.mapper
        self.lm, self.synthesizer, self.loss_config = lm, synthesizer, loss

    def forward(self, item: dict, layout: str) -> tuple[torch.Tensor, dict]:
        logits = student_logits(self.lm, self.synthesizer, item, layout)
        dev = logits.device
        t = lambda key, dtype=torch.long: torch.tensor(item[key], dtype=dtype, device=dev)
        return distill_loss(logits, t("answer_ids"), t("topk_ids"), t("topk_logprobs", torch.float32),
                            t("value_mask"), item.get("teacher_right"), self.loss_config)


def base_fork(lm: LM, item: dict) -> Fork:
    """The item's branches prefilled by the frozen base model, as ordinary (autograd-usable) tensors."""
    f = from_ids(lm, item.get("question") or "?", item["prefix_ids"], item["branch_ids"])
    return dataclasses.replace(
        f, prefix=_plain(f.prefix), branches=tuple(dataclasses.replace(b, kv=_plain(b.kv)) for b in f.branches)
    )


def _plain(kv: KV) -> KV:
    return KV(tuple(k.clone() for k in kv.keys), tuple(v.clone() for v in kv.values), kv.positions.clone())


def student_logits(lm: LM, synthesizer: Synthesizer | None, item: dict, layout: str,
                   options: CacheOptions | None = None) -> torch.Tensor:
    """Cache-route logits [T, V] predicting each of the teacher's answer tokens (teacher forcing)."""
    return teacher_forced(lm, base_fork(lm, item), item["prompt_ids"], item["answer_ids"], layout=layout,
                          synthesizer=synthesizer, options=options)


def train(
    lm: LM, data: Path, run: Path, config: TrainConfig, *, on_error: str = "stop", show_progress: bool = True,
    stop_after: int | None = None,
) -> Synthesizer:
    """Train (or resume) a synthesizer in `run`; returns it. The checkpoint is run/checkpoint.
    `stop_after` ends this call after that many steps (with a checkpoint); calling again continues."""
    accelerator = Accelerator(gradient_accumulation_steps=config.accumulate, cpu=lm.device.type == "cpu")
    run = Path(run)
    items, _ = split(read_items(Path(data), on_error=on_error), config.holdout_percent)
    if not items:
        raise ValueError(f"no training items in {data}")
    _check_run(run, config, data, accelerator)
    torch.manual_seed(config.seed + accelerator.process_index)
    resumed = (run / "trainer.pt").exists()
    synthesizer = load_checkpoint(lm, run / "checkpoint") if resumed else attach(lm, config.adapter)
    synthesizer.recipe = {"train": config.to_dict(), "data": str(data), "items": len(items)}
    params = _param_groups(synthesizer, config)
    optimizer = torch.optim.AdamW(params, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup * config.steps), config.steps)
    start = _resume(run / "trainer.pt", optimizer, scheduler) if resumed else 0
    student, optimizer = accelerator.prepare(Student(lm, synthesizer, config.loss), optimizer)
    log = _Log(run / "metrics.jsonl", start, accelerator.is_main_process)
    bar = _bar(config.steps, start, show_progress and accelerator.is_main_process)
    t0 = time.perf_counter()
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    for step in range(start, end):
        layout = random.Random(config.seed * 1_000_003 + step).choice(config.layouts)
        stats = _step(student, optimizer, accelerator, [p for g in params for p in g["params"]], items, step, layout,
                      config)
        scheduler.step()
        done = step + 1
        bar(done, stats["loss"])
        if done % config.log_every == 0 or done == config.steps:
            log.write({"step": done, **stats, "layout": layout, "lr": scheduler.get_last_lr()[0],
                       "seconds": time.perf_counter() - t0, "world_size": accelerator.num_processes})
        if done % config.checkpoint_every == 0 or done == end:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                _checkpoint(lm, synthesizer, optimizer, scheduler, done, run)
    accelerator.wait_for_everyone()
    bar(None, None)
    synthesizer.path = run / "checkpoint"
    return synthesizer


def _step(student, optimizer, accelerator: Accelerator, params: list, items: Sequence[dict], step: int, layout: str,
          config: TrainConfig) -> dict:
    """One optimizer step over `accumulate` micro-batches of one item per process; mean loss parts."""
    stats: dict = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
    world = accelerator.num_processes
    for micro in range(config.accumulate):
        index = (step * config.accumulate + micro) * world + accelerator.process_index
        with accelerator.accumulate(student):
            loss, parts = student(_pick(items, index, config.seed), layout)
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.clip:
                accelerator.clip_grad_norm_(params, config.clip)
            optimizer.step()
            optimizer.zero_grad()
        stats["loss"] += loss.item() / config.accumulate
        stats["kl"] += parts["kl"] / config.accumulate
        stats["ce"] += parts["ce"] / config.accumulate
    return stats


def _resume(path: Path, optimizer, scheduler) -> int:
    """Restore the optimizer, schedule and random states saved at a checkpoint; the step to continue from."""
    saved = torch.load(path, weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    random.setstate(saved["python_rng"])
    torch.set_rng_state(saved["torch_rng"])
    return saved["step"]


def _param_groups(synthesizer: Synthesizer, config: TrainConfig) -> list[dict]:
    groups = []
    lora = synthesizer.lora.parameters() if synthesizer.lora is not None else []
    if lora:
        groups.append({"params": lora, "lr": config.lr})
    if synthesizer.mapper is not None:
        groups.append({"params": list(synthesizer.mapper.parameters()), "lr": config.mapper_lr})
    if not groups:
        raise ValueError("nothing to train: the adapter config has neither LoRA nor a mapper")
    return groups


def _pick(items: Sequence[dict], index: int, seed: int) -> dict:
    """Item number `index` of an endless sequence of epochs, each a fresh permutation."""
    epoch, at = divmod(index, len(items))
    order = list(range(len(items)))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return items[order[at]]


def _check_run(run: Path, config: TrainConfig, data: Path, accelerator: Accelerator) -> None:
    settings = {"train": config.to_dict(), "data": str(Path(data).resolve())}
    path = run / "config.json"
    if path.exists():
        old, new = json.loads(path.read_text()), json.loads(json.dumps(settings))
        if old != new:
            changed = sorted(_differences(old, new))
            raise ValueError(f"{run} holds a run with other settings ({', '.join(changed[:4])}); "
                             "resume with the same ones or use a new folder")
    elif accelerator.is_main_process:
        write_json(path, settings)
    accelerator.wait_for_everyone()


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in old.keys() | new.keys() for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _checkpoint(lm, synthesizer, optimizer, scheduler, step: int, run: Path) -> None:
    save(synthesizer, lm, run / "checkpoint")
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
             "python_rng": random.getstate(), "torch_rng": torch.get_rng_state()}
    atomic_write(run / "trainer.pt", lambda p: torch.save(state, p))


class _Log:
    """metrics.jsonl; on resume, lines past the resumed step are dropped so no step is counted twice."""

    def __init__(self, path: Path, start: int, main: bool):
        self.records = Records(path) if main else None
        if self.records is not None:
            self.records.keep(lambda r: r.get("step", 0) <= start)

    def write(self, record: dict) -> None:
        if self.records is not None:
            with self.records as out:
                out.append(record)


def _bar(total: int, start: int, show: bool):
    if not show:
        return lambda *a: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), transient=False)
    task = progress.add_task("train", total=total, completed=start, loss="-")
    progress.start()

    def update(done, loss):
        if done is None:
            progress.stop()
            return
        progress.update(task, completed=done, loss=f"{loss:.4f}" if not math.isnan(loss) else "nan")

    return update
