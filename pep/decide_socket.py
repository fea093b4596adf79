"""``abc-pep --pdp-socket PATH``: ``Decide``, and the settlements no decision carried, over
the PDP's decide socket.

Its wire format is ``pdp.api.decide_socket``.

A grpc.aio call costs the sidecar about as much CPU as proxying the request itself; a
frame on a Unix socket costs a write and a read. A pool of connections, one per decision
in flight: the protocol answers one request at a time on each. Each connection is a bare
``asyncio.Protocol``: on every decision, asyncio's streams would add their own buffering
and wake-ups to the sidecar's busiest path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from pathlib import Path

from google.protobuf.message import DecodeError, Message

from pdp.api import pdp_pb2
from pdp.api.decide_socket import HEADER, MAX_FRAME, OK, PREAMBLE, SETTLE_PREAMBLE, frame

__all__ = ["DecideSocketClient", "DecideSocketError"]

log = logging.getLogger("abc.pep")
REUSE_SECONDS = 30.0  # the PDP drops a connection idle for 60 s (pdp.server.decide_socket)
# The users a PDP may run as: the sidecar's own, or root.
OWN_USERS = frozenset({os.getuid(), 0})


class DecideSocketError(Exception):
    """No answer to trust: the PDP is down, slow, refused the request or spoke garbage."""


def _peer_uid(transport: asyncio.BaseTransport) -> int | None:
    """The user the process at the other end runs as, from the socket itself; None when the
    loop does not say."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _expire(answer: asyncio.Future[bytes]) -> None:
    if not answer.done():
        answer.set_exception(TimeoutError())


