"""The one request → action mapping that the PEP's adapters and the ext_authz door share."""

from __future__ import annotations

import pytest

from pdp.action import validate_action
from pdp.api import ReasonCode
from pdp.api.mapping import (
    CAP_GROWTH,
    STEP_HEADER,
    cap_to_write,
    model_request,
    step_action,
    step_request_id,
)
from pdp.api.reasons import MappingError, refusal_status
from pdp.api.requests import check_http_path, parse_json_object, unsafe_request
from pdp.errors import AbcError


def test_model_request_reserves_the_body_size_with_the_cap() -> None:
    body = b'{"model": "gpt-4o-mini", "max_tokens": 100, "messages": []}'
    action, document = model_request("openai", "chat/completions", body)
    assert (action.kind, action.target, action.max_tokens) == (
        "model",
        "model:openai/gpt-4o-mini",
        100,
    )
    assert action.input_bytes == len(body) + CAP_GROWTH and document["max_tokens"] == 100
    claude, _ = model_request("anthropic", "messages", b'{"model": "c", "max_tokens": 9}')
    assert claude.target == "model:anthropic/c" and claude.max_tokens == 9


@pytest.mark.parametrize(
    ("provider", "endpoint", "body"),
    [
        ("openai", "chat/completions", b'{"model": "a", "model": "b"}'),
        ("openai", "chat/completions", b"[1]"),
        ("openai", "chat/completions", b'{"model": "a", "max_tokens": NaN}'),
        # Case-folding parsers (Go's) read these as "model" and "max_tokens".
        ("openai", "chat/completions", b'{"model": "a", "Model": "b"}'),
        ("openai", "chat/completions", b'{"model": "a", "max_to\\u212aens": 9, "max_tokens": 1}'),
        # Alone, too: a Go upstream reads it as the field judged absent.
        ("openai", "chat/completions", b'{"model": "a", "max_tokens": 9, "MAX_TOKENS": 99}'),
        ("openai", "chat/completions", b'{"model": "a", "max_completion_to\\u212aens": 99}'),
        ("openai", "chat/completions", b'{"model": "a", "N": 8}'),
        ("anthropic", "messages", b'{"model": "c", "tools": [{"Type": "web_search_20250305"}]}'),
        # One completion per prompt, each up to the cap.
        ("openai", "completions", b'{"model": "a", "max_tokens": 9, "prompt": ["x", "y"]}'),
        ("openai", "completions", b'{"model": "a", "max_tokens": 9, "prompt": [[1], [2]]}'),
        ("openai", "files", b'{"model": "a"}'),
        ("anthropic", "complete", b'{"model": "a"}'),
        ("gemini", "generate", b'{"model": "a"}'),
    ],
)
def test_unmappable_model_requests_raise(provider: str, endpoint: str, body: bytes) -> None:
    with pytest.raises(MappingError):
        model_request(provider, endpoint, body)


def test_a_legacy_completion_takes_one_prompt_in_any_of_its_spellings() -> None:
    for prompt in ('"x"', '["x"]', "[1, 2, 3]", "[[1, 2, 3]]"):
        body = f'{{"model": "a", "max_tokens": 9, "prompt": {prompt}}}'.encode()
        assert model_request("openai", "completions", body)[0].max_tokens == 9


def test_parse_json_object_refuses_duplicates() -> None:
    with pytest.raises(MappingError, match="duplicate"):
        parse_json_object(b'{"a": 1, "a": 2}')


def test_cap_to_write() -> None:
    assert cap_to_write(100, {"max_tokens": 2048}) is None  # already below the cap
    assert cap_to_write(2048, {"max_tokens": 2048}) is None
    assert cap_to_write(5000, {"max_tokens": 2048}) == 2048
    assert cap_to_write(0, {"max_tokens": 2048}) == 2048  # no cap asked: the manifest's
    assert cap_to_write(5000, {}) is None
    assert cap_to_write(5000, {"max_tokens": True}) is None


def test_unsafe_requests() -> None:
    json_body = [("Content-Type", "application/json")]

    def unsafe(
        headers: list[tuple[str, str]], method: str = "POST", path: str = "/v1/x", query: str = ""
    ) -> bool:
        found = unsafe_request(method, path, json_body + headers, model_route=True, raw_query=query)
        return found is not None

    assert not unsafe([])
    assert not unsafe([("Content-Encoding", "identity")])
    assert unsafe([("Content-Encoding", "gzip")])
    # A second Content-Encoding must not hide behind an innocent first one.
    assert unsafe([("Content-Encoding", "identity"), ("content-encoding", "gzip")])
    assert unsafe([("X-HTTP-Method-Override", "DELETE")])
    assert unsafe([], method="GET")
    assert unsafe([], path="/v1/chat%2Fcompletions")
    assert unsafe_request("GET", "/a%2e", [], model_route=False) is None  # the policy judges


def test_a_model_request_is_one_json_body_without_a_query() -> None:
    def unsafe(headers: list[tuple[str, str]], query: str = "") -> bool:
        found = unsafe_request("POST", "/v1/x", headers, model_route=True, raw_query=query)
        return found is not None

    json_body = [("Content-Type", "application/json; charset=utf-8")]
    assert not unsafe(json_body)
    assert not unsafe(json_body, "beta=true")  # Anthropic's SDK, for its beta endpoints
    assert not unsafe(json_body, "api-version=2024-10-21")
    # A form-parsing upstream reads model=o1-pro out of a JSON string's text.
    assert unsafe([("Content-Type", "application/x-www-form-urlencoded")])
    assert unsafe([])
    assert unsafe([*json_body, ("content-type", "application/json")])
    assert unsafe(json_body, "model=o1-pro")
    assert unsafe(json_body, "beta=true&model=o1-pro")


