"""The fake upstreams speak the real wire formats: the official SDKs work against them unmodified.

No sidecar here: every client points straight at a fake. Tests that go through the sidecar can
then trust that a failure is the sidecar's, not the fake's.
"""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from mcp import types as mcp_types
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.fakes.http_service import ADMIN_SECRET, INVOICE_AMOUNT_USD_MICROS
from tests.fakes.mcp_server import TOOL_NAMES
from tests.fakes.recorder import Recorder
from tests.fakes.serve import FakeUpstreams

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

OPENAI_KEY = "sk-fake-openai-key"
ANTHROPIC_KEY = "sk-ant-fake-key"
MODEL = "claude-sonnet-5"


@pytest.fixture(scope="module")
def fakes() -> Iterator[FakeUpstreams]:
    with FakeUpstreams(openai_api_key=OPENAI_KEY, anthropic_api_key=ANTHROPIC_KEY) as upstreams:
        yield upstreams


@pytest.fixture
def recorder(fakes: FakeUpstreams) -> Recorder:
    fakes.recorder.clear()
    return fakes.recorder


@pytest.fixture(scope="module")
def oai(fakes: FakeUpstreams) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(api_key=OPENAI_KEY, base_url=fakes.openai_url, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def claude(fakes: FakeUpstreams) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        api_key=ANTHROPIC_KEY, base_url=fakes.anthropic_url, max_retries=0
    ) as client:
        yield client


def http_json(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, _lower(response.headers.items()), json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, _lower(err.headers.items()), json.loads(err.read())


def _lower(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers}


# --- OpenAI -------------------------------------------------------------------------------


def test_openai_chat_completion(oai: openai.OpenAI, recorder: Recorder) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "ping the governance sidecar"},
        ],
    )
    completion = raw.parse()

    assert raw.headers["x-fake-upstream"] == "openai"
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == (
        "Hello from the fake OpenAI. You said: ping the governance sidecar"
    )
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 7
    assert completion.usage.prompt_tokens == 6
    assert completion.usage.total_tokens == 13

    seen = recorder.last("openai", path="/v1/chat/completions")
    assert seen.method == "POST"
    assert seen.header("authorization") == f"Bearer {OPENAI_KEY}"
    assert seen.body["model"] == "gpt-4o-mini"


def test_openai_chat_completion_respects_max_tokens(oai: openai.OpenAI, recorder: Recorder) -> None:
    completion = oai.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )

    assert completion.choices[0].message.content == "Hello from the"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3
    assert recorder.last("openai").body["max_tokens"] == 3

    capped = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=5,
    )
    assert capped.usage is not None
    assert capped.usage.completion_tokens == 5


def test_openai_chat_completion_stream(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the fake OpenAI. You said: stream please"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == 7
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop"

    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 7
    assert last.usage.total_tokens == last.usage.prompt_tokens + 7
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_chat_stream_without_usage_and_capped(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            max_tokens=2,
        )
    )

    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_chat_stream_is_really_streamed(fakes: FakeUpstreams) -> None:
    """Events leave the fake one by one, so a proxy that buffers whole bodies would show."""
    request = urllib.request.Request(
        f"{fakes.openai_url}/chat/completions",
        data=json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
        ).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {OPENAI_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Transfer-Encoding"] == "chunked"
        lines = [line.decode() for line in response]

    events = [line for line in lines if line.strip()]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1].strip() == "data: [DONE]"
    assert len(events) == 1 + 7 + 1 + 1  # role, content pieces, finish, [DONE]


def test_openai_responses(oai: openai.OpenAI, recorder: Recorder) -> None:
    response = oai.responses.create(
        model="gpt-4.1", input="what is policy as code?", instructions="Answer briefly."
    )

    assert response.object == "response"
    assert response.status == "completed"
    assert response.model == "gpt-4.1"
    assert response.output_text == "Hello from the fake OpenAI. You said: what is policy as code?"
    message = response.output[0]
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert response.usage is not None
    assert response.usage.output_tokens == 7
    assert response.usage.input_tokens == 7
    assert response.usage.total_tokens == 14
    assert recorder.last("openai").path == "/v1/responses"


