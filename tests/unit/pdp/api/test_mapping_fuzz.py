"""Fuzz the shared request → action mapping: it never raises anything but ``MappingError``,
and what it maps is exact (a well-formed target, token counts in range, the path as sent)."""

from __future__ import annotations

import json
import unicodedata
from typing import Any
from urllib.parse import unquote_to_bytes

from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.api.mapping import MAX_TOKENS, TARGETS, mcp_tool_action, model_request
from pdp.api.reasons import MappingError
from pdp.api.requests import check_http_path, unsafe_request

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(["gpt-4o-mini", "gpt-4o-mini\n", "x\ud800", "", "a/b"])
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_KEYS = st.sampled_from(
    [
        "model",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "n",
        "best_of",
        "tools",
        "web_search_options",
        "mcp_servers",
        "container",
        "prompt",
        "stream",
        "x",
    ]
)
_BODIES = st.dictionaries(_KEYS, _JSON, max_size=6)
_ENDPOINTS = st.sampled_from(
    [
        ("openai", "chat/completions"),
        ("openai", "responses"),
        ("openai", "completions"),
        ("openai", "embeddings"),
        ("anthropic", "messages"),
        ("openai", "files"),
    ]
)


def _encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()  # ASCII escapes: lone surrogates reach the parser


@settings(max_examples=150, deadline=None)
@given(document=_BODIES, endpoint=_ENDPOINTS)
def test_model_requests_map_exactly_or_raise_mapping_error(
    document: dict[str, Any], endpoint: tuple[str, str]
) -> None:
    body = _encode(document)
    try:
        action, parsed = model_request(*endpoint, body)
    except MappingError:
        return
    assert TARGETS["model"].fullmatch(action.target)
    assert action.target == f"model:{endpoint[0]}/{parsed['model']}"
    assert 0 <= action.max_tokens <= MAX_TOKENS
    action.SerializeToString()  # every field fits its wire type


@settings(max_examples=150, deadline=None)
@given(name=st.text(max_size=10) | st.sampled_from(["search", "search\n"]), arguments=_JSON)
def test_tool_calls_map_exactly_or_raise_mapping_error(name: str, arguments: Any) -> None:
    try:
        action = mcp_tool_action("kb", {"name": name, "arguments": arguments})
    except MappingError:
        return
    assert TARGETS["tool"].fullmatch(action.target) and action.target == f"tool:kb/{name}"
    assert json.loads(action.args_json) == (arguments or {})
    action.SerializeToString()


_PATH_PIECES = st.sampled_from(
    [
        "/",
        "a",
        ".",
        "..",
        ";",
        "%",
        "%2e",
        "%2E",
        "%3b",
        "%3B",
        "%2f",
        "%5c",
        "%25",
        "%c0%ae",
        "%e0%80%ae",
        "%f0%80%80%ae",
        "%ef%bc%8e",
        "%c3%a9",
        "%20",
        "%00",
        "%e2%80%a5",
        "%ff",
        "~",
    ]
)


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(_PATH_PIECES, max_size=10))
def test_an_accepted_path_reads_the_same_to_every_decoder(pieces: list[str]) -> None:
    path = "/" + "".join(pieces)
    try:
        assert check_http_path(path) == path  # forwarded as sent
    except MappingError:
        return
    for segment in path.split("/"):
        if "%" not in segment:
            continue
        decoded = unquote_to_bytes(segment).decode("utf-8")
        for form in (decoded, unicodedata.normalize("NFKC", decoded)):
            assert form.split(";")[0] not in (".", "..")
            assert not set(form) & set("/\\%")


@settings(max_examples=150, deadline=None)
@given(
    headers=st.lists(st.tuples(st.text(max_size=24), st.text(max_size=8)), max_size=4),
    query=st.text(max_size=20),
)
def test_unsafe_request_answers_without_raising(headers: list[tuple[str, str]], query: str) -> None:
    problem = unsafe_request("GET", "/x", headers, model_route=False, raw_query=query)
    assert problem is None or isinstance(problem, str)
