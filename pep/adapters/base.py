"""The shape every protocol adapter shares: request → ``Call`` (the action), verdict → refusal.

``pep/proxy.py`` runs the loop once for all of them: request in → action → decision →
forward or refuse. An adapter never talks to the PDP or the upstream itself, except the
MCP answer filter (tool lists), which gets a probe function from the loop.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import ClientResponse, web

from pdp.api import pdp_pb2
from pdp.api.actions import MappingError, cap_to_write, parse_json_object
from pdp.api.reasons import refusal_status
from pep.pdp_client import Verdict

__all__ = [
    "Adapter",
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
    jsonrpc_id: Any = None
    # An MCP tools/list: its answer is filtered by decisions, so it counts as allowed.
    lists_tools: bool = False


class Adapter(Protocol):
    route: str
    reads_body: bool  # False: the request body streams through unread

    def call(self, request: web.Request, body: bytes) -> Call:
        """Map the request; ``MappingError`` if it cannot be mapped (then it is refused)."""

    def refusal(self, verdict: Verdict, call: Call | None, status: int) -> web.Response:
        """The refusal in the agent's protocol, carrying reason code and decision id."""


def dump_json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def model_call(
    body: bytes, document: dict[str, Any], action: pdp_pb2.Action, token_field: str | None
) -> Call:
    """A model request: streamed or not, usage read, its token cap written where it lowers."""
    return Call(
        action=action,
        body=body,
        streaming=document.get("stream") is True,
        reads_usage=True,
        apply_obligations=token_capper(body, document, token_field, action.max_tokens),
    )


def token_capper(
    raw: bytes, document: dict[str, Any], field: str | None, requested: int
) -> Callable[[dict[str, Any]], bytes]:
    """Write the decision's ``max_tokens`` cap into ``field`` when it lowers the request.

    When the request already asks for no more than the cap, the agent's bytes go as sent.
    """

    def apply(obligations: dict[str, Any]) -> bytes:
        cap = cap_to_write(requested, obligations)
        if field is None or cap is None:
            return raw
        return dump_json({**document, field: cap})

    return apply
