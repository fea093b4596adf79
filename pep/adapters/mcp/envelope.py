"""Which MCP revision a request speaks, and whether its routing headers say what its body says.

Both revisions share one route, chosen per request as the spec says:

- 2025-06-18 / 2025-11-25 (and older): ``initialize`` opens a session (``Mcp-Session-Id``);
  requests carry no per-request envelope.
- 2026-07-28: no session; every request carries ``params._meta`` with the protocol version
  (and the ``MCP-Protocol-Version`` header equal to it), ``Mcp-Method`` and, for a named
  target, ``Mcp-Name``; a ``tools/call`` mirrors the arguments its tool's schema marks with
  ``x-mcp-header`` into ``Mcp-Param-<token>`` headers.

The sidecar decides on the body, but a proxy in front of the server may route on the
headers: a request whose headers disagree with its body is refused (HEADER_MISMATCH), in
either revision, so no header can steer a request past the decision it got.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pdp.api.reasons import MappingError

__all__ = [
    "MODERN_VERSIONS",
    "NAMED_PARAM",
    "HeaderMismatch",
    "ParamHeaders",
    "UnsupportedVersion",
    "check_headers",
    "request_revision",
]

MODERN_VERSIONS = ("2026-07-28",)
VERSION_META = "io.modelcontextprotocol/protocolVersion"
VERSION_HEADER = "mcp-protocol-version"
METHOD_HEADER = "mcp-method"
NAME_HEADER = "mcp-name"
PARAM_PREFIX = "mcp-param-"
# The param whose value a request's Mcp-Name header mirrors.
NAMED_PARAM = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
_ROUTING = frozenset({VERSION_HEADER, METHOD_HEADER, NAME_HEADER})
_SENTINEL = re.compile(r"=\?base64\?(?P<payload>.*)\?=")
_DECIMAL = re.compile(r"-?[0-9]+(\.0+)?")


class HeaderMismatch(MappingError):
    """A routing header that disagrees with the body (JSON-RPC -32020)."""


class UnsupportedVersion(MappingError):
    """A per-request protocol version the sidecar does not speak (JSON-RPC -32022, with the
    versions it does, so a client can negotiate down rather than fail)."""


def request_revision(message: Mapping[str, Any]) -> str | None:
    """The 2026+ protocol version a request's envelope names, or None (handshake era)."""
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict) or VERSION_META not in meta:
        return None
    version = meta[VERSION_META]
    if version not in MODERN_VERSIONS:
        # A revision the sidecar has not learned may route or name things it cannot read.
        raise UnsupportedVersion(f"MCP protocol version {version!r} is not spoken here")
    return str(version)