def test_openai_responses_with_message_list_and_cap(oai: openai.OpenAI) -> None:
    response = oai.responses.create(
        model="gpt-4.1",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "first"}]},
            {"role": "user", "content": "second"},
        ],
        max_output_tokens=4,
    )

    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "Hello from the fake"
    assert response.usage is not None
    assert response.usage.output_tokens == 4


def test_openai_responses_stream(oai: openai.OpenAI) -> None:
    events = list(oai.responses.create(model="gpt-4.1", input="stream it", stream=True))

    types = [e.type for e in events]
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    assert "response.output_text.done" in types
    assert [e.sequence_number for e in events] == list(range(len(events)))

    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == 7
    done = next(e for e in events if e.type == "response.output_text.done")
    assert "".join(deltas) == done.text == "Hello from the fake OpenAI. You said: stream it"

    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.status == "completed"
    assert completed.response.output_text == done.text
    assert completed.response.usage is not None
    assert completed.response.usage.output_tokens == 7


def test_openai_responses_stream_helper(oai: openai.OpenAI) -> None:
    """The SDK's accumulating helper needs the full item/part event sequence, not just deltas."""
    with oai.responses.stream(model="gpt-4.1", input="helper") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()

    assert text == final.output_text == "Hello from the fake OpenAI. You said: helper"
    assert final.usage is not None
    assert final.usage.output_tokens == 7


def test_openai_models(oai: openai.OpenAI) -> None:
    models = [m.id for m in oai.models.list()]
    assert "gpt-4o-mini" in models
    assert oai.models.retrieve("gpt-4o").owned_by == "system"


def test_openai_errors_use_openai_shape(oai: openai.OpenAI, fakes: FakeUpstreams) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert bad.value.status_code == 400
    assert bad.value.code == "empty_array"
    assert bad.value.param == "messages"

    with pytest.raises(openai.BadRequestError) as low:
        oai.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], max_tokens=0
        )
    assert low.value.code == "integer_below_min_value"

    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")

    with (
        openai.OpenAI(api_key="wrong", base_url=fakes.openai_url, max_retries=0) as wrong,
        pytest.raises(openai.AuthenticationError) as denied,
    ):
        wrong.models.list()
    assert denied.value.code == "invalid_api_key"

    status, headers, body = http_json(
        "POST", f"{fakes.openai_url}/nope", {}, {"Authorization": f"Bearer {OPENAI_KEY}"}
    )
    assert status == 404
    assert headers["x-fake-upstream"] == "openai"
    assert set(body["error"]) == {"message", "type", "param", "code"}


# --- Anthropic ----------------------------------------------------------------------------


def test_anthropic_message(claude: anthropic.Anthropic, recorder: Recorder) -> None:
    raw = claude.messages.with_raw_response.create(
        model=MODEL,
        max_tokens=64,
        system="Be brief.",
        messages=[{"role": "user", "content": "hello claude"}],
    )
    message = raw.parse()

    assert raw.headers["x-fake-upstream"] == "anthropic"
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == MODEL
    assert message.content[0].type == "text"
    assert message.content[0].text == "Hello from the fake Anthropic. You said: hello claude"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 4
    assert message.usage.output_tokens == 7

    seen = recorder.last("anthropic", path="/v1/messages")
    # anthropic 2.x sends the api_key as a bearer token, not as x-api-key.
    assert seen.header("authorization") == f"Bearer {ANTHROPIC_KEY}"
    assert seen.header("x-api-key") is None
    assert seen.header("anthropic-version")
    assert seen.body["max_tokens"] == 64


def test_anthropic_message_capped(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "x"}]
    )

    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 2
    assert message.content[0].type == "text"
    assert message.content[0].text == "Hello from"


