"""A fake OpenAI API: chat completions, the Responses API and the model list, streamed or not.

Wire formats follow what the official `openai` SDK parses: chat streams are bare `data:` lines
ending in `data: [DONE]`; Responses streams carry `event:` lines plus a `type` in every payload.
A request capped below the full reply gets a shorter answer and says so the way OpenAI does
(`finish_reason: "length"`, or `status: "incomplete"` for the Responses API).
"""

from __future__ import annotations

import time
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

UPSTREAM = "openai"
VENDOR = "OpenAI"
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "o4-mini")
_API_KEY = web.AppKey("api_key", str)


def render_error(err: FakeApiError) -> dict[str, Any]:
    return {
        "error": {
            "message": err.message,
            "type": err.kind,
            "param": err.param,
            "code": err.code,
        }
    }


def openai_app(recorder: Recorder, *, api_key: str | None = None) -> web.Application:
    """The fake; with `api_key` set, requests must carry `Authorization: Bearer <api_key>`."""
    app = fake_app(UPSTREAM, recorder, render_error)
    if api_key is not None:
        app[_API_KEY] = api_key
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", retrieve_model)
    return app


def _response_headers() -> dict[str, str]:
    return {"x-request-id": new_id("req_"), "openai-processing-ms": "1"}


def _check_auth(request: web.Request) -> None:
    expected = request.app.get(_API_KEY)
    if expected is None:
        return
    presented = request.headers.get("Authorization", "")
    if not presented.startswith("Bearer "):
        raise FakeApiError(
            401,
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )
    if presented.removeprefix("Bearer ") != expected:
        raise FakeApiError(
            401, "Incorrect API key provided.", code="invalid_api_key", kind="invalid_request_error"
        )


def _require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise FakeApiError(400, "you must provide a model parameter", param="model")
    return model


def _stream_flag(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise FakeApiError(
            400,
            "Invalid type for 'stream': expected a boolean.",
            param="stream",
            code="invalid_type",
        )
    return stream


def _token_cap(body: dict[str, Any], *names: str) -> int | None:
    caps = [cap for name in names if (cap := optional_positive_int(body, name)) is not None]
    return min(caps) if caps else None


# --- chat completions ---------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    _check_auth(request)
    body = await json_object(request)
    model = _require_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise FakeApiError(
            400,
            "Missing required parameter: 'messages'."
            if messages is None
            else "Invalid 'messages': empty array. Expected an array with minimum length 1.",
            param="messages",
            code="missing_required_parameter" if messages is None else "empty_array",
        )
    stream = _stream_flag(body)
    cap = _token_cap(body, "max_tokens", "max_completion_tokens")

    texts = [text_of(m.get("content")) for m in messages if isinstance(m, dict)]
    said = next(
        (
            text_of(m.get("content"))
            for m in reversed(messages)
            if isinstance(m, dict) and m.get("role") == "user"
        ),
        "",
    )
    pieces = reply_pieces(VENDOR, said, cap)
    finish_reason = "length" if truncated(pieces) else "stop"
    usage = _chat_usage(count_tokens(*texts), len(pieces))
    common = {
        "id": new_id("chatcmpl-"),
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_fake",
        "service_tier": "default",
    }

    if not stream:
        completion = {
            **common,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "".join(pieces),
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage,
        }
        return web.json_response(completion, headers=_response_headers())

    stream_options = body.get("stream_options")
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    chunk_base = {**common, "object": "chat.completion.chunk"}
    # With include_usage OpenAI puts "usage": null on every chunk but the last one.
    if include_usage:
        chunk_base["usage"] = None

    def chunk(delta: dict[str, Any], finish: str | None = None) -> SseEvent:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return None, {**chunk_base, "choices": [choice]}

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": piece}) for piece in pieces]
    events.append(chunk({}, finish_reason))
    if include_usage:
        events.append((None, {**chunk_base, "choices": [], "usage": usage}))
    events.append((None, "[DONE]"))
    return await stream_sse(request, events, _response_headers())


def _chat_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


# --- Responses API ------------------------------------------------------------------------


def _responses_input(body: dict[str, Any]) -> tuple[list[str], str]:
    """All input texts (for usage) and the last user text (to echo)."""
    raw = body.get("input")
    if isinstance(raw, str):
        return [raw], raw
    if not isinstance(raw, list) or not raw:
        raise FakeApiError(
            400,
            "Missing required parameter: 'input'.",
            param="input",
            code="missing_required_parameter",
        )
    texts: list[str] = []
    said = ""
    for item in raw:
        if not isinstance(item, dict):
            continue
        text = text_of(item.get("content"))
        texts.append(text)
        if item.get("role") == "user":
            said = text
    return texts, said


async def responses(request: web.Request) -> web.StreamResponse:
    _check_auth(request)
    body = await json_object(request)
    model = _require_model(body)
    texts, said = _responses_input(body)
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        texts.append(instructions)
    stream = _stream_flag(body)
    cap = _token_cap(body, "max_output_tokens")

    pieces = reply_pieces(VENDOR, said, cap)
    text = "".join(pieces)
    input_tokens, output_tokens = count_tokens(*texts), len(pieces)
    incomplete = truncated(pieces)
    response_id, message_id = new_id("resp_", 24), new_id("msg_", 24)
    created = int(time.time())

    def envelope(status: str, output: list[dict[str, Any]], usage: Any) -> dict[str, Any]:
        return {
            "id": response_id,
            "object": "response",
            "created_at": created,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": instructions if isinstance(instructions, str) else None,
            "max_output_tokens": cap,
            "model": model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools", []),
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": body.get("metadata") or {},
        }

    def part(content: str) -> dict[str, Any]:
        return {"type": "output_text", "text": content, "annotations": [], "logprobs": []}

    def message(status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": message_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    final_status = "incomplete" if incomplete else "completed"
    usage = {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }
    final_message = message(final_status, [part(text)])
    final = envelope(final_status, [final_message], usage)

    if not stream:
        return web.json_response(final, headers=_response_headers())

    where = {"item_id": message_id, "output_index": 0, "content_index": 0}
    in_progress = envelope("in_progress", [], None)
    steps: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": in_progress}),
        ("response.in_progress", {"response": in_progress}),
        ("response.output_item.added", {"output_index": 0, "item": message("in_progress", [])}),
        ("response.content_part.added", {**where, "part": part("")}),
        *[
            ("response.output_text.delta", {**where, "delta": piece, "logprobs": []})
            for piece in pieces
        ],
        ("response.output_text.done", {**where, "text": text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": part(text)}),
        ("response.output_item.done", {"output_index": 0, "item": final_message}),
        (f"response.{final_status}", {"response": final}),
    ]
    events: list[SseEvent] = [
        (name, {"type": name, "sequence_number": number, **fields})
        for number, (name, fields) in enumerate(steps)
    ]
    return await stream_sse(request, events, _response_headers())


# --- models -------------------------------------------------------------------------------


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 1_715_367_049, "owned_by": "system"}


async def list_models(request: web.Request) -> web.StreamResponse:
    _check_auth(request)
    return web.json_response(
        {"object": "list", "data": [_model(m) for m in MODELS]}, headers=_response_headers()
    )


async def retrieve_model(request: web.Request) -> web.StreamResponse:
    _check_auth(request)
    model_id = request.match_info["model"]
    if model_id not in MODELS:
        raise FakeApiError(
            404,
            f"The model '{model_id}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    return web.json_response(_model(model_id), headers=_response_headers())
