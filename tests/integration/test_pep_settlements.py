"""The sidecar's PDP client against the real abc-pdp: settlements ride on the next decision.

A forwarded call's settlement waits for the next Decide to carry it (one call and one
durable write for both); what no decision picks up goes in a batch of its own.
"""

from __future__ import annotations

import asyncio
import time

from pdp.api import pdp_pb2, pdp_pb2_grpc
from pep.pdp_client import PdpClient
from tests.harness import INTENT, PdpProcess, Signer

LINGER = 2.0  # long enough that a carried settlement cannot have gone in a batch
MODEL = pdp_pb2.Action(kind="model", target="model:openai/gpt-4o-mini", max_tokens=2000)


def test_a_settlement_rides_on_the_next_decision_and_a_late_one_goes_alone(
    pdp: PdpProcess, signer: Signer
) -> None:
    text = INTENT.read_text().replace("lineage: acme/support-bot", "lineage: acme/riding")
    envelope = signer.freeze(text.replace("tokens: 200000", "tokens: 3000"), "riding")
    runs = pdp_pb2_grpc.DecisionServiceStub(pdp.channel())  # type: ignore[no-untyped-call]

    def books(run_id: str) -> tuple[int, int]:
        run = runs.GetRun(pdp_pb2.GetRunRequest(run_id=run_id), timeout=5)
        return run.spent.tokens, run.reserved.tokens

    async def scenario() -> None:
        client = PdpClient(pdp.address, 3.0, settle_linger=LINGER)
        _, run_id = await client.register(envelope)
        first = await client.decide(run_id, "ride-1", MODEL)
        assert first.allow
        queued = time.monotonic()
        client.report_usage(first.reservation_id, 100)
        assert books(run_id) == (0, 2000)  # queued, not sent
        # 2000 more fit the 3000 only once the first is settled at 100: carried, it is.
        second = await client.decide(run_id, "ride-2", MODEL)
        assert time.monotonic() - queued < LINGER  # so no batch could have settled it
        assert second.allow and books(run_id) == (100, 2000)
        client.report_usage(second.reservation_id, 50)  # no decision follows: a batch
        deadline = time.monotonic() + 10
        while books(run_id) != (150, 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert books(run_id) == (150, 0)
        await client.close()

    asyncio.run(scenario())


def test_a_report_waits_its_own_linger_not_a_timer_started_for_an_earlier_one(
    pdp: PdpProcess, signer: Signer
) -> None:
    """A batch timer started by the first report must not take a later one early: the next
    decision was about to carry it, and a batch of its own would cost a second fsync."""
    text = INTENT.read_text().replace("lineage: acme/support-bot", "lineage: acme/lingering")
    envelope = signer.freeze(text, "lingering")
    runs = pdp_pb2_grpc.DecisionServiceStub(pdp.channel())  # type: ignore[no-untyped-call]

    def reserved(run_id: str) -> int:
        return int(runs.GetRun(pdp_pb2.GetRunRequest(run_id=run_id), timeout=5).reserved.tokens)

    async def scenario() -> None:
        client = PdpClient(pdp.address, 3.0, settle_linger=LINGER)
        _, run_id = await client.register(envelope)
        first = await client.decide(run_id, "linger-1", MODEL)
        started = time.monotonic()
        client.report_usage(first.reservation_id, 10)  # a batch timer starts: due at LINGER
        await asyncio.sleep(0.05)  # the agent's next call comes a moment later
        second = await client.decide(run_id, "linger-2", MODEL)  # carries the first
        await asyncio.sleep(0.8 * LINGER - (time.monotonic() - started))
        queued = time.monotonic()
        client.report_usage(second.reservation_id, 10)
        await asyncio.sleep(1.1 * LINGER - (time.monotonic() - started))
        # Past the first timer's moment: the second report is still queued, not sent.
        assert time.monotonic() - queued < LINGER
        assert reserved(run_id) == 2000
        third = await client.decide(run_id, "linger-3", MODEL)  # and this decision carries it
        assert time.monotonic() - queued < LINGER
        assert reserved(run_id) == 2000  # the third's own reservation alone
        client.report_usage(third.reservation_id, 10)
        await client.close()

    asyncio.run(scenario())
