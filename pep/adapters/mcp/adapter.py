"""MCP over streamable HTTP (JSON-RPC), both revisions on one route: what is decided.

- ``tools/call``: decided on the tool name and its arguments as sent, in either revision;
  a 2026-07-28 retry carrying ``inputResponses`` / ``requestState`` (after an
  ``InputRequiredResult``) is the same tool call sent again, so it is decided again.
  ``resources/read`` and ``resources/subscribe`` are decided on the URI, ``prompts/get``
  on the prompt name, ``completion/complete`` on what it completes (a prompt, a resource
  template), a 2026-07-28 ``subscriptions/listen`` on the resource it subscribes to.
- Tool, resource, resource template and prompt lists (and any other answer holding one):
  filtered (``answers``).
- ``initialize``, ``server/discover``, ``ping``, ``logging/setLevel``,
  ``resources/unsubscribe``, notifications, GET/DELETE and the client's answers to server
  requests are forwarded undecided (their answers still filtered): none grants a
  capability. Any other method (the 2025-11-25 ``tasks/*`` among them) is refused
  (default deny). The table per revision is in the README (MCP section).
- Routing headers must say what the body says (``envelope``); session headers
  (``Mcp-Session-Id``) pass through untouched both ways.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from pdp.api import pdp_pb2
from pdp.api.mapping import (
    mcp_completion_action,
    mcp_listen_action,
    mcp_prompt_action,
    mcp_resource_action,
    mcp_tool_action,
)
from pdp.api.reasons import MappingError
from pep.adapters.base import AgentRequest, Call, parse_json_object
from pep.adapters.mcp.answers import AnswerFilter
from pep.adapters.mcp.envelope import (
    MODERN_VERSIONS,
    HeaderMismatch,
    ParamHeaders,
    UnsupportedVersion,
    check_headers,
    request_revision,
)
from pep.adapters.mcp.refusals import (
    HEADER_MISMATCH,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    UNSUPPORTED_VERSION,
    McpRequest,
    refusal_message,
)
from pep.pdp_client import Verdict

__all__ = ["McpAdapter"]

# Forwarded undecided: the handshake, discovery and liveness carry no capability; a log
# level or an unsubscribe only changes what the server sends of its own accord.
PASS_THROUGH = frozenset(
    {"initialize", "server/discover", "ping", "logging/setLevel", "resources/unsubscribe"}
)
# Decided: each names one capability (a tool and its arguments, a resource URI, a prompt);
# None from the mapping: this request names none (a listen for list changes only).
DECIDED: dict[str, Callable[[str, Any], pdp_pb2.Action | None]] = {
    "tools/call": mcp_tool_action,
    "resources/read": mcp_resource_action,
    "resources/subscribe": mcp_resource_action,
    "prompts/get": mcp_prompt_action,
    "completion/complete": mcp_completion_action,
    "subscriptions/listen": mcp_listen_action,
}
# Forwarded, their answers filtered entry by entry (every page: each is an answer).
LISTS = frozenset({"tools/list", "resources/list", "resources/templates/list", "prompts/list"})


def _plain_id(value: Any) -> bool:
    """Ids that survive every JSON parser unchanged, so an answer cannot dodge the filter."""
    if isinstance(value, str):
        return True
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53


class _Refused(MappingError):
    """A JSON-RPC request refused before any decision, under the request's own id."""

    def __init__(self, request: McpRequest, message: str) -> None:
        super().__init__(message)
        self.mcp = request


