"""pep.front against aiohttp alone, on the same bytes: whatever a request looks like, the
sidecar's handlers see it as aiohttp's would (method, raw path and query, headers in order,
body), or it is refused as aiohttp refuses it. Generated requests mix the lean shape with
each way out of it (other methods, versions and targets, headers twice, without Host, not
ASCII, with tabs or trailing spaces, chunked, Expect, Upgrade)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pep.front import Front, LeanResponse, ModelRequest

TARGETS = [  # the first four of the lean shape
    b"/openai/v1/chat/completions",
    b"/openai/v1/chat/completions?api-version=2024-10-21&x=%22y",
    b"/anthropic/v1/messages",
    b"/openai/v1/responses?",
    b"/openai/v1/models",
    b"/openai/v1/models?x=1",
    b"/openai/v1/chat/%63ompletions",
    b"/openai/v1/./chat/completions",
    b"/openai/v1/chat//completions",
    b"/openai/v1/chat/completions#f",
    b"/openai/v1/",
    b"/openai/v1/.well-known/x",
    b"http://sidecar/openai/v1/chat/completions",
    b"/OPENAI/v1/chat/completions",
    b"/mcp/kb",
]
NAMES = [
    b"Host",
    b"host",
    b"Content-Type",
    b"content-type",
    b"User-Agent",
    b"Authorization",
    b"X-Abc-Run",
    b"X-Custom",
    b"Connection",
    b"Transfer-Encoding",
    b"Expect",
    b"Content-Encoding",
    b"Upgrade",
    b"Max-Forwards",
    b"Sec-WebSocket-Key1",
    b"Accept-Encoding",
]
PLAIN = [  # headers as SDKs send them
    (b"content-type", b"application/json"),
    (b"Authorization", b"Bearer sk-x"),
    (b"X-Custom", b"a b "),
    (b"x-stainless-os", b"Linux"),
    (b"Accept", b"*/*"),
]
VALUES = [
    b"a",
    b"",
    b"application/json",
    b"v ",
    b"v\t",
    b"a\tb",
    b"caf\xc3\xa9",
    b"\xff",
    b"close",
    b"keep-alive",
    b"upgrade",
    b"chunked",
    b"gzip, chunked",
    b"100-continue",
    b"Bearer sk-x",
    b"h2c",
]


async def _echo(request: web.Request | ModelRequest) -> dict[str, Any]:
    body = request.body if isinstance(request, ModelRequest) else await request.read()
    return {
        "method": request.method,
        "path": request.rel_url.raw_path,
        "query": request.rel_url.raw_query_string,
        "headers": list(request.headers.items()),
        "body": None if body is None else body.decode("latin-1"),
    }


async def _by_aiohttp(request: web.Request) -> web.Response:
    return web.json_response(await _echo(request))


LEAN: list[bytes] = []  # the requests the lean server read


async def _by_front(request: ModelRequest) -> web.StreamResponse | LeanResponse:
    LEAN.append(request.rel_url.raw_path.encode())
    return web.json_response(await _echo(request))


def _app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _by_aiohttp)
    return app


@pytest.fixture(scope="module")
def ports() -> Iterator[tuple[int, int]]:
    """(the front's port, aiohttp's alone), served by a loop of their own."""
    loop = asyncio.new_event_loop()
    ready: list[tuple[int, int]] = []

    async def start() -> tuple[Front, web.AppRunner, web.AppRunner]:
        plain = web.AppRunner(_app(), access_log=None, handle_signals=False)
        await plain.setup()
        site = web.TCPSite(plain, "127.0.0.1", 0)
        await site.start()
        runner = web.AppRunner(_app(), access_log=None, handle_signals=False)
        await runner.setup()
        assert runner.server is not None
        serve = {"openai": _by_front, "anthropic": _by_front}
        door = Front(runner.app, serve, runner.server, 1 << 20)
        await door.listen("127.0.0.1", 0)
        assert door._listening is not None and site._server is not None
        front_port = door._listening.sockets[0].getsockname()[1]
        plain_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ready.append((front_port, plain_port))
        return door, runner, plain

    door, runner, plain = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield ready[0]
    finally:

        async def stop() -> None:
            await door.close(timeout=1)
            await runner.cleanup()
            await plain.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def _answer(port: int, request: bytes) -> tuple[int, Any]:
    """The status and body of the first final answer, or (0, None) if the connection ended
    without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(request)
        received = b""
        while True:
            head, found, rest = received.partition(b"\r\n\r\n")
            if found:
                status = int(head.split()[1])
                if status == 100:
                    received = rest
                    continue
                fields = dict(
                    line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line
                )
                length = {k.strip().lower(): v for k, v in fields.items()}[b"content-length"]
                while len(rest) < int(length):
                    more = sock.recv(65536)
                    if not more:
                        break
                    rest += more
                body = rest[: int(length)]
                return status, json.loads(body) if status == 200 else None
            try:
                more = sock.recv(65536)
            except TimeoutError:
                return 0, None
            if not more:
                return 0, None
            received += more


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"POST"] * 8 + [b"GET", b"PUT", b"post"]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 5 + [b"HTTP/1.0"]))
    target = draw(st.sampled_from(TARGETS[:4] * 4 + TARGETS))  # the lean shape, mostly
    lines = [method + b" " + target + b" " + version]
    if draw(st.sampled_from([True] * 7 + [False])):
        lines.append(b"Host: sidecar")
    headers = draw(st.lists(st.sampled_from(PLAIN), unique=True, max_size=4))
    if draw(st.sampled_from([False, False, True])):  # one that may lead out of the lean shape
        headers.insert(
            draw(st.integers(0, len(headers))),
            (draw(st.sampled_from(NAMES)), draw(st.sampled_from(VALUES))),
        )
    body = draw(st.binary(max_size=40))
    chunked = any(n.lower() == b"transfer-encoding" and v == b"chunked" for n, v in headers)
    if chunked:
        body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    else:
        framing = draw(st.sampled_from(["length"] * 6 + ["none", "twice", "twice-unequal"]))
        if framing != "none":
            lines.append(b"Content-Length: %d" % len(body))
        if framing == "twice":
            lines.append(b"Content-Length: %d" % len(body))
        if framing == "twice-unequal":
            lines.append(b"Content-Length: %d" % (len(body) + 1))
        if framing == "none":
            body = b""
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests())
def test_the_front_reads_every_request_as_aiohttp_alone_does(
    ports: tuple[int, int], request: bytes
) -> None:
    front_port, plain_port = ports
    lean = len(LEAN)
    answer = _answer(front_port, request)
    assert answer == _answer(plain_port, request), request
    event(f"answered {answer[0]}" + (" by the lean server" if len(LEAN) > lean else ""))
