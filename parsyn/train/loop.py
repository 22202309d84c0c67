"""The one training loop: one process or many (data parallel through Accelerate / DDP).

Each step takes one item per process and micro-batch: the frozen base model prefills its branches
(LoRA off), the student composes them (mapper, layout drawn per step, structural aid) and runs the
synthesizer's prompt plus the teacher's answer (LoRA on); the loss compares its next-token
distributions with the teacher's. AdamW, warm-up + cosine, gradient accumulation and clipping.
A run folder holds its settings (config.json, written once everything is validated), a JSONL metrics
log and the latest checkpoint: one folder, `checkpoint/`, that `adapter.load` reads and that also holds
the trainer state (trainer.pt: optimizer, schedule, step, random states; loaded with weights_only) and
state.json, written last, with the step, the data position and the sha256 of every file. A new checkpoint
is written beside the old one and renamed into place, so a kill at any moment leaves one complete
checkpoint; a killed run continues from it (at most one interval is redone) and ends bitwise where an
uninterrupted run ends. A resume refuses a checkpoint whose files, settings or data do not belong together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import pickle
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from ..adapter import CONFIG, WEIGHTS, AdapterConfig, Synthesizer, attach, check_number, known_fields, read_file, save
from ..adapter import load as load_checkpoint
from ..files import Records, atomic_folder, recover_folder, sha256, write_json
from ..kv import KV
from ..layout import LAYOUTS
from ..mapper import MapperConfig
from ..model import LM
from ..synthesis import CacheOptions, teacher_forced
from ..workers import Fork, from_ids
from .curve import CURVE_ITEMS, held_out_loss
from .data import read_items
from .loss import LossConfig, distill_loss

TRAINER, STATE = "trainer.pt", "state.json"  # in run/checkpoint, beside the synthesizer's two files
STATE_FORMAT = "parsyn-train-state"


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
        for name in ("steps", "accumulate", "checkpoint_every", "log_every"):
            check_number(f"TrainConfig.{name}", getattr(self, name), integer=True, at_least=1)
        check_number("TrainConfig.seed", self.seed, integer=True, at_least=0, below=2**63)
        check_number("TrainConfig.holdout_percent", self.holdout_percent, integer=True, at_least=0, below=100)
        check_number("TrainConfig.lr", self.lr, above=0)
        check_number("TrainConfig.mapper_lr", self.mapper_lr, above=0)
        check_number("TrainConfig.warmup", self.warmup, at_least=0, below=1)
        check_number("TrainConfig.clip", self.clip, at_least=0)
        if (not isinstance(self.layouts, (tuple, list)) or not self.layouts
                or any(layout not in LAYOUTS for layout in self.layouts)):
            raise ValueError(f"TrainConfig.layouts must be drawn from {', '.join(LAYOUTS)}, got {self.layouts!r}")
        object.__setattr__(self, "layouts", tuple(self.layouts))
        if not isinstance(self.loss, LossConfig) or not isinstance(self.adapter, AdapterConfig):
            raise ValueError("TrainConfig.loss and TrainConfig.adapter must be a LossConfig and an AdapterConfig")
        if not self.adapter.lora and self.adapter.mapper is None:
            raise ValueError("TrainConfig.adapter trains nothing: it has neither a LoRA nor a mapper")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        data = known_fields(cls, data, "TrainConfig")
        data["loss"] = LossConfig(**known_fields(LossConfig, data.get("loss", {}), "TrainConfig.loss"))
        data["adapter"] = AdapterConfig.from_dict(data.get("adapter", {}))
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
    `stop_after` ends this call after that many steps (with a checkpoint); calling again continues.
    Everything is validated (data, settings, the adapter on this model, a checkpoint to resume) before
    anything is written; ValueError otherwise, FloatingPointError when the loss stops being finite."""
    if stop_after is not None:
        check_number("stop_after", stop_after, integer=True, at_least=1)
    accelerator = Accelerator(gradient_accumulation_steps=config.accumulate, cpu=lm.device.type == "cpu")
    run, data = Path(run), Path(data)
    items, held, position = _training_items(data, config, on_error, accelerator.num_processes)
    _check_run(run, config, data)
    torch.manual_seed(config.seed + accelerator.process_index)
    synthesizer, state = _start(lm, run, config, position, accelerator)
    synthesizer.recipe = {"train": config.to_dict(), "data": str(data), "items": len(items)}
    params = _param_groups(synthesizer, config)
    optimizer = torch.optim.AdamW(params, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup * config.steps), config.steps)
    start = _resume(run / "checkpoint", state, optimizer, scheduler) if state else 0
    _write_settings(run, config, data, accelerator)
    student, optimizer = accelerator.prepare(Student(lm, synthesizer, config.loss), optimizer)
    log = _Log(run / "metrics.jsonl", start, accelerator.is_main_process)
    curve = _Log(run / "held_out.jsonl", start, accelerator.is_main_process and bool(held))
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
            if accelerator.is_main_process:  # the curve first: a checkpoint's step always has its point
                if held:
                    curve.write({"step": done, **held_out_loss(accelerator.unwrap_model(student), held,
                                                               config.layouts)})
                _checkpoint(lm, synthesizer, optimizer, scheduler, done, run, {**position, "train": config.to_dict()})
    accelerator.wait_for_everyone()
    bar(None, None)
    synthesizer.path = run / "checkpoint"
    return synthesizer


