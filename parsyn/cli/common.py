"""What every command shares: the app, the consoles, model loading and progress bars."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Synthesize parallel LLM-agent branches from their KV caches.")
out = Console()
err = Console(stderr=True)


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so files close as they do on Ctrl-C."""


class Interrupted(Exception):
    """A command stopped by Ctrl-C (exit 130) or SIGTERM (exit 143); `message` says what was kept."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def raise_on_sigterm() -> None:
    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


@contextmanager
def resumable(kept: Callable[[], str]) -> Iterator[None]:
    """Within the block, Ctrl-C and SIGTERM become `Interrupted` carrying `kept()`: what was kept, how to resume."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(kept(), 130) from None
    except Terminated:
        raise Interrupted(kept(), 143) from None


class Route(str, Enum):
    text = "text"
    cache = "cache"
    both = "both"
    auto = "auto"


class Layout(str, Enum):
    parallel = "parallel"
    sequential = "sequential"


def quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=err, show_path=False)])
    for name in ("httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)


MODEL_HELP = ("A model name (`parsyn models`), Hugging Face folder or .gguf file; default qwen2.5-coder-0.5b "
              "or $PARSYN_MODEL.")


def load_model(model: Optional[str], device: str = "cpu"):
    from ..model import load
    from ..registry import default

    with err.status(f"loading {model or default()}"):
        return load(model, device=device)


def names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


class steps:
    """A progress bar for a counted job; yields tick(done, total, what=None), `what` relabelling the bar."""

    def __init__(self, what: str, total: int):
        self.what, self.total = what, total

    def __enter__(self):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err)
        task = self.progress.add_task(self.what, total=self.total)
        self.progress.start()
        return lambda done, total, what=None: self.progress.update(task, completed=done, total=total,
                                                                   description=what or self.what)

    def __exit__(self, *exc) -> None:
        self.progress.stop()


