"""Canonical JSON: strict parsing and the already-canonical check."""

from __future__ import annotations

import pytest

from pdp.errors import BadRequest
from pdp.manifest.canonical import (
    canonical_bytes,
    canonical_record_bytes,
    digest,
    parse_canonical,
    parse_record,
    parse_strict_json,
)


def test_canonical_sorts_keys_and_drops_whitespace() -> None:
    assert canonical_bytes({"b": 1, "a": [True, None, "x"]}) == b'{"a":[true,null,"x"],"b":1}'


def test_digest_format() -> None:
    assert digest(b"") == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize(
    "document",
    [{"x": 1.5}, {"x": [0.0]}, {"x": 2**53 + 1}],
    ids=["float", "nested-float", "big-int"],
)
def test_floats_and_unsafe_integers_cannot_be_canonicalized(document: object) -> None:
    with pytest.raises(BadRequest):
        canonical_bytes(document)


@pytest.mark.parametrize(
    "data",
    [b'{"a":1,"a":2}', b'{"a":NaN}', b'{"a":Infinity}', b'{"a":1.0}', b"\xff", b'{"a":1} x'],
    ids=["duplicate", "nan", "infinity", "float", "not-utf8", "trailing"],
)
def test_strict_parse_refuses(data: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_strict_json(data)


def test_parse_canonical_accepts_only_the_canonical_spelling() -> None:
    assert parse_canonical(b'{"a":1,"b":"\\u0001"}') == {"a": 1, "b": "\x01"}
    for spelling in [b'{"b":1,"a":1}', b'{"a": 1}', b'{"a":"\\u0061"}', b'{"a":1e0}']:
        with pytest.raises(BadRequest):
            parse_canonical(spelling)


@pytest.mark.parametrize(
    ("number", "spelling"),
    [(0.5, b"0.5"), (-2.25, b"-2.25"), (1e-7, b"1e-7"), (1e21, b"1e+21"), (5e-324, b"5e-324")],
    ids=["half", "negative", "tiny", "huge", "subnormal"],
)
def test_a_log_record_holds_any_finite_number_as_rfc_8785_spells_it(
    number: float, spelling: bytes
) -> None:
    encoded = canonical_record_bytes({"x": number})
    assert encoded == b'{"x":' + spelling + b"}"
    assert parse_canonical(encoded, allow_floats=True) == {"x": number}
    with pytest.raises(BadRequest):  # a signed document still refuses it
        canonical_bytes({"x": number})


@pytest.mark.parametrize(
    "document",
    [
        {"x": float("nan")},
        {"x": float("inf")},
        {"x": 2**53},
        {"x": "\ud800"},
        {"\udfff": 1},
        {"x": b"bytes"},
    ],
    ids=["nan", "infinity", "big-int", "lone-surrogate", "lone-surrogate-key", "not-json"],
)
def test_a_log_record_refuses_what_no_reader_would_read_back(document: object) -> None:
    with pytest.raises(BadRequest):
        canonical_record_bytes(document)
    with pytest.raises(BadRequest):
        canonical_bytes(document)


def test_a_record_float_must_be_spelled_canonically() -> None:
    for spelling in [b'{"x":0.50}', b'{"x":1e21}', b'{"x":1E-7}', b'{"x":-0.0}']:
        with pytest.raises(BadRequest):
            parse_canonical(spelling, allow_floats=True)


def test_an_integer_past_pythons_digit_limit_is_a_bad_request_not_a_crash() -> None:
    with pytest.raises(BadRequest):
        parse_strict_json(b'{"x":' + b"1" * 5000 + b"}", allow_floats=True)


def test_a_record_reads_back_a_float_spelled_as_digits_past_2_53() -> None:
    encoded = canonical_record_bytes({"x": 1e16})
    assert encoded == b'{"x":10000000000000000}'
    assert parse_record(encoded) == {"x": 1e16}
    with pytest.raises(BadRequest):  # digits no float spells are not canonical
        parse_record(b'{"x":9007199254740993}')