def _training_items(data: Path, config: TrainConfig, on_error: str, world: int) -> tuple[list, list, dict]:
    """The training items, the held-out ones the curve scores, and what ties a checkpoint to them: the data
    file's sha256, the number of training items and how many a step takes (position = step x that)."""
    if not data.is_file():
        raise ValueError(f"data file not found: {data}")
    items, held = split(read_items(data, on_error=on_error), config.holdout_percent)
    if not items:
        raise ValueError(f"no training items in {data} (the file is empty or every item is held out)")
    return items, held[:CURVE_ITEMS], {"data_sha256": sha256(data), "items": len(items), "world_size": world,
                                       "items_per_step": config.accumulate * world}


def _step(student, optimizer, accelerator: Accelerator, params: list, items: Sequence[dict], step: int, layout: str,
          config: TrainConfig) -> dict:
    """One optimizer step over `accumulate` micro-batches of one item per process; mean loss parts."""
    stats: dict = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
    world = accelerator.num_processes
    for micro in range(config.accumulate):
        index = (step * config.accumulate + micro) * world + accelerator.process_index
        with accelerator.accumulate(student):
            loss, parts = student(_pick(items, index, config.seed), layout)
            _check_finite(loss, accelerator, step)
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.clip:
                accelerator.clip_grad_norm_(params, config.clip)
            optimizer.step()
            optimizer.zero_grad()
        stats["loss"] += loss.item() / config.accumulate
        stats["kl"] += parts["kl"] / config.accumulate
        stats["ce"] += parts["ce"] / config.accumulate
    return stats


