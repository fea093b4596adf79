"""The model routes' way upstream: HTTP/1.1 over a pool of kept-alive connections.

A model call is one POST with its whole body in hand, answered by JSON or a stream of
events: a request line, headers and body in one write, the answer read by llhttp
(``httptools``, which aiohttp's client parses with too). aiohttp's client spends about
0.14 ms more CPU per request on this (its request and response objects, cookie, proxy and
redirect handling, a timer per read): a sixth of what the sidecar spent on a call. The
other routes (MCP, HTTP tools) stream request bodies and read answers through aiohttp,
and keep its client.

A connection carries one request at a time and is used again only when its answer was a
success framed by a length or chunks to the last (never a 204 or 304), read to its end by
the caller, the upstream did not ask to close, not one byte followed it (delivered or
waiting in the socket) and the request was all sent: whatever one answer leaves on a
connection never becomes another agent's.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import cast

import aiohappyeyeballs
import httptools
from multidict import CIMultiDict
from yarl import URL

__all__ = ["Lease", "ModelUpstream", "UpstreamError", "UpstreamResponse"]

CONNECT_SECONDS = 10.0
READ_SECONDS = 600.0  # the longest an upstream may stay silent, mid-answer included
KEEP_IDLE_SECONDS = 15.0  # aiohttp's default: a connection idle longer is closed, not reused
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 256
_HIGH_WATER = 256 * 1024  # buffered answer bytes past which the upstream is paused


class UpstreamError(Exception):
    """The upstream could not be reached, or answered outside HTTP/1.1. ``sent``: the
    request may have reached it (it failed after being written), so the call may have been
    carried out and paid for."""

    def __init__(self, message: str, *, sent: bool = False) -> None:
        super().__init__(message)
        self.sent = sent


class _Connection(asyncio.Protocol):
    """One connection: a request written, its answer parsed as it arrives."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[str, str, int]) -> None:
        self.key = key
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._closed_here = False
        self._timer: asyncio.TimerHandle | None = None
        self.idle_since = 0.0
        self._answer_state(None)

    def _answer_state(self, parser: httptools.HttpResponseParser | None) -> None:
        """What one answer's parse keeps: all of it set afresh for each request. No
        parser: the connection is idle, and any byte arriving closes it."""
        self._parser = parser
        self._head: asyncio.Future[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        # Bytes received since the last body bytes: a head, a chunk's size line or a
        # trailer that never ends is cut at MAX_HEAD_BYTES (llhttp holds it whole).
        self._unbodied = 0
        self._body_seen = False
        self._header_bytes = 0
        self._headers: list[tuple[str, str]] = []
        self._reason = bytearray()
        self._length = False  # a Content-Length
        self._codings = ""  # the Transfer-Encoding values, joined
        self._framed = False
        self._keep_alive = False
        self._last_data = self._loop.time()
        self.status = 0
        self.reason = ""
        self.complete = False
        self.failure: Exception | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self._parser is None or self.complete:
            self._fail(UpstreamError("the upstream sent bytes no request asked for"))
            return
        self._last_data = self._loop.time()
        self._body_seen = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the upstream switched protocols"))
            return
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the upstream's answer is not HTTP/1.1: {exc}"))
            return
        self._unbodied = 0 if self._body_seen else self._unbodied + len(data)
        if self._unbodied > MAX_HEAD_BYTES:
            self._fail(UpstreamError("an answer head, chunk line or trailer over the limit"))

    def eof_received(self) -> bool:
        self._end_unframed()
        self._fail(UpstreamError("the upstream closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if exc is None and not self._closed_here:
            self._end_unframed()
        self._fail(UpstreamError(f"the upstream connection was lost: {exc or 'closed'}"))

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            # Bytes after the answer: parsing stops here, before any of them is read as
            # part of it, and the connection is closed.
            raise UpstreamError("the upstream answered twice")
        self._reason.clear()  # an interim answer's phrase is not the final one's

    def on_status(self, reason: bytes) -> None:
        self._reason += reason  # llhttp may hand it over in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.status:
            return  # a trailer: read past, never passed on as a header
        self._header_bytes += len(name) + len(value)
        if len(self._headers) >= MAX_HEADERS or self._header_bytes > MAX_HEAD_BYTES:
            raise UpstreamError("an answer head over the limit")
        key = name.lower()
        if key == b"content-length":
            self._length = True
        elif key == b"transfer-encoding":
            self._codings += "," + value.decode("latin-1")
        # As aiohttp reads them: the agent gets the bytes the upstream sent.
        self._headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if status < 100:
            raise UpstreamError(f"an answer with status {status}")
        if status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._headers, self._header_bytes, self._length, self._codings = [], 0, False, ""
            return
        self.status = status
        self.reason = self._reason.decode("latin-1")
        # Framed: ended by its length or its last chunk, as llhttp reads it. Another last
        # coding (gzip) is read to the connection's end. A 204 or 304 has no body whatever
        # it declares: bytes it announced and sent late would be read as the next answer.
        last = self._codings.rsplit(",", 1)[-1].strip().lower()
        self._framed = (self._length or last == "chunked") and status not in (204, 304)
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._body_seen = True
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake_reader()

    def on_message_complete(self) -> None:
        if self.status:
            assert self._parser is not None
            # Read here: llhttp forgets it once the callback returns.
            self._keep_alive = self._parser.should_keep_alive()
            self._finish()

    # the request's side

    def _end_unframed(self) -> None:
        """The upstream closed the connection: the end of an answer without a length."""
        if self._parser is not None and self.status and not self._framed and not self.failure:
            self._finish()

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

    def usable(self) -> bool:
        """Open, not idle too long, and nothing waiting to be read: bytes (or a close) the
        loop has not delivered yet would otherwise be read as the next answer."""
        if self._transport is None or self._transport.is_closing():
            return False
        if self._loop.time() - self.idle_since >= KEEP_IDLE_SECONDS:
            return False
        sock = self._transport.get_extra_info("socket")
        if sock is None:
            return False
        waiting = select.poll()
        waiting.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        return not waiting.poll(0)

    async def send(self, request: bytes, read_seconds: float) -> None:
        """Write the request; return once the answer's head has arrived."""
        assert self._transport is not None
        self._answer_state(httptools.HttpResponseParser(self))
        self._head = self._loop.create_future()
        self._timer = self._loop.call_at(
            self._last_data + read_seconds, self._check_silence, read_seconds
        )
        self._transport.write(request)
        await self._head

    def head(self) -> tuple[int, str, CIMultiDict[str]]:
        return self.status, self.reason, CIMultiDict(self._headers)

    async def read(self) -> bytes:
        """What has arrived of the answer's body since the last read, b"" at its end."""
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
        # All of it in one piece: one write to the agent, however the upstream cut it.
        chunk = self._body.popleft() if len(self._body) == 1 else b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return chunk

    def reusable(self) -> bool:
        """A success read to its framed end, kept alive, nothing after it, our request all
        sent. Only a success: an upstream may answer an error before it has read the whole
        body, and the rest of the body would be read as the next request."""
        return (
            self.complete
            and 200 <= self.status < 300
            and self._framed
            and not self._body
            and self._keep_alive
            and self._transport is not None
            and not self._transport.is_closing()
            and not self._transport.get_write_buffer_size()
        )

    def idle(self) -> None:
        """Back in the pool (only after ``reusable()``)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._parser, self.idle_since = None, self._loop.time()

    def close(self) -> None:
        self._closed_here = True
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

    @property
    def complete(self) -> bool:
        """Read to its end."""
        return self._connection.complete

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


class Lease:
    """A request and the pooled connection it is to go on, not written yet
    (``ModelUpstream.connect``)."""

    def __init__(
        self, pool: ModelUpstream, connection: _Connection, request: bytes, read_seconds: float
    ) -> None:
        self._pool, self._connection, self._request = pool, connection, request
        self._read_seconds = read_seconds

    async def send(self) -> UpstreamResponse:
        """Write the request, before anything is awaited; the answer once its head has
        arrived, else ``UpstreamError`` (``sent``)."""
        try:
            await self._connection.send(self._request, self._read_seconds)
        except BaseException as exc:
            self._pool.abandon(self._connection)
            if isinstance(exc, UpstreamError):
                exc.sent = True
                raise
            if isinstance(exc, OSError | RuntimeError | ValueError):  # a transport's own
                raise UpstreamError(f"{type(exc).__name__}: {exc}", sent=True) from exc
            raise
        return UpstreamResponse(self._pool, self._connection)


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
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def connect(self, url: URL, headers: Iterable[tuple[str, str]], body: bytes) -> Lease:
        """A POST of ``body`` to ``url`` (sent as encoded) with ``headers`` and a Host and
        Content-Length of its own, and a pooled connection to send it on; nothing written
        yet, so a caller cancelled here knows its call never left. ``UpstreamError`` if
        the request cannot be sent or no connection had; ``Lease.send`` writes it."""
        host = url.raw_host
        if url.scheme not in ("http", "https") or not host or url.port is None:
            raise UpstreamError(f"not an http(s) URL: {url.scheme}://...")
        key = (url.scheme, host, url.port)
        request = _request_bytes(url, headers, body)
        if self._closed:
            raise UpstreamError("the sidecar is stopping")
        await self._slots.acquire()
        try:
            connection = self._reuse(key) or await self._connect(key)
        except BaseException as exc:
            self._slots.release()
            # Refused, unreachable, TLS, connect timeout; what aiohappyeyeballs raises on an
            # empty address list (ValueError) or a loop it cannot drive (RuntimeError).
            if isinstance(exc, OSError | RuntimeError | ValueError):
                raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
            raise
        return Lease(self, connection, request, self._read_seconds)

    def abandon(self, connection: _Connection) -> None:
        """Close a leased connection whose request failed, and free its slot."""
        self._discard(connection)
        self._slots.release()

    def release(self, connection: _Connection) -> None:
        self._slots.release()
        if self._closed or not connection.reusable():
            self._discard(connection)
            return
        connection.idle()
        self._idle.setdefault(connection.key, []).append(connection)
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(KEEP_IDLE_SECONDS, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle past the limit: reuse takes the newest, so what a
        burst opened would otherwise stay open for good."""
        self._sweeper, now = None, asyncio.get_running_loop().time()
        for idle in self._idle.values():
            while idle and now - idle[0].idle_since >= KEEP_IDLE_SECONDS:
                self._discard(idle.pop(0))
        if any(self._idle.values()):
            self._sweeper = asyncio.get_running_loop().call_later(KEEP_IDLE_SECONDS, self._sweep)

    def _reuse(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.usable():
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
            addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            # As aiohttp connects: the next address tried 0.25 s after one that does not
            # answer (an IPv6 route that drops packets), not after the whole timeout.
            sock = await aiohappyeyeballs.start_connection(
                addresses, happy_eyeballs_delay=0.25, interleave=1
            )
            try:
                await loop.create_connection(
                    lambda: connection, sock=sock, ssl=tls, server_hostname=host if tls else None
                )
            except BaseException:
                sock.close()
                raise
        self._open.add(connection)
        if self._closed:  # closed while this one connected
            self._discard(connection)
            raise UpstreamError("the sidecar is stopping")
        return connection

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._open.discard(connection)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
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
