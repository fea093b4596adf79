"""``abc-pep --pdp-socket PATH``: ``Decide``, and the settlements no decision carried, over
the PDP's decide socket; ``--pdp-decide HOST:PORT``: the same over TLS, to a PDP on another
host (``abc-pdp --decide-listen``), this sidecar showing its client certificate.

Its wire format is ``pdp.api.decide_socket``.

A grpc.aio call costs the sidecar about as much CPU as proxying the request itself; a
frame on a Unix socket costs a write and a read. Decisions share one connection, each
written as it comes without waiting for the answers before it, which come back in order:
the PDP decides what arrived together as one batch, with one commit and one write back
(``pdp.server.decide_socket``). Nothing is sent on such a connection before the PDP has
said its preamble back: a PDP of before that closes it instead, and gets the decisions one
at a time on connections of their own for a while. Settlements take connections of their
own, one batch at a time on each. Each connection is a bare ``asyncio.Protocol``: on every
decision, asyncio's streams would add their own buffering and wake-ups to the sidecar's
busiest path.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, cast

from google.protobuf.message import DecodeError

from pdp.api import pdp_pb2
from pdp.api.decide_socket import (
    BUSY,
    HEADER,
    MAX_FRAME,
    OK,
    PIPELINED,
    PREAMBLE,
    SETTLE_PREAMBLE,
    frame,
)

__all__ = ["DecideSocketClient", "DecideSocketError", "TlsPeer", "UnixPeer"]

log = logging.getLogger("abc.pep")
REUSE_SECONDS = 30.0  # the PDP drops a connection idle for 60 s (pdp.server.decide_socket)
ALONE_SECONDS = 60.0  # decided one at a time this long after a PDP did not take PIPELINED
OPEN_SECONDS = 5.0  # to open a connection decisions share: each waits its own deadline
# The users a PDP may run as: the sidecar's own, or root.
OWN_USERS = frozenset({os.getuid(), 0})


class DecideSocketError(Exception):
    """No answer to trust: the PDP is down, slow, refused the request or spoke garbage."""


class _Busy(ConnectionRefusedError):
    """The PDP said ``BUSY``: it cannot serve another connection now."""


class _NotPipelined(ConnectionResetError):
    """Closed at ``PIPELINED`` without saying it back: a PDP of before, deciding one at a
    time. Nothing was sent on the connection."""


def _peer_uid(transport: asyncio.BaseTransport) -> int | None:
    """The user the process at the other end runs as, from the socket itself; None when the
    loop does not say."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


@dataclass(frozen=True)
class UnixPeer:
    """The PDP's socket on this host, served by one of ``users``."""

    path: Path
    users: frozenset[int] = OWN_USERS
    # A PDP of before pipelining closes the connection at its preamble: taken for one.
    old_pdps: ClassVar[bool] = True
    transport: ClassVar[str] = "decide_socket"  # one of pep.metrics.TRANSPORTS

    def __str__(self) -> str:
        return str(self.path)

    async def open(
        self, factory: Callable[[], _Connection]
    ) -> tuple[asyncio.Transport, _Connection]:
        loop = asyncio.get_running_loop()
        transport, connection = await loop.create_unix_connection(factory, str(self.path))
        # The file's mode guards who may connect, not who serves: whoever can write to the
        # socket's directory could put a socket of their own there and answer allow.
        uid = _peer_uid(transport)
        if uid not in self.users:
            transport.close()
            log.error("%s is served by uid %s, not this sidecar's user: refused", self.path, uid)
            raise PermissionError(f"served by uid {uid}, not this sidecar's user")
        return transport, connection


@dataclass(frozen=True)
class TlsPeer:
    """A PDP on another host, known by its certificate: ``context`` trusts the PDP's CA
    alone and holds this sidecar's client certificate; ``server_name`` is checked in the
    PDP's."""

    host: str
    port: int
    context: ssl.SSLContext
    server_name: str
    # Every PDP serving TLS pipelines: one that closes at the preamble is stopping, or busy.
    old_pdps: ClassVar[bool] = False
    transport: ClassVar[str] = "decide_tls"

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    async def open(
        self, factory: Callable[[], _Connection]
    ) -> tuple[asyncio.Transport, _Connection]:
        loop = asyncio.get_running_loop()
        transport, connection = await loop.create_connection(
            factory,
            self.host,
            self.port,
            ssl=self.context,
            server_hostname=self.server_name,
            ssl_handshake_timeout=OPEN_SECONDS,
        )
        return transport, connection


