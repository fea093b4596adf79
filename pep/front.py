"""The sidecar's listening socket: model calls on a lean HTTP/1.1 server, the rest on aiohttp.

A model call is the sidecar's busiest path, and aiohttp's web server spent about 0.03 ms of
CPU on each one beyond reading and writing its bytes (0.07 ms when calls come apart, its
code cold): a tenth or more of all the sidecar spent on a call.

Every connection starts here. A request of the one plain shape model calls take (``POST``
to ``/openai/v1/*`` or ``/anthropic/v1/*`` but ``models``, HTTP/1.1, an origin-form target
of plain characters, printable ASCII headers, its body framed by one ``Content-Length``) is
parsed by llhttp (``httptools``; aiohttp parses with llhttp too) and served by the route's
handler. At the first request of any other shape (another route or method, a chunked body,
``Expect``, ``Upgrade``, a header or target that is not plain, a head llhttp refuses), the
connection goes to aiohttp with that request's bytes from its first: aiohttp judges it by
its own rules, as it judged every request before. No request is read by both.

A connection carries one request at a time. One sent before the last answer's handler
ended is read after it; one in the same segment as the request before it (pipelined: no SDK
sends one) is never read, and the connection closes once the answer is written, reading on
and dropping what the agent still sends for a while (as aiohttp does): a close on unread
bytes resets the connection, and a reset can overtake the answer. An agent that hangs up
cancels its handler, as aiohttp's ``handler_cancellation`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

import httptools
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

__all__ = ["IDLE_SECONDS", "Front", "LeanResponse", "ModelRequest", "Serve"]

log = logging.getLogger("abc.pep")

IDLE_SECONDS = 75.0  # a connection with nothing to do is closed (aiohttp's keepalive_timeout)
LINGER_SECONDS = 10.0  # reading on, unread, after a last answer (aiohttp's lingering_time)
MAX_HEAD = 64 * 1024  # a head still unfinished past this goes to aiohttp, which limits heads
# A lean header's name and value together, and its target: well inside aiohttp's limit of
# 8190 however it counts a line (a value with its trailing spaces, a name with the last one's).
MAX_FIELD = 4000
MAX_HEADERS = 128
# The lean shape: a route and a tail of plain segments, a query of plain characters.
_TARGET = re.compile(
    r"/(openai|anthropic)/v1/([A-Za-z0-9_.~-]+(?:/[A-Za-z0-9_.~-]+)*)(?:\?([A-Za-z0-9_.~=&+%,-]*))?"
)
_NOT_LEAN = frozenset(
    {b"transfer-encoding", b"expect", b"upgrade", b"content-encoding", b"sec-websocket-key1"}
)
# Headers aiohttp refuses twice (its SINGLETON_HEADERS): such a request is its to refuse.
_ONCE = frozenset(
    {
        b"content-length",
        b"content-location",
        b"content-range",
        b"content-type",
        b"etag",
        b"host",
        b"max-forwards",
        b"server",
        b"user-agent",
    }
)
_NO_BODY = frozenset({204, 304})
# aiohttp names the headers it knows as hdrs spells them, whatever case was sent.
_SPELLED = {
    str(name).lower().encode(): str(name) for name in vars(hdrs).values() if isinstance(name, istr)
}
# Framing is the answer's own: never a header copied from elsewhere.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


class _Stop(Exception):
    """Raised in a parser callback: the parser reads no further into this chunk."""


class _Output:
    """How many bytes of an answer were written: ``request.writer`` on aiohttp."""

    output_size = 0


class ModelRequest:
    """A model call read by the lean server, with the part of ``web.Request`` handlers use."""

    method = "POST"

    def __init__(
        self,
        connection: _Connection,
        app: web.Application,
        route: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | None,
    ) -> None:
        self.connection = connection
        self.app = app
        self.route = route  # "openai" or "anthropic"
        path, _, query = target.partition("?")
        self.rel_url = URL.build(path=path, query_string=query, encoded=True)  # as aiohttp
        self.match_info = {"tail": path[len(route) + 5 :]}  # after /ROUTE/v1/
        self.headers = CIMultiDictProxy(headers)
        self.body = body  # None: declared over the size limit, and not read
        self.writer = _Output()


class LeanResponse:
    """An answer on a lean connection, with the part of ``web.StreamResponse`` relaying uses.

    A body of known length leaves with its head in one write; another (a stream) is sent
    chunked, its head at once."""

    def __init__(self, request: ModelRequest, status: int, reason: str | None = None) -> None:
        self._request = request
        self.status = status
        self.reason = reason or _reason(status)
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.content_length: int | None = None
        self._connection: _Connection | None = None
        self._held = b""  # the head, until the body's first bytes
        self._chunked = False
        self._left: int | None = None
        self.complete = False

    async def prepare(self) -> None:
        request = self._request
        self._connection = request.connection
        bodiless = self.status in _NO_BODY or self.status < 200
        framing: list[tuple[str, str]] = []
        if self.content_length is not None and not bodiless:
            framing.append(("Content-Length", str(self.content_length)))
            self._left = self.content_length
        elif not bodiless:
            framing.append(("Transfer-Encoding", "chunked"))
            self._chunked = True
        head = _head(
            self.status, self.reason, self.headers, framing, closing=request.connection.closing
        )
        if self._left is None:
            request.connection.write(head)  # a stream: the agent sees its status at once
        else:
            self._held = head

    async def write(self, data: bytes) -> None:
        connection = self._connection
        assert connection is not None, "prepare first"
        if not data:
            return
        if self._left is not None:
            self._left -= len(data)
            if self._left < 0:
                raise ConnectionResetError("an answer longer than its Content-Length")
            framed = self._held + data
            self._held = b""
        else:
            framed = b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data
        connection.write(framed)
        await connection.drain()

    async def write_eof(self) -> None:
        connection = self._connection
        assert connection is not None, "prepare first"
        if self._held:
            connection.write(self._held)
            self._held = b""
        if self._chunked:
            connection.write(b"0\r\n\r\n")
        await connection.drain()
        # An answer shorter than it said leaves the agent's connection out of step.
        self.complete = not self._left


def _reason(status: int) -> str:
    with contextlib.suppress(ValueError):
        return HTTPStatus(status).phrase
    return ""


def _head(
    status: int,
    reason: str,
    headers: CIMultiDict[str],
    framing: list[tuple[str, str]],
    *,
    closing: bool,
) -> bytes:
    """An answer's status line and headers; ``ValueError`` for a reason, name or value that
    would split the head (as aiohttp refuses them)."""
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    for name, value in headers.items():
        if name.lower() not in _FRAMING:
            if ":" in name:
                raise ValueError(f"header {name!r} would split the head")
            lines.append(f"{name}: {value}\r\n")
    lines += [f"{name}: {value}\r\n" for name, value in framing]
    if "Date" not in headers:
        lines.append(f"Date: {formatdate(usegmt=True)}\r\n")
    if closing:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    head = "".join(lines)
    # Each line ends in CR LF, and none holds another: nothing the upstream sent splits it.
    if head.count("\r") != len(lines) or head.count("\n") != len(lines):
        raise ValueError("a reason, header name or value would split the head")
    return head.encode("utf-8", "surrogateescape")


Serve = Callable[[ModelRequest], Awaitable[web.StreamResponse | LeanResponse]]


class Front:
    """The listening socket's protocol factory: lean model calls, aiohttp for the rest."""

    def __init__(
        self,
        app: web.Application,
        serve: dict[str, Serve],
        aiohttp_server: web.Server,
        max_body_bytes: int,
    ) -> None:
        self.app = app
        self.serve = serve  # by route: "openai", "anthropic"
        self.aiohttp_server = aiohttp_server
        self.max_body_bytes = max_body_bytes
        self.connections: set[_Connection] = set()
        self._listening: asyncio.Server | None = None
        self.closed = False

    def __call__(self) -> _Connection:
        return _Connection(self)

    async def listen(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._listening = await loop.create_server(self, host, port)

    async def close(self, timeout: float = 60.0) -> None:
        """Stop listening; close each connection once its answer is written, waiting up to
        ``timeout`` for those in progress (then cancelled, as an agent hanging up would).
        The connections handed to aiohttp stop alike, at the same time."""
        self.closed = True  # a connection accepted meanwhile is closed as it is made
        if self._listening is not None:
            self._listening.close()
        self.aiohttp_server.pre_shutdown()
        await asyncio.gather(self._close_lean(timeout), self.aiohttp_server.shutdown(timeout))

    async def _close_lean(self, timeout: float) -> None:
        busy = {}
        for connection in list(self.connections):
            task = connection.close_when_done()
            if task is not None:
                busy[task] = connection
        if not busy:
            return
        _done, late = await asyncio.wait(busy, timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=1.0)
        for task in late:
            busy[task].abort()  # perhaps an agent that does not read: its buffer let go


class _Connection(asyncio.Protocol):
    """One agent connection, lean until it carries a request of another shape."""

    def __init__(self, front: Front) -> None:
        self._front = front
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._raw: list[bytes] | None = None  # this request's bytes, while it may go to aiohttp
        self._raw_size = 0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: bytearray | None = None
        self._request: ModelRequest | None = None
        self._task: asyncio.Task[None] | None = None
        self._hand_off = False
        self._stopped = False  # a callback stopped the parser on purpose
        self.closing = False  # closed once the answer in progress is written
        self._writable: asyncio.Future[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._early: list[bytes] = []  # sent while an answer's task ran: read after it
        self._early_size = 0
        self._paused = False
        self._lingering = False

    # --- the connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self._front.closed:
            transport.close()
            return
        self._front.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # as aiohttp's connections: dead peers found
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._front.connections.discard(self)
        self._transport = None
        if self._idle is not None:
            self._idle.cancel()
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(ConnectionResetError("the agent hung up"))
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the agent hung up: its call is abandoned

    def eof_received(self) -> bool:
        # The agent hung up, as aiohttp takes an end of input: the transport closes, and the
        # call in progress is cancelled.
        return False

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the agent's connection is closed")
        transport.write(data)
        if self._request is not None:
            self._request.writer.output_size += len(data)

    async def drain(self) -> None:
        if self._writable is not None and not self._writable.done():
            await self._writable

    def close(self) -> None:
        """Closed once what was written has left."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Closed now, whatever is still buffered."""
        if self._transport is not None:
            self._transport.abort()

    def close_when_done(self) -> asyncio.Task[None] | None:
        """The answer in progress, if any; the connection closes after it (at once if none)."""
        self.closing = True
        if self._task is None or self._task.done():
            self.close()
            return None
        return self._task

    def _await_request(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self._loop.call_later(IDLE_SECONDS, self._idle_too_long)

    def _idle_too_long(self) -> None:
        if self._task is None:
            self.close()

    def data_received(self, data: bytes) -> None:
        if self._lingering or (self.closing and self._task is not None):
            return  # nothing more is read on this connection
        if self._task is not None:
            # A next request sent as soon as the answer arrived, before its task ended: read
            # once it has. Past a head's worth, the agent waits.
            self._early.append(data)
            self._early_size += len(data)
            if self._early_size > MAX_HEAD and self._transport is not None and not self._paused:
                self._transport.pause_reading()
                self._paused = True
            return
        self._await_request()  # idle counts from the last byte: a head sent slowly ends too
        if self._raw is None and self._request is None:
            self._raw, self._raw_size = [], 0  # a request begins with this chunk
        if self._raw is not None:
            self._raw.append(data)
            self._raw_size += len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            if self._task is not None:
                # Bytes after the request being answered (llhttp refuses any after a
                # Connection: close): never read; closed after the answer.
                self.closing = True
            elif not self._stopped:
                # A head aiohttp answers its way; past a lean head (a body of a declared
                # length, which llhttp counts), a connection to close.
                self._hand_off = True
        if not self._hand_off and self._raw is not None and self._raw_size > MAX_HEAD:
            self._hand_off = True
        if self._hand_off:
            self._to_aiohttp()

    def _stop(self) -> _Stop:
        self._stopped = True
        return _Stop()

    def _to_aiohttp(self) -> None:
        transport, raw = self._transport, self._raw
        if transport is None or raw is None:  # past a lean head: never aiohttp's
            self.close()
            return
        if self._idle is not None:
            self._idle.cancel()
        self._front.connections.discard(self)
        handler = self._front.aiohttp_server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(b"".join(raw))

    # --- llhttp's callbacks

    def on_message_begin(self) -> None:
        if self._request is not None:  # a request pipelined behind one being answered
            self.closing = True
            raise self._stop()
        self._url, self._headers, self._body = b"", [], None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self._headers) >= MAX_HEADERS:
            self._hand_off = True
            raise self._stop()
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self._lean_request()
        if request is None:
            self._hand_off = True
            raise self._stop()
        self._raw = None  # lean: never aiohttp's
        self._request = request
        if request.body is None:  # over the size limit: refused unread, and closed after
            self.closing = True
            self._start()
            raise self._stop()
        self._body = bytearray()

    def on_body(self, body: bytes) -> None:
        if self._body is not None:
            self._body += body

    def on_message_complete(self) -> None:
        request = self._request
        if request is None or self._body is None:
            return
        request.body = bytes(self._body)
        self._body = None
        self._start()

    def _lean_request(self) -> ModelRequest | None:
        """This request, if it has the lean shape; None if it goes to aiohttp."""
        parser = self._parser
        if parser.get_method() != b"POST" or parser.get_http_version() != "1.1":
            return None
        if parser.should_upgrade():
            return None
        try:
            target = self._url.decode("ascii")
        except UnicodeDecodeError:
            return None
        match = _TARGET.fullmatch(target)
        if match is None or match[2] == "models" or "/." in target or len(target) > MAX_FIELD:
            return None
        headers: CIMultiDict[str] = CIMultiDict()
        length: bytes | None = None
        once: set[bytes] = set()
        for name, raw_value in self._headers:
            # llhttp has refused a name that is not a token, and control characters in a
            # value but tabs; it strips the space before a value, not after.
            value = raw_value.rstrip(b" ")
            if not value.isascii() or b"\t" in value or len(name) + len(raw_value) > MAX_FIELD:
                return None
            lower = name.lower()
            if lower in _NOT_LEAN:
                return None
            if lower in _ONCE:
                if lower in once:
                    return None
                once.add(lower)
            if lower == b"content-length":  # one, of digits: llhttp refuses others
                length = value
            if lower == b"connection" and b"close" in value.lower().replace(b" ", b"").split(b","):
                self.closing = True
            headers.add(_SPELLED.get(lower) or name.decode("ascii"), value.decode("ascii"))
        if length is None or b"host" not in once:
            return None
        body = None if int(length) > self._front.max_body_bytes else b""
        return ModelRequest(self, self._front.app, match[1], target, headers, body)

    # --- the answer

    def _start(self) -> None:
        request = self._request
        assert request is not None
        if self._idle is not None:
            self._idle.cancel()
        serve = self._front.serve[request.route]
        self._task = self._loop.create_task(self._answer(serve, request))

    async def _answer(self, serve: Serve, request: ModelRequest) -> None:
        complete = False
        try:
            response = await serve(request)
            if isinstance(response, LeanResponse):
                complete = response.complete
            elif request.writer.output_size == 0:
                self._send(response)
                complete = True
        except asyncio.CancelledError:
            pass  # the agent hung up, or the sidecar stops
        except ConnectionResetError:
            pass  # the agent hung up while its answer was written
        except Exception:
            log.exception("a model call's handler failed")
            if request.writer.output_size == 0:
                self.closing = True
                with contextlib.suppress(ConnectionResetError):
                    self._send(web.Response(status=500, text="500 Internal Server Error"))
        finally:
            self._task = None
            self._request = None
            if not complete or self._transport is None:
                self.close()
            elif self.closing:
                self._linger()
            else:
                self._await_request()
                self._read_early()

    def _resume(self) -> None:
        if self._paused and self._transport is not None:
            self._transport.resume_reading()
        self._paused = False

    def _read_early(self) -> None:
        early, self._early, self._early_size = b"".join(self._early), [], 0
        self._resume()
        if early:
            self.data_received(early)

    def _linger(self) -> None:
        """The last answer written: input ends, read and dropped, before the connection
        closes (or in ``LINGER_SECONDS``). Closing on unread bytes (a body refused unread, a
        request sent behind) resets the connection, and a reset can overtake the answer."""
        transport = self._transport
        if transport is None:
            return
        self._lingering = True
        self._early.clear()
        self._resume()
        if transport.can_write_eof():
            transport.write_eof()
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self._loop.call_later(LINGER_SECONDS, self.close)

    def _send(self, response: web.StreamResponse) -> None:
        """A whole answer the handler made (a refusal): written in one piece."""
        body = response.body if isinstance(response, web.Response) else None
        if not isinstance(body, bytes):
            raise TypeError(f"a lean connection cannot send {type(response).__name__}")
        framing = [("Content-Length", str(len(body)))]
        head = _head(
            response.status, response.reason, response.headers, framing, closing=self.closing
        )
        self.write(head + body)
