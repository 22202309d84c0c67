"""The `python` tool: a model's program run in the bubblewrap sandbox (`sandbox.py`), its output returned."""

from __future__ import annotations

from typing import Annotated

from . import sandbox
from .base import Tool, ToolError

# The sandbox bounds a run itself (deadline, CPU, memory, processes); the tool's thread deadline is only a
# backstop past it, for the sandbox's own start-up and clean-up.
_GRACE_S = 10.0

_LIMITS = sandbox.Limits()  # the evaluation's: 10 s, 512 MiB, 64 processes, 4000 characters of output
_ENDINGS = {
    "failed": "the program raised an exception or exited early",
    "timeout": "the program ran past its time limit of {timeout:g} s and was stopped",
    "memory": "the program ran out of memory (limit {memory} MiB)",
    "error": "the program did not compile, or was killed",
}


def python_tool(*, limits: sandbox.Limits = _LIMITS, name: str = "python",
                description: str | None = None) -> Tool:
    """A tool that runs a Python program (`code`) isolated by bubblewrap under `limits`: no network, a
    read-only file system but for its own temporary folder, bounded time, memory and processes. Its text is the
    last `limits.output_chars` characters of stdout and stderr together; a program that does not run to the
    end is a failed result (`error: <how it ended>` then its output, the traceback included).

    Raises RuntimeError now, naming what is missing, where bubblewrap cannot isolate code on this machine."""
    sandbox.isolation()

    def python(code: Annotated[str, "a complete Python 3 program; print() what you want to see"]) -> str:
        result = sandbox.run(code, limits=limits)
        output = result.output or "(no output)"
        if result.passed:
            return output
        ending = _ENDINGS[result.status].format(timeout=limits.timeout_s, memory=limits.memory_bytes // 2**20)
        raise ToolError(f"{ending}\n{output}")

    text = description or ("Run a Python 3 program in a sandbox (no network, no files kept, "
                           f"{limits.timeout_s:g} s at most) and see what it prints.")
    return Tool.from_function(python, name=name, description=text, timeout_s=limits.timeout_s + _GRACE_S,
                              max_chars=limits.output_chars + 200)
