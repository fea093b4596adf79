"""Make an action's values safe to hand to the engine exactly, or refuse them.

OPA reads its input as JSON text and keeps every string and number as sent (NUL
characters, non-ASCII, fractions). What cannot cross into it unchanged is refused
before evaluation with a reason, never truncated or rounded (``BadRequest``):

- a lone surrogate (not Unicode: Go would read it as U+FFFD, another string);
- NaN and infinities (not JSON);
- an integer at or beyond 2^53: gRPC's Struct carries numbers as doubles, so such a
  value may already be a rounded neighbour of what the agent sent;
- values nested deeper than ``MAX_DEPTH``.

A double that holds an integer exactly becomes that integer (Struct sends 5 as 5.0), so
``type: integer`` and the canonical log see what the agent wrote. Argument names must be
plain identifiers (they appear in reason messages).
"""

from __future__ import annotations

import re
from typing import Any

from pdp.errors import BadRequest

__all__ = ["MAX_DEPTH", "check_arg_names", "engine_text", "engine_value"]

MAX_DEPTH = 32
EXACT = 2**53
_ARG_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def engine_text(value: str) -> str:
    """``value`` if it is Unicode text the engine reads unchanged; else ``BadRequest``."""
    if _SURROGATE.search(value):
        raise BadRequest("a string holding a lone surrogate is not Unicode text")
    return value


def _number(value: float | int) -> int | float:
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise BadRequest("NaN and infinities are not JSON numbers")
        if value.is_integer():
            # 2^53 itself is refused too: a double of 2^53 may be a rounded 2^53 + 1.
            if abs(value) >= EXACT:
                raise BadRequest("an integer beyond 2^53 is refused, never rounded")
            return int(value)
        return value
    if abs(value) >= EXACT:
        raise BadRequest("an integer beyond 2^53 is refused, never rounded")
    return value


def engine_value(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` the engine reads exactly; ``BadRequest`` if impossible."""
    if depth > MAX_DEPTH:
        raise BadRequest(f"arguments nested deeper than {MAX_DEPTH}")
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return engine_text(value)
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, list):
        return [engine_value(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {engine_text(str(k)): engine_value(v, depth + 1) for k, v in value.items()}
    raise BadRequest(f"unsupported value type {type(value).__name__}")


def check_arg_names(args: dict[str, Any]) -> None:
    for name in args:
        if not _ARG_NAME.fullmatch(name):
            raise BadRequest("argument names must be identifiers")
