"""pep/pdp_client.py: an answer from the PDP is trusted only when it is well formed."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2

from pdp.api import ReasonCode, pdp_pb2, pdp_pb2_grpc
from pep.pdp_client import PdpClient, Verdict, _verdict
from tests.harness import DecideRelay

MODEL = pdp_pb2.Action(kind="model", target="model:openai/gpt-4o-mini")
TOOL = pdp_pb2.Action(kind="tool", target="tool:kb/search")


def _reason(code: str = "tool_not_allowed") -> pdp_pb2.Reason:
    return pdp_pb2.Reason(code=code, message="m")


def test_an_allow_with_its_obligations_and_reservation() -> None:
    obligations = struct_pb2.Struct()
    obligations.update({"max_tokens": 512})
    verdict = _verdict(
        pdp_pb2.DecideResponse(
            allow=True, decision_id="dec_1", obligations=obligations, reservation_id="rsv_1"
        ),
        MODEL,
    )
    assert verdict == Verdict(True, None, "", "dec_1", {"max_tokens": 512}, "rsv_1")


def test_a_refusal_names_its_first_reason() -> None:
    verdict = _verdict(
        pdp_pb2.DecideResponse(
            allow=False, decision_id="dec_1", reasons=[_reason(), _reason("budget_exhausted")]
        ),
        TOOL,
    )
    assert not verdict.allow and verdict.reason is ReasonCode.TOOL_NOT_ALLOWED


def test_a_shadow_answer_goes_ahead_with_the_would_be_refusal() -> None:
    verdict = _verdict(
        pdp_pb2.DecideResponse(
            allow=True, shadow=True, would_allow=False, decision_id="dec_1", reasons=[_reason()]
        ),
        TOOL,
    )
    assert verdict.allow and verdict.shadow and verdict.reason is ReasonCode.TOOL_NOT_ALLOWED


@pytest.mark.parametrize(
    "response",
    [
        pdp_pb2.DecideResponse(allow=True),
        pdp_pb2.DecideResponse(allow=True, decision_id="d", reasons=[_reason()]),
        pdp_pb2.DecideResponse(allow=False, decision_id="d"),
        pdp_pb2.DecideResponse(allow=False, shadow=True, decision_id="d", reasons=[_reason()]),
        pdp_pb2.DecideResponse(allow=True, shadow=True, would_allow=False, decision_id="d"),
        pdp_pb2.DecideResponse(allow=False, decision_id="d", reasons=[_reason("made_up")]),
    ],
    ids=[
        "no-decision-id",
        "allow-with-reasons",
        "refusal-without-reason",
        "shadow-that-refuses",
        "shadow-refusal-without-reason",
        "unknown-reason-code",
    ],
)
def test_a_malformed_answer_is_refused(response: pdp_pb2.DecideResponse) -> None:
    with pytest.raises(ValueError):
        _verdict(response, TOOL)


@pytest.mark.parametrize(
    "obligations",
    [{"redact": True}, {"max_tokens": 64, "redact": True}, {"max_tokens": "64"}, {}],
    ids=["unknown-alone", "unknown-beside-a-cap", "cap-as-text", "uncapped-model-call"],
)
def test_an_obligation_the_sidecar_cannot_apply_is_refused(obligations: dict[str, object]) -> None:
    response = pdp_pb2.DecideResponse(allow=True, decision_id="d")
    response.obligations.update(obligations)
    with pytest.raises(ValueError):
        _verdict(response, MODEL)


class _Outage(pdp_pb2_grpc.DecisionServiceServicer):
    """A PDP whose first Decide fails and whose second does not read carried settlements
    (as a PDP before they existed): it answers no ``settled``. Batches are recorded."""

    def __init__(self) -> None:
        self.decides = 0
        self.carried: list[list[str]] = []
        self.batches: list[list[str]] = []

    async def Decide(self, request, context):  # type: ignore[no-untyped-def]
        self.decides += 1
        self.carried.append([s.reservation_id for s in request.settlements])
        if self.decides == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        return pdp_pb2.DecideResponse(allow=True, decision_id="dec_1")

    async def ReportUsageBatch(self, request, context):  # type: ignore[no-untyped-def]
        self.batches.append([r.reservation_id for r in request.reports])
        return pdp_pb2.ReportUsageBatchResponse(settled=[True] * len(request.reports))


@contextlib.asynccontextmanager
async def _serving(pdp: pdp_pb2_grpc.DecisionServiceServicer) -> AsyncIterator[str]:
    """``pdp`` on a real gRPC server on loopback: its address."""
    server = grpc.aio.server()
    pdp_pb2_grpc.add_DecisionServiceServicer_to_server(pdp, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def test_settlements_a_decision_did_not_settle_are_sent_again() -> None:
    async def scenario() -> _Outage:
        pdp = _Outage()
        async with _serving(pdp) as address:
            client = PdpClient(address, 3.0, settle_linger=0.3)
            client.report_usage("rsv_a", 10)
            refused = await client.decide("run_1", "r1", TOOL)  # carries rsv_a, fails
            assert not refused.allow and refused.reason is ReasonCode.PDP_UNAVAILABLE
            client.report_usage("rsv_b", 20)
            assert (await client.decide("run_1", "r2", TOOL)).allow  # carries both, unread
            await client.close()  # the batch goes before the client closes
        return pdp

    pdp = asyncio.run(scenario())
    assert pdp.carried == [["rsv_a"], ["rsv_a", "rsv_b"]]
    assert pdp.batches == [["rsv_a", "rsv_b"]]  # in order, once, none lost


class _Hanging(_Outage):
    """A PDP that takes a decision and never answers it."""

    async def Decide(self, request, context):  # type: ignore[no-untyped-def]
        self.carried.append([s.reservation_id for s in request.settlements])
        await asyncio.sleep(30)


def test_settlements_a_cancelled_decision_carried_are_sent_again() -> None:
    async def scenario() -> _Hanging:
        pdp = _Hanging()
        async with _serving(pdp) as address:
            client = PdpClient(address, 10.0, settle_linger=0.1)
            client.report_usage("rsv_a", 10)
            deciding = asyncio.create_task(client.decide("run_1", "r1", TOOL))
            for _ in range(300):  # until the PDP holds the decision and what it carried
                if pdp.carried:
                    break
                await asyncio.sleep(0.01)
            deciding.cancel()  # as a shutdown or a closing stdio bridge does
            with pytest.raises(asyncio.CancelledError):
                await deciding
            await client.close()  # the batch goes before the client closes
        return pdp

    pdp = asyncio.run(scenario())
    assert pdp.carried == [["rsv_a"]]
    assert pdp.batches == [["rsv_a"]]  # not lost with the cancelled decision


def test_batches_the_decide_socket_refuses_go_over_grpc_and_skip_it_a_while(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A PDP of before settlements on its socket closes such a connection: the batch goes
    over gRPC at once, said once, and the next batches do not try the socket again."""
    where = Path(tempfile.mkdtemp(prefix="abc-old-"))  # short: a socket path is 107 bytes
    # No PDP behind it: this client only settles, and is closed on.
    listener = DecideRelay(where / "pdp.sock", where / "d.sock", decisions_only=True)

    async def scenario() -> _Outage:
        pdp = _Outage()
        async with _serving(pdp) as address:
            client = PdpClient(address, 3.0, settle_linger=0.05, decide_socket=where / "d.sock")
            client.report_usage("rsv_a", 10)
            await asyncio.sleep(0.4)
            client.report_usage("rsv_b", 20)
            await client.close()
        return pdp

    try:
        pdp = asyncio.run(scenario())
    finally:
        listener.close()
        shutil.rmtree(where, ignore_errors=True)
    assert pdp.batches == [["rsv_a"], ["rsv_b"]]
    assert len(listener.said) == 1 and listener.said[0].startswith(b"ABC-SETTLE/1")
    assert caplog.text.count("usage reports go over gRPC for 60 s") == 1
