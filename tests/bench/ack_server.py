"""The least a local decider with a durable log can do:
``python -m tests.bench.ack_server SOCKET LOG``.

On a Unix socket, each length-prefixed frame (as ``pdp.api.decide_socket`` frames them) is
answered with a fixed 115-byte frame, about a ``DecideResponse``, once a 900-byte line,
about a decision record, is appended to ``LOG`` and fdatasynced. Frames that arrive in the
same turn of the loop share one fsync, as the PDP's group commit shares one. A bare
``asyncio.Protocol`` on uvloop, no decision: ``floor_proxy`` with ``ASK_SOCKET`` waits
for one answer per request, the floor of a proxy that waits on a durable local decision.

A connection that opens with the decide socket's preamble (a sidecar's, ``abc-pep
--pdp-socket``) is spoken to in that protocol: each ``DecideRequest`` is answered, after
the same synced line, with a well-formed allow that settles what the request carried; one
that opens with the settlements' preamble gets each batch settled whole, likewise. The
sidecar then does all its own work, but waits on the least a decider can do instead of
on the PDP: the benchmark's ``sidecar_ack`` target, which splits the sidecar's cost into
its own and what waiting on the real PDP adds.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from typing import cast

import uvloop

from pdp.api import pdp_pb2
from pdp.api.decide_socket import HEADER, OK, PIPELINED, PREAMBLE, SETTLE_PREAMBLE, frame

ANSWER = frame(b"a" * 115)
LINE = b"x" * 899 + b"\n"


@functools.cache
def allow(settlements: int) -> bytes:
    """A framed allow, as the PDP answers the benchmark's requests: a token cap above the
    request's own (so the body goes as sent), a reservation, ``settlements`` settled."""
    response = pdp_pb2.DecideResponse(
        allow=True,
        would_allow=True,
        decision_id="dec_" + "0" * 32,
        reservation_id="res_" + "0" * 32,
        settled=[True] * settlements,
    )
    response.obligations.update({"max_tokens": 4096})
    return frame(OK + response.SerializeToString())


def settled(payload: bytes) -> bytes:
    reports = len(pdp_pb2.ReportUsageBatchRequest.FromString(payload).reports)
    return frame(
        OK + pdp_pb2.ReportUsageBatchResponse(settled=[True] * reports).SerializeToString()
    )


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
        self._owed: list[tuple[asyncio.Transport, bytes]] = []

    def owe(self, transport: asyncio.Transport, answer: bytes) -> None:
        if not self._owed:
            asyncio.get_running_loop().call_soon(self._commit)
        self._owed.append((transport, answer))

    def _commit(self) -> None:
        owed, self._owed = self._owed, []
        os.write(self._fd, LINE * len(owed))
        os.fdatasync(self._fd)
        for transport, answer in owed:
            transport.write(answer)


class Ack(asyncio.Protocol):
    def __init__(self, log: Log) -> None:
        self._log = log
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._said: bytes | None = None  # a sidecar's preamble, b"" for none; None until known

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._said is None:
            preambles = (PIPELINED, PREAMBLE, SETTLE_PREAMBLE)  # as long as each other
            if len(self._buffer) < len(PREAMBLE) and any(
                said.startswith(self._buffer) for said in preambles
            ):
                return
            self._said = next((said for said in preambles if self._buffer.startswith(said)), b"")
            del self._buffer[: len(self._said)]
            if self._said == PIPELINED:
                assert self._transport is not None
                self._transport.write(PIPELINED)  # taken: requests may come back to back
        while (payload := take_frame(self._buffer)) is not None:
            assert self._transport is not None
            if self._said in (PIPELINED, PREAMBLE):
                carried = len(pdp_pb2.DecideRequest.FromString(payload).settlements)
                self._log.owe(self._transport, allow(carried))
            elif self._said == SETTLE_PREAMBLE:
                self._log.owe(self._transport, settled(payload))
            else:
                self._log.owe(self._transport, ANSWER)


async def serve(path: str, log: str) -> None:
    durable = Log(log)
    server = await asyncio.get_running_loop().create_unix_server(lambda: Ack(durable), path)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1], sys.argv[2]))
