"""Plumbing shared by the aiohttp fakes: recording, vendor error shapes, SSE, fake tokens."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web

from tests.fakes.recorder import Recorder

UPSTREAM_HEADER = "x-fake-upstream"

# A pause between SSE events so that a proxy which buffers a whole stream before forwarding it
# is observable: chunks then arrive at the client bunched together instead of spread out.
STREAM_PAUSE_SECONDS = 0.005

# How many "tokens" a reply has when nothing caps it. Each reply piece counts as one token, so
# usage figures are exact and a capped request yields a visibly shorter answer.
FULL_REPLY_TOKENS = 7

ECHO_LIMIT = 40

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# One server-sent event: its `event:` name (None for none) and its `data:` (JSON or raw text).
SseEvent = tuple[str | None, dict[str, Any] | str]


class FakeApiError(Exception):
    """An error to be rendered in the vendor's own JSON error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code


ErrorRenderer = Callable[[FakeApiError], dict[str, Any]]

_STATUS_KINDS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
}


def new_id(prefix: str, nbytes: int = 12) -> str:
    return f"{prefix}{secrets.token_hex(nbytes)}"


def fake_app(upstream: str, recorder: Recorder, render_error: ErrorRenderer) -> web.Application:
    """An aiohttp app that records every request and answers errors in the vendor's shape."""

    @web.middleware
    async def record_and_render(request: web.Request, handler: Handler) -> web.StreamResponse:
        # aiohttp caches the body, so handlers can still read it after this.
        raw = await request.read()
        recorder.record(
            upstream=upstream,
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=request.headers.items(),
            raw_body=raw,
        )
        try:
            return await handler(request)
        except FakeApiError as err:
            return web.json_response(render_error(err), status=err.status)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = f"{exc.reason}: {request.method} {request.path}"
            kind = _STATUS_KINDS.get(exc.status, "api_error")
            error = FakeApiError(exc.status, message, kind=kind)
            return web.json_response(render_error(error), status=exc.status)

    async def tag_response(_request: web.Request, response: web.StreamResponse) -> None:
        # A signal rather than the middleware: streamed responses send their headers before the
        # handler returns, so only on_response_prepare reaches them in time.
        response.headers[UPSTREAM_HEADER] = upstream

    app = web.Application(middlewares=[record_and_render])
    app.on_response_prepare.append(tag_response)
    return app


async def json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else None
    except (UnicodeDecodeError, ValueError) as exc:
        raise FakeApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly.)",
        ) from exc
    if not isinstance(body, dict):
        raise FakeApiError(400, "The request body must be a JSON object.")
    return body


def optional_positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FakeApiError(
            400,
            f"Invalid type for '{name}': expected an integer, but got {type(value).__name__}.",
            param=name,
            code="invalid_type",
        )
    if value < 1:
        raise FakeApiError(
            400,
            f"Invalid '{name}': integer below minimum value. Expected a value >= 1, "
            f"but got {value} instead.",
            param=name,
            code="integer_below_min_value",
        )
    return value


def text_of(content: Any) -> str:
    """Plain text of a message's content, in any of the vendors' shapes (string or parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
        return " ".join(texts)
    return ""


def count_tokens(*texts: str) -> int:
    """A crude but deterministic token count: whitespace-separated words, at least one."""
    return max(1, sum(len(t.split()) for t in texts))


def reply_pieces(vendor: str, said: str, limit: int | None) -> list[str]:
    """The reply, one token per piece, cut to `limit` tokens when the request capped it."""
    said = " ".join(said.split())
    excerpt = said if len(said) <= ECHO_LIMIT else said[: ECHO_LIMIT - 1] + "…"
    pieces = ["Hello", " from", " the", " fake", f" {vendor}.", " You said:", f" {excerpt or '-'}"]
    assert len(pieces) == FULL_REPLY_TOKENS
    return pieces if limit is None else pieces[:limit]


def truncated(pieces: list[str]) -> bool:
    return len(pieces) < FULL_REPLY_TOKENS


async def stream_sse(
    request: web.Request, events: Iterable[SseEvent], headers: dict[str, str]
) -> web.StreamResponse:
    """Send `events` as server-sent events, one write (and one short pause) per event."""
    response = web.StreamResponse(
        status=200,
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        | headers,
    )
    await response.prepare(request)
    # Clients and proxies hang up mid-stream routinely (e.g. a sidecar cutting a stream short);
    # the real APIs just stop sending, and aiohttp would log a traceback per write otherwise.
    with contextlib.suppress(ConnectionResetError):
        for name, data in events:
            payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
            frame = (f"event: {name}\n" if name else "") + f"data: {payload}\n\n"
            await response.write(frame.encode())
            await asyncio.sleep(STREAM_PAUSE_SECONDS)
        await response.write_eof()
    return response
