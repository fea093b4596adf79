"""``abc-pep --pdp-socket PATH``: ``Decide`` over the PDP's decide socket.

Its wire format is ``pdp.api.decide_socket``.

A grpc.aio call costs the sidecar about as much CPU as proxying the request itself; a
frame on a Unix socket costs a write and a read. A pool of connections, one per decision
in flight: the protocol answers one request at a time on each.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from google.protobuf.message import DecodeError

from pdp.api import pdp_pb2
from pdp.api.decide_socket import HEADER, MAX_FRAME, OK, PREAMBLE, frame

__all__ = ["DecideSocketClient", "DecideSocketError"]

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class DecideSocketError(Exception):
    """No answer to trust: the PDP is down, slow, refused the request or spoke garbage."""


class DecideSocketClient:
    def __init__(self, path: Path, max_connections: int = 64) -> None:
        self._path = path
        self._idle: list[Connection] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def decide(
        self, request: pdp_pb2.DecideRequest, timeout: float
    ) -> pdp_pb2.DecideResponse:
        """The PDP's answer within ``timeout`` seconds, else ``DecideSocketError``."""
        try:
            async with asyncio.timeout(timeout), self._slots:
                connection = self._idle.pop() if self._idle else await self._connect()
                try:
                    response = await self._exchange(connection, request)
                except BaseException:
                    # Its answer may still come: the connection is out of step, never reused.
                    connection[1].close()
                    raise
                self._idle.append(connection)
                return response
        except (OSError, EOFError, TimeoutError, DecodeError) as exc:
            raise DecideSocketError(f"{type(exc).__name__}: {exc}") from exc

    async def _connect(self) -> Connection:
        reader, writer = await asyncio.open_unix_connection(self._path, limit=MAX_FRAME + 1)
        writer.write(PREAMBLE)
        return reader, writer

    @staticmethod
    async def _exchange(
        connection: Connection, request: pdp_pb2.DecideRequest
    ) -> pdp_pb2.DecideResponse:
        reader, writer = connection
        writer.write(frame(request.SerializeToString()))
        (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        if not 1 <= length <= MAX_FRAME:
            raise DecodeError(f"a frame of {length} bytes")
        answer = await reader.readexactly(length)
        if answer[:1] != OK:
            raise DecodeError(f"refused: {answer[1:201].decode(errors='replace')}")
        return pdp_pb2.DecideResponse.FromString(answer[1:])

    async def close(self) -> None:
        while self._idle:
            _reader, writer = self._idle.pop()
            writer.close()
