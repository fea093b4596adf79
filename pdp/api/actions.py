"""The one mapping from a protocol request to an ``Action`` (OpenAI, Anthropic, MCP, HTTP).

The PEP's adapters use it, and so does the PDP's Envoy ext_authz door, so the two can
never disagree on what a request asks for. It knows the protocols, not the policy:
every function is pure and raises ``MappingError`` for a request it cannot map, which
the caller refuses (an unmappable request is never passed through).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

from pdp.api.abc.pdp.v1 import pdp_pb2

__all__ = [
    "CAP_GROWTH",
    "MAX_TOKENS",
    "MODEL_PATHS",
    "OVERRIDE_HEADERS",
    "STEP_HEADER",
    "TARGETS",
    "MappingError",
    "anthropic_action",
    "cap_to_write",
    "check_http_path",
    "exact_value_problem",
    "http_action",
    "mcp_list_probe",
    "mcp_tool_action",
    "model_request",
    "openai_action",
    "parse_json_object",
    "step_action",
    "step_request_id",
    "token_field",
    "token_fields",
    "unsafe_request",
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


def _target(kind: str, target: str) -> str:
    if not TARGETS[kind].fullmatch(target):
        raise MappingError(f"malformed {kind} target")
    return target


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; ``MappingError`` for anything else.

    UTF-8 only: ``json.loads`` would sniff UTF-16 or UTF-32 from bytes, which the
    upstream need not do, and a byte-order mark is refused likewise.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MappingError("the request body is not UTF-8") from exc
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
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
        "x-original-uri",
        "x-rewrite-url",
        "x-original-method",
        "x-forwarded-method",
        "x-forwarded-uri",
        "x-forwarded-path",
        "x-forwarded-prefix",
    }
)
# Headers whose meaning the sidecar relies on (framing, hop-by-hop, its own): spelled with
# an underscore, a CGI-style server reads them as these, after the sidecar judged them not.
_MEANINGFUL_HEADERS = frozenset(
    {
        "connection",
        "content-encoding",
        "content-length",
        "content-type",
        "host",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def _header_key(name: str) -> str:
    """A header name as CGI-style servers read it: case-folded, ``_`` the same as ``-``."""
    return name.strip().lower().replace("_", "-")


# Query keys that some frameworks read as the method (Laravel, Express method-override).
_OVERRIDE_QUERY_KEYS = frozenset(_header_key(k) for k in ("_method", *OVERRIDE_HEADERS))


def _header_problem(headers: Iterable[tuple[str, str]]) -> str | None:
    spellings: dict[str, str] = {}
    for name, value in headers:
        key = _header_key(name)
        if key in OVERRIDE_HEADERS:
            return "method or URL override headers are refused"
        # Every Content-Encoding header counts: a second one must not hide behind the first.
        if key == "content-encoding" and value.strip().lower() != "identity":
            return "compressed request bodies are refused"
        if "_" in name and (key in _MEANINGFUL_HEADERS or key.startswith("x-abc-")):
            return "a framing or sidecar header spelled with an underscore is refused"
        if spellings.setdefault(key, name.lower()) != name.lower():
            # X-Api-Key and X_Api_Key: which one an upstream reads is its choice, not ours.
            return "one header sent under two spellings is refused"
    return None


def _query_problem(raw_query: str) -> str | None:
    for pair in re.split(r"[&;]", raw_query):
        raw_key = pair.split("=", 1)[0].replace("+", " ")
        key = unquote_to_bytes(raw_key).decode("utf-8", "replace")
        if _header_key(key) in _OVERRIDE_QUERY_KEYS:
            return "method override query parameters are refused"
    return None


def unsafe_request(
    method: str,
    raw_path: str,
    headers: Iterable[tuple[str, str]],
    *,
    model_route: bool,
    raw_query: str = "",
) -> str | None:
    """Why a request cannot be judged faithfully (then it is refused), or None.

    ``headers`` are (name, value) pairs as received; ``raw_path`` and ``raw_query`` are the
    path and query string as sent.
    """
    problem = _header_problem(headers) or _query_problem(raw_query)
    if problem is not None:
        return problem
    if model_route:
        if method != "POST":
            return f"{method} on a model endpoint is not governed"
        if "%" in raw_path:
            return "percent-encoded model endpoint paths are refused"
    return None


_PRINTABLE_PATH = re.compile(r"/[\x21-\x7e]{0,2047}")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# Characters that never need an escape (RFC 3986 unreserved), and the ones the policy reads
# a path by: escaped, a decoding upstream sees one the policy was not shown.
_NEVER_ESCAPED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/\\%")
_DOT_SEGMENTS = frozenset({".", ".."})


def check_http_path(path: str) -> str:
    """``path`` (the raw path as sent, which is forwarded byte for byte) if no upstream can
    read it as another path than the policy is shown; ``MappingError`` otherwise.

    Dot segments and backslashes written out are left to the policy, which sees them as they
    are. What it cannot see is what escapes decode to, so:

    1. printable ASCII only, starting with ``/`` (what the PDP takes);
    2. every ``%`` starts an escape of two hex digits;
    3. no escape of a character that never needs one (unreserved, ``/``, ``\\``, ``%``);
    4. the escaped bytes are valid, shortest-form UTF-8 (``%c0%ae``, ``%e0%80%ae`` and
       ``%f0%80%80%ae`` are an overlong ``.``), with no control or format characters;
    5. a segment with escapes is no dot segment (``..%3b`` is ``..;``), and holds no slash,
       backslash or percent sign, once decoded and once NFKC-normalised (``%ef%bc%8e`` is a
       full-width dot, ``.`` to a server that normalises).
    """
    # 1.
    if not _PRINTABLE_PATH.fullmatch(path):
        raise MappingError("HTTP path must start with / and hold printable ASCII only")
    # 2.
    if "%" in _ESCAPE.sub("", path):
        raise MappingError("a percent sign in the path starts no escape")
    # 3.
    if any(chr(int(m.group(1), 16)) in _NEVER_ESCAPED for m in _ESCAPE.finditer(path)):
        raise MappingError("the path escapes a character that needs no escape")
    for segment in path.split("/"):
        if "%" not in segment:
            continue
        # 4.
        try:
            decoded = unquote_to_bytes(segment).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MappingError("the path's escapes are not shortest-form UTF-8") from exc
        if any(unicodedata.category(c) in ("Cc", "Cf") for c in decoded):
            raise MappingError("the path escapes a control character")
        # 5.
        for form in (decoded, unicodedata.normalize("NFKC", decoded)):
            if form.split(";", 1)[0] in _DOT_SEGMENTS or any(c in form for c in "/\\%"):
                raise MappingError("an escaped path segment decodes to another path")
    return path


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
    return pdp_pb2.Action(
        kind="model",
        target=_model_target("openai", body),
        max_tokens=_tokens(body, MODEL_PATHS[path]),
    )


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
    if provider == "openai":
        action = openai_action(endpoint, document)
    elif provider == "anthropic":
        action = anthropic_action(endpoint, document)
    else:
        raise MappingError(f"no model provider {provider!r}")
    action.input_bytes = len(body) + CAP_GROWTH
    return action, document


def cap_to_write(requested: int, obligations: Mapping[str, Any]) -> int | None:
    """The ``max_tokens`` cap a decision obliges the request to carry, when the request
    does not already ask for at most that (0: it asked for no cap); None otherwise."""
    cap = obligations.get("max_tokens")
    if isinstance(cap, bool) or not isinstance(cap, int | float) or 0 < requested <= cap:
        return None
    return int(cap)


def exact_value_problem(value: Any) -> str | None:
    """Why a JSON value cannot be judged and logged exactly as sent, or None.

    The engine and the decision log take Unicode text: a lone surrogate could be neither
    judged nor logged as sent (numbers, fractions included, are both).
    Iterative, so that nesting as deep as a JSON parser allows cannot overflow the stack.
    """
    pending = [value]
    while pending:
        item = pending.pop()
        texts = [item] if isinstance(item, str) else list(item) if isinstance(item, dict) else []
        for text in texts:
            try:
                text.encode("utf-8")
            except (UnicodeEncodeError, AttributeError):
                return "strings must be valid Unicode (no lone surrogates)"
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None


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


def mcp_list_probe(server: str, tool_name: str) -> pdp_pb2.Action:
    """May ``tool_name`` appear in a ``tools/list`` answer? Judged like a call, minus arguments."""
    return pdp_pb2.Action(kind="tool", target=f"tool:{server}/{tool_name}", probe=True)


def http_action(host: str, method: str, path: str) -> pdp_pb2.Action:
    """``path`` is the request path as sent, query string excluded: the path forwarded,
    byte for byte, so it must read the same to every upstream (``check_http_path``)."""
    return pdp_pb2.Action(
        kind="http",
        target=_target("http", f"http:{host}"),
        method=method.upper(),
        path=check_http_path(path),
    )


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
