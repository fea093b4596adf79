"""The shape every protocol adapter shares: request → ``Call`` (the action), verdict → refusal.

``pep/proxy.py`` runs the loop once for all of them: request in → action → decision →
forward or refuse. An adapter never talks to the PDP or the upstream itself, except the
MCP answer filter (tool lists), which gets a probe function from the loop.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import ClientResponse, web
from multidict import CIMultiDictProxy
from yarl import URL

from pdp.api import pdp_pb2
from pdp.api.reasons import MappingError, refusal_status
from pdp.api.requests import parse_json_object
from pep.pdp_client import Verdict
from pep.splice import write_fields

if TYPE_CHECKING:
    from pep.adapters.mcp.refusals import McpRequest

__all__ = [
    "Adapter",
    "AgentRequest",
    "Call",
    "MappingError",
    "Probe",
    "Responder",
    "model_call",
    "parse_json_object",
    "refusal_status",
    "token_capper",
]

Probe = Callable[[pdp_pb2.Action], Awaitable[Verdict]]
Responder = Callable[[web.Request, ClientResponse, Probe], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Call:
    """What an adapter makes of one agent request."""

    action: pdp_pb2.Action | None  # None: forwarded without a decision ("pass")
    body: bytes
    streaming: bool = False
    reads_usage: bool = False
    # Rewrites the body to honour the decision's obligations (e.g. a max_tokens cap).
    apply_obligations: Callable[[dict[str, Any]], bytes] | None = None
    # Replaces the plain relay when the response itself must be read (every MCP answer).
    respond: Responder | None = None
    mcp: McpRequest | None = None  # an MCP request: what its refusal must answer
    # An MCP list (tools, resources, prompts): its answer is filtered by decisions, so it
    # counts as allowed.
    lists_tools: bool = False


class AgentRequest(Protocol):
    """What an adapter reads of a request: aiohttp's, or the lean server's (pep.front)."""

    @property
    def method(self) -> str: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def rel_url(self) -> URL: ...
    @property
    def match_info(self) -> Mapping[str, str]: ...


class Adapter(Protocol):
    route: str
    reads_body: bool  # False: the request body streams through unread

    def call(self, request: AgentRequest, body: bytes) -> Call:
        """Map the request; ``MappingError`` if it cannot be mapped (then it is refused)."""

    def refusal(self, verdict: Verdict, call: Call | None, status: int) -> web.Response:
        """The refusal in the agent's protocol, carrying reason code and decision id."""


def dump_json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def model_call(
    body: bytes, document: dict[str, Any], action: pdp_pb2.Action, fields: tuple[str, ...]
) -> Call:
    """A model request: streamed or not, usage read, its token cap written where it lowers.

    ``fields`` are every body field that bounds the completion.
    """
    return Call(
        action=action,
        body=body,
        streaming=document.get("stream") is True,
        reads_usage=True,
        apply_obligations=token_capper(body, document, fields),
    )


def token_capper(
    raw: bytes, document: dict[str, Any], fields: tuple[str, ...]
) -> Callable[[dict[str, Any]], bytes]:
    """Write the decision's ``max_tokens`` cap into every token field that asks for more, or
    for no cap (0, null); into the first field if the request sets none. The rest of the body
    goes byte for byte as sent; a request within the cap goes exactly as sent."""

    def apply(obligations: dict[str, Any]) -> bytes:
        cap = obligations.get("max_tokens")
        if not isinstance(cap, int) or not fields:
            return raw  # no cap: a shadow run forwarding what enforcing would refuse
        present = [name for name in fields if name in document]
        writes = {
            name: cap for name in present if document[name] in (None, 0) or document[name] > cap
        }
        if not present:
            writes = {fields[0]: cap}
        return write_fields(raw, writes) if writes else raw

    return apply
