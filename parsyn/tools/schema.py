"""A typed Python signature as a tool's JSON schema, and a model's JSON arguments checked against it.

Supported parameter types: str, int, float, bool, `Literal[...]` (an enum), `list[T]` of those, `Optional[T]`
(or `T | None`), each optionally wrapped in `Annotated[T, "what the parameter means"]`. A parameter with a
default is not required. Anything else (no annotation, `*args`, other unions, classes) is a TypeError when the
tool is made, naming the parameter, so a tool can never be offered with a schema that does not match it.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}
_MISSING = inspect.Parameter.empty


class ArgumentError(ValueError):
    """Arguments a model sent that do not fit the tool's signature; the message says which and why."""


@dataclass(frozen=True)
class Param:
    """One parameter of a tool: its name, its type (annotations resolved, `Annotated` removed), its default
    (`inspect.Parameter.empty` when required) and the description `Annotated` gave it."""

    name: str
    kind: Any
    default: Any = _MISSING
    description: str = ""

    @property
    def required(self) -> bool:
        return self.default is _MISSING


def params(fn: Callable[..., object]) -> tuple[Param, ...]:
    """The parameters of `fn`, checked to be expressible in JSON schema; raises TypeError naming the first that
    is not."""
    where = getattr(fn, "__qualname__", repr(fn))
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except (NameError, TypeError) as exc:
        raise TypeError(f"cannot read the annotations of {where}: {exc}") from exc
    found = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise TypeError(f"{where}: parameter {p.name!r} is {p.kind.description}; a tool takes named arguments")
        if p.name not in hints:
            raise TypeError(f"{where}: parameter {p.name!r} has no type annotation")
        kind, description = _unwrap(hints[p.name])
        _schema(kind, f"{where}: parameter {p.name!r}")  # raises for what JSON schema cannot say
        found.append(Param(p.name, kind, p.default, description))
    return tuple(found)


def json_schema(parameters: tuple[Param, ...]) -> dict:
    """The OpenAI-style JSON schema (`{"type": "object", "properties": ..., "required": [...]}`) of a tool."""
    properties = {}
    for p in parameters:
        prop = _schema(p.kind, p.name)
        if p.description:
            prop["description"] = p.description
        if not p.required and _is_json(p.default):
            prop["default"] = json.loads(json.dumps(p.default))  # JSON's own value: a tuple default is an array
        properties[p.name] = prop
    return {"type": "object", "properties": properties, "required": [p.name for p in parameters if p.required],
            "additionalProperties": False}


def bind(parameters: tuple[Param, ...], arguments: object) -> dict[str, Any]:
    """Keyword arguments for the tool from `arguments` (a dict, or its JSON text; None or "" mean none); raises
    ArgumentError for invalid JSON, an unknown or missing argument, or a value of the wrong type."""
    if arguments is None or arguments == "":
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ArgumentError(f"the arguments are not valid JSON ({exc})") from None
    if not isinstance(arguments, dict):
        raise ArgumentError(f"the arguments must be a JSON object, got {type(arguments).__name__}")
    names = [p.name for p in parameters]
    unknown = [k for k in arguments if k not in names]
    if unknown:
        raise ArgumentError(f"unknown argument {unknown[0]!r} (the parameters are: {', '.join(names) or 'none'})")
    missing = [p.name for p in parameters if p.required and p.name not in arguments]
    if missing:
        raise ArgumentError(f"missing required argument {missing[0]!r}")
    return {p.name: _check(arguments[p.name], p.kind, p.name) for p in parameters if p.name in arguments}


def _unwrap(hint: Any) -> tuple[Any, str]:
    if typing.get_origin(hint) is typing.Annotated:
        base, *extras = typing.get_args(hint)
        return base, " ".join(e for e in extras if isinstance(e, str))
    return hint, ""


def _optional(kind: Any) -> Any | None:
    """T for `Optional[T]` / `T | None`, else None."""
    if typing.get_origin(kind) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(rest) == 1 and len(typing.get_args(kind)) == 2:
            return rest[0]
    return None


def _schema(kind: Any, where: str) -> dict:
    if kind in _SCALARS:
        return {"type": _SCALARS[kind]}
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal and all(type(a) in _SCALARS for a in args):
        types_ = {_SCALARS[type(a)] for a in args}
        return {"type": types_.pop(), "enum": list(args)} if len(types_) == 1 else {"enum": list(args)}
    if origin is list and len(args) == 1:
        return {"type": "array", "items": _schema(args[0], where)}
    inner = _optional(kind)
    if inner is not None:
        schema = _schema(inner, where)
        if "enum" in schema:
            schema["enum"] = [*schema["enum"], None]
        if isinstance(schema.get("type"), str):
            return {**schema, "type": [schema["type"], "null"]}
        return {"anyOf": [schema, {"type": "null"}]}
    raise TypeError(f"{where}: type {kind!r} is not supported (str, int, float, bool, Literal[...], list[T], "
                    "Optional[T])")


def _check(value: Any, kind: Any, where: str) -> Any:
    """`value` as `kind` wants it (an integral float becomes an int, an int a float), or ArgumentError."""
    inner = _optional(kind)
    if inner is not None:
        return None if value is None else _check(value, inner, where)
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        if not any(value == c and type(value) is type(c) for c in choices):
            raise ArgumentError(f"argument {where!r} must be one of {', '.join(map(repr, choices))}, "
                                f"got {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ArgumentError(f"argument {where!r} must be an array, got {_show(value)}")
        (item,) = typing.get_args(kind)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if type(value) is not kind:  # exact: bool is an int subclass, and true is no number in JSON
        raise ArgumentError(f"argument {where!r} must be {_ARTICLE[kind]}, got {_show(value)}")
    return value


_ARTICLE = {str: "a string", int: "an integer", float: "a number", bool: "a boolean (true or false)"}


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}… ({type(value).__name__})" if len(text) > 60 else f"{text} ({type(value).__name__})"


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True
