"""Every MCP answer read as the client will read it; tool lists in it filtered by decisions.

Every answer, to any POST and on every GET stream (resumed or not), is read as the client
will read it (content coding, charset, BOM; one JSON body or an SSE stream), and every
message in it that holds a tool list (a result with ``tools``, whatever its id or method:
``tools/list`` pages, a ``server/discover`` that lists tools) is filtered: each listed tool
is probed with the same policy (the target judged without arguments) and only allowed tools
are shown. Anything the sidecar cannot read that way is refused, never passed through: an
unfiltered list must not leak on one undecodable line, coding or stream.
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
from pdp.api.mapping import MCP_LISTS, mcp_list_probe
from pdp.api.reasons import MappingError
from pep.adapters.base import Probe, dump_json, parse_json_object
from pep.adapters.mcp.envelope import ParamHeaders
from pep.adapters.mcp.refusals import INTERNAL_ERROR, McpRequest, refusal_message
from pep.forward import response_headers
from pep.pdp_client import Verdict
from pep.reading import BodyDecoder, Unreadable, media_type
from pep.sse import SseEvent, SseParser, render_event

__all__ = ["MAX_ANSWER_BYTES", "AnswerFilter"]

log = logging.getLogger("abc.pep")

MAX_ANSWER_BYTES = 8 * 1024 * 1024  # one JSON answer (an SSE stream: per event)


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

    def __init__(self, server: str, request_id: Any, schemas: ParamHeaders | None = None) -> None:
        self.server, self.request_id = server, request_id
        self.schemas = schemas or ParamHeaders()

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
        return await self.judge(text, probe) if text else ""

    async def _event(self, event: SseEvent, probe: Probe) -> bytes:
        if event.data:  # no data, or empty data (a priming event): no message to read
            event = replace(event, data=await self.judge(event.data, probe))
        return render_event(event).encode()

    async def judge(self, text: str, probe: Probe) -> str:
        """The message as it may be relayed: its own text, or its lists filtered."""
        try:
            message = parse_json_object(text.encode())  # a batch (JSON array) is refused
        except MappingError as exc:
            raise MappingError(f"an MCP message that cannot be read: {exc}") from exc
        result = message.get("result")
        if not isinstance(result, dict) or not any(key in result for key in MCP_LISTS):
            return text  # parsed, holds no list: its own text, so nothing is reread
        # Any answer that lists tools, resources or prompts is filtered, whatever id or
        # stream carries it.
        filtered = dict(result)
        for key, (kind, field) in MCP_LISTS.items():
            if key in result:
                filtered[key] = await self._allowed(result[key], kind, field, probe)
        self.schemas.learn(self.server, filtered.get("tools", []))  # what headers mirror
        try:
            return dump_json({**message, "result": filtered}).decode()
        except (ValueError, RecursionError) as exc:
            raise MappingError("the filtered list cannot be written") from exc

    async def _allowed(self, entries: Any, kind: str, field: str, probe: Probe) -> list[Any]:
        """The entries of one list the same policy allows (each probed by its name or URI)."""
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get(field), str) for e in entries
        ):
            raise MappingError(f"a result holds no well-formed {kind} list")
        verdicts = await asyncio.gather(
            *(probe(mcp_list_probe(self.server, entry[field], kind)) for entry in entries)
        )
        for verdict in verdicts:
            if verdict.reason is ReasonCode.PDP_UNAVAILABLE:
                raise _Unavailable(verdict)
        return [entry for entry, verdict in zip(entries, verdicts, strict=True) if verdict.allow]

    def _refusal(self, exc: Exception) -> dict[str, Any]:
        verdict = (
            exc.verdict
            if isinstance(exc, _Unavailable)
            else Verdict.refuse(ReasonCode.BAD_REQUEST, f"the answer could not be read: {exc}")
        )
        log.info("refused an mcp answer: %s (%s)", verdict.reason, verdict.decision_id)
        # The upstream's answer, not the client's request, is what failed.
        return refusal_message(verdict, McpRequest(self.request_id, code=INTERNAL_ERROR))

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
