"""The decide socket's wire format: ``Decide`` over a local Unix socket, without gRPC.

A sidecar beside its PDP (one pod, one host) spends most of each decision's CPU in gRPC's
own machinery, on both sides. Over this socket the same ``DecideRequest`` and
``DecideResponse`` messages travel in plain frames:

- a connection opens with ``PIPELINED`` (or, from a sidecar of before, ``PREAMBLE``) from
  the client;
- a request is a 4-byte big-endian length, then a serialized ``abc.pdp.v1.DecideRequest``;
- its answer is a 4-byte big-endian length, then one status byte, then either a serialized
  ``DecideResponse`` (``OK``) or a UTF-8 reason (``REFUSED``: the request was not judged);
- after ``PIPELINED`` requests may follow one another without waiting for their answers,
  which come back in the order of the requests, after ``PIPELINED`` itself, said back at
  once. The PDP decides what one read brought as one batch, made durable with one commit,
  and writes their answers together. A PDP of before this closes such a connection
  unanswered, and the sidecar decides one request at a time on connections opened with
  ``PREAMBLE`` (a client wanting more in flight opens more connections);
- a connection that opens with ``SETTLE_PREAMBLE`` instead carries settlements: each request
  a serialized ``ReportUsageBatchRequest``, each ``OK`` answer a ``ReportUsageBatchResponse``
  (``REFUSED``: not settled, to be sent again). The batch is settled at once and answered
  once durable: the PDP may wait up to ``SETTLE_WAIT_SECONDS`` for a decision's commit to
  make it so, rather than spend a write of its own. A batch that asks for it
  (``confirm_by_decision``, to a PDP with its own store) is answered at once, ``pending``:
  its records go with the next commit, and the sidecar's next decision carries the same
  reports again, its answer saying they are durable. A PDP that does not know the preamble
  closes the connection, and the sidecar settles over gRPC instead.

A PDP that cannot serve another connection now (at its cap, stopping) says ``BUSY`` and
closes it: the sidecar refuses the call, and does not take it for a PDP of before.

Anything else (another preamble, a length over ``MAX_FRAME``, bytes that do not parse)
closes the connection, and the client refuses the call it was making: it fails closed.
There is no TLS: the file's mode (0600) guards who connects, and the client checks who
serves (the peer's user, from the socket). So it is for a sidecar on the PDP's host;
anything across a network uses gRPC with mTLS.
"""

from __future__ import annotations

import struct

__all__ = [
    "BUSY",
    "HEADER",
    "MAX_FRAME",
    "OK",
    "PIPELINED",
    "PREAMBLE",
    "REFUSED",
    "SETTLE_PREAMBLE",
    "SETTLE_WAIT_SECONDS",
    "frame",
]

PREAMBLE = b"ABC-DECIDE/1\n"
PIPELINED = b"ABC-DECIDE/2\n"
BUSY = b"ABC-BUSY/1\n"
SETTLE_PREAMBLE = b"ABC-SETTLE/1\n"  # as long as PREAMBLE: one read tells them apart
SETTLE_WAIT_SECONDS = 0.5
HEADER = struct.Struct(">I")
MAX_FRAME = (1 << 20) + 4096  # as the gRPC port's largest message (an envelope's + 4 KiB)
OK, REFUSED = b"\x00", b"\x01"


def frame(payload: bytes) -> bytes:
    """``payload`` with its length before it."""
    return HEADER.pack(len(payload)) + payload
