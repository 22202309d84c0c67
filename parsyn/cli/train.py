"""`parsyn data`, `train` and `fidelity`: self-distillation data, training, and the fidelity gates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import app, err, load_model, steps


@app.command()
def data(
    out: Annotated[Path, typer.Argument(help="Folder for items.jsonl and manifest.json (resumes if present).")],
    items: Annotated[int, typer.Option(help="Number of items.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the item mix.")] = 0,
    batch: Annotated[int, typer.Option(help="Items decoded together.")] = 16,
    model: Annotated[Optional[str], typer.Option("--model", help="Base model (default: embedded SmolLM2).")] = None,
) -> None:
    """Generate self-distillation data: branches, then the text route's answers and distributions."""
    from ..train.data import DataConfig, generate

    config = DataConfig(items=items, seed=seed, batch=batch)
    lm = load_model(model)
    with steps("items", items) as tick:
        path = generate(lm, out, config, progress=tick)
    err.print(f"data: {path}")


@app.command()
def train(
    data_file: Annotated[Path, typer.Argument(metavar="DATA", help="items.jsonl from `parsyn data`.")],
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="Run folder (resumes if it holds a run).")],
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1500,
    lr: Annotated[float, typer.Option(help="LoRA learning rate.")] = 3e-4,
    mapper_lr: Annotated[float, typer.Option(help="Mapper learning rate.")] = 3e-3,
    mapper: Annotated[str, typer.Option(help="Mapper kind: affine, tagged or none.")] = "affine",
    lora: Annotated[bool, typer.Option(help="Train a LoRA on the synthesizer.")] = True,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    kl: Annotated[float, typer.Option(help="Weight of KL(teacher || student).")] = 1.0,
    ce: Annotated[float, typer.Option(help="Weight of cross-entropy on the teacher's tokens.")] = 0.0,
    value_weight: Annotated[float, typer.Option(help="Weight of answer positions copied from a branch.")] = 5.0,
    layouts: Annotated[str, typer.Option(help="Layouts drawn per step, comma-separated.")] = "parallel,sequential",
    layout: Annotated[str, typer.Option(help="Layout the checkpoint uses by default at synthesis.")] = "parallel",
    recompute: Annotated[int, typer.Option(help="Structural aid: first tokens of each branch recomputed.")] = 0,
    accumulate: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    on_error: Annotated[str, typer.Option(help="Malformed data lines: stop or skip (both name the lines).")] = "stop",
    model: Annotated[Optional[str], typer.Option("--model", help="Base model (default: embedded SmolLM2).")] = None,
) -> None:
    """Train a synthesizer (LoRA + mapper) by distillation from the text route; resumable."""
    from ..adapter import AdapterConfig
    from ..mapper import MapperConfig
    from ..train.loop import TrainConfig, train as run_training
    from ..train.loss import LossConfig

    config = TrainConfig(
        steps=steps, lr=lr, mapper_lr=mapper_lr, accumulate=accumulate, checkpoint_every=checkpoint_every, seed=seed,
        layouts=tuple(l.strip() for l in layouts.split(",") if l.strip()),
        loss=LossConfig(kl=kl, ce=ce, value_weight=value_weight),
        adapter=AdapterConfig(lora=lora, rank=rank, alpha=2 * rank, layout=layout, recompute=recompute,
                              mapper=None if mapper == "none" else MapperConfig(kind=mapper)),
    )
    if not data_file.is_file():
        raise ValueError(f"data file not found: {data_file}")
    lm = load_model(model)
    result = run_training(lm, data_file, run_dir, config, on_error=on_error)
    err.print(f"checkpoint: {result.path}")


@app.command()
def fidelity(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint folder, `auto` (the packaged one) or `none`.")],
    data_file: Annotated[Path, typer.Option("--data", help="items.jsonl whose held-out items are scored.")],
    probe: Annotated[int, typer.Option(help="Retrieval probe items.")] = 100,
    held_out: Annotated[int, typer.Option(help="At most this many held-out items.")] = 100,
    layouts: Annotated[str, typer.Option(help="Layouts to score, comma-separated.")] = "parallel,sequential",
    out: Annotated[Optional[Path], typer.Option(help="Write the rows as JSON here.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Base model (default: embedded SmolLM2).")] = None,
) -> None:
    """Score raw and trained cache routes against text synthesis (agreement, KL, probe)."""
    from ..adapter import resolve
    from ..eval.fidelity import ablations, evaluate, table
    from ..train.data import read_items
    from ..train.loop import split

    lm = load_model(model)
    trained = resolve(lm, checkpoint)
    holdout_percent = trained.recipe.get("train", {}).get("holdout_percent", 4) if trained else 4
    items = split(read_items(data_file), holdout_percent)[1][:held_out]
    if not items:
        raise ValueError(f"no held-out items in {data_file}")
    variants = ablations(trained, [l.strip() for l in layouts.split(",") if l.strip()])
    with err.status("scoring") as status:
        rows = evaluate(lm, variants, items, probe_size=probe, progress=lambda name: status.update(f"scoring: {name}"))
    out_text = table(rows)
    print(out_text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"checkpoint": checkpoint if trained else None, "held_out": len(items),
                                   "probe": probe, "rows": rows}, indent=2) + "\n")


