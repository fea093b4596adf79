"""What ``abcctl suggest`` infers from observed values: pure rules, never wider than observed.

A new tool's arguments come from every observed call of it: one JSON type per argument,
``required`` when every call sent it; a string argument whose values recur (some value
seen twice) among at most ``ENUM_MAX`` distinct values is an ``enum`` of them, any other
string is at most as long as the longest seen (and non-empty when none was empty);
numbers stay within the observed minimum and maximum. Each argument's evidence says how
many values its bounds rest on. A new host's path prefix is the longest common directory
of the paths seen; budgets use the nearest-rank p95, rounded up to two significant digits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

from pdp.manifest.model import ArgConstraint

__all__ = [
    "ENUM_MAX",
    "Unsure",
    "clean_path",
    "common_directory",
    "infer_args",
    "nearest_rank_p95",
    "plural",
    "round_up",
    "split_target",
]

ENUM_MAX = 4  # more distinct values than this are not "one of a few"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Unsure(ValueError):
    """Observations that no capability could describe without guessing."""


def nearest_rank_p95(values: Iterable[int]) -> int:
    ordered = sorted(values)
    if not ordered:
        return 0
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


def round_up(value: Fraction | int) -> int:
    """Up to an integer with at most two significant digits: 5325 -> 5400, 7 -> 7."""
    exact = Fraction(value)
    whole = -(-exact.numerator // exact.denominator)  # the ceiling, in integers
    if whole < 100:
        return whole
    step: int = 10 ** (len(str(whole)) - 2)
    return -(-whole // step) * step


def common_directory(paths: Iterable[str]) -> str:
    """The path prefix for observed paths: the path itself if only one was seen,
    else their longest common prefix cut back to a directory (ending in ``/``)."""
    distinct = sorted({path.split("?", 1)[0].split("#", 1)[0] for path in paths})
    if not distinct:
        raise Unsure("no path observed")
    if len(distinct) == 1:
        return distinct[0]
    prefix = distinct[0]
    for path in distinct[1:]:
        while not path.startswith(prefix):
            prefix = prefix[:-1]
    return prefix[: prefix.rfind("/") + 1]


def split_target(target: str) -> tuple[str, str, str]:
    """``tool:kb/search`` -> ("tool", "kb", "search"); the first "/" splits owner and name."""
    kind, _, rest = target.partition(":")
    owner, _, name = rest.partition("/")
    return kind, owner, name


def clean_path(path: str) -> bool:
    """The policy refuses unclean paths whatever the manifest says; never learn them."""
    segments = path.split("?", 1)[0].split("/")
    return (
        path.startswith("/")
        and "%" not in path
        and "\\" not in path
        and not any(re.fullmatch(r"\.\.?(;.*)?", segment, re.DOTALL) for segment in segments)
    )


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    if value is None:
        return "null"
    raise Unsure(f"unsupported value type {type(value).__name__}")


def plural(count: int, word: str) -> str:
    """``1 value``, ``3 values``."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def _string_bounds(name: str, values: list[str]) -> tuple[dict[str, Any], str]:
    distinct = sorted(set(values))
    seen = f"{plural(len(values), 'value')} seen, {len(distinct)} distinct"
    if len(distinct) <= ENUM_MAX and len(values) > len(distinct):
        return {"enum": tuple(distinct)}, f"{name}: one of {len(distinct)} ({seen})"
    lengths = [len(value) for value in values]
    bounds: dict[str, Any] = {"minLength": 1} if min(lengths) > 0 else {}
    bounds["maxLength"] = max(lengths)
    return bounds, f"{name}: at most {max(lengths)} characters ({seen})"


def infer_args(
    calls: list[tuple[dict[str, Any], frozenset[str]]],
) -> tuple[dict[str, ArgConstraint], list[str]]:
    """Constraints for a new tool from its observed calls ``(args, masked names)``, and one
    line of evidence per argument (how many values its bounds rest on, or why it has none).

    Never wider than observed (see the module's docstring); raises ``Unsure`` when one
    argument was sent with several JSON types.
    """
    names: list[str] = []
    for args, _ in calls:
        names.extend(name for name in args if name not in names)
    constraints: dict[str, ArgConstraint] = {}
    evidence: list[str] = []
    for name in names:
        if not _NAME.fullmatch(name):
            raise Unsure(f"argument name {name!r} cannot be declared in a manifest")
        seen = [(args[name], name in masked) for args, masked in calls if name in args]
        values = [value for value, hidden in seen if not hidden]
        required = len(seen) == len(calls)
        kinds = {_json_type(value) for value in values}
        if kinds == {"integer", "number"}:
            kinds = {"number"}
        if len(kinds) > 1:
            raise Unsure(f"argument {name} was sent as {' and '.join(sorted(kinds))}")
        if not kinds:  # only ever masked: the log never saw a value
            evidence.append(f"{name}: masked in the log, type string assumed, no bounds")
            constraints[name] = ArgConstraint(type="string", required=required)
            continue
        (kind,) = kinds
        bounds: dict[str, Any] = {}
        if kind == "string" and len(values) < len(seen):
            line = f"{name}: sometimes masked in the log, no bounds"
        elif kind == "string":
            bounds, line = _string_bounds(name, values)
        elif kind in ("integer", "number"):
            low, high = math.floor(min(values)), math.ceil(max(values))
            bounds = {"minimum": low, "maximum": high}
            line = f"{name}: {low}..{high} ({plural(len(values), 'value')} seen)"
        else:
            line = f"{name}: {kind}, no bounds ({plural(len(values), 'value')} seen)"
        evidence.append(line)
        constraints[name] = ArgConstraint(type=kind, required=required, **bounds)  # type: ignore[arg-type]
    return constraints, evidence
