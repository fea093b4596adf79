"""Values are handed to rego-cpp exactly, or refused."""

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
        (2**53 - 1, 2**53 - 1),
        ('a"b\n', 'a"b\n'),
        ([1.0, {"x": 2.0}], [1, {"x": 2}]),
    ],
    ids=["whole-double", "negative", "half", "max-exact-int", "string-untouched", "nested"],
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
        1.0000001,
        float("nan"),
        float("inf"),
        {"x": [[[[]]]] * 1},
    ],
    ids=["2^53", "2^53+1", "double-2^53", "int64-min", "seven-decimals", "nan", "inf", "ok-depth"],
)
def test_inexact_values_refused(value: object) -> None:
    if value == {"x": [[[[]]]]}:
        assert engine_value(value) == value
        return
    with pytest.raises(BadRequest):
        engine_value(value)


def test_depth_bounded() -> None:
    deep: object = "leaf"
    for _ in range(40):
        deep = [deep]
    with pytest.raises(BadRequest):
        engine_value(deep)
