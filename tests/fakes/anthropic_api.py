"""A fake Anthropic Messages API (`POST /v1/messages`), streamed or not.

The `anthropic` SDK ignores SSE events without an `event:` line, so every event carries both
`event:` and a `data:` payload whose `type` repeats it. As on the real API, `max_tokens` and the
`anthropic-version` header are required, and a reply cut by `max_tokens` ends with
`stop_reason: "max_tokens"`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tests.fakes._support import (
    FakeApiError,
    SseEvent,
    count_tokens,
    fake_app,
    json_object,
    new_id,
    optional_positive_int,
    reply_pieces,
    stream_sse,
    text_of,
    truncated,
)
from tests.fakes.recorder import Recorder

UPSTREAM = "anthropic"
VENDOR = "Anthropic"
_API_KEY = web.AppKey("api_key", str)


def render_error(err: FakeApiError) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": err.kind, "message": err.message},
        "request_id": new_id("req_"),
    }


def anthropic_app(recorder: Recorder, *, api_key: str | None = None) -> web.Application:
    """The fake; with `api_key` set, requests must carry it (x-api-key or bearer token)."""
    app = fake_app(UPSTREAM, recorder, render_error)
    if api_key is not None:
        app[_API_KEY] = api_key
    app.router.add_post("/v1/messages", messages)
    return app


def _check_headers(request: web.Request) -> None:
    expected = request.app.get(_API_KEY)
    # The anthropic 2.x SDK sends its api_key as `Authorization: Bearer`, older clients and curl
    # examples as `x-api-key`; the real API takes either.
    presented = {
        request.headers.get("x-api-key"),
        request.headers.get("Authorization", "").removeprefix("Bearer "),
    }
    if expected is not None and expected not in presented:
        raise FakeApiError(401, "invalid x-api-key", kind="authentication_error")
    if not request.headers.get("anthropic-version"):
        raise FakeApiError(400, "anthropic-version: header is required")


def _validate(body: dict[str, Any]) -> tuple[str, int, list[Any]]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise FakeApiError(400, "model: Field required")
    if body.get("max_tokens") is None:
        raise FakeApiError(400, "max_tokens: Field required")
    try:
        max_tokens = optional_positive_int(body, "max_tokens")
    except FakeApiError as err:
        raise FakeApiError(400, f"max_tokens: {err.message}") from err
    assert max_tokens is not None
    conversation = body.get("messages")
    if not isinstance(conversation, list) or not conversation:
        raise FakeApiError(400, "messages: at least one message is required")
    return model, max_tokens, conversation


async def messages(request: web.Request) -> web.StreamResponse:
    _check_headers(request)
    body = await json_object(request)
    model, max_tokens, conversation = _validate(body)
    stream = body.get("stream") is True

    texts = [text_of(m.get("content")) for m in conversation if isinstance(m, dict)]
    texts.append(text_of(body.get("system")))
    said = next(
        (
            text_of(m.get("content"))
            for m in reversed(conversation)
            if isinstance(m, dict) and m.get("role") == "user"
        ),
        "",
    )
    pieces = reply_pieces(VENDOR, said, max_tokens)
    stop_reason = "max_tokens" if truncated(pieces) else "end_turn"
    input_tokens = count_tokens(*texts)
    headers = {"request-id": new_id("req_")}
    message_id = new_id("msg_01", 11)

    def message(
        content: list[dict[str, Any]], output_tokens: int, stop: str | None
    ) -> dict[str, Any]:
        return {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "service_tier": "standard",
            },
        }

    if not stream:
        full = message([{"type": "text", "text": "".join(pieces)}], len(pieces), stop_reason)
        return web.json_response(full, headers=headers)

    steps: list[tuple[str, dict[str, Any]]] = [
        # Anthropic reports one output token at message_start; message_delta has the final count.
        ("message_start", {"message": message([], 1, None)}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {}),
        *[
            ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})
            for piece in pieces
        ],
        ("content_block_stop", {"index": 0}),
        (
            "message_delta",
            {
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": len(pieces)},
            },
        ),
        ("message_stop", {}),
    ]
    events: list[SseEvent] = [(name, {"type": name, **fields}) for name, fields in steps]
    return await stream_sse(request, events, headers)
