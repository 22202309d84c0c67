"""The `parsyn` command line. Library errors become one line on stderr and a non-zero exit code."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Synthesize parallel LLM-agent branches from their KV caches.")
out = Console()
err = Console(stderr=True)


class Route(str, Enum):
    text = "text"
    cache = "cache"
    both = "both"


class Layout(str, Enum):
    parallel = "parallel"
    sequential = "sequential"


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=err, show_path=False)])
    for name in ("httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _load(model: Optional[str]):
    from .model import load

    with err.status("loading model" if model else "loading the embedded SmolLM2-135M-Instruct"):
        return load(model)


@app.callback()
def _commands() -> None:
    """Synthesize parallel LLM-agent branches from their KV caches."""


@app.command()
def run(
    question: Annotated[str, typer.Argument(help="The question every worker answers.")],
    workers: Annotated[int, typer.Option("--workers", "-n", help="Number of parallel workers.")] = 3,
    role: Annotated[Optional[list[str]], typer.Option("--role", help="A role instruction per worker (repeat).")] = None,
    branch: Annotated[Optional[list[str]], typer.Option("--branch", help="A ready branch text instead of running workers (repeat).")] = None,
    route: Annotated[Route, typer.Option(help="Synthesis route.")] = Route.both,
    layout: Annotated[Optional[Layout], typer.Option(help="Position layout of the cache route (default: the adapter's, else parallel).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Token limit for each worker and for the synthesizer.")] = 128,
    temperature: Annotated[float, typer.Option(help="Workers' sampling temperature (the synthesizer is greedy).")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Workers' nucleus sampling mass.")] = 0.95,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    system: Annotated[Optional[str], typer.Option(help="System prompt of the shared prefix.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Hugging Face model folder or .gguf file (default: embedded SmolLM2).")] = None,
    adapter: Annotated[str, typer.Option(help="Trained synthesizer for the cache route: auto (the packaged one when it fits the model), none, or a checkpoint folder.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the display.")] = False,
) -> None:
    """Fork workers on QUESTION, then synthesize their branches by text, by cache, or both."""
    from .decode import SamplingParams
    from .synthesis import synthesize
    from .workers import fork, from_texts

    worker_sampling = SamplingParams(max_new_tokens, temperature, top_p, seed)
    synth_sampling = SamplingParams(max_new_tokens, 0.0, 1.0, seed)
    if not question.strip():  # cheap checks before the model loads
        raise ValueError("the question is empty")
    if not branch and workers < 1:
        raise ValueError(f"need at least one worker, got {workers}")
    lm = _load(model)
    roles = role or []
    if branch:
        f = from_texts(lm, question, branch, roles=roles, system=system)
    else:
        with _worker_progress(workers, max_new_tokens, quiet=as_json) as on_token:
            f = fork(lm, question, workers=workers, roles=roles, system=system, sampling=worker_sampling, on_token=on_token)
    from .adapter import resolve

    trained = resolve(lm, adapter)
    routes = ["text", "cache"] if route == Route.both else [route.value]
    chosen = layout.value if layout else None
    results = {r: synthesize(lm, f, route=r, layout=chosen, sampling=synth_sampling, synthesizer=trained) for r in routes}
    if as_json:
        report = _as_dict(f, results, lm.name)
        report["adapter"] = None if trained is None else adapter if adapter != "auto" else "auto (packaged)"
        print(json.dumps(report, indent=2))
    else:
        _show(f, results, trained=trained is not None)


@app.command()
def data(
    out: Annotated[Path, typer.Argument(help="Folder for items.jsonl and manifest.json (resumes if present).")],
    items: Annotated[int, typer.Option(help="Number of items.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the item mix.")] = 0,
    batch: Annotated[int, typer.Option(help="Items decoded together.")] = 16,
    model: Annotated[Optional[str], typer.Option("--model", help="Base model (default: embedded SmolLM2).")] = None,
) -> None:
    """Generate self-distillation data: branches, then the text route's answers and distributions."""
    from .train.data import DataConfig, generate

    config = DataConfig(items=items, seed=seed, batch=batch)
    lm = _load(model)
    with _steps("items", items) as tick:
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
    from .adapter import AdapterConfig
    from .mapper import MapperConfig
    from .train.loop import TrainConfig, train as run_training
    from .train.loss import LossConfig

    config = TrainConfig(
        steps=steps, lr=lr, mapper_lr=mapper_lr, accumulate=accumulate, checkpoint_every=checkpoint_every, seed=seed,
        layouts=tuple(l.strip() for l in layouts.split(",") if l.strip()),
        loss=LossConfig(kl=kl, ce=ce, value_weight=value_weight),
        adapter=AdapterConfig(lora=lora, rank=rank, alpha=2 * rank, layout=layout, recompute=recompute,
                              mapper=None if mapper == "none" else MapperConfig(kind=mapper)),
    )
    if not data_file.is_file():
        raise ValueError(f"data file not found: {data_file}")
    lm = _load(model)
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
    from .adapter import resolve
    from .fidelity import ablations, evaluate, table
    from .train.data import read_items
    from .train.loop import split

    lm = _load(model)
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


