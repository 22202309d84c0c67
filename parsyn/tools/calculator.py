"""The `calculator` tool: arithmetic evaluated by walking Python's syntax tree, never by `eval`.

Numbers, `+ - * / // % **`, unary minus and plus, parentheses, the functions in `FUNCTIONS` and the constants
in `CONSTANTS`; anything else (names, attributes, strings, comprehensions, keyword arguments) is refused with
a message saying what. Integers stay exact but are bounded (`_MAX_BITS`), so `9**9**9` is refused at once
instead of computing for hours, and so is `round(x, n)` with a huge `n`; floats overflow into a refusal too.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Annotated, Callable

from .base import Tool, ToolError


def _round(number: int | float, ndigits: int | None = None) -> int | float:
    if ndigits is not None and abs(ndigits) > 400:  # round(10, -10**9) would compute 10**(10**9)
        raise ToolError(f"round() takes at most 400 digits, got {ndigits}")
    return round(number) if ndigits is None else round(number, ndigits)


FUNCTIONS: dict[str, Callable[..., float | int]] = {
    "abs": abs, "round": _round, "min": min, "max": max, "sqrt": math.sqrt, "exp": math.exp, "log": math.log,
    "log2": math.log2, "log10": math.log10, "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin,
    "acos": math.acos, "atan": math.atan, "atan2": math.atan2, "floor": math.floor, "ceil": math.ceil,
    "hypot": math.hypot, "degrees": math.degrees, "radians": math.radians,
}
CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_MAX_BITS = 14_000     # about 4,200 decimal digits: Python refuses to print longer integers (sys.int_info)
_MAX_LENGTH = 1000     # characters of an expression (and so the depth of its tree)


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic `expression`; raises ToolError saying what is refused or went wrong."""
    if len(expression) > _MAX_LENGTH:
        raise ToolError(f"the expression is {len(expression)} characters long; at most {_MAX_LENGTH} are taken")
    try:
        return _value(ast.parse(expression.strip(), mode="eval").body)
    except SyntaxError as exc:
        raise ToolError(f"not an arithmetic expression ({exc.msg})") from None
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("the result is too large") from None
    except (RecursionError, MemoryError):
        raise ToolError("the expression is nested too deeply") from None
    except (ValueError, TypeError) as exc:  # math domain errors, wrong argument counts
        raise ToolError(str(exc)) from None


def calculator_tool(*, name: str = "calculator", description: str | None = None) -> Tool:
    """A tool that evaluates one arithmetic expression (`expression`) exactly where it can (see `evaluate`)."""

    def calculator(expression: Annotated[str, "e.g. (3 + 4) * 2 ** 10 / sqrt(2)"]) -> str:
        value = evaluate(expression)
        return str(value) if isinstance(value, int) else repr(value)

    text = description or ("Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses, "
                           f"{', '.join(FUNCTIONS)}, and {', '.join(CONSTANTS)}.")
    return Tool.from_function(calculator, name=name, description=text, timeout_s=5.0, max_chars=2000)


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.Name) and node.id in CONSTANTS:
        return CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _bounded(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise ToolError(f"{node.func.id}() takes plain arguments only")
        return _bounded(FUNCTIONS[node.func.id](*(_value(a) for a in node.args)))
    raise ToolError(f"refused: {_describe(node)} is not arithmetic (allowed: numbers, + - * / // % **, "
                    f"parentheses, {', '.join(FUNCTIONS)}, {', '.join(CONSTANTS)})")


def _check_power(base: int | float, exponent: int | float) -> None:
    """Refuse an integer power whose result would pass `_MAX_BITS` before computing it."""
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 and exponent > 0:
        if exponent * (abs(base).bit_length() - 1) > _MAX_BITS:
            raise ToolError(f"the result of {base} ** {exponent} is too large (over {_MAX_BITS} bits)")


def _bounded(value: object) -> int | float:
    if isinstance(value, complex):
        raise ToolError("the result is a complex number")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ToolError(f"the result is not a number ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("the result is not a finite number (it overflowed)")
    if isinstance(value, int) and value.bit_length() > _MAX_BITS:
        raise ToolError(f"the result is too large (over {_MAX_BITS} bits)")
    return value


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"the name {node.id!r}"
    if isinstance(node, ast.Call):
        return f"a call of {ast.unparse(node.func)!r}"
    if isinstance(node, ast.Constant):
        return f"the constant {node.value!r}"
    return f"{type(node).__name__} ({ast.unparse(node)[:40]})"
