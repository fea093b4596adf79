"""MCP over streamable HTTP (JSON-RPC): ``tools/call`` decided, tool lists filtered.

- ``tools/call``: decided on the tool name and its arguments as sent.
- Tool lists: every answer, to any POST and on every GET stream (resumed or not), is
  read as the client will read it (content coding, charset, BOM; one JSON body or an
  SSE stream), and every message in it that holds a tool list (a result with ``tools``,
  whatever its id) is filtered: each listed tool is probed with the same policy (the
  target judged without arguments) and only allowed tools are shown. Anything the
  sidecar cannot read that way is refused, never passed through: an unfiltered list
  must not leak on one undecodable line, coding or stream.
- ``initialize``, ``ping``, notifications, GET/DELETE and the client's answers to server
  requests are forwarded undecided; any other method is refused (default deny).
- Session headers (``mcp-session-id``) pass through untouched both ways.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import replace
from typing import Any

from aiohttp import ClientResponse, web
from multidict import CIMultiDict

from pdp.api import ReasonCode
from pdp.api.mapping import mcp_list_probe, mcp_tool_action
from pdp.api.reasons import MappingError
from pep.adapters.base import Call, Probe, dump_json, parse_json_object
from pep.forward import response_headers
from pep.pdp_client import Verdict
from pep.reading import BodyDecoder, Unreadable, media_type
from pep.sse import SseEvent, SseParser, render_event

__all__ = ["AnswerFilter", "McpAdapter"]

log = logging.getLogger("abc.pep")

PASS_THROUGH = frozenset({"initialize", "ping"})
REFUSED = -32001  # JSON-RPC server-defined error: refused by policy
MAX_ANSWER_BYTES = 8 * 1024 * 1024  # one JSON answer (an SSE stream: per event)


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


class AnswerFilter:
    """Reads one MCP answer as the client will, and relays only what it read.

    Every answer goes through here: to any POST (``tools/list``, an allowed ``tools/call``,
    ``initialize``...) and every GET stream, resumed (``Last-Event-ID``) or not, because a
    server may put a tool list in any of them. The body is decoded as the client would
    (``pep.reading``: content coding, charset, BOM) and each message in it is parsed; one
    that holds a tool list (a result object with ``tools``) is filtered by the per-tool
    decision, any other goes on as the text it was. Anything unreadable is refused: before
    the headers, as a JSON-RPC error; in a stream already started, by ending the stream
    (with a JSON-RPC error under the request's id when there is one), never raw.
    """

    def __init__(self, server: str, request_id: Any) -> None:
        self.server, self.request_id = server, request_id

    async def __call__(
        self, request: web.Request, upstream: ClientResponse, probe: Probe
    ) -> web.StreamResponse:
        headers = response_headers(upstream)
        headers.popall("Content-Encoding", None)  # what goes out is what the sidecar decoded
        try:
            kind, _ = media_type(upstream.headers)
            decoder = BodyDecoder.for_response(upstream.headers)
        except Unreadable as exc:
            return self._refused(upstream.status, headers, exc)
        if kind == "text/event-stream":
            return await self._stream(request, upstream, decoder, probe, headers)
        return await self._whole(upstream, decoder, probe, headers)

    async def _whole(
        self,
        upstream: ClientResponse,
        decoder: BodyDecoder,
        probe: Probe,
        headers: CIMultiDict[str],
    ) -> web.Response:
        try:
            answer = await self.whole(upstream.content.iter_any(), decoder, probe)
        except (ValueError, RecursionError, _Unavailable) as exc:
            return self._refused(upstream.status, headers, exc)
        if not answer:  # 202 to a notification, an empty error: no message to read
            return web.Response(status=upstream.status, headers=headers)
        headers["Content-Type"] = "application/json"
        return web.Response(status=upstream.status, headers=headers, body=answer.encode())

    async def _stream(
        self,
        request: web.Request,
        upstream: ClientResponse,
        decoder: BodyDecoder,
        probe: Probe,
        headers: CIMultiDict[str],
    ) -> web.StreamResponse:
        headers["Content-Type"] = "text/event-stream; charset=utf-8"
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        try:
            try:
                async for event in self.events(upstream.content.iter_any(), decoder, probe):
                    await response.write(event)
            except (ValueError, RecursionError, _Unavailable) as exc:
                await self._end_refused(response, exc)
            await response.write_eof()
        except ConnectionResetError:
            # The client hung up (the SDK closes an answer once it has its response): not
            # an upstream failure and not an error; leaving closes the upstream too.
            pass
        return response

    async def events(
        self, chunks: AsyncIterable[bytes], decoder: BodyDecoder, probe: Probe
    ) -> AsyncIterator[bytes]:
        """Each event of an SSE stream as it may be relayed, in order; raises ``ValueError``
        (``MappingError``), ``RecursionError`` or ``_Unavailable`` where it must be refused."""
        parser = SseParser()
        async for chunk in chunks:
            for text in decoder.feed(chunk):
                for event in parser.feed(text):
                    yield await self._event(event, probe)
        for event in [*parser.feed(decoder.finish()), *parser.finish()]:
            yield await self._event(event, probe)

    async def whole(self, chunks: AsyncIterable[bytes], decoder: BodyDecoder, probe: Probe) -> str:
        """A whole (non-SSE) answer as it may be relayed ("" for none); raises like ``events``."""
        text = await _read_text(chunks, decoder)
        # Whatever the declared type: a client that finds JSON here may read it.
        return await self._judge(text, probe) if text else ""

    async def _event(self, event: SseEvent, probe: Probe) -> bytes:
        if event.data:  # no data, or empty data (a priming event): no message to read
            event = replace(event, data=await self._judge(event.data, probe))
        return render_event(event).encode()

    async def _judge(self, text: str, probe: Probe) -> str:
        """The message as it may be relayed: its own text, or its tool list filtered."""
        try:
            message = parse_json_object(text.encode())  # a batch (JSON array) is refused
        except MappingError as exc:
            raise MappingError(f"an MCP message that cannot be read: {exc}") from exc
        result = message.get("result")
        if not isinstance(result, dict) or "tools" not in result:
            return text  # parsed, holds no tool list: its own text, so nothing is reread
        # Any answer that lists tools is filtered, whatever id or stream carries it.
        tools = result.get("tools")
        if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools
        ):
            raise MappingError("a result holds no well-formed tool list")
        verdicts = await asyncio.gather(
            *(probe(mcp_list_probe(self.server, tool["name"])) for tool in tools)
        )
        for verdict in verdicts:
            if verdict.reason is ReasonCode.PDP_UNAVAILABLE:
                raise _Unavailable(verdict)
        allowed = [tool for tool, verdict in zip(tools, verdicts, strict=True) if verdict.allow]
        try:
            return dump_json({**message, "result": {**result, "tools": allowed}}).decode()
        except (ValueError, RecursionError) as exc:
            raise MappingError("the filtered tool list cannot be written") from exc

    def _refusal(self, exc: Exception) -> dict[str, Any]:
        verdict = (
            exc.verdict
            if isinstance(exc, _Unavailable)
            else Verdict.refuse(ReasonCode.BAD_REQUEST, f"the answer could not be read: {exc}")
        )
        log.info("refused an mcp answer: %s (%s)", verdict.reason, verdict.decision_id)
        return jsonrpc_error(self.request_id, verdict)

    def _refused(self, status: int, headers: CIMultiDict[str], exc: Exception) -> web.Response:
        refusal = self._refusal(exc)
        headers["Content-Type"] = "application/json"
        headers["x-abc-decision-id"] = refusal["error"]["data"]["decision_id"]
        headers["x-abc-reason"] = refusal["error"]["data"]["reason"]
        return web.Response(status=status, headers=headers, body=dump_json(refusal))

    async def _end_refused(self, response: web.StreamResponse, exc: Exception) -> None:
        refusal = self._refusal(exc)
        if self.request_id is not None:  # a GET stream answers no request: it just ends
            error = render_event(SseEvent(data=dump_json(refusal).decode(), event="message"))
            await response.write(error.encode())


async def _read_text(chunks: AsyncIterable[bytes], decoder: BodyDecoder) -> str:
    """The whole body decoded; ``MappingError`` over the size limit (raw or decoded)."""
    raw = decoded = 0
    parts: list[str] = []
    async for chunk in chunks:
        raw += len(chunk)
        for text in decoder.feed(chunk):
            decoded += len(text)
            parts.append(text)
        if raw > MAX_ANSWER_BYTES or decoded > MAX_ANSWER_BYTES:
            raise MappingError("answer over the size limit")
    parts.append(decoder.finish())
    return "".join(parts)


class _Unavailable(Exception):
    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.message)
        self.verdict = verdict


def _plain_id(value: Any) -> bool:
    """Ids that survive every JSON parser unchanged, so an answer cannot dodge the filter."""
    if isinstance(value, str):
        return True
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53


def _passed(server: str, body: bytes, request_id: Any, *, answer_id: Any) -> Call:
    """Forwarded undecided; its answer is still read and filtered like every other."""
    return Call(
        action=None, body=body, jsonrpc_id=request_id, respond=AnswerFilter(server, answer_id)
    )


class McpAdapter:
    route = "mcp"
    reads_body = True

    def call(self, request: web.Request, body: bytes) -> Call:
        server = request.match_info["server"]
        if request.method in ("GET", "DELETE"):
            # The server's event stream (new or resumed), and ending a session: no message to
            # decide, but the answer is read like any other (a server may replay a list there).
            if body:
                raise MappingError(f"an MCP {request.method} carries no body")
            return Call(action=None, body=body, respond=AnswerFilter(server, None))
        if request.method != "POST":
            raise MappingError(f"MCP over HTTP has no {request.method}")
        message = parse_json_object(body)  # a batch (JSON array) is refused here
        method, request_id = message.get("method"), message.get("id")
        if "method" not in message:
            # Only the client's answer to a server request passes without a method.
            if "id" not in message or ("result" in message) == ("error" in message):
                raise _Refused(request_id, "a message without a method must be a response")
            # Its id is the server's: nothing the client waits on, so no id for a refusal.
            return _passed(server, body, request_id, answer_id=None)
        if not isinstance(method, str):
            raise _Refused(request_id, "method must be a string")
        if method.startswith("notifications/"):
            if "id" in message:
                raise _Refused(request_id, "a notification carries no id")
            return _passed(server, body, None, answer_id=None)
        if not _plain_id(request_id):
            raise _Refused(None, "a request id must be a string or an integer below 2^53")
        if method in PASS_THROUGH:
            return _passed(server, body, request_id, answer_id=request_id)
        if method == "tools/call":
            try:
                action = mcp_tool_action(server, message.get("params"))
            except MappingError as exc:
                raise _Refused(request_id, str(exc)) from exc
            return Call(
                action=action,
                body=body,
                jsonrpc_id=request_id,
                respond=AnswerFilter(server, request_id),
            )
        if method == "tools/list":
            return Call(
                action=None,
                body=body,
                jsonrpc_id=request_id,
                respond=AnswerFilter(server, request_id),
                lists_tools=True,
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
