"""The one mapping from a protocol request to an ``Action`` (OpenAI, Anthropic, MCP, HTTP).

The PEP's adapters use it, and so does the PDP's Envoy ext_authz door, so the two can
never disagree on what a request asks for. It knows the protocols, not the policy:
every function is pure and raises ``MappingError`` for a request it cannot map, which
the caller refuses (an unmappable request is never passed through).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from pdp.api.abc.pdp.v1 import pdp_pb2

__all__ = [
    "MODEL_PATHS",
    "OVERRIDE_HEADERS",
    "STEP_HEADER",
    "MappingError",
    "anthropic_action",
    "cap_to_write",
    "http_action",
    "mcp_list_probe",
    "mcp_tool_action",
    "model_request",
    "openai_action",
    "parse_json_object",
    "step_action",
    "step_request_id",
    "token_field",
    "unsafe_request",
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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        # Parsers disagree on which duplicate wins; the decider and the upstream must not.
        raise MappingError("duplicate keys in the request body")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise MappingError(f"{name} is not JSON")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; ``MappingError`` for anything else."""
    try:
        value = json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, MappingError):
            raise
        raise MappingError("the request body is not JSON") from exc
    if not isinstance(value, dict):
        raise MappingError("the request body is not a JSON object")
    return value


# Headers that make some servers do another method or path than the one decided.
OVERRIDE_HEADERS = frozenset(
    {
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
        "x-original-method",
    }
)


def unsafe_request(
    method: str, raw_path: str, headers: Iterable[tuple[str, str]], *, model_route: bool
) -> str | None:
    """Why a request cannot be judged faithfully (then it is refused), or None.

    ``headers`` are (name, value) pairs as received; ``raw_path`` is the path as sent.
    """
    for name, value in headers:
        name = name.lower()
        if name in OVERRIDE_HEADERS:
            return "method or URL override headers are refused"
        # Every Content-Encoding header counts: a second one must not hide behind the first.
        if name == "content-encoding" and value.strip().lower() != "identity":
            return "compressed request bodies are refused"
    if model_route:
        if method != "POST":
            return f"{method} on a model endpoint is not governed"
        if "%" in raw_path:
            return "percent-encoded model endpoint paths are refused"
    return None


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


def model_request(
    provider: str, endpoint: str, body: bytes
) -> tuple[pdp_pb2.Action, dict[str, Any]]:
    """A model request's action and its parsed body. ``endpoint`` follows ``/v1/``.

    The body's size is an upper bound on its prompt tokens: reserved with the completion
    cap, so the prompt cannot spend past the budget either.
    """
    document = parse_json_object(body)
    if provider == "openai":
        action = openai_action(endpoint, document)
    elif provider == "anthropic":
        action = anthropic_action(endpoint, document)
    else:
        raise MappingError(f"no model provider {provider!r}")
    action.input_bytes = len(body)
    return action, document


def cap_to_write(requested: int, obligations: Mapping[str, Any]) -> int | None:
    """The ``max_tokens`` cap a decision obliges the request to carry, when the request
    does not already ask for at most that (0: it asked for no cap); None otherwise."""
    cap = obligations.get("max_tokens")
    if isinstance(cap, bool) or not isinstance(cap, int | float) or 0 < requested <= cap:
        return None
    return int(cap)


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


# The header an agent (or an Envoy in front of it) names the step it enters with. Entering
# is an action of its own, decided and logged before the call that carries the header.
STEP_HEADER = "x-abc-step"


def step_action(step: str) -> pdp_pb2.Action:
    """The action of entering ``step`` (``@completed`` / ``@failed`` end the run)."""
    return pdp_pb2.Action(kind="step", target=f"step:{step}")


def step_request_id(request_id: str) -> str:
    """The step change's own request id, derived from the call's, so the two read as one
    request in the log and never take each other's idempotent answer."""
    return f"{request_id}:step"
