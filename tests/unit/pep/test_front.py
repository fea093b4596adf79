"""pep.front over loopback: lean model calls, and every other request served by aiohttp with
its bytes from the first, as a raw agent sends them."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

import pep.front
from pep.front import MAX_HEAD, MAX_HEADERS, Front, LeanResponse, ModelRequest

CHAT = b"/openai/v1/chat/completions"
BODY = b'{"model":"m"}'


@dataclass
class Served:
    """What the lean handler saw, and how each call ended."""

    requests: list[ModelRequest] = field(default_factory=list)
    cancelled: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)


async def _aiohttp(request: web.Request) -> web.Response:
    if request.path == "/slow":
        await asyncio.sleep(30)
    body = await request.read()
    return web.json_response(
        {"by": "aiohttp", "path": request.path_qs, "body": body.decode(errors="replace")}
    )


def _lean(served: Served) -> Callable[[ModelRequest], Awaitable[web.StreamResponse | LeanResponse]]:
    async def serve(request: ModelRequest) -> web.StreamResponse | LeanResponse:
        served.requests.append(request)
        served.started.set()
        tail = request.match_info["tail"]
        try:
            if tail == "slow":
                await asyncio.sleep(30)
            if tail == "boom":
                raise RuntimeError("a handler's bug")
            if tail == "late":  # the whole answer sent, then the handler still busy a while
                response = LeanResponse(request, 200)
                response.content_length = 2
                await response.prepare()
                await response.write(b"{}")
                await response.write_eof()
                await asyncio.sleep(0.1)
                return response
            if tail == "flood":  # more than an agent that does not read will take
                response = LeanResponse(request, 200)
                await response.prepare()
                while True:
                    await response.write(b"x" * 65536)
            if tail == "stream":
                response = LeanResponse(request, 200)
                response.headers["Content-Type"] = "text/event-stream"
                await response.prepare()
                for event in (b"data: 1\n\n", b"data: 2\n\n"):
                    await response.write(event)
                await response.write_eof()
                return response
        except asyncio.CancelledError:
            served.cancelled += 1
            raise
        seen = {
            "by": "lean",
            "tail": tail,
            "query": request.rel_url.raw_query_string,
            "body": None if request.body is None else request.body.decode(),
            "headers": list(request.headers.items()),
        }
        return web.json_response(seen, headers={"X-Seen": "1"})

    return serve


@asynccontextmanager
async def front(max_body: int = 1024) -> AsyncIterator[tuple[Front, int, Served]]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _aiohttp)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    served = Served()
    serve = _lean(served)
    door = Front(app, {"openai": serve, "anthropic": serve}, runner.server, max_body)
    await door.listen("127.0.0.1", 0)
    assert door._listening is not None
    port = door._listening.sockets[0].getsockname()[1]
    try:
        yield door, port, served
    finally:
        await door.close(timeout=1.0)
        await runner.cleanup()


def _post(path: bytes = CHAT, body: bytes = BODY, *headers: bytes) -> bytes:
    head = [b"POST " + path + b" HTTP/1.1", b"Host: sidecar", b"Content-Type: application/json"]
    head += [b"Content-Length: %d" % len(body), *headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One answer framed by its Content-Length."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode().split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


async def _exchange(port: int, *requests: bytes) -> list[tuple[int, dict[str, str], dict]]:
    """Each request sent after the answer to the one before, on one connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    for request in requests:
        writer.write(request)
        status, headers, body = await _answer(reader)
        answers.append((status, headers, json.loads(body)))
    writer.close()
    return answers


def test_model_calls_are_lean_and_keep_their_connection() -> None:
    async def scenario() -> None:
        async with front() as (_, port, served):
            answers = await _exchange(
                port,
                _post(),
                _post(CHAT + b"?api-version=1", b"{}"),
                _post(b"/anthropic/v1/messages"),
            )
            assert [a[2]["by"] for a in answers] == ["lean", "lean", "lean"]
            assert [a[2]["tail"] for a in answers] == ["chat/completions"] * 2 + ["messages"]
            assert answers[1][2]["query"] == "api-version=1" and answers[1][2]["body"] == "{}"
            assert answers[0][0] == 200 and answers[0][1]["x-seen"] == "1"
            assert "date" in answers[0][1] and "connection" not in answers[0][1]
            first, second, _ = served.requests
            assert first.connection is second.connection  # one connection, kept alive
            assert first.headers["content-type"] == "application/json"
            assert first.rel_url.raw_path == CHAT.decode()

    asyncio.run(scenario())


