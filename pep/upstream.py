"""The model routes' way upstream: HTTP/1.1 over a pool of kept-alive connections.

A model call is one POST with its whole body in hand, answered by JSON or a stream of
events: a request line, headers and body in one write, the answer read by llhttp
(``httptools``). aiohttp's client does the same with about 0.14 ms more CPU per request
(its request and response objects, cookie, proxy and redirect handling, a timer per read),
which is a third of what the whole sidecar spends on a call. The other routes (MCP, HTTP
tools) stream request bodies and read answers through aiohttp, and keep its client.

A connection carries one request at a time and is used again only when its answer was
framed (a length, or chunks to the last), read to its end by the caller, the upstream did
not ask to close, and not one byte followed it: whatever one answer leaves on a connection
never becomes another agent's.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import cast

import httptools
from multidict import CIMultiDict
from yarl import URL

__all__ = ["ModelUpstream", "UpstreamError", "UpstreamResponse"]

CONNECT_SECONDS = 10.0
READ_SECONDS = 600.0  # the longest an upstream may stay silent, mid-answer included
KEEP_IDLE_SECONDS = 15.0  # aiohttp's default: a connection idle longer is closed, not reused
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 256
_HIGH_WATER = 256 * 1024  # buffered answer bytes past which the upstream is paused


class UpstreamError(Exception):
    """The upstream could not be reached, or answered outside HTTP/1.1."""


class _Connection(asyncio.Protocol):
    """One connection: a request written, its answer parsed as it arrives."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[str, str, int]) -> None:
        self.key = key
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._head: asyncio.Future[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._head_bytes = 0  # received while no head has ended: one never ending is cut
        self._header_bytes = 0  # in the headers read: a long head in one piece is cut too
        self._headers: list[tuple[str, str]] = []
        self._framed = False  # Content-Length or Transfer-Encoding seen
        self._keep_alive = False
        self.status = 0
        self.reason = ""
        self.complete = False
        self.failure: Exception | None = None
        self.idle_since = 0.0
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self._parser is None or self.complete:
            self._fail(UpstreamError("the upstream sent bytes no request asked for"))
            return
        self._last_data = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the upstream switched protocols"))
            return
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the upstream's answer is not HTTP/1.1: {exc}"))
            return
        if self.status < 200:
            # llhttp holds a head until it ends, however long.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(UpstreamError("an answer head over the limit"))

    def eof_received(self) -> bool:
        self._end_unframed()
        self._fail(UpstreamError("the upstream closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if exc is None:
            self._end_unframed()
        self._fail(UpstreamError(f"the upstream connection was lost: {exc or 'closed'}"))

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            # Bytes after the answer: parsing stops here, before any of them is read as
            # part of it, and the connection is closed.
            raise UpstreamError("the upstream answered twice")

    def on_status(self, reason: bytes) -> None:
        self.reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if len(self._headers) >= MAX_HEADERS or self._header_bytes > MAX_HEAD_BYTES:
            raise UpstreamError("an answer head over the limit")
        key = name.decode("latin-1").lower()
        if key in ("content-length", "transfer-encoding"):
            self._framed = True
        # As aiohttp reads them: the agent gets the bytes the upstream sent.
        self._headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._headers, self._framed = [], False
            return
        self.status = status
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake_reader()

    def on_message_complete(self) -> None:
        if self.status >= 200:
            assert self._parser is not None
            # Read here: llhttp forgets it once the callback returns.
            self._keep_alive = self._parser.should_keep_alive()
            self._finish()

    # the request's side

    def _end_unframed(self) -> None:
        if self._parser is not None and self.status >= 200 and not self._framed:
            self._finish()  # an answer without a length ends with its connection

    def _finish(self) -> None:
        self.complete = True
        self._wake_reader()

    def _wake_reader(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self.failure is None and not self.complete:
            self.failure = exc
        for waiter in (self._head, self._wake):
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
        self.close()

    def _check_silence(self, limit: float) -> None:
        """Fail the request once the upstream was silent ``limit`` seconds while it was
        waited for: one timer per request, moved on when it fires, not one armed and
        cancelled on every read. An upstream paused, or whose bytes the agent has not taken
        yet, is not silent."""
        now = self._loop.time()
        if self._paused or self._body:
            self._last_data = now
        if now >= self._last_data + limit:
            self._fail(UpstreamError(f"the upstream was silent for {limit:g} s"))
        elif not self.complete and self.failure is None:
            self._timer = self._loop.call_at(self._last_data + limit, self._check_silence, limit)

    def usable(self, now: float) -> bool:
        return (
            self._transport is not None
            and not self._transport.is_closing()
            and self.failure is None
            and now - self.idle_since < KEEP_IDLE_SECONDS
        )

    async def send(self, request: bytes, read_seconds: float) -> None:
        """Write the request; return once the answer's head has arrived."""
        assert self._transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self._head = self._loop.create_future()
        self._last_data = self._loop.time()
        self._timer = self._loop.call_at(
            self._last_data + read_seconds, self._check_silence, read_seconds
        )
        self._transport.write(request)
        await self._head

    def head(self) -> tuple[int, str, CIMultiDict[str]]:
        return self.status, self.reason, CIMultiDict(self._headers)

    async def read(self) -> bytes:
        """The next piece of the answer's body, b"" at its end."""
        while not self._body:
            if self.complete:
                return b""
            if self.failure is not None:
                raise self.failure
            self._wake = self._loop.create_future()
            try:
                await self._wake
            finally:
                self._wake = None
        chunk = self._body.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= _HIGH_WATER // 4 and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return chunk

    def reusable(self) -> bool:
        """Read to its framed end, kept alive, nothing after it."""
        return (
            self.complete
            and self._framed
            and not self._body
            and self._keep_alive
            and self._transport is not None
            and not self._transport.is_closing()
        )

    def reset(self, now: float) -> None:
        """Ready for the next request (only after ``reusable()``)."""
        if self._timer is not None:
            self._timer.cancel()
        self._parser, self._head, self._timer = None, None, None
        self._headers, self._head_bytes, self._header_bytes, self._framed = [], 0, 0, False
        self.status, self.complete, self._keep_alive, self.idle_since = 0, False, False, now

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()


class UpstreamResponse:
    """An answer as it arrives: status and headers, then the body with ``chunks()``. Leaving
    the ``async with`` gives the connection back, or closes it if it cannot serve again."""

    def __init__(self, pool: ModelUpstream, connection: _Connection) -> None:
        self._pool, self._connection = pool, connection
        self.status, self.reason, self.headers = connection.head()
        length = self.headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None

    async def chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self._connection.read():
            yield chunk

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._pool.release(self._connection)


class ModelUpstream:
    """Kept-alive connections to the model upstreams, at most ``limit`` at once."""

    def __init__(
        self,
        limit: int = 256,
        connect_seconds: float = CONNECT_SECONDS,
        read_seconds: float = READ_SECONDS,
    ) -> None:
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._slots = asyncio.Semaphore(limit)
        self._connect_seconds, self._read_seconds = connect_seconds, read_seconds
        self._tls: ssl.SSLContext | None = None
        self._open: set[_Connection] = set()

    async def request(
        self, url: URL, headers: Iterable[tuple[str, str]], body: bytes
    ) -> UpstreamResponse:
        """POST ``body`` to ``url`` (sent as encoded) with ``headers`` and a Host and
        Content-Length of its own; the answer once its head has arrived, else
        ``UpstreamError``."""
        host = url.raw_host
        if url.scheme not in ("http", "https") or not host or url.port is None:
            raise UpstreamError(f"not an http(s) URL: {url.scheme}://...")
        key = (url.scheme, host, url.port)
        request = _request_bytes(url, headers, body)
        await self._slots.acquire()
        connection: _Connection | None = None
        try:
            connection = self._reuse(key) or await self._connect(key)
            await connection.send(request, self._read_seconds)
        except BaseException as exc:
            if connection is not None:
                self._discard(connection)
            self._slots.release()
            if isinstance(exc, OSError):  # refused, unreachable, TLS, connect timeout
                raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
            raise
        return UpstreamResponse(self, connection)

    def release(self, connection: _Connection) -> None:
        self._slots.release()
        if not connection.reusable():
            self._discard(connection)
            return
        now = time.monotonic()
        connection.reset(now)
        idle = self._idle.setdefault(connection.key, [])
        idle.append(connection)
        # The oldest first: what a burst opened is closed once traffic no longer needs it.
        while now - idle[0].idle_since >= KEEP_IDLE_SECONDS:
            self._discard(idle.pop(0))

    def _reuse(self, key: tuple[str, str, int]) -> _Connection | None:
        idle, now = self._idle.get(key), time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.usable(now):
                return connection
            self._discard(connection)
        return None

    async def _connect(self, key: tuple[str, str, int]) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()  # the system's CAs, names checked
            tls = self._tls
        connection = _Connection(loop, key)
        async with asyncio.timeout(self._connect_seconds):
            await loop.create_connection(
                lambda: connection,
                host,
                port,
                ssl=tls,
                server_hostname=host if tls else None,
            )
        self._open.add(connection)
        return connection

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._open.discard(connection)

    async def close(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._open.clear()
        self._idle.clear()


def _request_bytes(url: URL, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
    host = url.raw_host or ""
    host = f"[{host}]" if ":" in host else host
    authority = host if url.is_default_port() else f"{host}:{url.port}"
    lines = [f"POST {url.raw_path_qs} HTTP/1.1", f"Host: {authority}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {len(body)}")
    head = "\r\n".join(lines)
    breaks = len(lines) - 1
    if head.count("\r") != breaks or head.count("\n") != breaks or "\0" in head:
        # The agent's side refuses these already; nothing may split the request here either.
        raise UpstreamError("a request line or header with a line break")
    return head.encode("utf-8", "surrogateescape") + b"\r\n\r\n" + body
