"""Tools an agent calls with JSON arguments: a typed Python function with limits, and a box of them.

    @tool(timeout_s=5)
    def weather(city: str, unit: Literal["C", "F"] = "C") -> str:
        '''The current temperature in a city.'''
        ...

    box = Toolbox((weather, calculator_tool()))
    box.schemas()                      # OpenAI's `tools=[{"type": "function", "function": {...}}]`
    box.call("weather", '{"city": "Oslo"}').text

`Tool.call` never raises for what the tool or its arguments do: bad arguments, an exception, a hang past
`timeout_s` and a result past `max_chars` all end in a `ToolResult` whose text tells the model what happened.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .schema import ArgumentError, Param, bind, json_schema, params

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")  # what OpenAI's API accepts for a function name


class ToolError(Exception):
    """Raised by a tool for an expected failure; the model sees `error: <message>`, without a type name."""


@dataclass(frozen=True)
class ToolResult:
    """What a call gave the model: `text` (the result, or `error: ...`), `ok` (False for bad arguments, an
    exception, a timeout), seconds taken, and whether the text was cut to the tool's `max_chars`."""

    text: str
    ok: bool
    elapsed_s: float
    truncated: bool = False


@dataclass(frozen=True)
class Tool:
    """A function a model may call: `name`, `description` and the JSON schema `parameters` (derived from the
    function's typed signature, see `schema.py`), with limits on its time and on the length of its result.

    A call runs the function in a daemon thread and waits `timeout_s` for it. A Python thread cannot be killed:
    one still running at the deadline is abandoned (it runs on, its result is dropped), so a tool that can hang
    should bound itself (the python and sql tools do, in a subprocess and through SQLite's progress handler)."""

    name: str
    description: str
    fn: Callable[..., object]
    timeout_s: float = 30.0
    max_chars: int = 8000
    parameters: dict = field(init=False, compare=False)
    _params: tuple[Param, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"Tool.name must be letters, digits, _ or - (at most 64), got {self.name!r}")
        if not isinstance(self.description, str) or not self.description.strip():
            raise ValueError(f"Tool.description of {self.name!r} must be a non-empty string, got "
                             f"{self.description!r}")
        if not callable(self.fn):
            raise TypeError(f"Tool.fn of {self.name!r} must be callable, got {type(self.fn).__name__}")
        for option in ("timeout_s", "max_chars"):
            if not getattr(self, option) > 0:
                raise ValueError(f"Tool.{option} of {self.name!r} must be positive, got {getattr(self, option)!r}")
        object.__setattr__(self, "_params", params(self.fn))
        object.__setattr__(self, "parameters", json_schema(self._params))

    @classmethod
    def from_function(cls, fn: Callable[..., object], *, name: str | None = None, description: str | None = None,
                      timeout_s: float = 30.0, max_chars: int = 8000) -> Tool:
        """A tool from a typed function: its name, the first paragraph of its docstring as the description
        (unless given), its signature as the schema. Raises TypeError for a parameter JSON cannot describe."""
        if description is None:
            description = _first_paragraph(fn.__doc__ or "")
            if not description:
                raise ValueError(f"the tool {getattr(fn, '__name__', fn)!r} needs a description: give the "
                                 "function a docstring, or pass description=")
        return cls(name or getattr(fn, "__name__", ""), description, fn, timeout_s=timeout_s, max_chars=max_chars)

    def schema(self) -> dict:
        """This tool as one entry of OpenAI's `tools` list (what Qwen2.5's chat template takes, too)."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def call(self, arguments: dict | str | None = None) -> ToolResult:
        """Run the tool on `arguments` (a dict, or its JSON text). Never raises for what the tool or the
        arguments do: the result's text is the tool's output, or `error: ...` saying what went wrong."""
        start = time.monotonic()
        try:
            kwargs = bind(self._params, arguments)
        except ArgumentError as exc:
            return ToolResult(f"error: bad arguments for {self.name}: {exc}", False, time.monotonic() - start)
        box: dict[str, Any] = {}
        worker = threading.Thread(target=_run, args=(self.fn, kwargs, box), name=f"parsyn-tool-{self.name}",
                                  daemon=True)  # daemon: an abandoned one does not keep the process alive
        worker.start()
        worker.join(self.timeout_s)
        elapsed = time.monotonic() - start
        if worker.is_alive():
            return ToolResult(f"error: {self.name} did not finish within {self.timeout_s:g} s and was abandoned",
                              False, elapsed)
        text, truncated = _cut(box["text"], self.max_chars)
        return ToolResult(text, box["ok"], elapsed, truncated)


def tool(fn: Callable[..., object] | None = None, /, *, name: str | None = None, description: str | None = None,
         timeout_s: float = 30.0, max_chars: int = 8000):
    """Decorator: `@tool` or `@tool(timeout_s=5, ...)` turns a typed function into a `Tool` (see
    `Tool.from_function`); the plain function stays reachable as `.fn`."""
    def make(f: Callable[..., object]) -> Tool:
        return Tool.from_function(f, name=name, description=description, timeout_s=timeout_s, max_chars=max_chars)
    return make if fn is None else make(fn)


@dataclass(frozen=True)
class Toolbox:
    """Tools by name, as a value: `schemas()` for the chat template, `call(name, arguments)` for the loop."""

    tools: tuple[Tool, ...]

    def __post_init__(self):
        object.__setattr__(self, "tools", tuple(self.tools))
        for t in self.tools:
            if not isinstance(t, Tool):
                raise TypeError(f"Toolbox.tools must hold Tool values, got {type(t).__name__}")
        names = [t.name for t in self.tools]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"Toolbox.tools has two tools named {twice[0]!r}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tools)

    def __getitem__(self, name: str) -> Tool:
        for t in self.tools:
            if t.name == name:
                return t
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def schemas(self) -> list[dict]:
        """OpenAI's `tools=[{"type": "function", "function": {...}}, ...]`, in this box's order."""
        return [t.schema() for t in self.tools]

    def call(self, name: str, arguments: dict | str | None = None) -> ToolResult:
        """Call the tool `name`; an unknown name is a failed result listing the tools there are."""
        if name not in self:
            known = ", ".join(self.names) or "none"
            return ToolResult(f"error: there is no tool {name!r} (the tools are: {known})", False, 0.0)
        return self[name].call(arguments)

    def with_tools(self, *tools: Tool) -> Toolbox:
        """A new box with `tools` added (the names must stay unique); this one is unchanged."""
        return Toolbox((*self.tools, *tools))


def _run(fn: Callable[..., object], kwargs: dict, box: dict) -> None:
    """The worker thread: the tool's text, or its exception as an error line, into `box`."""
    try:
        result = fn(**kwargs)
        box["text"], box["ok"] = result if isinstance(result, str) else json.dumps(result, default=str), True
    except ToolError as exc:
        box["text"], box["ok"] = f"error: {exc}", False
    except BaseException as exc:  # SystemExit too: in a worker thread it would vanish silently
        box["text"], box["ok"] = f"error: {type(exc).__name__}: {exc}", False


def _cut(text: str, most: int) -> tuple[str, bool]:
    if len(text) <= most:
        return text, False
    return f"{text[:most]}\n[cut: {len(text) - most} of {len(text)} characters not shown]", True


def _first_paragraph(doc: str) -> str:
    paragraph = inspect.cleandoc(doc).split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines()).strip()
