"""MCP over streamable HTTP (JSON-RPC): ``tools/call`` decided, ``tools/list`` filtered.

- ``tools/call``: decided on the tool name and its arguments as sent.
- ``tools/list``: forwarded, then each listed tool is probed with the same policy
  (the target judged without arguments); only allowed tools are shown. Both framings
  are handled: one JSON body, or an SSE stream (the official SDK server's default).
  A message the sidecar cannot parse is refused, never passed through: an unfiltered
  list must not leak on one undecodable line.
- ``initialize``, ``ping``, notifications and the client's answers to server requests
  pass through undecided; any other method is refused (default deny).
- Session headers (``mcp-session-id``) pass through untouched both ways.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import ClientResponse, web

from pdp.api import ReasonCode
from pdp.api.actions import MappingError, mcp_list_probe, mcp_tool_action
from pep.adapters.base import Call, Probe, dump_json, parse_json_object
from pep.forward import response_headers
from pep.pdp_client import Verdict
from pep.sse import SseSplitter, event_data

__all__ = ["McpAdapter"]

PASS_THROUGH = frozenset({"initialize", "ping"})
REFUSED = -32001  # JSON-RPC server-defined error: refused by policy
MAX_LIST_BYTES = 8 * 1024 * 1024


def jsonrpc_error(request_id: Any, verdict: Verdict) -> dict[str, Any]:
    code = verdict.reason.value if verdict.reason else "bad_request"
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {
            "code": REFUSED,
            "message": f"{code}: {verdict.message} (decision {verdict.decision_id})",
            "data": {"reason": code, "decision_id": verdict.decision_id},
        },
    }


class _ListFilter:
    """Answers one ``tools/list`` request with only the tools the policy allows."""

    def __init__(self, server: str, request_id: Any) -> None:
        self.server, self.request_id = server, request_id

    async def _filter(self, message: Any, probe: Probe) -> Any:
        """The message with its tool list filtered; raises ``MappingError`` if malformed."""
        if not isinstance(message, dict):
            raise MappingError("a JSON-RPC message must be an object")
        result = message.get("result")
        if not isinstance(result, dict) or "tools" not in result:
            return message  # notifications, errors, other answers: nothing listed
        # Any answer that lists tools is filtered, whatever id it carries.
        tools = result.get("tools")
        if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools
        ):
            raise MappingError("tools/list result holds no well-formed tool list")
        verdicts = await asyncio.gather(
            *(probe(mcp_list_probe(self.server, tool["name"])) for tool in tools)
        )
        for verdict in verdicts:
            if verdict.reason is ReasonCode.PDP_UNAVAILABLE:
                raise _Unavailable(verdict)
        allowed = [tool for tool, verdict in zip(tools, verdicts, strict=True) if verdict.allow]
        return {**message, "result": {**result, "tools": allowed}}

    def _refusal_message(self, exc: Exception) -> dict[str, Any]:
        verdict = (
            exc.verdict
            if isinstance(exc, _Unavailable)
            else Verdict.refuse(ReasonCode.BAD_REQUEST, f"the tool list could not be read: {exc}")
        )
        return jsonrpc_error(self.request_id, verdict)

    async def __call__(
        self, request: web.Request, upstream: ClientResponse, probe: Probe
    ) -> web.StreamResponse:
        content_type = upstream.headers.get("Content-Type", "").split(";")[0].strip().lower()
        headers = response_headers(upstream)
        if content_type == "text/event-stream":
            return await self._sse(request, upstream, probe, headers)
        body = await upstream.content.read(MAX_LIST_BYTES + 1)
        try:
            if len(body) > MAX_LIST_BYTES:
                raise MappingError("tool list over the size limit")
            answer = await self._filter(json.loads(body), probe)
        except (ValueError, _Unavailable) as exc:  # MappingError is a ValueError
            answer = self._refusal_message(exc)
        headers.popall("Content-Encoding", None)
        headers["Content-Type"] = "application/json"
        return web.Response(status=upstream.status, headers=headers, body=dump_json(answer))

    async def _sse(
        self, request: web.Request, upstream: ClientResponse, probe: Probe, headers: Any
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        splitter = SseSplitter()
        async for chunk in upstream.content.iter_any():
            try:
                for raw in splitter.feed(chunk):
                    await response.write(await self._event(raw, probe))
            except (ValueError, _Unavailable) as exc:
                # Headers are sent: end the stream with an error for this request instead.
                error = dump_json(self._refusal_message(exc)).decode()
                await response.write(f"event: message\ndata: {error}\n\n".encode())
                await response.write_eof()
                return response
        if splitter.rest().strip():
            error = dump_json(self._refusal_message(MappingError("truncated event"))).decode()
            await response.write(f"event: message\ndata: {error}\n\n".encode())
        await response.write_eof()
        return response

    async def _event(self, raw: bytes, probe: Probe) -> bytes:
        data = event_data(raw)
        if data is None:
            return raw  # comments, keep-alives, retry hints
        filtered = await self._filter(json.loads(data), probe)
        kept = [
            line
            for line in raw.decode("utf-8").splitlines()
            if line and not line.startswith("data:")
        ]
        return ("\n".join([*kept, f"data: {dump_json(filtered).decode()}"]) + "\n\n").encode()


class _Unavailable(Exception):
    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.message)
        self.verdict = verdict


def _plain_id(value: Any) -> bool:
    """Ids that survive every JSON parser unchanged, so an answer cannot dodge the filter."""
    if isinstance(value, str):
        return True
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53


class McpAdapter:
    route = "mcp"
    reads_body = True

    def call(self, request: web.Request, body: bytes) -> Call:
        if request.method in ("GET", "DELETE"):
            # The server's event stream, and ending a session: no message, nothing to decide.
            if body:
                raise MappingError(f"an MCP {request.method} carries no body")
            return Call(action=None, body=body)
        if request.method != "POST":
            raise MappingError(f"MCP over HTTP has no {request.method}")
        message = parse_json_object(body)  # a batch (JSON array) is refused here
        method, request_id = message.get("method"), message.get("id")
        server = request.match_info["server"]
        if "method" not in message:
            # Only the client's answer to a server request passes without a method.
            if "id" not in message or ("result" in message) == ("error" in message):
                raise _Refused(request_id, "a message without a method must be a response")
            return Call(action=None, body=body, jsonrpc_id=request_id)
        if not isinstance(method, str):
            raise _Refused(request_id, "method must be a string")
        if method.startswith("notifications/"):
            if "id" in message:
                raise _Refused(request_id, "a notification carries no id")
            return Call(action=None, body=body)
        if not _plain_id(request_id):
            raise _Refused(None, "a request id must be a string or an integer below 2^53")
        if method in PASS_THROUGH:
            return Call(action=None, body=body, jsonrpc_id=request_id)
        if method == "tools/call":
            try:
                action = mcp_tool_action(server, message.get("params"))
            except MappingError as exc:
                raise _Refused(request_id, str(exc)) from exc
            return Call(action=action, body=body, jsonrpc_id=request_id)
        if method == "tools/list":
            return Call(
                action=None,
                body=body,
                jsonrpc_id=request_id,
                respond=_ListFilter(server, request_id),
            )
        raise _Refused(request_id, f"MCP method {method!r} is not governed")

    def refusal(self, verdict: Verdict, call: Call | None, status: int) -> web.Response:
        request_id = call.jsonrpc_id if call is not None else None
        return web.json_response(
            jsonrpc_error(request_id, verdict),
            # Refusing a request is a JSON-RPC error in a 200 answer, so MCP clients raise
            # their normal error; only a body that is no JSON-RPC request keeps its 4xx.
            status=200 if request_id is not None else status,
            headers={
                "x-abc-decision-id": verdict.decision_id,
                "x-abc-reason": verdict.reason.value if verdict.reason else "bad_request",
            },
        )


class _Refused(MappingError):
    """A JSON-RPC request the sidecar cannot map; refused under the request's own id."""

    def __init__(self, request_id: Any, message: str) -> None:
        super().__init__(message)
        self.jsonrpc_id = request_id
