"""A small, safe arithmetic language for a grid's derived values (``model.et.memories: 4 * model.et.dim``).

An expression is parsed with :mod:`ast` and walked node by node; nothing is ever passed to ``eval``. Allowed:
numbers, dotted config keys (``model.et.dim``) whose values are numbers, ``+ - * / // % **``, unary ``+``/``-``,
parentheses and the functions ``min``, ``max``, ``round``, ``abs``, ``int``. Everything else (strings, attribute
access on anything but a key, comprehensions, lambdas, keyword arguments, …) is refused with the reason.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping

Number = int | float


class ExprError(ValueError):
    """An expression is malformed, names an unknown key or cannot be computed; the message says which part."""


_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
FUNCTIONS: dict[str, Callable[..., Number]] = {"min": min, "max": max, "round": round, "abs": abs, "int": int}
MAX_EXPONENT = 64  # keeps ``**`` from building astronomically large integers
MAX_LENGTH = 500


def names(text: str) -> list[str]:
    """The dotted keys an expression reads, in order of appearance (raises :class:`ExprError` if malformed)."""
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Name | ast.Attribute):
            key = _dotted(node)
            if key is not None:
                if key not in out:
                    out.append(key)
                return
        if isinstance(node, ast.Call) and _is_function(node.func):
            for a in node.args:
                visit(a)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(_parse(text).body)
    return out


def evaluate(text: str, values: Mapping[str, object]) -> Number:
    """The value of ``text`` with every dotted key looked up in ``values`` (flattened config keys)."""
    tree = _parse(text)
    result = _eval(tree.body, values)
    if isinstance(result, float) and not math.isfinite(result):
        raise ExprError(f"the result is {result}, not a finite number")
    return result


def _parse(text: str) -> ast.Expression:
    if not isinstance(text, str) or not text.strip():
        raise ExprError("an expression must be a non-empty string")
    if len(text) > MAX_LENGTH:
        raise ExprError(f"an expression may be at most {MAX_LENGTH} characters")
    try:
        return ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ExprError(f"not an arithmetic expression ({e.msg})") from None


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of attribute accesses ending in a plain name; None for anything else."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _is_function(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id in FUNCTIONS


def _eval(node: ast.expr, values: Mapping[str, object]) -> Number:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise ExprError(f"{node.value!r} is not a number (only numbers, config keys and + - * / // % ** are "
                            f"allowed)")
        return node.value
    if isinstance(node, ast.Name | ast.Attribute):
        return _lookup(node, values)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left, values), _eval(node.right, values)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ExprError(f"exponent {right} is larger than {MAX_EXPONENT}")
        try:
            return _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ExprError(f"division by zero in {ast.unparse(node)!r}") from None
        except OverflowError:
            raise ExprError(f"{ast.unparse(node)!r} overflows") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand, values))
    if isinstance(node, ast.Call) and _is_function(node.func) and not node.keywords:
        name = node.func.id  # type: ignore[attr-defined]
        args = [_eval(a, values) for a in node.args]
        try:
            return FUNCTIONS[name](*args)
        except (TypeError, ValueError) as e:
            raise ExprError(f"{name}(…): {e}") from None
    raise ExprError(f"{ast.unparse(node)!r} is not allowed (only numbers, config keys, + - * / // % **, "
                    f"parentheses and {', '.join(FUNCTIONS)})")


def _lookup(node: ast.Name | ast.Attribute, values: Mapping[str, object]) -> Number:
    key = _dotted(node)
    if key is None:
        raise ExprError(f"{ast.unparse(node)!r} is not allowed (only numbers, config keys, + - * / // % **, "
                        f"parentheses and {', '.join(FUNCTIONS)})")
    if key not in values:
        raise ExprError(f"unknown key {key!r} (a derived value reads full dotted config keys, e.g. model.et.dim)")
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ExprError(f"{key} is {value!r}, not a number")
    return value