def test_anthropic_stream(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model=MODEL,
        max_tokens=100,
        messages=[{"role": "user", "content": "stream to me"}],
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()

    assert len(pieces) == 7
    assert final.content[0].type == "text"
    assert final.content[0].text == "".join(pieces)
    assert final.content[0].text == "Hello from the fake Anthropic. You said: stream to me"
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 3
    assert final.usage.output_tokens == 7


def test_anthropic_raw_stream_events(claude: anthropic.Anthropic) -> None:
    events = list(
        claude.messages.create(
            model=MODEL,
            max_tokens=3,
            messages=[{"role": "user", "content": "x"}],
            stream=True,
        )
    )

    # The SDK drops `ping`; everything else arrives in Anthropic's order.
    assert [e.type for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    delta = events[-2]
    assert delta.type == "message_delta"
    assert delta.delta.stop_reason == "max_tokens"
    assert delta.usage.output_tokens == 3


def test_anthropic_errors_use_anthropic_shape(
    claude: anthropic.Anthropic, fakes: FakeUpstreams
) -> None:
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model=MODEL, max_tokens=10, messages=[])
    assert bad.value.status_code == 400
    assert isinstance(bad.value.body, dict)
    assert bad.value.body["type"] == "error"
    assert bad.value.body["error"]["type"] == "invalid_request_error"

    with (
        anthropic.Anthropic(api_key="wrong", base_url=fakes.anthropic_url, max_retries=0) as c,
        pytest.raises(anthropic.AuthenticationError),
    ):
        c.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}])

    status, _, body = http_json(
        "POST",
        f"{fakes.anthropic_url}/v1/messages",
        {"model": "m", "messages": [{"role": "user", "content": "x"}]},
        {"x-api-key": ANTHROPIC_KEY},
    )
    assert status == 400
    assert body["error"]["message"] == "anthropic-version: header is required"


# --- MCP ----------------------------------------------------------------------------------


async def _mcp_round_trip(url: str) -> tuple[list[mcp_types.Tool], mcp_types.CallToolResult]:
    async with (
        streamable_http_client(url) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        tools = await session.list_tools()
        result = await session.call_tool("search", {"query": "governance", "top_k": 2})
        assert isinstance(result, mcp_types.CallToolResult)
        return tools.tools, result


@pytest.mark.parametrize(
    ("variant", "upstream"),
    [("sse", "mcp-sse"), ("json", "mcp-json"), ("stateless", "mcp-json-stateless")],
)
def test_mcp_client_lists_and_calls_tools(
    fakes: FakeUpstreams, recorder: Recorder, variant: str, upstream: str
) -> None:
    url = {
        "sse": fakes.mcp_sse_url,
        "json": fakes.mcp_json_url,
        "stateless": fakes.mcp_stateless_url,
    }[variant]
    assert url.endswith("/mcp")

    tools, result = asyncio.run(asyncio.wait_for(_mcp_round_trip(url), timeout=15))

    assert {t.name for t in tools} == set(TOOL_NAMES)
    by_name = {t.name: t for t in tools}
    assert by_name["search"].input_schema["required"] == ["query"]
    assert by_name["admin_reset"].input_schema["properties"]["confirm"]["type"] == "boolean"
    assert by_name["delete_everything"].annotations is not None
    assert by_name["delete_everything"].annotations.destructive_hint is True
    assert result.is_error is False
    assert result.content[0].type == "text"
    assert result.content[0].text == "2 results for 'governance': art-1, art-2"

    assert recorder.tool_calls(upstream) == ["search"]
    call = recorder.last(upstream, json_rpc_method="tools/call")
    assert call.body["params"]["arguments"] == {"query": "governance", "top_k": 2}
    assert "text/event-stream" in (call.header("accept") or "")
    session_id = call.header("mcp-session-id")
    assert (session_id is None) == (variant == "stateless")


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "raw-http", "version": "0"},
    },
}
MCP_ACCEPT = {"Accept": "application/json, text/event-stream"}


