"""The least a local decider with a durable log can do:
``python -m tests.bench.ack_server SOCKET LOG``.

On a Unix socket, each length-prefixed frame (as ``pdp.api.decide_socket`` frames them) is
answered with a fixed 115-byte frame, about a ``DecideResponse``, once a 900-byte line,
about a decision record, is appended to ``LOG`` and fdatasynced. Frames that arrive in the
same turn of the loop share one fsync, as the PDP's group commit shares one. A bare
``asyncio.Protocol`` on uvloop, no decision: ``floor_proxy`` with ``ASK_SOCKET`` waits
for one answer per request, the floor of a proxy that waits on a durable local decision.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import cast

import uvloop

from pdp.api.decide_socket import HEADER, frame

ANSWER = frame(b"a" * 115)
LINE = b"x" * 899 + b"\n"


def take_frame(buffer: bytearray) -> bytes | None:
    """The first whole frame's payload, cut from ``buffer``; None until one has arrived."""
    if len(buffer) < HEADER.size:
        return None
    end = HEADER.size + HEADER.unpack_from(buffer)[0]
    if len(buffer) < end:
        return None
    payload = bytes(buffer[HEADER.size : end])
    del buffer[:end]
    return payload


class Log:
    """Answers owed, written and synced together at the end of the loop's turn."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._owed: list[asyncio.Transport] = []

    def owe(self, transport: asyncio.Transport) -> None:
        if not self._owed:
            asyncio.get_running_loop().call_soon(self._commit)
        self._owed.append(transport)

    def _commit(self) -> None:
        owed, self._owed = self._owed, []
        os.write(self._fd, LINE * len(owed))
        os.fdatasync(self._fd)
        for transport in owed:
            transport.write(ANSWER)


class Ack(asyncio.Protocol):
    def __init__(self, log: Log) -> None:
        self._log = log
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while take_frame(self._buffer) is not None:
            assert self._transport is not None
            self._log.owe(self._transport)


async def serve(path: str, log: str) -> None:
    durable = Log(log)
    server = await asyncio.get_running_loop().create_unix_server(lambda: Ack(durable), path)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1], sys.argv[2]))
