"""pep/splice.py: a cap is written into the agent's bytes, never into a re-serialised body."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.api.mapping import CAP_GROWTH, MAX_TOKENS
from pep.splice import top_level_spans, write_fields


@pytest.mark.parametrize(
    ("raw", "values", "expected"),
    [
        (
            b' { "a" : 1e9 , "max_tokens":  100000 }',
            {"max_tokens": 2048},
            b' { "a" : 1e9 , "max_tokens":  2048 }',
        ),
        (b"{}", {"max_tokens": 5}, b'{"max_tokens":5}'),
        (b"{ }", {"max_tokens": 5}, b'{"max_tokens":5 }'),
        (
            b'{"x":[1,{"max_tokens":9}]}',
            {"max_tokens": 5},
            b'{"max_tokens":5,"x":[1,{"max_tokens":9}]}',
        ),
        (
            b'{"max_tokens":null,"max_completion_tokens":-0}',
            {"max_tokens": 7, "max_completion_tokens": 7},
            b'{"max_tokens":7,"max_completion_tokens":7}',
        ),
        (
            b'{"s":"caf\\u00e9 \xc3\xa9","max_tokens":9}',
            {"max_tokens": 1},
            b'{"s":"caf\\u00e9 \xc3\xa9","max_tokens":1}',
        ),
    ],
    ids=[
        "overwrite-keeps-spacing",
        "insert-empty",
        "insert-spaced",
        "nested-untouched",
        "null-and-minus-zero",
        "utf8-kept",
    ],
)
def test_write_fields(raw: bytes, values: dict[str, int], expected: bytes) -> None:
    assert write_fields(raw, values) == expected


@pytest.mark.parametrize("raw", [b"[]", b'{"a" 1}', b'{"a":1,}', b"{", b'"x"'])
def test_not_an_object_raises(raw: bytes) -> None:
    with pytest.raises(ValueError):
        top_level_spans(raw.decode())


def test_only_token_counts_are_spliced() -> None:
    with pytest.raises(ValueError):
        write_fields(b"{}", {"max_tokens": MAX_TOKENS + 1})


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = st.sampled_from(["max_tokens", "max_completion_tokens", "max_output_tokens"])


@settings(max_examples=100, deadline=None)
@given(
    document=st.dictionaries(st.text(max_size=6), _JSON, max_size=5),
    fields=st.lists(_FIELDS, min_size=1, max_size=3, unique=True),
    present=st.integers(0, 2**63),
    cap=st.integers(0, MAX_TOKENS),
    indent=st.sampled_from([None, 0, 2]),
    space=st.booleans(),
)
def test_a_splice_changes_only_the_fields_written(
    document: dict[str, object],
    fields: list[str],
    present: int,
    cap: int,
    indent: int | None,
    space: bool,
) -> None:
    """What the PEP does: overwrite the token fields a body has, or insert one if it has
    none. The result parses to the document with exactly those fields set, every other byte
    is the agent's, and it grows by at most CAP_GROWTH."""
    for name in fields:
        document.pop(name, None)
    if present % 2:
        document.update({name: present % (MAX_TOKENS + 1) for name in fields})
        values = dict.fromkeys(fields, cap)
    else:
        values = {fields[0]: cap}
    separators = (", ", ": ") if space else (",", ":")
    raw = json.dumps(document, indent=indent, separators=separators, ensure_ascii=False).encode()
    written = write_fields(raw, values)
    assert json.loads(written) == {**document, **values}
    assert len(written) <= len(raw) + CAP_GROWTH
