"""The one mapping from a protocol request to an ``Action`` (OpenAI, Anthropic, MCP, HTTP).

The PEP's adapters use it, and so does the PDP's Envoy ext_authz door, so the two can
never disagree on what a request asks for. It knows the protocols, not the policy:
every function is pure and raises ``MappingError`` for a request it cannot map, which
the caller refuses (an unmappable request is never passed through).
"""

from __future__ import annotations

import json
from typing import Any

from pdp.api.abc.pdp.v1 import pdp_pb2

__all__ = [
    "MODEL_PATHS",
    "MappingError",
    "anthropic_action",
    "http_action",
    "mcp_list_probe",
    "mcp_tool_action",
    "openai_action",
    "token_field",
]

# OpenAI endpoints that consume a model, and the body field that caps the completion.
MODEL_PATHS = {
    "chat/completions": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
    "embeddings": (),
}


class MappingError(ValueError):
    """The request cannot be mapped to an action: refuse it as ``bad_request``."""


# Tools the agent runs itself (their calls come back to it, and through the sidecar);
# anything else runs at the provider (web search, remote MCP servers, code) unjudged.
_CLIENT_TOOL_TYPES = frozenset({"function", "custom"})


def _client_tools_only(body: dict[str, Any], *, untyped_is_client: bool) -> None:
    """Refuse provider-side tools. OpenAI tools always name a type; an Anthropic client
    tool may leave it out (its server tools always name one)."""
    tools = body.get("tools", [])
    if not isinstance(tools, list):
        raise MappingError("tools must be a list")
    for tool in tools:
        if not isinstance(tool, dict):
            raise MappingError("each tool must be an object")
        kind = tool.get("type")
        if kind is None and untyped_is_client:
            continue
        if kind not in _CLIENT_TOOL_TYPES:
            raise MappingError(f"provider-side tool {kind!r} is not governed")
    for field in ("web_search_options", "mcp_servers"):
        if body.get(field):
            raise MappingError(f"{field} runs tools at the provider, which are not governed")


def _model_name(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise MappingError("the request names no model")
    return model


def _tokens(body: dict[str, Any], fields: tuple[str, ...]) -> int:
    for name in fields:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MappingError(f"{name} must be a non-negative integer")
        return value
    return 0


def token_field(path: str, body: dict[str, Any]) -> str | None:
    """The body field an OpenAI request uses for its completion cap (the one it sent, or
    the first the endpoint knows), so the PEP can write the obligation's cap there."""
    fields = MODEL_PATHS.get(path, ())
    for name in fields:
        if name in body:
            return name
    return fields[0] if fields else None


def openai_action(path: str, body: dict[str, Any]) -> pdp_pb2.Action:
    """``path`` is what follows ``/v1/`` (e.g. ``chat/completions``)."""
    if path not in MODEL_PATHS:
        raise MappingError(f"OpenAI endpoint /v1/{path} is not governed")
    _client_tools_only(body, untyped_is_client=False)
    for field in ("n", "best_of"):
        # The cap is per completion: n completions would spend n times what was reserved.
        if body.get(field, 1) != 1:
            raise MappingError(f"{field} other than 1 is not governed")
    return pdp_pb2.Action(
        kind="model",
        target=f"model:openai/{_model_name(body)}",
        max_tokens=_tokens(body, MODEL_PATHS[path]),
    )


def anthropic_action(path: str, body: dict[str, Any]) -> pdp_pb2.Action:
    if path != "messages":
        raise MappingError(f"Anthropic endpoint /v1/{path} is not governed")
    _client_tools_only(body, untyped_is_client=True)
    return pdp_pb2.Action(
        kind="model",
        target=f"model:anthropic/{_model_name(body)}",
        max_tokens=_tokens(body, ("max_tokens",)),
    )


def mcp_tool_action(server: str, params: Any) -> pdp_pb2.Action:
    """A ``tools/call`` request's params: the tool name and its arguments, as sent."""
    if not isinstance(params, dict) or not isinstance(params.get("name"), str):
        raise MappingError("tools/call needs params.name")
    arguments = params.get("arguments", {})
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise MappingError("tools/call arguments must be an object")
    try:
        # JSON bytes, not a Struct: integers stay integers.
        args_json = json.dumps(arguments, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except ValueError as exc:
        raise MappingError("tools/call arguments hold a number JSON cannot carry") from exc
    return pdp_pb2.Action(
        kind="tool", target=f"tool:{server}/{params['name']}", args_json=args_json
    )


def mcp_list_probe(server: str, tool_name: str) -> pdp_pb2.Action:
    """May ``tool_name`` appear in a ``tools/list`` answer? Judged like a call, minus arguments."""
    return pdp_pb2.Action(kind="tool", target=f"tool:{server}/{tool_name}", probe=True)


def http_action(host: str, method: str, path: str) -> pdp_pb2.Action:
    """``path`` is the request path as sent, query string excluded."""
    return pdp_pb2.Action(kind="http", target=f"http:{host}", method=method.upper(), path=path)
