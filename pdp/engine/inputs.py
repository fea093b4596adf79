"""Make an action's values safe to hand to rego-cpp, or refuse them.

rego-cpp's dict input (``set_input``) keeps strings exact (lengths and regexes see the
real characters; the JSON-term path does not: it sees escapes), but it rounds floats
to 6 decimals and wraps integers outside int64. So before evaluation:

- a double that holds an integer exactly becomes that integer (gRPC's Struct sends
  5 as 5.0);
- an integer beyond 2^53, or a float the engine would round, is refused: an argument
  is judged exactly as sent, never rounded (``BadRequest``);
- argument names must be plain identifiers (they appear in reason messages).
"""

from __future__ import annotations

import re
from typing import Any

from pdp.errors import BadRequest

__all__ = ["MAX_DEPTH", "check_arg_names", "engine_value"]

MAX_DEPTH = 32
EXACT = 2**53
_ARG_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def _number(value: float | int) -> int | float:
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise BadRequest("NaN and infinities are not JSON numbers")
        if value.is_integer():
            # 2^53 itself is refused too: a double of 2^53 may be a rounded 2^53 + 1.
            if abs(value) >= EXACT:
                raise BadRequest("an integer beyond 2^53 is refused, never rounded")
            return int(value)
        if float(f"{value:.6f}") != value:
            raise BadRequest("a number the policy engine cannot hold exactly is refused")
        return value
    if abs(value) >= EXACT:
        raise BadRequest("an integer beyond 2^53 is refused, never rounded")
    return value


def engine_value(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` the engine reads exactly; ``BadRequest`` if impossible."""
    if depth > MAX_DEPTH:
        raise BadRequest(f"arguments nested deeper than {MAX_DEPTH}")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, list):
        return [engine_value(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {str(k): engine_value(v, depth + 1) for k, v in value.items()}
    raise BadRequest(f"unsupported value type {type(value).__name__}")


def check_arg_names(args: dict[str, Any]) -> None:
    for name in args:
        if not _ARG_NAME.match(name):
            raise BadRequest("argument names must be identifiers")