class McpAdapter:
    route = "mcp"
    reads_body = True

    def __init__(self) -> None:
        self.schemas = ParamHeaders()

    def _passed(self, server: str, body: bytes, request: McpRequest | None) -> Call:
        """Forwarded undecided; its answer is still read and filtered like every other."""
        answer_id = request.id if request else None
        return Call(action=None, body=body, mcp=request, respond=self._filter(server, answer_id))

    def _filter(self, server: str, answer_id: Any) -> AnswerFilter:
        return AnswerFilter(server, answer_id, self.schemas)

    def call(self, request: AgentRequest, body: bytes) -> Call:
        server = request.match_info["server"]
        if request.method in ("GET", "DELETE"):
            # The server's event stream (new or resumed), and ending a session: no message to
            # decide, but the answer is read like any other (a server may replay a list there).
            if body:
                raise MappingError(f"an MCP {request.method} carries no body")
            return self._passed(server, body, None)
        if request.method != "POST":
            raise MappingError(f"MCP over HTTP has no {request.method}")
        return self.message(server, body, request.headers.items())

    def message(self, server: str, body: bytes, headers: Iterable[tuple[str, str]] | None) -> Call:
        """One JSON-RPC message from the client; ``headers`` None: a transport without
        headers (stdio), where there is nothing to agree with the body."""
        message = parse_json_object(body)  # a batch (JSON array) is refused here
        method, request_id = message.get("method"), message.get("id")
        if "method" not in message:
            # Only the client's answer to a server request passes without a method.
            if "id" not in message or ("result" in message) == ("error" in message):
                raise _Refused(
                    McpRequest(request_id, code=INVALID_REQUEST),
                    "a message without a method must be a response",
                )
            # Its id is the server's: nothing the client waits on, so no id for a refusal.
            return self._passed(server, body, None)
        if not isinstance(method, str):
            raise _Refused(McpRequest(request_id, code=INVALID_REQUEST), "method must be a string")
        notification = method.startswith("notifications/")
        if notification and "id" in message:
            raise _Refused(McpRequest(request_id, code=INVALID_REQUEST), "a notification has no id")
        if not notification and not _plain_id(request_id):
            raise _Refused(
                McpRequest(None, code=INVALID_REQUEST),
                "a request id must be a string or an integer below 2^53",
            )
        rpc = McpRequest(None if notification else request_id, method)
        try:
            revision = request_revision(message)
            rpc = McpRequest(rpc.id, method, modern=revision is not None)
            if headers is not None:
                check_headers(headers, message, revision, self.schemas, server)
        except UnsupportedVersion as exc:
            data = {"supported": list(MODERN_VERSIONS), "requested": _requested(message)}
            raise _Refused(
                McpRequest(rpc.id, method, code=UNSUPPORTED_VERSION, data=data), str(exc)
            ) from exc
        except HeaderMismatch as exc:
            raise _Refused(McpRequest(rpc.id, method, code=HEADER_MISMATCH), str(exc)) from exc
        if notification:
            return self._passed(server, body, None)
        if method in PASS_THROUGH:
            return self._passed(server, body, rpc)
        decided = DECIDED.get(method)
        if decided is not None:
            try:
                action = decided(server, message.get("params"))
            except MappingError as exc:
                refused = McpRequest(rpc.id, method, rpc.modern, code=INVALID_PARAMS)
                raise _Refused(refused, str(exc)) from exc
            if action is None:
                return self._passed(server, body, rpc)
            return Call(action=action, body=body, mcp=rpc, respond=self._filter(server, rpc.id))
        if method in LISTS:
            return Call(
                action=None,
                body=body,
                mcp=rpc,
                respond=self._filter(server, rpc.id),
                lists_tools=True,
            )
        raise _Refused(
            McpRequest(rpc.id, method, rpc.modern, code=METHOD_NOT_FOUND),
            f"MCP method {method!r} is not governed",
        )

    def refusal(self, verdict: Verdict, call: Call | None, status: int) -> web.Response:
        request = call.mcp if call is not None and call.mcp is not None else McpRequest(None)
        message = refusal_message(verdict, request)
        return web.json_response(
            message,
            # A refusal of a request is a JSON-RPC message in a 200 answer, so MCP clients
            # read it as the answer to their request; only a body that is no JSON-RPC
            # request keeps its 4xx.
            status=200 if request.id is not None else status,
            headers={
                "x-abc-decision-id": verdict.decision_id,
                "x-abc-reason": verdict.reason.value if verdict.reason else "bad_request",
            },
        )


def _requested(message: dict[str, Any]) -> str:
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    version = meta.get("io.modelcontextprotocol/protocolVersion") if meta else None
    return version if isinstance(version, str) else repr(version)