def test_another_request_hands_the_connection_to_aiohttp_from_its_first_byte() -> None:
    """The models listing after a model call, then a model call again: aiohttp's now."""

    async def scenario() -> None:
        async with front() as (door, port, served):
            listing = b"GET /openai/v1/models HTTP/1.1\r\nHost: sidecar\r\n\r\n"
            answers = await _exchange(port, _post(), listing, _post())
            assert [a[2]["by"] for a in answers] == ["lean", "aiohttp", "aiohttp"]
            assert answers[1][2]["path"] == "/openai/v1/models"
            assert answers[2][2]["body"] == BODY.decode()
            assert len(served.requests) == 1 and not door.connections

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked"
            b"\r\n\r\nd\r\n" + BODY + b"\r\n0\r\n\r\n",
            id="chunked",
        ),
        pytest.param(_post(CHAT, BODY, b"Expect: 100-continue"), id="expect"),
        pytest.param(_post(CHAT, BODY).replace(b"HTTP/1.1", b"HTTP/1.0"), id="http-1.0"),
        pytest.param(_post(CHAT, BODY, "X-Name: caf\u00e9".encode()), id="utf-8-header"),
        pytest.param(_post(CHAT, BODY, b"X-Tab: a\tb"), id="tab-in-value"),
        pytest.param(_post(b"/openai/v1/chat/%63ompletions"), id="encoded-path"),
        pytest.param(_post(b"/openai/v1/./chat/completions"), id="dot-segment"),
        pytest.param(_post(b"/openai/v1//chat/completions"), id="empty-segment"),
        pytest.param(_post(b"/openai/v1/chat/completions?a=%22b#f"), id="fragment"),
        pytest.param(_post(b"http://sidecar/openai/v1/chat/completions"), id="absolute-form"),
        pytest.param(_post(b"/openai/v1/models"), id="models"),
        pytest.param(_post(b"/mcp/kb"), id="another-route"),
        pytest.param(_post(CHAT, BODY).replace(b"POST", b"PUT", 1), id="put"),
        pytest.param(_post(CHAT, BODY, b"Content-Length: 13"), id="two-lengths-400"),
        pytest.param(_post(CHAT, BODY, b"Host: other"), id="two-hosts-400"),
        pytest.param(_post(CHAT, BODY, b"User-Agent: a", b"User-Agent: b"), id="two-agents-400"),
        pytest.param(_post(CHAT, BODY).replace(b"Host: sidecar\r\n", b""), id="no-host-400"),
        pytest.param(_post(CHAT, BODY, b"Sec-WebSocket-Key1: 1"), id="hixie-key-400"),
        pytest.param(
            _post(CHAT, BODY).replace(b"Host:", b"X: " + b"a" * 8190 + b"\r\nHost:"),
            id="long-first-header-400",
        ),
        pytest.param(_post(CHAT, BODY, b"X: " + b"a" * 4000), id="long-header"),
        pytest.param(_post(CHAT, BODY, b"Upgrade: h2c", b"Connection: upgrade"), id="upgrade"),
        pytest.param(
            _post(CHAT, BODY, *(b"X-%d: 1" % i for i in range(MAX_HEADERS))), id="many-headers-400"
        ),
    ],
)
def test_each_other_shape_is_aiohttps_whole(
    request_bytes: bytes, request: pytest.FixtureRequest
) -> None:
    refused = request.node.callspec.id.endswith("-400")  # as aiohttp refuses it

    async def scenario() -> None:
        async with front() as (_, port, served):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_bytes)
            if b"Expect" in request_bytes:
                assert (await reader.readline()).startswith(b"HTTP/1.1 100")
                await reader.readline()
            status, _, body = await _answer(reader)
            writer.close()
            assert not served.requests  # the lean server read none of it as a request
            if refused:
                assert status == 400 and b'"by"' not in body
                return
            assert status == 200 and json.loads(body)["by"] == "aiohttp"
            if b"Transfer-Encoding" in request_bytes or b"Expect" in request_bytes:
                assert json.loads(body)["body"] == BODY.decode()

    asyncio.run(scenario())


