"""The pure rules of `abcctl suggest`: inference never wider than observed, budgets, paths."""

from __future__ import annotations

from datetime import UTC, datetime
from fractions import Fraction

import pytest

from pdp.learn.history import parse_since
from pdp.learn.infer import (
    ENUM_MAX,
    Unsure,
    common_directory,
    infer_args,
    nearest_rank_p95,
    round_up,
)
from pdp.manifest.model import ArgConstraint

NONE: frozenset[str] = frozenset()


def test_arguments_are_inferred_no_wider_than_observed() -> None:
    args, notes = infer_args(
        [
            ({"q": "refund", "k": 3, "exact": True, "tags": ["a"]}, NONE),
            ({"q": "invoice 42", "k": 10.0}, NONE),  # 10.0: a Struct's integer
            ({"q": "x", "k": 1, "exact": False}, NONE),
        ]
    )
    assert args == {
        "q": ArgConstraint(type="string", required=True, minLength=1, maxLength=10),
        "k": ArgConstraint(type="integer", required=True, minimum=1, maximum=10),
        "exact": ArgConstraint(type="boolean"),
        "tags": ArgConstraint(type="array"),
    }
    assert notes == [  # what each bound rests on
        "q: at most 10 characters (3 values seen, 3 distinct)",
        "k: 1..10 (3 values seen)",
        "exact: boolean, no bounds (2 values seen)",
        "tags: array, no bounds (1 value seen)",
    ]


def test_a_string_whose_values_recur_among_a_few_is_an_enum() -> None:
    args, notes = infer_args(
        [({"format": "csv"}, NONE), ({"format": "pdf"}, NONE), ({"format": "csv"}, NONE)]
    )
    assert args["format"] == ArgConstraint(type="string", required=True, enum=("csv", "pdf"))
    assert notes == ["format: one of 2 (3 values seen, 2 distinct)"]
    # Every value different (page ids): not "one of a few", only its length is bounded.
    args, _ = infer_args([({"page": p}, NONE) for p in ("p-1", "p-22", "p-333")])
    assert args["page"] == ArgConstraint(type="string", required=True, minLength=1, maxLength=5)
    # Recurring, but more distinct values than ENUM_MAX: lengths again.
    values = ["a", "bb", "c", "dd", "e", "a"]
    assert len(set(values)) > ENUM_MAX
    args, _ = infer_args([({"x": v}, NONE) for v in values])
    assert args["x"] == ArgConstraint(type="string", required=True, minLength=1, maxLength=2)


def test_an_empty_string_drops_min_length_and_fractions_make_a_number() -> None:
    args, _ = infer_args([({"q": "", "r": 0.5}, NONE), ({"q": "ab", "r": 2}, NONE)])
    assert args["q"] == ArgConstraint(type="string", required=True, maxLength=2)
    assert args["r"] == ArgConstraint(type="number", required=True, minimum=0, maximum=2)


def test_an_argument_sent_with_two_types_is_not_guessed() -> None:
    with pytest.raises(Unsure, match="argument q was sent as integer and string"):
        infer_args([({"q": "a"}, NONE), ({"q": 1}, NONE)])


def test_an_argument_name_a_manifest_cannot_hold_is_not_guessed() -> None:
    with pytest.raises(Unsure, match="cannot be declared"):
        infer_args([({"_private": 1}, NONE)])


def test_masked_arguments_are_strings_without_bounds_and_say_so() -> None:
    args, notes = infer_args(
        [({"password": "***", "user": "a"}, frozenset({"password"})), ({"user": "bb"}, NONE)]
    )
    assert args["password"] == ArgConstraint(type="string")
    assert args["user"] == ArgConstraint(type="string", required=True, minLength=1, maxLength=2)
    assert notes == [
        "password: masked in the log, type string assumed, no bounds",
        "user: at most 2 characters (2 values seen, 2 distinct)",
    ]


@pytest.mark.parametrize(
    ("paths", "prefix"),
    [
        (["/v2/customers/7", "/v2/customers/9"], "/v2/customers/"),
        (["/v2/customers/7", "/v2/orders/7?x=1"], "/v2/"),
        (["/v2/customers/71", "/v2/customers/72"], "/v2/customers/"),  # a directory, not "7"
        (["/v2/customers/7", "/v2/customers/7"], "/v2/customers/7"),  # only one path seen
        (["/a", "/b"], "/"),
    ],
)
def test_an_http_prefix_is_the_longest_common_directory(paths: list[str], prefix: str) -> None:
    assert common_directory(paths) == prefix


def test_budgets_round_up_to_two_significant_digits() -> None:
    assert [round_up(v) for v in (0, 7, 99, 100, 101, 5325, 200000)] == [
        0,
        7,
        99,
        100,
        110,
        5400,
        200000,
    ]
    assert round_up(Fraction(370) * Fraction(3, 2)) == 560
    assert round_up(Fraction(13, 2)) == 7  # a ceiling, exact in fractions


def test_p95_is_the_nearest_rank() -> None:
    assert nearest_rank_p95([]) == 0
    assert nearest_rank_p95([5]) == 5
    assert nearest_rank_p95([6, 3]) == 6
    assert nearest_rank_p95(range(1, 101)) == 95
    assert nearest_rank_p95([*[10] * 19, 1000]) == 10  # one outlier in 20 runs is left out


def test_since_needs_a_time_zone() -> None:
    assert parse_since("2026-11-22T10:00:00+01:00") == datetime(2026, 11, 22, 9, tzinfo=UTC)
    assert parse_since("2026-11-22T10:00:00.5Z").microsecond == 500000
    with pytest.raises(ValueError, match="no time zone"):
        parse_since("2026-11-22T10:00:00")
    with pytest.raises(ValueError, match="not an ISO 8601"):
        parse_since("yesterday")