def test_a_charset_counts_only_where_the_body_is_judged() -> None:
    utf7 = [("Content-Type", "text/plain; charset=utf-7")]
    assert unsafe_request("POST", "/x", utf7, model_route=False, body_judged=False) is None
    ascii_json = [("Content-Type", "application/json; charset=US-ASCII")]
    assert unsafe_request("POST", "/v1/x", ascii_json, model_route=True) is None


@pytest.mark.parametrize(
    ("uri", "granted_under_its_prefix"),
    [
        ("file:///docs/guide.md", True),
        ("file:///docs/a%20b.md", True),
        ("kb://articles", True),
        ("https://api.example.com/items?next=%2Fpage%2F..%2F2", True),  # a query: not a path
        ("gitlab://projects/group%2Fsub/README.md", True),
        ("file:///docs/100%25.md", True),
        ("file:///docs/%7Euser", True),
        ("file:///docs/..%2Fetc", False),
        ("file:///docs/%252e%252e/etc", False),
        ("file:///docs/%ef%bc%8e%ef%bc%8e/etc", False),
        ("file:///docs/../../etc/passwd", False),
        ("file:///docs/./x", False),
        ("file:///docs/..;/etc", False),
        ("file:///docs/%2e%2e/%2e%2e/etc/passwd", False),
        ("file:///docs/%2E%2E%2Fetc", False),
        ("file:///docs/%c0%ae%c0%ae/etc", False),
        ("file:///docs\\..\\etc", False),
        ("urn:kb:%2e%2e", True),  # opaque: no path to resolve
    ],
    ids=lambda value: str(value),
)
def test_a_resource_uri_cannot_leave_the_prefix_it_starts_with(
    uri: str, granted_under_its_prefix: bool
) -> None:
    target = f"resource:kb/{uri}"
    if granted_under_its_prefix:
        assert validate_action("resource", target).target == target
    else:
        with pytest.raises(AbcError, match="resource URI"):
            validate_action("resource", target)


def test_refusal_status() -> None:
    assert refusal_status(ReasonCode.TOOL_NOT_ALLOWED) == 403
    assert refusal_status(ReasonCode.MANIFEST_UNKNOWN) == 400
    assert refusal_status(ReasonCode.BAD_REQUEST) == 400
    assert refusal_status(ReasonCode.PDP_UNAVAILABLE) == 503


@pytest.mark.parametrize(
    ("path", "forwarded"),
    [
        ("/v1/invoices/caf%C3%A9", True),
        ("/v1/invoices/a%3Bb;v=1", True),
        ("/v1/invoices/a%20b", True),
        ("/v1/invoices/../admin", True),  # written out: the policy sees it and refuses it
        ("/v1/invoices/..%3b/admin", False),
        ("/v1/invoices/%e0%80%ae", False),
        ("/v1/invoices/%f0%80%80%ae", False),
        ("/v1/invoices/%c0%ae", False),
        ("/v1/invoices/%ed%a0%80", False),
        ("/v1/invoices/%2e", False),
        ("/v1/invoices/%41", False),
        ("/v1/invoices/%25", False),
        ("/v1/invoices/%g0", False),
        ("/v1/invoices/%0a", False),
        ("/v1/invoices/%ef%bc%8e%ef%bc%8e", False),
        ("/v1/invoices/%ef%bc%8f", False),
        ("/v1/invoices/é", False),
        ("v1/invoices", False),
    ],
    ids=lambda value: str(value),
)
def test_check_http_path(path: str, forwarded: bool) -> None:
    if forwarded:
        assert check_http_path(path) == path
    else:
        with pytest.raises(MappingError):
            check_http_path(path)


@pytest.mark.parametrize(
    ("headers", "query", "refused"),
    [
        ([("X_HTTP_Method_Override", "DELETE")], "", True),
        ([("x_original_url", "/admin")], "", True),
        ([("X-Forwarded-Prefix", "/admin")], "", True),
        ([("Transfer_Encoding", "chunked")], "", True),
        ([("x_abc_step", "answer")], "", True),
        ([("X-Api-Key", "a"), ("X_Api_Key", "b")], "", True),
        ([("X_Custom", "1")], "", False),
        ([("X-Api-Key", "a"), ("x-api-key", "b")], "", False),
        ([], "_method=PUT", True),
        ([], "a=1;%5Fmethod=PUT", True),
        ([], "x-http-method-override=PUT", True),
        ([], "method=PUT&a=%2F", False),
        # MCP's routing headers, spelled for a proxy that reads _ as -.
        ([("Mcp_Name", "delete_all")], "", True),
        ([("mcp_param_target", "prod")], "", True),
        ([("Mcp-Name", "search")], "", False),
        # A body judged as UTF-8 must be UTF-8 to whoever decodes it next.
        ([("Content-Type", "application/json; charset=utf-7")], "", True),
        ([("Content-Type", 'application/json; charset="Shift_JIS"')], "", True),
        ([("Content-Type", "application/json; charset=UTF-8; charset=utf-7")], "", True),
        ([("Content-Type", "application/json; charset=UTF-8")], "", False),
        ([("Content-Type", "application/json")], "", False),
    ],
)
def test_requests_read_otherwise_by_some_servers(
    headers: list[tuple[str, str]], query: str, refused: bool
) -> None:
    problem = unsafe_request("GET", "/x", headers, model_route=False, raw_query=query)
    assert (problem is not None) == refused


def test_the_step_header_is_an_action_of_its_own() -> None:
    assert STEP_HEADER == "x-abc-step"
    action = step_action("answer")
    assert (action.kind, action.target) == ("step", "step:answer")
    assert step_request_id("req-1") == "req-1:step" != step_request_id("req-2")