def test_a_head_that_llhttp_refuses_is_answered_by_aiohttp() -> None:
    async def scenario() -> None:
        async with front() as (_, port, served):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /openai/v1/chat/completions HTTP/1.1\r\nBad Header: x\r\n\r\n")
            status_line = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            assert status_line.split()[1] == b"400" and not served.requests

    asyncio.run(scenario())


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "handed-off"])
def test_a_request_sent_a_byte_at_a_time_is_read_whole(lean: bool) -> None:
    async def scenario() -> None:
        async with front() as (_, port, _):
            request = _post() if lean else _post(CHAT, BODY, b"X-Tab: a\tb")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for byte in request:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0)
            status, _, body = await _answer(reader)
            writer.close()
            answer = json.loads(body)
            assert status == 200 and answer["body"] == BODY.decode()
            assert answer["by"] == ("lean" if lean else "aiohttp")

    asyncio.run(scenario())


def test_a_head_past_the_limit_goes_to_aiohttp_which_refuses_it() -> None:
    async def scenario() -> None:
        async with front() as (_, port, served):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /openai/v1/chat/completions HTTP/1.1\r\nX-Big: ")
            writer.write(b"a" * (MAX_HEAD + 10))  # and no end to the head
            status_line = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            assert status_line.split()[1] in (b"400", b"431") and not served.requests

    asyncio.run(scenario())


def test_a_pipelined_request_is_never_read_and_the_connection_closes() -> None:
    async def scenario() -> None:
        async with front() as (_, port, served):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_post() + _post(CHAT, b'{"second":1}'))
            status, headers, _ = await _answer(reader)
            assert status == 200 and headers["connection"] == "close"
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing more
            writer.close()
            assert len(served.requests) == 1

    asyncio.run(scenario())


def test_a_body_declared_over_the_limit_is_not_read_and_the_connection_closes() -> None:
    async def scenario() -> None:
        async with front(max_body=8) as (_, port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_post(CHAT, b"x" * 9))
            _, headers, body = await _answer(reader)
            assert json.loads(body)["body"] is None and headers["connection"] == "close"
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()

    asyncio.run(scenario())


def test_an_agent_that_hangs_up_cancels_its_call() -> None:
    async def scenario() -> None:
        async with front() as (door, port, served):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_post(b"/openai/v1/slow"))
            await asyncio.wait_for(served.started.wait(), 5)
            writer.close()
            for _ in range(100):
                if served.cancelled:
                    break
                await asyncio.sleep(0.01)
            assert served.cancelled == 1 and not door.connections

    asyncio.run(scenario())


def test_a_stream_is_chunked_and_read_by_an_http_client() -> None:
    async def scenario() -> None:
        async with front() as (_, port, _served), aiohttp.ClientSession() as session:
            for _ in range(2):  # the connection is kept after a chunked answer
                async with session.post(f"http://127.0.0.1:{port}/openai/v1/stream") as reply:
                    assert reply.headers["Transfer-Encoding"] == "chunked"
                    assert await reply.read() == b"data: 1\n\ndata: 2\n\n"

    asyncio.run(scenario())


def test_an_idle_connection_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pep.front, "IDLE_SECONDS", 0.2)

    async def scenario() -> None:
        async with front() as (door, port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_post())
            await _answer(reader)
            writer.write(b"POST /openai/v1/chat")  # a head begun, never finished
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            assert not door.connections

    asyncio.run(scenario())


