"""`parsyn data`, `train` and `fidelity`: self-distillation data, training, and the fidelity gates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import MODEL_HELP, app, err, load_model, resumable, steps


@app.command()
def data(
    out: Annotated[Path, typer.Argument(help="Folder for items.jsonl and manifest.json (resumes if present).")],
    items: Annotated[int, typer.Option(help="Number of items.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the item mix.")] = 0,
    batch: Annotated[int, typer.Option(help="Items decoded together.")] = 16,
    model: Annotated[Optional[str], typer.Option("--model", help=MODEL_HELP)] = None,
) -> None:
    """Generate self-distillation data: branches, then the text route's answers and distributions."""
    from ..train.data import DataConfig, generate, read_items

    config = DataConfig(items=items, seed=seed, batch=batch)
    lm = load_model(model)
    path = out / "items.jsonl"
    kept = lambda: (f"{len(read_items(path, on_error='skip'))} of {items} items are in {path}; "
                    "run the same command to resume")
    with resumable(kept), steps("items", items) as tick:
        path = generate(lm, out, config, progress=tick)
    err.print(f"data: {path}")


@app.command()
def train(
    data_file: Annotated[Path, typer.Argument(metavar="DATA", help="items.jsonl from `parsyn data`.")],
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="Run folder (resumes if it holds a run).")],
    recipe: Annotated[Optional[str], typer.Option(
        help="A named recipe (parsyn/configs, e.g. smollm2-135m-instruct) or a JSON file; "
             "flags below override it.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps [1500].")] = None,
    lr: Annotated[Optional[float], typer.Option(help="LoRA learning rate [3e-4].")] = None,
    mapper_lr: Annotated[Optional[float], typer.Option(help="Mapper learning rate [3e-3].")] = None,
    mapper: Annotated[Optional[str], typer.Option(help="Mapper kind: affine, tagged or none [affine].")] = None,
    lora: Annotated[Optional[bool], typer.Option(
        "--lora/--no-lora", help="Train a LoRA on the synthesizer [yes].")] = None,
    rank: Annotated[Optional[int], typer.Option(help="LoRA rank [16].")] = None,
    kl: Annotated[Optional[float], typer.Option(help="Weight of KL(teacher || student) [1].")] = None,
    ce: Annotated[Optional[float], typer.Option(
        help="Weight of cross-entropy on the teacher's tokens [0].")] = None,
    value_weight: Annotated[Optional[float], typer.Option(
        help="Weight of answer positions copied from a branch [5].")] = None,
    layouts: Annotated[Optional[str], typer.Option(
        help="Layouts drawn per step, comma-separated [parallel,sequential].")] = None,
    layout: Annotated[Optional[str], typer.Option(
        help="Layout the checkpoint uses by default at synthesis [parallel].")] = None,
    recompute: Annotated[Optional[int], typer.Option(
        help="Structural aid: first tokens of each branch recomputed [0].")] = None,
    accumulate: Annotated[Optional[int], typer.Option(help="Gradient accumulation steps [1].")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Steps between checkpoints [100].")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed [0].")] = None,
    on_error: Annotated[str, typer.Option(help="Malformed data lines: stop or skip (both name the lines).")] = "stop",
    model: Annotated[Optional[str], typer.Option("--model", help=MODEL_HELP)] = None,
) -> None:
    """Train a synthesizer (LoRA + mapper) by distillation from the text route; resumable. Defaults in
    brackets hold without --recipe."""
    from ..train import recipes
    from ..train.loop import TrainConfig
    from ..train.loop import train as run_training

    base = recipes.load(recipe) if recipe else TrainConfig()
    config = recipes.override(base, steps=steps, lr=lr, mapper_lr=mapper_lr, mapper=mapper, lora=lora, rank=rank, kl=kl,
                              ce=ce, value_weight=value_weight, layouts=layouts, layout=layout, recompute=recompute,
                              accumulate=accumulate, checkpoint_every=checkpoint_every, seed=seed)
    if on_error not in ("stop", "skip"):
        raise ValueError(f"--on-error must be stop or skip, got {on_error!r}")
    if not data_file.is_file():
        raise ValueError(f"data file not found: {data_file}")
    lm = load_model(model)  # what needs the model (the rank against its layers, a checkpoint) train() checks
    kept = lambda: f"{run_dir} keeps its last complete checkpoint; run the same command to resume"
    with resumable(kept):
        result = run_training(lm, data_file, run_dir, config, on_error=on_error)
    err.print(f"checkpoint: {result.path}")


@app.command()
def derive(
    checkpoint: Annotated[Path, typer.Argument(help="A synthesizer checkpoint folder.")],
    out: Annotated[Path, typer.Argument(help="Folder to write the derived checkpoint to.")],
    mapper: Annotated[bool, typer.Option("--mapper/--no-mapper", help="Keep the cache mapper.")] = True,
    layout: Annotated[Optional[str], typer.Option(help="Default layout at synthesis (parallel, sequential).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help=MODEL_HELP)] = None,
) -> None:
    """Write a checkpoint of the same trained parts without the mapper and/or with another default layout."""
    from ..adapter import derive as derived
    from ..adapter import load, save

    if out.resolve() == checkpoint.resolve():
        raise ValueError("write the derived checkpoint to another folder than its source")
    lm = load_model(model)
    path = save(derived(load(lm, checkpoint), mapper=mapper, layout=layout), lm, out)
    err.print(f"checkpoint: {path}")


@app.command()
def fidelity(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint folder, `auto` (the packaged one) or `none`.")],
    data_file: Annotated[Path, typer.Option("--data", help="items.jsonl whose held-out items are scored.")],
    probe: Annotated[int, typer.Option(help="Retrieval probe items.")] = 100,
    held_out: Annotated[int, typer.Option(help="At most this many held-out items.")] = 100,
    layouts: Annotated[str, typer.Option(help="Layouts to score, comma-separated.")] = "parallel,sequential",
    out: Annotated[Optional[Path], typer.Option(help="Write the rows as JSON here.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help=MODEL_HELP)] = None,
) -> None:
    """Score raw and trained cache routes against text synthesis (agreement, KL, probe)."""
    from ..adapter import resolve

    if probe < 0 or held_out < 1:
        raise ValueError(f"--probe must be >= 0 and --held-out >= 1, got {probe} and {held_out}")
    if not data_file.is_file():
        raise ValueError(f"data file not found: {data_file}")
    from ..eval.fidelity import ablations, evaluate, table
    from ..train.data import read_items
    from ..train.loop import split

    lm = load_model(model)
    trained = resolve(lm, checkpoint)
    holdout_percent = trained.recipe.get("train", {}).get("holdout_percent", 4) if trained else 4
    items = split(read_items(data_file), holdout_percent)[1][:held_out]
    if not items:
        raise ValueError(f"no held-out items in {data_file}")
    variants = ablations(trained, [name.strip() for name in layouts.split(",") if name.strip()])
    with err.status("scoring") as status:
        rows = evaluate(lm, variants, items, probe_size=probe, progress=lambda name: status.update(f"scoring: {name}"))
    out_text = table(rows)
    print(out_text)
    if out:
        from ..files import write_json

        write_json(out, {"checkpoint": checkpoint if trained else None, "held_out": len(items), "probe": probe,
                         "rows": rows})


