"""The one mapping from a protocol request to an action (OpenAI, Anthropic, MCP, HTTP, steps).

The PEP's adapters use it, and so does the PDP's Envoy ext_authz door, so the two can
never disagree on what a request asks for. It knows the protocols, not the policy:
every function is pure and raises ``MappingError`` for a request it cannot map, which
the caller refuses (an unmappable request is never passed through).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pdp.api.abc.pdp.v1 import pdp_pb2
from pdp.api.reasons import MappingError
from pdp.api.requests import check_http_path, exact_value_problem, parse_json_object

__all__ = [
    "CAP_GROWTH",
    "MAX_TOKENS",
    "MODEL_PATHS",
    "RUN_KEY_HEADER",
    "STEP_HEADER",
    "TARGETS",
    "anthropic_action",
    "cap_to_write",
    "http_action",
    "mcp_completion_action",
    "mcp_list_probe",
    "mcp_listen_action",
    "mcp_prompt_action",
    "mcp_resource_action",
    "mcp_tool_action",
    "model_request",
    "openai_action",
    "step_action",
    "step_request_id",
    "token_field",
    "token_fields",
]

# OpenAI endpoints that consume a model, and every body field that bounds the completion:
# an upstream may honour any of them, so each one present is judged and capped.
MODEL_PATHS = {
    "chat/completions": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
    "embeddings": (),
}
ANTHROPIC_TOKEN_FIELDS = ("max_tokens",)
# The most tokens any field may ask for (the PDP takes no more either): beyond it a request
# is the agent's mistake, refused here before an int64 field of the Action could overflow.
MAX_TOKENS = 10**9
# The most bytes writing a cap into a body adds (the PEP splices it into the agent's bytes):
# one field inserted, the longest name quoted with the largest cap and a comma (35 bytes),
# or at most 9 more digits in each field present. Reserved with the body, whichever door.
CAP_GROWTH = 48

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
# Well-formed targets. Always ``fullmatch``: a ``$`` would admit a trailing newline.
TARGETS = {
    "model": re.compile(rf"model:{_NAME}/[A-Za-z0-9][A-Za-z0-9._:/-]{{0,127}}"),
    "tool": re.compile(rf"tool:{_NAME}/{_NAME}"),
    "http": re.compile(r"http:[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?(:[0-9]{1,5})?"),
    # "@..." names end the run (step ids never start with "@"); the policy knows which.
    "step": re.compile(rf"step:(@[a-z]{{1,32}}|{_NAME})"),
    # A resource by its URI as sent (printable ASCII, as the spec's URIs are); a prompt by name.
    "resource": re.compile(rf"resource:{_NAME}/[\x21-\x7e]{{1,2048}}"),
    "prompt": re.compile(rf"prompt:{_NAME}/{_NAME}"),
}


def _target(kind: str, target: str) -> str:
    if not TARGETS[kind].fullmatch(target):
        raise MappingError(f"malformed {kind} target")
    return target


# Tools the agent runs itself (their calls come back to it, and through the sidecar);
# anything else runs at the provider (web search, remote MCP servers, code) unjudged.
_CLIENT_TOOL_TYPES = frozenset({"function", "custom"})


def _client_tools_only(
    body: dict[str, Any], provider_side: tuple[str, ...], *, untyped_is_client: bool
) -> None:
    """Refuse provider-side tools. OpenAI tools always name a type; an Anthropic client
    tool may leave it out (its server tools always name one). A provider-side field is
    refused by its presence, whatever its value: ``"web_search_options": {}`` turns
    search on."""
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
    for field in provider_side:
        if field in body:
            raise MappingError(f"{field} runs tools at the provider, which are not governed")


# Fields that run tools at the provider, or (a stored prompt) bring tools and a model the
# sidecar never sees; refused when present.
_OPENAI_PROVIDER_SIDE = ("web_search_options",)
_RESPONSES_PROVIDER_SIDE = ("prompt",)
_ANTHROPIC_PROVIDER_SIDE = ("mcp_servers", "container")


def _model_target(provider: str, body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise MappingError("the request names no model")
    return _target("model", f"model:{provider}/{model}")


def _tokens(body: dict[str, Any], fields: tuple[str, ...]) -> int:
    """The most any of ``fields`` asks for (0: none sets a cap); null counts as absent."""
    requested = 0
    for name in fields:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
            raise MappingError(f"{name} must be an integer from 0 to {MAX_TOKENS}")
        requested = max(requested, value)
    return requested


def token_fields(provider: str, endpoint: str) -> tuple[str, ...]:
    """Every body field that bounds the completion of this endpoint (first: the one a cap
    is written into when the request sets none)."""
    if provider == "anthropic":
        return ANTHROPIC_TOKEN_FIELDS
    return MODEL_PATHS.get(endpoint, ())


def token_field(path: str, body: dict[str, Any]) -> str | None:
    """The body field an OpenAI request uses for its completion cap (the first it sent, or
    the first the endpoint knows)."""
    fields = MODEL_PATHS.get(path, ())
    for name in fields:
        if name in body:
            return name
    return fields[0] if fields else None


def openai_action(path: str, body: dict[str, Any]) -> pdp_pb2.Action:
    """``path`` is what follows ``/v1/`` (e.g. ``chat/completions``)."""
    if path not in MODEL_PATHS:
        raise MappingError(f"OpenAI endpoint /v1/{path} is not governed")
    provider_side: tuple[str, ...] = _OPENAI_PROVIDER_SIDE
    if path == "responses":
        provider_side += _RESPONSES_PROVIDER_SIDE
    _client_tools_only(body, provider_side, untyped_is_client=False)
    for field in ("n", "best_of"):
        # The cap is per completion: n completions would spend n times what was reserved.
        value = body.get(field, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value != 1:
            raise MappingError(f"{field} other than 1 is not governed")
    if path == "completions" and _prompts(body.get("prompt")) > 1:
        raise MappingError("a batch of prompts is not governed: the cap is per completion")
    return pdp_pb2.Action(
        kind="model",
        target=_model_target("openai", body),
        max_tokens=_tokens(body, MODEL_PATHS[path]),
    )


def _prompts(prompt: Any) -> int:
    """How many completions a legacy ``prompt`` asks for: a list of token ids is one
    prompt, any other list one per item."""
    if not isinstance(prompt, list):
        return 1
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return 1
    return len(prompt)


def anthropic_action(path: str, body: dict[str, Any]) -> pdp_pb2.Action:
    if path != "messages":
        raise MappingError(f"Anthropic endpoint /v1/{path} is not governed")
    _client_tools_only(body, _ANTHROPIC_PROVIDER_SIDE, untyped_is_client=True)
    return pdp_pb2.Action(
        kind="model",
        target=_model_target("anthropic", body),
        max_tokens=_tokens(body, ANTHROPIC_TOKEN_FIELDS),
    )


def model_request(
    provider: str, endpoint: str, body: bytes
) -> tuple[pdp_pb2.Action, dict[str, Any]]:
    """A model request's action and its parsed body. ``endpoint`` follows ``/v1/``.

    The body's size is an upper bound on its prompt tokens: reserved with the completion
    cap, so the prompt cannot spend past the budget either. It is the size of the body as
    forwarded, which a cap written into it may grow by ``CAP_GROWTH``.
    """
    document = parse_json_object(body)
    _api_spelled(document)
    if provider == "openai":
        action = openai_action(endpoint, document)
    elif provider == "anthropic":
        action = anthropic_action(endpoint, document)
    else:
        raise MappingError(f"no model provider {provider!r}")
    action.input_bytes = len(body) + CAP_GROWTH
    return action, document


# How the APIs spell a field: lower-case ASCII snake_case, in the body and in each tool.
_FIELD = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _api_spelled(body: dict[str, Any]) -> None:
    """Refuse field names the APIs never use. An upstream that matches names
    case-insensitively (Go's ``encoding/json``: Ollama, Go gateways) reads
    ``MAX_COMPLETION_TOKENS``, ``max_completion_to\u212aens`` or a tool's ``Type`` as the
    field the mapping judged by its exact name, or found absent."""
    tools = body.get("tools")
    for fields in (
        [body, *(t for t in tools if isinstance(t, dict))] if isinstance(tools, list) else [body]
    ):
        for name in fields:
            if not _FIELD.fullmatch(name):
                raise MappingError(f"field {name!r} is not spelled as the API spells fields")


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
    target = _target("tool", f"tool:{server}/{params['name']}")
    arguments = params.get("arguments", {})
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise MappingError("tools/call arguments must be an object")
    problem = exact_value_problem(arguments)
    if problem is not None:
        raise MappingError(f"tools/call arguments: {problem}")
    try:
        # JSON bytes, not a Struct: integers stay integers.
        args_json = json.dumps(arguments, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except ValueError as exc:
        raise MappingError("tools/call arguments hold a number JSON cannot carry") from exc
    return pdp_pb2.Action(kind="tool", target=target, args_json=args_json)


def mcp_resource_action(server: str, params: Any) -> pdp_pb2.Action:
    """A ``resources/read`` or ``resources/subscribe`` request's params: the resource URI,
    as sent (a subscription is the same capability: it tells when the resource changes)."""
    if not isinstance(params, dict) or not isinstance(params.get("uri"), str):
        raise MappingError("a resource request needs params.uri")
    return pdp_pb2.Action(
        kind="resource", target=_target("resource", f"resource:{server}/{params['uri']}")
    )


def mcp_prompt_action(server: str, params: Any) -> pdp_pb2.Action:
    """A ``prompts/get`` request's params: the prompt name (its arguments are not judged)."""
    if not isinstance(params, dict) or not isinstance(params.get("name"), str):
        raise MappingError("prompts/get needs params.name")
    return pdp_pb2.Action(
        kind="prompt", target=_target("prompt", f"prompt:{server}/{params['name']}")
    )


def mcp_completion_action(server: str, params: Any) -> pdp_pb2.Action:
    """A ``completion/complete`` request's params: judged as what it completes for, a
    prompt by name or a resource template by its URI template (granted, like a template
    in a list, only when it lies under a granted URI prefix): completions of what is not
    granted would leak it."""
    ref = params.get("ref") if isinstance(params, dict) else None
    kind = ref.get("type") if isinstance(ref, dict) else None
    if kind == "ref/prompt":
        return mcp_prompt_action(server, ref)
    if kind == "ref/resource":
        return mcp_resource_action(server, ref)
    raise MappingError("completion/complete needs params.ref: a ref/prompt or a ref/resource")


def mcp_listen_action(server: str, params: Any) -> pdp_pb2.Action | None:
    """A 2026-07-28 ``subscriptions/listen``: None (nothing to decide) unless it subscribes
    to a resource's updates, which is judged as that resource. One URI per request: one
    request gets one decision, and a client can open one stream per resource."""
    notifications = params.get("notifications") if isinstance(params, dict) else None
    if not isinstance(notifications, dict):
        raise MappingError("subscriptions/listen needs params.notifications")
    uris = notifications.get("resourceSubscriptions")
    if uris is None or uris == []:
        return None
    if not isinstance(uris, list) or len(uris) != 1:
        raise MappingError("subscriptions/listen may subscribe to one resource per request")
    return mcp_resource_action(server, {"uri": uris[0]})


# What each MCP list holds, and the field that names each entry: the kind it is judged as.
MCP_LISTS = {
    "tools": ("tool", "name"),
    "resources": ("resource", "uri"),
    # A template is judged by its URI template as a URI: shown only when it lies under a
    # granted prefix, so every URI it expands to does too.
    "resourceTemplates": ("resource", "uriTemplate"),
    "prompts": ("prompt", "name"),
}


def mcp_list_probe(server: str, name: str, kind: str = "tool") -> pdp_pb2.Action:
    """May the entry ``name`` (a tool or prompt name, a resource URI) appear in a list
    answer? Judged like a call of that kind, minus arguments."""
    return pdp_pb2.Action(kind=kind, target=f"{kind}:{server}/{name}", probe=True)


def http_action(host: str, method: str, path: str) -> pdp_pb2.Action:
    """``path`` is the request path as sent, query string excluded: the path forwarded,
    byte for byte, so it must read the same to every upstream (``check_http_path``)."""
    return pdp_pb2.Action(
        kind="http",
        target=_target("http", f"http:{host}"),
        method=method.upper(),
        path=check_http_path(path),
    )


# The header an agent names its task with: each task id is a run of the sidecar's grant,
# with its own step, budgets and answers (started on first sight).
RUN_KEY_HEADER = "x-abc-run-key"

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