def decode_header_value(value: str) -> str | None:
    """A header value as the spec encodes it: verbatim, or ``=?base64?...?=`` (UTF-8); None
    when the sentinel is malformed, so a corrupt header never matches by accident."""
    match = _SENTINEL.fullmatch(value)
    if match is None:
        return value
    payload = match.group("payload")
    try:
        raw = base64.b64decode(payload, validate=True)
        if base64.b64encode(raw).decode("ascii") != payload:
            return None
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def _rendered(value: Any) -> str | None:
    """An argument as a client mirrors it into a header (None: not mirrorable)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


def check_headers(
    headers: Iterable[tuple[str, str]],
    message: Mapping[str, Any],
    revision: str | None,
    params: ParamHeaders,
    server: str,
) -> None:
    """Refuse (``HeaderMismatch``) a request whose routing headers disagree with its body.

    In the 2026 revision the version, method and name headers are required; in the
    handshake era they are optional, but when present they must agree all the same.
    """
    seen: dict[str, str] = {}
    mirrored: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        if key in seen or key in mirrored:
            raise HeaderMismatch(f"{name} appears more than once")
        if key in _ROUTING:
            seen[key] = value
        elif key.startswith(PARAM_PREFIX):
            mirrored[key] = value
    method = message.get("method")
    if revision is not None and seen.get(VERSION_HEADER) != revision:
        raise HeaderMismatch("MCP-Protocol-Version does not match the request's _meta")
    if revision is not None and METHOD_HEADER not in seen:
        raise HeaderMismatch("Mcp-Method is missing")
    if METHOD_HEADER in seen and seen[METHOD_HEADER] != method:
        raise HeaderMismatch("Mcp-Method does not match the request body's method")
    name_key = NAMED_PARAM.get(method) if isinstance(method, str) else None
    body_params = message.get("params")
    named = body_params.get(name_key) if name_key and isinstance(body_params, dict) else None
    if NAME_HEADER in seen:
        if named is None or decode_header_value(seen[NAME_HEADER]) != named:
            raise HeaderMismatch(f"Mcp-Name does not match the body's {name_key or 'target'}")
    elif revision is not None and named is not None:
        raise HeaderMismatch("Mcp-Name is missing")
    if mirrored:  # only a tools/call may carry them, each declared by its tool
        arguments = body_params.get("arguments") if isinstance(body_params, dict) else None
        tool = named if method == "tools/call" and isinstance(named, str) else None
        params.check(server, tool, arguments if isinstance(arguments, dict) else {}, mirrored)


@dataclass(frozen=True)
class _Declared:
    path: tuple[str, ...]
    token: str


def _declared(schema: Any) -> tuple[_Declared, ...] | None:
    """The arguments a tool's input schema mirrors into headers (``x-mcp-header`` on a
    property reached by ``properties`` alone); None for a schema whose annotations a
    conforming client would reject (it drops the tool and sends no headers for it)."""
    found: list[_Declared] = []
    stack: list[tuple[tuple[str, ...], Any]] = [((), schema)]
    while stack:
        path, node = stack.pop()
        if not isinstance(node, dict):
            continue
        token = node.get("x-mcp-header")
        if token is not None:
            if not path or not isinstance(token, str) or not token:
                return None
            found.append(_Declared(path, token.lower()))
        properties = node.get("properties")
        if isinstance(properties, dict):
            stack.extend(((*path, name), sub) for name, sub in properties.items())
    if len({d.token for d in found}) != len(found):
        return None
    return tuple(found)


class ParamHeaders:
    """Which ``Mcp-Param-*`` headers each tool's calls carry, learned from the tool lists
    the sidecar relays (the client learns them there too). Checking a call needs the
    schema: a call carrying such headers for a tool whose schema the sidecar never relayed
    is refused, since it cannot tell which argument a header claims to be."""

    MAX_TOOLS = 4096  # per server: a hostile list cannot grow the sidecar without bound

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[str, dict[str, tuple[_Declared, ...] | None]] = {}

    def learn(self, server: str, tools: Iterable[Mapping[str, Any]]) -> None:
        with self._lock:
            known = self._known.setdefault(server, {})
            for tool in tools:
                if len(known) >= self.MAX_TOOLS and tool["name"] not in known:
                    known.pop(next(iter(known)))
                known[tool["name"]] = _declared(tool.get("inputSchema"))

    def check(
        self, server: str, tool: str | None, arguments: Mapping[str, Any], headers: dict[str, str]
    ) -> None:
        # Called with headers only: without them no proxy can be steered by them (a header
        # the tool declares but the call omits, the server itself refuses).
        with self._lock:
            declared = self._known.get(server, {}).get(tool or "", ())
        if tool is None or declared is None or not declared:
            raise HeaderMismatch("Mcp-Param headers on a request whose tool declares none")
        by_token = {d.token: d for d in declared}
        for name, raw in headers.items():
            entry = by_token.get(name[len(PARAM_PREFIX) :])
            if entry is None:
                raise HeaderMismatch(f"{name} is not declared by the tool's schema")
            value: Any = arguments
            for step in entry.path:
                value = value.get(step) if isinstance(value, dict) else None
            decoded = decode_header_value(raw)
            if decoded is None or value is None or not _same(value, decoded):
                raise HeaderMismatch(f"{name} does not match the request body's arguments")


def _same(value: Any, decoded: str) -> bool:
    """A decoded header against its argument: as text, except that an integral number
    matches its canonical decimal (the spec lets ``42`` match ``42.0``)."""
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (isinstance(value, int) or value.is_integer())
        and _DECIMAL.fullmatch(decoded)
    ):
        return int(decoded.split(".")[0]) == int(value)
    return decoded == _rendered(value)