class _Connection(asyncio.Protocol):
    """One connection to the socket: requests out as they come, their answers back in the
    same order."""

    def __init__(self, preamble: bytes, old_pdps: bool = True) -> None:
        self._transport: asyncio.Transport | None = None
        self._received = bytearray()
        self._waiting: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self.broken = False
        self._retired = False  # takes no more requests; closed once it has answered all
        self._first = True  # nothing heard yet: it may be ``BUSY``
        # Kept: each asyncio.get_running_loop() is a getpid() system call on Python 3.11.
        self._loop = asyncio.get_running_loop()
        # Set once the PDP said ``PIPELINED`` back: a request sent before could be one a PDP
        # of before never read, or one it did; after it, never sent twice. Made here, not
        # in ``start``: a loop may hand over the first bytes before the connection.
        self.greeted: asyncio.Future[None] | None = None
        if preamble == PIPELINED:
            self.greeted = self._loop.create_future()
        self._preamble = preamble
        self._old_pdps = old_pdps
        self.used = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # to close it, if need be

    def start(self, transport: asyncio.Transport) -> None:
        # Here, not in connection_made: an event loop may call that only after the
        # connection is handed back, and the preamble must precede the first request.
        self._transport = transport
        transport.write(self._preamble)

    def usable(self, reuse_seconds: float) -> bool:
        """Open and taking requests. One idle for ``reuse_seconds`` is let go, so that a
        request never meets the PDP closing it (it drops one idle for twice that)."""
        if self.broken or self._retired or self._loop.is_closed():
            return False  # closed loop: made under an earlier asyncio.run, useless in this one
        if not self._waiting and time.monotonic() - self.used >= reuse_seconds:
            self.close()
            return False
        return True

    def data_received(self, data: bytes) -> None:
        received = self._received
        received += data
        if self._first:
            if len(received) < len(BUSY) and BUSY.startswith(received):
                return  # perhaps BUSY, cut short (its first bytes are PIPELINED's too)
            if received.startswith(BUSY):
                self._break(_Busy("the PDP turned the connection away: busy"))
                return
            self._first = False
        if self.greeted is not None and not self.greeted.done():
            if not (received.startswith(PIPELINED) or PIPELINED.startswith(received)):
                self._break(DecodeError("not the decide socket's protocol"))
                return
            if len(received) < len(PIPELINED):
                return
            del received[: len(PIPELINED)]
            self.greeted.set_result(None)
        while len(received) >= HEADER.size:
            (length,) = HEADER.unpack_from(received)
            if not 1 <= length <= MAX_FRAME:
                self._break(DecodeError(f"a frame of {length} bytes"))
                return
            end = HEADER.size + length
            if len(received) < end:
                return
            if not self._waiting:
                self._break(DecodeError("an answer nobody asked for"))
                return
            answer = self._waiting.popleft()
            if not answer.done():  # done: its caller gave up waiting, the answer is dropped
                answer.set_result(bytes(memoryview(received)[HEADER.size : end]))
            del received[:end]
        if self._retired:
            self.retire()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None and self._old_pdps and self.greeted is not None and not self.greeted.done():
            # A clean end before any word: a PDP of before reads the preamble and closes. A
            # reset or a broken pipe is a PDP going away, or turning us away, instead.
            exc = _NotPipelined("the PDP closed the connection at its preamble")
        self._break(exc or ConnectionResetError("the PDP closed the decide socket"))

    def _break(self, exc: Exception) -> None:
        self.broken = True
        if self.greeted is not None and not self.greeted.done():
            self.greeted.set_exception(exc)
        while self._waiting:
            answer = self._waiting.popleft()
            if not answer.done():
                answer.set_exception(exc)
        if self._transport is not None:
            self._transport.close()

    def _expire(self, answer: asyncio.Future[bytes]) -> None:
        if not answer.done():
            answer.set_exception(TimeoutError())
        # The answers behind a late one come later still: new requests go elsewhere.
        self.retire()

    async def exchange(self, payload: bytes, deadline: float) -> bytes:
        """The answer to ``payload``; ``TimeoutError`` once the loop's clock passes
        ``deadline``. One timer on the answer, not ``asyncio.timeout``'s cancellation of
        the whole task: this runs on every decision."""
        if self.broken or self._transport is None:
            raise ConnectionResetError("the decide socket connection is closed")
        answer: asyncio.Future[bytes] = self._loop.create_future()
        self._waiting.append(answer)
        timer = self._loop.call_at(deadline, self._expire, answer)
        self._transport.write(frame(payload))
        try:
            return await answer
        finally:
            timer.cancel()
            self.used = time.monotonic()
            if self._retired:  # this caller may have been the last one waiting
                self.retire()

    def retire(self) -> None:
        """Take no more requests; close once no caller waits for an answer (at once if
        none does)."""
        self._retired = True
        if all(answer.done() for answer in self._waiting):
            self.close()

    def close(self) -> None:
        self.broken = True
        if self._transport is not None:
            self._transport.close()