@app.command()
def bench(
    branches: Annotated[str, typer.Option(help="Numbers of branches, comma-separated.")] = "1,2,4,8",
    lengths: Annotated[str, typer.Option(help="Branch lengths in tokens, comma-separated.")] = "128,256,512,1024",
    repeats: Annotated[int, typer.Option(help="Timed repeats per cell (after one warm-up); medians are reported.")] = 3,
    layout: Annotated[str, typer.Option(help="Layout of the cache route.")] = "parallel",
    as_json: Annotated[bool, typer.Option("--json", help="Print the list of cells as JSON.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Also write the full result (command, environment, cells) here.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Model (default: embedded SmolLM2).")] = None,
    random_shape: Annotated[Optional[str], typer.Option(help="Time a randomly initialised model of this shape instead (e.g. qwen3-14b).")] = None,
    device: Annotated[str, typer.Option(help="Device for --random-shape (cpu or cuda).")] = "cpu",
    tokenizer: Annotated[Optional[Path], typer.Option(help="Tokenizer folder for --random-shape (default: the embedded model's).")] = None,
) -> None:
    """Time to first token, text vs cache, over a grid of branch counts and lengths."""
    from transformers import AutoTokenizer

    from .bench import environment, parse_ints, random_lm, sweep

    counts, sizes = parse_ints(branches, "branches"), parse_ints(lengths, "lengths")
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    if random_shape:
        if tokenizer is not None and not (tokenizer / "tokenizer_config.json").is_file():
            raise ValueError(f"--tokenizer: no tokenizer_config.json in '{tokenizer}'")
        source = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else _load(model).tokenizer if model else None
        lm = random_lm(random_shape, source, device)
    else:
        lm = _load(model)
    with _steps("cells", len(counts) * len(sizes)) as tick:
        cells = sweep(lm, counts, sizes, repeats=repeats, layout=layout, progress=tick)
    result = {"command": "parsyn " + " ".join(sys.argv[1:]), "environment": environment(lm), "cells": cells}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    if as_json:
        print(json.dumps(cells, indent=2))
        return
    table = Table(title=f"time to first token ({lm.name}, {layout})", title_justify="left")
    for column in ("branches", "length", "text", "cache", "floor", "speed-up", "overhead"):
        table.add_column(column, justify="right")
    for c in cells:
        if c.get("skipped"):
            table.add_row(str(c["branches"]), str(c["length"]), "—", "—", "—", "—", c["skipped"])
            continue
        table.add_row(str(c["branches"]), str(c["length"]), f"{c['text_ttft_s'] * 1000:.0f} ms",
                      f"{c['cache_ttft_s'] * 1000:.0f} ms", f"{c['floor_s'] * 1000:.0f} ms",
                      f"{c['speedup']:.1f}×", f"{100 * c['overhead']:+.1f}%")
    Console().print(table)


@app.command(name="eval")
def evaluate(
    tasks: Annotated[str, typer.Option(help="Tasks, comma-separated (see parsyn/eval/tasks.py).")],
    out: Annotated[Path, typer.Option(help="Results folder (resumes if it holds this evaluation).")],
    methods: Annotated[str, typer.Option(help="Methods, comma-separated.")] = "single,text,cache-parallel,cache-sequential,cache-trained,cacheblend,ape",
    limit: Annotated[int, typer.Option(help="Items per task (a deterministic subset by seed).")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the subsets and of the workers' sampling.")] = 0,
    workers: Annotated[int, typer.Option(help="Workers per item.")] = 3,
    max_new_tokens: Annotated[int, typer.Option(help="Token limit of the workers and of every synthesizer.")] = 96,
    adapter: Annotated[str, typer.Option(help="Synthesizer for cache-trained: auto, none or a checkpoint.")] = "auto",
    model: Annotated[Optional[str], typer.Option("--model", help="Model (default: embedded SmolLM2).")] = None,
) -> None:
    """Accuracy, agreement with text synthesis and TTFT per task and method, on the same branches."""
    from .eval.run import EvalConfig, run as run_eval

    config = EvalConfig(tasks=_names(tasks), methods=_names(methods), limit=limit, seed=seed, workers=workers,
                        worker_tokens=max_new_tokens, answer_tokens=max_new_tokens, adapter=adapter)
    lm = _load(model)
    with _steps("items", 1) as tick:
        summary = run_eval(lm, config, out, command="parsyn " + " ".join(sys.argv[1:]),
                           progress=lambda done, n, task: tick(done, n))
    table = Table(title=f"evaluation ({out})", title_justify="left")
    for column in ("task", "method", "n", "accuracy", "agreement", "identical", "TTFT p50", "TTFT p90", "prefilled"):
        table.add_column(column)
    for r in summary["rows"]:
        agree, same = ("—" if r[k] is None else f"{100 * r[k]:.0f}%" for k in ("agreement", "identical"))
        table.add_row(r["task"], r["method"], str(r["n"]), f"{100 * r['accuracy']:.0f}%", agree, same,
                      f"{r['ttft_median_s'] * 1000:.0f} ms", f"{r['ttft_p90_s'] * 1000:.0f} ms", f"{r['prefill_tokens_mean']:.0f}")
    Console().print(table)


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="Folder of `parsyn eval` (holds summary.json).")],
    bench_files: Annotated[Optional[list[Path]], typer.Option("--bench", help="JSON written by `parsyn bench --out` (repeatable).")] = None,
) -> None:
    """Write results/report.html (self-contained) and its PNG plots."""
    from .eval.report import write_report

    err.print(f"report: {write_report(results, bench=bench_files or None)}")


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


