"""Values are handed to OPA's engine exactly, or refused before evaluation."""

from __future__ import annotations

import pytest

from pdp.engine.inputs import engine_value
from pdp.errors import BadRequest


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5.0, 5),
        (-3.0, -3),
        (0.5, 0.5),
        (1.0000001, 1.0000001),
        (2**53 - 1, 2**53 - 1),
        ('a"b\n', 'a"b\n'),
        ("KB-1\x00../../etc/passwd", "KB-1\x00../../etc/passwd"),
        ("é１２３", "é１２３"),
        ([1.0, {"x": 2.0}], [1, {"x": 2}]),
        ({"x": [[[[]]]]}, {"x": [[[[]]]]}),
    ],
    ids=[
        "whole-double",
        "negative",
        "half",
        "seven-decimals",
        "max-exact-int",
        "string-untouched",
        "nul-kept",
        "non-ascii-kept",
        "nested",
        "ok-depth",
    ],
)
def test_exact_values_pass(value: object, expected: object) -> None:
    result = engine_value(value)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    "value",
    [
        2**53,
        2**53 + 1,
        float(2**53),
        -(2**63),
        float("nan"),
        float("inf"),
        "gpt\ud800",
        {"k\udfff": 1},
    ],
    ids=[
        "2^53",
        "2^53+1",
        "double-2^53",
        "int64-min",
        "nan",
        "inf",
        "lone-surrogate",
        "key-surrogate",
    ],
)
def test_inexact_values_refused(value: object) -> None:
    with pytest.raises(BadRequest):
        engine_value(value)


def test_depth_bounded() -> None:
    deep: object = "leaf"
    for _ in range(40):
        deep = [deep]
    with pytest.raises(BadRequest):
        engine_value(deep)
