"""The `parsyn` command line. Library errors become one line on stderr and a non-zero exit code."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from enum import Enum
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
    layout: Annotated[Layout, typer.Option(help="Position layout of the cache route.")] = Layout.parallel,
    max_new_tokens: Annotated[int, typer.Option(help="Token limit for each worker and for the synthesizer.")] = 128,
    temperature: Annotated[float, typer.Option(help="Workers' sampling temperature (the synthesizer is greedy).")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Workers' nucleus sampling mass.")] = 0.95,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    system: Annotated[Optional[str], typer.Option(help="System prompt of the shared prefix.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Hugging Face model folder or .gguf file (default: embedded SmolLM2).")] = None,
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
    routes = ["text", "cache"] if route == Route.both else [route.value]
    results = {r: synthesize(lm, f, route=r, layout=layout.value, sampling=synth_sampling) for r in routes}
    if as_json:
        print(json.dumps(_as_dict(f, results, lm.name), indent=2))
    else:
        _show(f, results)


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


def _show(f, results) -> None:
    for i, b in enumerate(f.branches, 1):
        title = f"worker {i}" + (f" · {b.role}" if b.role else "") + f" · {len(b.token_ids)} tokens"
        out.print(Panel(b.text or "(empty)", title=title, title_align="left", border_style="dim"))
    table = Table(title="synthesis", title_justify="left")
    for column in ("route", "answer", "TTFT", "prefilled"):
        table.add_column(column)
    for name, s in results.items():
        label = name if s.layout is None else f"{name} ({s.layout})"
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