def test_mcp_sse_framing_on_the_wire(fakes: FakeUpstreams) -> None:
    request = urllib.request.Request(
        fakes.mcp_sse_url,
        data=json.dumps(INITIALIZE).encode(),
        headers={**MCP_ACCEPT, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["mcp-session-id"]
        assert response.headers["x-fake-upstream"] == "mcp-sse"
        text = response.read().decode()

    # One `event: message` whose data is the JSON-RPC response; the stream then ends.
    frames = [f for f in text.replace("\r\n", "\n").split("\n\n") if f.strip()]
    assert len(frames) == 1
    fields = dict(line.split(": ", 1) for line in frames[0].splitlines())
    assert fields["event"] == "message"
    reply = json.loads(fields["data"])
    assert reply["id"] == 1
    assert reply["result"]["serverInfo"]["name"] == "fake-upstream-mcp"


@pytest.mark.parametrize("variant", ["json", "stateless"])
def test_mcp_json_framing_on_the_wire(fakes: FakeUpstreams, variant: str) -> None:
    url = fakes.mcp_json_url if variant == "json" else fakes.mcp_stateless_url
    status, headers, reply = http_json("POST", url, INITIALIZE, MCP_ACCEPT)

    assert status == 200
    assert headers["content-type"].startswith("application/json")
    assert ("mcp-session-id" in headers) == (variant == "json")
    assert reply["result"]["protocolVersion"] == "2025-06-18"


def test_mcp_sse_framing_requires_both_accept_types(fakes: FakeUpstreams) -> None:
    status, _, reply = http_json(
        "POST", fakes.mcp_sse_url, INITIALIZE, {"Accept": "application/json"}
    )
    assert status == 406
    assert "text/event-stream" in reply["error"]["message"]


# --- plain HTTP ---------------------------------------------------------------------------


def test_http_service(fakes: FakeUpstreams, recorder: Recorder) -> None:
    status, headers, body = http_json("GET", f"{fakes.http_url}/v1/invoices/inv_42")
    assert (status, body) == (
        200,
        {"invoice": "inv_42", "amount_usd_micros": INVOICE_AMOUNT_USD_MICROS},
    )
    assert headers["x-fake-upstream"] == "http"

    status, headers, body = http_json(
        "POST", f"{fakes.http_url}/v1/invoices", {"amount_usd_micros": 1_500_000}
    )
    assert status == 201
    assert body["amount_usd_micros"] == 1_500_000
    assert headers["location"] == f"/v1/invoices/{body['invoice']}"
    assert recorder.last("http", method="POST").body == {"amount_usd_micros": 1_500_000}

    status, _, body = http_json("GET", f"{fakes.http_url}/admin/secrets")
    assert (status, body) == (200, {"secret": ADMIN_SECRET})

    status, _, body = http_json("GET", f"{fakes.http_url}/v1/nothing-here")
    assert status == 404
    assert body["error"]["status"] == 404


def test_http_echo_shows_received_headers(fakes: FakeUpstreams) -> None:
    status, _, body = http_json(
        "GET",
        f"{fakes.http_url}/v1/echo?x=1",
        headers={"Authorization": "Bearer abc", "X-Custom": "yes", "Connection": "close"},
    )

    assert status == 200
    assert body["method"] == "GET"
    assert body["query"] == {"x": "1"}
    assert body["headers"]["authorization"] == "Bearer abc"
    assert body["headers"]["x-custom"] == "yes"
    assert body["headers"]["connection"] == "close"


# --- lifecycle ----------------------------------------------------------------------------


def test_start_and_stop_are_quick_and_release_ports() -> None:
    started = time.monotonic()
    with FakeUpstreams() as upstreams:
        ports = [int(url.rsplit(":", 1)[1].split("/", 1)[0]) for url in upstreams.urls().values()]
        assert len(set(ports)) == 6
        assert all(url.startswith("http://127.0.0.1:") for url in upstreams.urls().values())
        stopping = time.monotonic()
    assert stopping - started < 5
    assert time.monotonic() - stopping < 5

    for port in ports:
        with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
            sock.connect(("127.0.0.1", port))
    with pytest.raises(RuntimeError):
        _ = upstreams.openai_url


def test_serve_main_runs_until_sigterm() -> None:
    lines: queue.Queue[str] = queue.Queue()
    with subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.serve"],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        stdout = process.stdout
        assert stdout is not None

        # A reader thread, because select() cannot see lines already in the pipe's buffer.
        def pump() -> None:
            for line in stdout:
                lines.put(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            urls: dict[str, str] = {}
            while len(urls) < 6:
                name, equals, url = lines.get(timeout=20).strip().partition("=")
                if equals:
                    urls[name] = url
            assert set(urls) == {
                "OPENAI_BASE_URL",
                "ANTHROPIC_BASE_URL",
                "FAKE_HTTP_URL",
                "FAKE_MCP_SSE_URL",
                "FAKE_MCP_JSON_URL",
                "FAKE_MCP_STATELESS_URL",
            }
            status, _, body = http_json("GET", f"{urls['FAKE_HTTP_URL']}/healthz")
            assert (status, body) == (200, {"ok": True})

            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            # Let the reader hit EOF before the pipe is closed under it.
            reader.join(5)
