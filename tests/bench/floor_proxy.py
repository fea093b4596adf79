"""The floor any Python proxy can reach: aiohttp, one shared client session, chunks streamed
back, no policy. Run as its own process by bench_pep.py: ``python -m
tests.bench.floor_proxy PORT UPSTREAM [ASK_SOCKET]``.

With ``ASK_SOCKET`` (``ack_server``'s), each request first waits for one answer from
that local process, which answers once it has synced a line, over a pool of bare
``asyncio.Protocol`` connections as the sidecar's decide socket client keeps: the floor of
a proxy that waits on a durable local decision, with no decision in it.
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import aiohttp
import uvloop
from aiohttp import web

from pdp.api.decide_socket import frame
from tests.bench.ack_server import take_frame

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}
QUESTION = frame(b"q" * 308)  # about a DecideRequest


class _Asking(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[None] | None = None
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if take_frame(self._buffer) is not None:
            self._settle(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._settle(exc or ConnectionResetError("the ack server hung up"))

    def _settle(self, failure: Exception | None) -> None:
        if self.answer is None or self.answer.done():
            return
        if failure is None:
            self.answer.set_result(None)
        else:
            self.answer.set_exception(failure)


class Asker:
    """One question, one answer, on a connection of its own while it waits."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._idle: list[_Asking] = []

    async def ask(self) -> None:
        loop = asyncio.get_running_loop()
        while self._idle and self._idle[-1].transport is None:
            self._idle.pop()  # hung up meanwhile
        if self._idle:
            connection = self._idle.pop()
        else:
            _, connection = await loop.create_unix_connection(_Asking, self._path)
        connection.answer = loop.create_future()
        assert connection.transport is not None
        connection.transport.write(QUESTION)
        await connection.answer  # a hang-up fails this request, as it would the sidecar's
        self._idle.append(connection)


async def forward(request: web.Request) -> web.StreamResponse:
    session: aiohttp.ClientSession = request.app["session"]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    body = await request.read()
    if request.app["asker"] is not None:
        await request.app["asker"].ask()
    async with session.request(
        request.method,
        request.app["upstream"] + request.rel_url.path_qs,
        headers=headers,
        data=body,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status)
        response.headers.update({k: v for k, v in upstream.headers.items() if k.lower() not in HOP})
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    app["session"] = aiohttp.ClientSession(auto_decompress=False)
    yield
    await app["session"].close()


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2]
    app = web.Application()
    app["upstream"] = upstream
    app["asker"] = Asker(sys.argv[3]) if len(sys.argv) > 3 else None
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    # The sidecar's own loop: a floor on the standard loop would cost more CPU than any
    # proxy on uvloop needs to, and flatter the sidecar beside it.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