def _check_finite(loss: torch.Tensor, accelerator: Accelerator, step: int) -> None:
    """Stop (every process together) before a non-finite loss reaches the weights."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    if bad.item():
        raise FloatingPointError(f"training diverged: the loss at step {step + 1} is not finite (NaN or inf); "
                                 "stopped without a checkpoint of it (the last one is kept); lower the learning rates")


def _start(lm: LM, run: Path, config: TrainConfig, position: dict, accelerator: Accelerator):
    """(the synthesizer to train, the verified state.json of the checkpoint it resumes or None)."""
    folder = run / "checkpoint"
    if (run / TRAINER).exists():
        raise ValueError(f"{run} holds a run of an older parsyn (trainer.pt beside checkpoint/) whose checkpoint "
                         "cannot be verified; train into a new folder")
    if accelerator.is_main_process:
        recover_folder(folder)  # a kill while a checkpoint replaced the previous one: the previous comes back
    accelerator.wait_for_everyone()
    if not folder.exists():
        return attach(lm, config.adapter), None
    state = _verified_state(folder, {**position, "train": json.loads(json.dumps(config.to_dict()))})
    synthesizer = load_checkpoint(lm, folder)
    if synthesizer.recipe.get("step") != state["step"]:
        raise ValueError(f"checkpoint {folder}: {CONFIG} is for step {synthesizer.recipe.get('step')}, "
                         f"{STATE} for step {state['step']}")
    return synthesizer, state


def _verified_state(folder: Path, expected: dict) -> dict:
    """state.json once every file it lists matches its sha256 and the run, data and data position per
    step are the ones it was written for; ValueError naming the folder otherwise."""
    if not (folder / STATE).is_file():
        raise ValueError(f"{folder} holds no {STATE}: not a complete training checkpoint; train into a new folder")
    try:
        state = json.loads(read_file(folder / STATE, "training state"))
        if (not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("step"), int)
                or not isinstance(state.get("files"), dict) or any(Path(n).name != n for n in state["files"])):
            raise ValueError("not a parsyn training state (or it lists files outside its folder)")
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"checkpoint {folder}: {STATE} is corrupt: {error}") from None
    for name in sorted(set(state["files"]) | {WEIGHTS, CONFIG, TRAINER}):
        if not (folder / name).is_file() or sha256(folder / name) != state["files"].get(name):
            raise ValueError(f"checkpoint {folder} is incomplete or altered: {name} is missing or does not match the "
                             f"sha256 that {STATE} records")
    differ = sorted(k for k in expected if state.get(k) != expected[k])
    if differ:
        raise ValueError(f"checkpoint {folder} belongs to other settings, data or processes ({', '.join(differ)} "
                         "differ); resume with the same ones or use a new folder")
    if state.get("items_seen") != state["step"] * expected["items_per_step"]:
        raise ValueError(f"checkpoint {folder}: its data position ({state.get('items_seen')} items) is not step "
                         f"{state['step']} x {expected['items_per_step']} items per step")
    return state


def _resume(folder: Path, state: dict, optimizer, scheduler) -> int:
    """Restore the optimizer, schedule and random states saved at a checkpoint; the step to continue from."""
    try:
        saved = torch.load(io.BytesIO(read_file(folder / TRAINER, "trainer state")), map_location="cpu",
                           weights_only=True)
        if saved["step"] != state["step"]:
            raise ValueError(f"it is for step {saved['step']}, {STATE} for step {state['step']}")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        version, internal, gauss = saved["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(saved["torch_rng"])
    except pickle.UnpicklingError:
        raise ValueError(f"trainer state {folder / TRAINER} holds more than tensors and plain data; refused, since "
                         "loading it could run code") from None
    except (RuntimeError, EOFError, KeyError, TypeError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"trainer state {folder / TRAINER} does not fit this run: {reason}") from None
    return state["step"]


def _param_groups(synthesizer: Synthesizer, config: TrainConfig) -> list[dict]:
    groups = []
    lora = synthesizer.lora.parameters() if synthesizer.lora is not None else []
    if lora:
        groups.append({"params": lora, "lr": config.lr})
    if synthesizer.mapper is not None:
        groups.append({"params": list(synthesizer.mapper.parameters()), "lr": config.mapper_lr})
    return groups  # not empty: TrainConfig refuses an adapter without LoRA and mapper


def _pick(items: Sequence[dict], index: int, seed: int) -> dict:
    """Item number `index` of an endless sequence of epochs, each a fresh permutation."""
    epoch, at = divmod(index, len(items))
    order = list(range(len(items)))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return items[order[at]]


def _settings(config: TrainConfig, data: Path) -> dict:
    return {"train": config.to_dict(), "data": str(Path(data).resolve())}


def _check_run(run: Path, config: TrainConfig, data: Path) -> None:
    """Refuse a run folder that holds a run with other settings (nothing is written here)."""
    path = run / "config.json"
    if not path.exists():
        return
    try:
        old = json.loads(read_file(path, "run settings"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"run settings {path} are corrupt: {error}") from None
    new = json.loads(json.dumps(_settings(config, data)))
    if old != new:
        changed = sorted(_differences(old, new))
        raise ValueError(f"{run} holds a run with other settings ({', '.join(changed[:4])}); "
                         "resume with the same ones or use a new folder")


def _write_settings(run: Path, config: TrainConfig, data: Path, accelerator: Accelerator) -> None:
    if accelerator.is_main_process and not (run / "config.json").exists():
        write_json(run / "config.json", _settings(config, data))
    accelerator.wait_for_everyone()


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in old.keys() | new.keys() for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _checkpoint(lm, synthesizer, optimizer, scheduler, step: int, run: Path, belongs: dict) -> None:
    """One unit: the synthesizer's files, trainer.pt and, last, state.json (the step, what the checkpoint
    belongs to, each file's sha256) in a temporary folder that then replaces run/checkpoint."""
    synthesizer.recipe["step"] = step
    version, internal, gauss = random.getstate()
    trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
               "python_rng": [version, list(internal), gauss], "torch_rng": torch.get_rng_state()}
    with atomic_folder(run / "checkpoint") as tmp:
        save(synthesizer, lm, tmp)
        torch.save(trainer, tmp / TRAINER)
        files = {name: sha256(tmp / name) for name in (WEIGHTS, CONFIG, TRAINER)}
        write_json(tmp / STATE, {"format": STATE_FORMAT, "version": 1, "step": step,
                                 "items_seen": step * belongs["items_per_step"], **belongs, "files": files})


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
