"""The `parsyn` command line, one module per command group. Library errors become one line on stderr
and a non-zero exit code."""

from __future__ import annotations

import os
import sys

import typer

from . import agent, evaluate, models, run, serve, train  # noqa: F401  (each registers its commands on the app)
from .common import Interrupted, Terminated, app, quiet_libraries, raise_on_sigterm


@app.callback()
def _commands() -> None:
    """Synthesize parallel LLM-agent branches from their KV caches."""


def main() -> None:
    """Entry point: run the app; library errors become one stderr line and exit code 2."""
    raise_on_sigterm()
    try:
        quiet_libraries()
        code = app(standalone_mode=False)  # typer turns Ctrl-C outside a resumable block into a return of 130
    except typer.Exit as stop:
        sys.exit(stop.exit_code)
    except Interrupted as stop:
        print(f"parsyn: interrupted: {stop}", file=sys.stderr)
        sys.exit(stop.code)
    except (typer.Abort, KeyboardInterrupt, Terminated) as stop:
        print("parsyn: interrupted; nothing was written", file=sys.stderr)
        sys.exit(143 if isinstance(stop, Terminated) else 130)
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
    if isinstance(code, int) and code:
        if code in (130, 143):
            print("parsyn: interrupted; nothing was written", file=sys.stderr)
        sys.exit(code)