class _steps:
    """A progress bar for a counted job; yields tick(done, total)."""

    def __init__(self, what: str, total: int):
        self.what, self.total = what, total

    def __enter__(self):
        self.progress = Progress(TextColumn(self.what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err)
        task = self.progress.add_task(self.what, total=self.total)
        self.progress.start()
        return lambda done, total: self.progress.update(task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        self.progress.stop()


def _as_dict(f, results, model_name: str) -> dict:
    report = {
        "question": f.question,
        "model": model_name,
        "branches": [
            {"role": b.role, "text": b.text, "tokens": len(b.token_ids), "generated": b.generated}
            for b in f.branches
        ],
        "routes": {
            name: {
                "answer": s.answer, "layout": s.layout, "ttft_s": s.ttft_s, "total_s": s.total_s,
                "prefill_tokens": s.prefill_tokens, "provenance": [asdict(p) for p in s.provenance],
            }
            for name, s in results.items()
        },
    }
    if len(results) == 2:
        report["speedup"] = results["text"].ttft_s / results["cache"].ttft_s
    return report


class _worker_progress:
    """A live bar per worker while they decode; yields the on_token callback."""

    def __init__(self, workers: int, limit: int, quiet: bool):
        self.workers, self.limit, self.quiet = workers, limit, quiet

    def __enter__(self) -> Callable[[int, int], None] | None:
        if self.quiet or self.workers > 32:
            return None
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err, transient=True)
        tasks = [self.progress.add_task(f"worker {i + 1}", total=self.limit) for i in range(self.workers)]
        self.progress.start()
        return lambda row, _token: self.progress.advance(tasks[row])

    def __exit__(self, *exc) -> None:
        if hasattr(self, "progress"):
            self.progress.stop()


def _show(f, results, *, trained: bool = False) -> None:
    for i, b in enumerate(f.branches, 1):
        title = f"worker {i}" + (f" · {b.role}" if b.role else "") + f" · {len(b.token_ids)} tokens"
        out.print(Panel(b.text or "(empty)", title=title, title_align="left", border_style="dim"))
    table = Table(title="synthesis", title_justify="left")
    for column in ("route", "answer", "TTFT", "prefilled"):
        table.add_column(column)
    for name, s in results.items():
        label = name if s.layout is None else f"{name} ({s.layout}{', trained' if trained else ''})"
        table.add_row(label, s.answer, f"{s.ttft_s * 1000:.0f} ms", f"{s.prefill_tokens} tokens")
    out.print(table)
    if len(results) == 2:
        out.print(f"time to first token: cache route {results['text'].ttft_s / results['cache'].ttft_s:.1f}× faster "
                  f"than text synthesis")


def main() -> None:
    """Entry point: run the app; library errors become one stderr line and exit code 2."""
    _quiet_libraries()
    try:
        app(standalone_mode=False)
    except typer.Exit as stop:
        sys.exit(stop.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except Exception as error:  # the one place errors turn into an exit code
        if isinstance(error, typer.TyperException):  # usage errors: typer's own message and exit code
            error.show()
            sys.exit(error.exit_code)
        if os.environ.get("PARSYN_DEBUG"):
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        kind = "" if isinstance(error, (ValueError, TypeError)) else f"{type(error).__name__}: "
        print(f"parsyn: error: {kind}{message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