def test_idle_counts_from_the_last_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pep.front, "IDLE_SECONDS", 0.3)

    async def scenario() -> None:
        async with front() as (_, port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            request = _post()
            for i in range(0, len(request), len(request) // 4 + 1):  # over 0.6 s in all
                writer.write(request[i : i + len(request) // 4 + 1])
                await asyncio.sleep(0.15)
            status, _, body = await _answer(reader)
            writer.close()
            assert status == 200 and json.loads(body)["by"] == "lean"

    asyncio.run(scenario())


def test_closing_waits_for_the_answer_in_progress_then_closes() -> None:
    async def scenario() -> None:
        async with front() as (door, port, served):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.sleep(0.05)
            writer.write(_post(b"/openai/v1/stream"))
            await asyncio.wait_for(served.started.wait(), 5)
            await door.close(timeout=5)
            assert b"data: 2" in await asyncio.wait_for(reader.read(), 5)
            assert await asyncio.wait_for(idle_reader.read(), 5) == b""
            for w in (writer, idle_writer):
                w.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "name, value, reason",
    [("X", "a\r\nB: c", "OK"), ("X\nB", "c", "OK"), ("X:Y", "c", "OK"), ("X", "c", "OK\r\nB: c")],
)
def test_a_header_that_would_split_the_answer_is_refused(
    name: str, value: str, reason: str
) -> None:
    headers = web.Response(headers={name: value}).headers
    with pytest.raises(ValueError, match="would split the head"):
        pep.front._head(200, reason, headers, [], closing=False)


def test_a_handler_that_fails_answers_500_and_closes() -> None:
    async def scenario() -> None:
        async with front() as (_, port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_post(b"/openai/v1/boom"))
            status, headers, _ = await _answer(reader)
            assert status == 500 and headers["connection"] == "close"
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("trailing", [b"", b"X"], ids=["body-after-head", "a-byte-after-it"])
def test_a_call_asking_to_close_is_read_whole_answered_then_closed(trailing: bytes) -> None:
    """Its body in a later write, or a byte after it (llhttp refuses any after a close):
    answered all the same, then closed."""

    async def scenario() -> None:
        async with front() as (_, port, served):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            request = _post(CHAT, BODY, b"Connection: close")
            head, body = request[: -len(BODY)], request[-len(BODY) :]
            writer.write(head)
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(body + trailing)
            status, headers, answer = await _answer(reader)
            assert status == 200 and headers["connection"] == "close"
            assert json.loads(answer)["body"] == BODY.decode()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            assert len(served.requests) == 1

    asyncio.run(scenario())


def test_lean_connections_are_kept_alive_by_tcp() -> None:
    async def scenario() -> None:
        async with front() as (_, port, served):
            await _exchange(port, _post())
            sock = served.requests[0].connection._transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1

    asyncio.run(scenario())


def test_closing_cuts_off_an_agent_that_does_not_read() -> None:
    async def scenario() -> None:
        async with front() as (door, port, served):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.transport.pause_reading()  # never reads its answer
            writer.write(_post(b"/openai/v1/flood"))
            await asyncio.wait_for(served.started.wait(), 5)
            await asyncio.sleep(0.2)  # the sidecar's buffer for it is full by now
            await door.close(timeout=0.2)
            for _ in range(100):
                if not door.connections:
                    break
                await asyncio.sleep(0.01)
            assert not door.connections
            writer.close()

    asyncio.run(scenario())


def test_a_next_request_sent_before_the_last_answer_ended_is_read_after_it() -> None:
    """An agent may send its next call as soon as it has the whole answer, before the
    handler's task has ended: read then, on the same connection."""

    async def scenario() -> None:
        async with front() as (_, port, served):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_post(b"/openai/v1/late"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert b"200" in head and await reader.readexactly(2) == b"{}"
            writer.write(_post())  # while the handler still sleeps
            status, _, body = await _answer(reader)
            writer.close()
            assert status == 200 and json.loads(body)["by"] == "lean"
            first, second = served.requests
            assert first.connection is second.connection

    asyncio.run(scenario())


def test_connection_close_is_a_token_not_a_substring() -> None:
    async def scenario() -> None:
        async with front() as (_, port, served):
            answers = await _exchange(
                port, _post(CHAT, BODY, b"Connection: closed-captions"), _post()
            )
            assert [a[0] for a in answers] == [200, 200]
            assert served.requests[0].connection is served.requests[1].connection

    asyncio.run(scenario())


def test_a_body_refused_unread_is_read_on_and_dropped_not_reset() -> None:
    """The agent goes on sending a body over the limit after its refusal: the connection
    reads and drops it (a close on unread bytes resets, and a reset can overtake the
    answer), then ends once the agent has."""

    async def scenario() -> None:
        async with front(max_body=8) as (door, port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = b"x" * 4_000_000
            writer.write(_post(CHAT, body)[: -len(body)])
            _, headers, answer = await _answer(reader)
            assert json.loads(answer)["body"] is None and headers["connection"] == "close"
            for i in range(0, len(body), 65536):  # all of it goes: no reset
                writer.write(body[i : i + 65536])
                await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # the sidecar's end
            writer.close()
            await writer.wait_closed()
            for _ in range(100):
                if not door.connections:
                    break
                await asyncio.sleep(0.01)
            assert not door.connections

    asyncio.run(scenario())


def test_closing_stops_the_connections_handed_to_aiohttp_too() -> None:
    async def scenario() -> None:
        async with front() as (door, port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /slow HTTP/1.1\r\nHost: sidecar\r\n\r\n")
            await asyncio.sleep(0.1)
            started = asyncio.get_running_loop().time()
            await door.close(timeout=0.3)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert asyncio.get_running_loop().time() - started < 3
            writer.close()

    asyncio.run(scenario())
