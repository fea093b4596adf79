"""The ext_authz door and the PEP's adapters map a request to the same action: one module."""

from __future__ import annotations

import json

import pytest
from aiohttp.test_utils import make_mocked_request
from envoy.service.auth.v3 import attribute_context_pb2

from pdp.api.mapping import CAP_GROWTH
from pdp.api.reasons import MappingError
from pdp.server.ext_authz import ModelRoutes, map_request
from pep.adapters.anthropic import AnthropicAdapter
from pep.adapters.http import HttpAdapter
from pep.adapters.openai import OpenAIAdapter

HttpRequest = attribute_context_pb2.AttributeContext.HttpRequest
JSON = [("content-type", "application/json")]


def envoy(method: str, path: str, host: str, body: bytes = b"") -> HttpRequest:
    return HttpRequest(method=method, path=path, host=host, body=body.decode(), size=len(body))


@pytest.mark.parametrize(
    ("route", "tail", "body"),
    [
        ("openai", "chat/completions", {"model": "gpt-4o-mini", "max_tokens": 7, "messages": []}),
        ("openai", "responses", {"model": "o4", "max_output_tokens": 9, "input": "x"}),
        ("anthropic", "messages", {"model": "claude-haiku-4-5", "max_tokens": 64}),
    ],
)
def test_model_requests_map_alike(route: str, tail: str, body: dict[str, object]) -> None:
    raw = json.dumps(body).encode()
    path = f"/{route}/v1/{tail}"
    adapter = OpenAIAdapter() if route == "openai" else AnthropicAdapter()
    request = make_mocked_request("POST", path, match_info={"tail": tail})
    pep = adapter.call(request, raw).action
    door = map_request(envoy("POST", path, "api", raw), JSON, ModelRoutes(), route).action
    assert pep is not None and door == pep
    assert door.input_bytes == len(raw) + CAP_GROWTH


def test_http_requests_map_alike() -> None:
    path = "/v1/invoices/42"
    request = make_mocked_request(
        "GET", f"/http/billing.internal{path}", match_info={"name": "billing.internal"}
    )
    pep = HttpAdapter().call(request, b"").action
    door = map_request(envoy("GET", f"{path}?x=1", "billing.internal"), [], ModelRoutes()).action
    assert door == pep


def test_prefixes_route_models_and_nothing_else() -> None:
    routes = ModelRoutes("/llm/openai/", None)
    body = json.dumps({"model": "m", "max_tokens": 1}).encode()
    mapped = map_request(
        envoy("POST", "/llm/openai/v1/completions", "h", body), JSON, routes, "openai"
    )
    assert mapped.action.target == "model:openai/m" and mapped.token_field == "max_tokens"
    # With the Anthropic route off, its path is plain HTTP to the host.
    other = map_request(envoy("POST", "/anthropic/v1/messages", "h", body), [], routes)
    assert other.action.kind == "http"
    with pytest.raises(MappingError, match="routed as /llm/openai/v1/"):
        map_request(envoy("POST", "/llm/openai/chat", "h", body), JSON, routes, "openai")


def test_a_model_path_is_a_model_call_only_on_a_route_tagged_so() -> None:
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 10}).encode()
    chat = envoy("POST", "/openai/v1/chat/completions", "billing.internal", body)
    # On the billing route (untagged), Envoy sends it to billing: not judged as a model call.
    with pytest.raises(MappingError, match="not tagged abc_route: openai"):
        map_request(chat, JSON, ModelRoutes())
    with pytest.raises(MappingError, match="no anthropic API path"):
        map_request(chat, JSON, ModelRoutes(), "anthropic")
    # Tagged http, it is an HTTP action to the host it goes to.
    as_http = map_request(chat, JSON, ModelRoutes(), "http").action
    assert (as_http.kind, as_http.target) == ("http", "http:billing.internal")