class DecideSocketClient:
    def __init__(
        self,
        peer: Path | UnixPeer | TlsPeer,
        max_in_flight: int = 64,
        reuse_seconds: float = REUSE_SECONDS,
    ) -> None:
        self.peer = UnixPeer(peer) if isinstance(peer, Path) else peer
        self._reuse_seconds = reuse_seconds
        self._deciding: _Connection | None = None  # where decisions go
        self._opening: asyncio.Task[_Connection] | None = None
        # Until then (loop time) decisions go one at a time, each on a connection of its
        # own (a PDP of before), from ``_idle`` and back.
        self._alone_until = 0.0
        self._idle: list[_Connection] = []
        self._settling: list[_Connection] = []  # settlements go one batch at a time
        self._slots = asyncio.Semaphore(max_in_flight)
        self._closed = False

    async def decide(
        self, request: pdp_pb2.DecideRequest, timeout: float
    ) -> pdp_pb2.DecideResponse:
        """The PDP's answer within ``timeout`` seconds, else ``DecideSocketError``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        payload = request.SerializeToString()
        try:
            if self._slots.locked():  # as many in flight as allowed: wait, bounded too
                async with asyncio.timeout_at(deadline):
                    await self._slots.acquire()
            else:
                await self._slots.acquire()  # at once
            try:
                answer = await self._exchange(loop, payload, deadline)
            finally:
                self._slots.release()
            return pdp_pb2.DecideResponse.FromString(_accepted(answer))
        except (OSError, TimeoutError, DecodeError) as exc:
            raise DecideSocketError(f"{self.peer}: {type(exc).__name__}: {exc}") from exc

    async def _exchange(
        self, loop: asyncio.AbstractEventLoop, payload: bytes, deadline: float
    ) -> bytes:
        if loop.time() >= self._alone_until:
            try:
                connection = await self._connection(deadline)
            except _NotPipelined:
                self._go_alone()
            else:
                return await connection.exchange(payload, deadline)
        return await self._alone(self._idle, PREAMBLE, payload, deadline)

    def _go_alone(self) -> None:
        now = asyncio.get_running_loop().time()
        if now >= self._alone_until:  # the first of those who waited for it says so
            log.warning(
                "%s: the PDP takes one decision at a time on a connection (a PDP of before):"
                " so decided for %.0f s",
                self.peer,
                ALONE_SECONDS,
            )
            self._alone_until = now + ALONE_SECONDS

    async def settle(
        self, batch: pdp_pb2.ReportUsageBatchRequest, timeout: float
    ) -> pdp_pb2.ReportUsageBatchResponse:
        """The PDP's answer to a batch of settlements within ``timeout`` seconds, else
        ``DecideSocketError``: refused, not made durable, or a PDP that does not take
        settlements on its socket (it closes the connection)."""
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            answer = await self._alone(
                self._settling, SETTLE_PREAMBLE, batch.SerializeToString(), deadline
            )
            return pdp_pb2.ReportUsageBatchResponse.FromString(_accepted(answer))
        except (OSError, TimeoutError, DecodeError) as exc:
            raise DecideSocketError(f"{self.peer}: {type(exc).__name__}: {exc}") from exc

    async def _alone(
        self, idle: list[_Connection], preamble: bytes, payload: bytes, deadline: float
    ) -> bytes:
        """The answer to ``payload`` on a connection of its own, from ``idle`` (or opened
        with ``preamble``), which goes back there after it."""
        connection = self._reuse(idle) or await self._connect(deadline, preamble)
        try:
            answer = await connection.exchange(payload, deadline)
        except BaseException:
            connection.close()  # unanswered: the next request goes on a fresh one
            raise
        pipelining_again = (
            idle is self._idle and asyncio.get_running_loop().time() >= self._alone_until
        )
        if self._closed or pipelining_again:
            connection.close()
        else:
            idle.append(connection)
        return answer

    async def _connection(self, deadline: float) -> _Connection:
        """The connection decisions go on: the one open, or one opened for all who wait."""
        if self._closed:
            raise ConnectionResetError("the decide socket client is closed")
        current = self._deciding
        if current is not None and current.usable(self._reuse_seconds):
            return current
        if self._opening is None:
            opened_by = asyncio.get_running_loop().time() + OPEN_SECONDS
            self._opening = asyncio.ensure_future(self._connect(opened_by, PIPELINED))
            self._opening.add_done_callback(self._opened)
        async with asyncio.timeout_at(deadline):
            # Shielded: one caller's deadline does not end the others' wait.
            return await asyncio.shield(self._opening)

    def _opened(self, opening: asyncio.Task[_Connection]) -> None:
        self._opening = None
        if opening.cancelled() or opening.exception() is not None:
            return  # each waiter raises it; the next decision tries again
        if self._deciding is not None:
            self._deciding.retire()
        self._deciding = opening.result()
        if self._closed:
            self._deciding.retire()
        while self._idle:  # each holds a thread of the PDP until its idle limit
            self._idle.pop().close()

    async def check(self, timeout: float) -> None:
        """Connect once, as a decision would (peer checked), and keep the connection for
        the decisions; ``DecideSocketError`` when that fails."""
        try:
            await self._connection(asyncio.get_running_loop().time() + timeout)
        except _NotPipelined:
            self._go_alone()  # reachable, and decides: one at a time
        except _Busy:
            log.warning("%s: the PDP is busy (at its connection cap, or stopping)", self.peer)
        except (OSError, TimeoutError, DecodeError) as exc:
            raise DecideSocketError(f"{type(exc).__name__}: {exc}") from exc

    def _reuse(self, idle: list[_Connection]) -> _Connection | None:
        """An idle connection still open: one the PDP closed meanwhile (a restart) would
        refuse the batch it was handed."""
        while idle:
            connection = idle.pop()
            if connection.usable(self._reuse_seconds):
                return connection
            connection.close()
        return None

    async def _connect(self, deadline: float, preamble: bytes) -> _Connection:
        async with asyncio.timeout_at(deadline):
            transport, connection = await self.peer.open(
                lambda: _Connection(preamble, self.peer.old_pdps)
            )
        connection.start(transport)
        if connection.greeted is not None:
            try:
                async with asyncio.timeout_at(deadline):
                    await connection.greeted
            except BaseException:
                connection.close()
                raise
        return connection

    async def close(self) -> None:
        self._closed = True  # those in flight on the open connection are answered first
        if self._deciding is not None:
            self._deciding.retire()
        for idle in (self._idle, self._settling):
            while idle:
                idle.pop().close()


def _accepted(answer: bytes) -> bytes:
    """An OK answer's message bytes; ``DecodeError`` for a refusal."""
    if answer[:1] != OK:
        raise DecodeError(f"refused: {answer[1:201].decode(errors='replace')}")
    return answer[1:]
