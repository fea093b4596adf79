"""Settles reservations with the PDP, off the request path and without calls of their own.

Each forwarded call ends with one settlement. Sent as its own RPC, each would cost the
sidecar and the PDP a gRPC call and the PDP an fsync per request. Instead the next
``Decide`` carries what is queued (``take``), and the PDP makes both durable with one
write; what no decision picks up within ``linger`` seconds travels in one
``ReportUsageBatch``: on the decide socket when decisions go there (a gRPC call costs the
sidecar and the PDP more CPU than a decision does on the socket, and an agent whose calls
come more than ``linger`` apart settles every one this way), else over gRPC, which is also
where a batch the socket did not take goes next. A reservation settled late only holds its
worst case a little longer: conservative, never an overspend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import TypeVar

import grpc

from pdp.api import pdp_pb2, pdp_pb2_grpc
from pdp.api.decide_socket import SETTLE_WAIT_SECONDS
from pep.decide_socket import DecideSocketClient, DecideSocketError

__all__ = ["UsageReporter"]

log = logging.getLogger("abc.pep")
MAX_BATCH = 256
_Item = TypeVar("_Item")
RETRIES = 2
SOCKET_PAUSE = 60  # seconds over gRPC after the decide socket did not take a batch


class UsageReporter:
    def __init__(
        self,
        stub: pdp_pb2_grpc.DecisionServiceStub,
        deadline: float,
        linger: float = 0.1,
        decide_socket: DecideSocketClient | None = None,
    ) -> None:
        self._stub, self._socket = stub, decide_socket
        self._socket_after = 0.0  # monotonic time before which batches skip the socket
        self._deadline = deadline
        self._linger = linger
        # Each report with the time it was queued: a batch goes only once the oldest has
        # waited ``linger``. A timer that fired every ``linger`` instead would take the report
        # queued just before it, which the next decision was about to carry: a second fsync.
        self._queue: deque[tuple[float, pdp_pb2.ReportUsageRequest]] = deque()
        # Settled on the socket, not yet durable (answered pending): the next decision
        # carries them again, and its answer says they are durable.
        self._confirming: deque[pdp_pb2.ReportUsageRequest] = deque()
        self._task: asyncio.Task[None] | None = None

    def report(
        self, reservation_id: str, tokens: int, usd_micros: int = 0, bound: str = ""
    ) -> None:
        report = pdp_pb2.ReportUsageRequest(
            reservation_id=reservation_id,
            tokens=max(tokens, 0),
            usd_micros=max(usd_micros, 0),
            manifest_digest=bound,
        )
        self._queue.append((time.monotonic(), report))
        self._drain_soon()

    def take(self) -> list[pdp_pb2.ReportUsageRequest]:
        """For a decision to carry (at most a batch): the reports settled and still to be
        confirmed durable, then what is queued."""
        confirming = _first(self._confirming, MAX_BATCH)
        return confirming + self._queued(MAX_BATCH - len(confirming))

    def _queued(self, most: int = MAX_BATCH) -> list[pdp_pb2.ReportUsageRequest]:
        return [report for _, report in _first(self._queue, most)]

    def unsettled(self, reports: Sequence[pdp_pb2.ReportUsageRequest]) -> None:
        """Reports a decision carried but the PDP did not answer for: sent again, first."""
        now = time.monotonic()
        self._queue.extendleft((now, report) for report in reversed(reports))
        self._drain_soon()

    def _drain_soon(self) -> None:
        if self._queue and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._queue:
            waited = time.monotonic() - self._queue[0][0]
            if waited < self._linger:
                await asyncio.sleep(self._linger - waited)
                continue  # decisions may have carried it meanwhile
            # The oldest has waited long enough: the batch takes the newer ones too, since
            # it costs the PDP one fsync however many it holds.
            await self._send(self._queued())

    async def _send(self, batch: list[pdp_pb2.ReportUsageRequest], confirm: bool = True) -> None:
        """Settle ``batch``; with ``confirm``, on the socket, answered before it is durable
        (its records then go with the next commit, none of their own) and kept until the
        next decision, which carries it again, confirms it."""
        request = pdp_pb2.ReportUsageBatchRequest(reports=batch, confirm_by_decision=confirm)
        timeout = max(self._deadline, 1.0)
        if self._socket is not None and time.monotonic() >= self._socket_after:
            try:
                # The PDP may hold the answer until a decision's commit makes it durable.
                answer = await self._socket.settle(request, timeout + SETTLE_WAIT_SECONDS)
                if answer.pending:
                    self._confirming.extend(batch)
                return
            except DecideSocketError as exc:
                # An abc-pdp of before settlements on its socket closes such a connection:
                # over gRPC for a while, rather than a wasted connection every batch.
                self._socket_after = time.monotonic() + SOCKET_PAUSE
                log.warning(
                    "usage reports go over gRPC for %d s: the decide socket did not take them (%s)",
                    SOCKET_PAUSE,
                    exc,
                )
        for attempt in range(RETRIES + 1):
            try:
                await self._stub.ReportUsageBatch(request, timeout=timeout)
                return
            except grpc.aio.AioRpcError as exc:
                failure = exc.code().name
            await asyncio.sleep(0.1 * (attempt + 1))
        # Unsettled reservations stay held at their worst case: conservative, never an overspend.
        log.warning(
            "%d usage reports not delivered (%s): their reservations stay held at the worst"
            " case until they expire",
            len(batch),
            failure,
        )

    async def flush(self, timeout: float = 5.0) -> None:
        """Deliver what is queued, and make durable what is still to be confirmed (on
        shutdown), bounded in time."""
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task}, timeout=timeout)
        # No decision is coming to confirm them: answered only once durable.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while batch := _first(self._confirming, MAX_BATCH):
                    await self._send(batch, confirm=False)


def _first(queue: deque[_Item], most: int) -> list[_Item]:
    """Up to ``most`` items taken from the front of ``queue``."""
    return [queue.popleft() for _ in range(min(len(queue), most))]
