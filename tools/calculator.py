"""Arithmetic the model asks for, evaluated by walking the `ast` — never `eval`.

Only number literals, + - * / // % **, unary signs, parentheses, the constants pi/e/tau and a
whitelist of math functions are allowed; any name, attribute, subscript or other call is
rejected. Sizes are bounded before computing, so `9**9**9` or `factorial(10**6)` is refused
instead of hanging the process.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from tools.registry import ToolError

MAX_EXPRESSION_CHARS = 500
MAX_INT_BITS = 4096  # about 1233 decimal digits
MAX_FACTORIAL = 1000

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _factorial(n: Any) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_FACTORIAL:
        raise ToolError(f"factorial needs a whole number between 0 and {MAX_FACTORIAL}")
    return math.factorial(n)


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log10": math.log10, "log2": math.log2,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos,
    "atan": math.atan, "atan2": math.atan2, "degrees": math.degrees, "radians": math.radians,
    "hypot": math.hypot, "floor": math.floor, "ceil": math.ceil, "abs": abs, "round": round,
    "min": min, "max": max, "factorial": _factorial,
}


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; raises ToolError saying what is not allowed."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ToolError(f"not a valid expression ({e.msg}); write e.g. 2 * (3 + 4) ** 2") from None
    except (ValueError, RecursionError, MemoryError):  # a lone surrogate, a null byte, deep nesting
        raise ToolError("not a valid expression (it has characters or nesting Python can't parse); "
                        "write e.g. 2 * (3 + 4) ** 2") from None
    try:
        value = _eval(tree.body)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("the result is too large for a floating-point number") from None
    except (ValueError, TypeError) as e:  # math domain errors, wrong argument counts
        raise ToolError(f"cannot compute: {e}") from None
    if isinstance(value, complex):  # (-8) ** 0.5
        raise ToolError("the result is not a real number")
    return value


def _eval(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        _check_size(node.op, left, right)
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise ToolError("'^' is not a power here; write 2 ** 10")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        if node.keywords:
            raise ToolError(f"{node.func.id}() takes positional arguments only")
        return _FUNCTIONS[node.func.id](*[_eval(a) for a in node.args])
    allowed = ", ".join(sorted(_FUNCTIONS))
    raise ToolError(f"{ast.unparse(node)!r} is not allowed: use numbers, + - * / // % **, "
                    f"parentheses, pi, e, tau and the functions {allowed}")


def _check_size(op: ast.operator, left: Any, right: Any) -> None:
    """Refuse integer results too big to compute quickly (floats overflow on their own)."""
    if isinstance(left, int) and isinstance(right, int):
        if isinstance(op, ast.Pow) and right > 0 and abs(left) > 1:
            if right > MAX_INT_BITS or abs(left).bit_length() * right > MAX_INT_BITS:
                raise ToolError(f"the result would have more than {MAX_INT_BITS} bits")
        elif isinstance(op, ast.Mult) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise ToolError(f"the result would have more than {MAX_INT_BITS} bits")
    elif isinstance(op, ast.Pow) and isinstance(right, (int, float)) and abs(right) > 10_000:
        raise ToolError("exponents are limited to ±10000")