class _Connection(asyncio.Protocol):
    """One connection to the socket: a frame out, the frame that answers it back."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._received = bytearray()
        self._answer: asyncio.Future[bytes] | None = None
        self.broken = False
        self.used = time.monotonic()

    def start(
        self, transport: asyncio.Transport, path: Path, users: frozenset[int], preamble: bytes
    ) -> None:
        # Here, not in connection_made: an event loop may call that only after the
        # connection is handed back, and the preamble must precede the first request.
        self._transport = transport
        # The file's mode guards who may connect, not who serves: whoever can write to the
        # socket's directory could put a socket of their own there and answer allow.
        uid = _peer_uid(transport)
        if uid not in users:
            self.close()
            log.error("%s is served by uid %s, not this sidecar's user: refused", path, uid)
            raise PermissionError(f"served by uid {uid}, not this sidecar's user")
        transport.write(preamble)

    def data_received(self, data: bytes) -> None:
        if self._answer is None or self._answer.done():
            self._break(DecodeError("an answer nobody asked for"))
            return
        self._received += data
        if len(self._received) < HEADER.size:
            return
        (length,) = HEADER.unpack_from(self._received)
        if not 1 <= length <= MAX_FRAME:
            self._break(DecodeError(f"a frame of {length} bytes"))
        elif len(self._received) > HEADER.size + length:
            self._break(DecodeError("more than one answer"))
        elif len(self._received) == HEADER.size + length:
            self._answer.set_result(bytes(self._received[HEADER.size :]))
            self._received.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self._break(exc or ConnectionResetError("the PDP closed the decide socket"))

    def _break(self, exc: Exception) -> None:
        self.broken = True
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)
        if self._transport is not None:
            self._transport.close()

    async def exchange(self, payload: bytes, deadline: float) -> bytes:
        """The answer to ``payload``; ``TimeoutError`` once the loop's clock passes
        ``deadline``. One timer on the answer, not ``asyncio.timeout``'s cancellation of
        the whole task: this runs on every decision."""
        if self.broken or self._transport is None:
            raise ConnectionResetError("the decide socket connection is closed")
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bytes] = loop.create_future()
        self._answer = answer
        timer = loop.call_at(deadline, _expire, answer)
        self._transport.write(frame(payload))
        try:
            return await answer
        finally:
            timer.cancel()
            self._answer = None
            self.used = time.monotonic()

    def close(self) -> None:
        self.broken = True
        if self._transport is not None:
            self._transport.close()


class DecideSocketClient:
    def __init__(
        self,
        path: Path,
        max_connections: int = 64,
        users: frozenset[int] = OWN_USERS,
        reuse_seconds: float = REUSE_SECONDS,
    ) -> None:
        self._path, self._users, self._reuse_seconds = path, users, reuse_seconds
        self._idle: list[_Connection] = []
        self._settling: list[_Connection] = []  # settlements go one batch at a time
        self._slots = asyncio.Semaphore(max_connections)
        self._closed = False

    async def decide(
        self, request: pdp_pb2.DecideRequest, timeout: float
    ) -> pdp_pb2.DecideResponse:
        """The PDP's answer within ``timeout`` seconds, else ``DecideSocketError``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            if self._slots.locked():  # all connections busy: wait for one, bounded too
                async with asyncio.timeout_at(deadline):
                    await self._slots.acquire()
            else:
                await self._slots.acquire()  # at once
            try:
                answer = await self._exchange(self._idle, PREAMBLE, request, deadline)
            finally:
                self._slots.release()
            return pdp_pb2.DecideResponse.FromString(answer)
        except (OSError, TimeoutError, DecodeError) as exc:
            raise DecideSocketError(f"{self._path}: {type(exc).__name__}: {exc}") from exc

    async def settle(
        self, batch: pdp_pb2.ReportUsageBatchRequest, timeout: float
    ) -> pdp_pb2.ReportUsageBatchResponse:
        """The PDP's answer to a batch of settlements within ``timeout`` seconds, else
        ``DecideSocketError``: refused, not made durable, or a PDP that does not take
        settlements on its socket (it closes the connection)."""
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            answer = await self._exchange(self._settling, SETTLE_PREAMBLE, batch, deadline)
            return pdp_pb2.ReportUsageBatchResponse.FromString(answer)
        except (OSError, TimeoutError, DecodeError) as exc:
            raise DecideSocketError(f"{self._path}: {type(exc).__name__}: {exc}") from exc

    async def _exchange(
        self, idle: list[_Connection], preamble: bytes, request: Message, deadline: float
    ) -> bytes:
        """An OK answer's message bytes, on a connection from ``idle`` (or a new one opened
        with ``preamble``), which goes back there after it."""
        connection = self._reuse(idle) or await self._connect(deadline, preamble)
        try:
            answer = await connection.exchange(request.SerializeToString(), deadline)
        except BaseException:
            # Its answer may still come: the connection is out of step, never reused.
            connection.close()
            raise
        if self._closed:
            connection.close()
        else:
            idle.append(connection)
        if answer[:1] != OK:
            raise DecodeError(f"refused: {answer[1:201].decode(errors='replace')}")
        return answer[1:]

    async def check(self, timeout: float) -> None:
        """Connect once, as a decision would (peer checked), and keep the connection for
        the first one; ``DecideSocketError`` when that fails."""
        try:
            deadline = asyncio.get_running_loop().time() + timeout
            self._idle.append(await self._connect(deadline, PREAMBLE))
        except (OSError, TimeoutError) as exc:
            raise DecideSocketError(f"{type(exc).__name__}: {exc}") from exc

    def _reuse(self, idle: list[_Connection]) -> _Connection | None:
        """An idle connection still open: one the PDP closed meanwhile (a restart) would
        refuse the decision it was handed. One idle for half the PDP's idle limit is let go
        too, so that a request never meets the PDP closing it."""
        while idle:
            connection = idle.pop()
            if not connection.broken and time.monotonic() - connection.used < self._reuse_seconds:
                return connection
            connection.close()
        return None

    async def _connect(self, deadline: float, preamble: bytes) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout_at(deadline):
            transport, connection = await loop.create_unix_connection(_Connection, str(self._path))
        connection.start(transport, self._path, self._users, preamble)
        return connection

    async def close(self) -> None:
        self._closed = True  # those in flight are closed as they finish
        for idle in (self._idle, self._settling):
            while idle:
                idle.pop().close()
