"""Every decision is in the log: through the real sidecar and PDP, with the official MCP client."""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from pdp.api import pdp_pb2, pdp_pb2_grpc
from tests.fakes.serve import FakeUpstreams
from tests.harness import (
    INTENT,
    PdpProcess,
    PepProcess,
    Signer,
    audit_verify,
    log_records,
    start_pdp,
    start_pep,
)


def scored_intent() -> str:
    """The demo intent, its search tool also taking a fractional ``score`` (``type: number``)."""
    text = INTENT.read_text().replace("lineage: acme/support-bot", "lineage: acme/log-tests")
    return text.replace(
        "      top_k: {type: integer, minimum: 1, maximum: 20}\n",
        "      top_k: {type: integer, minimum: 1, maximum: 20}\n      score: {type: number}\n",
    )


def records(state: Path) -> list[dict[str, Any]]:
    return log_records(state / "decisions.log")


@pytest.fixture
def fakes() -> Iterator[FakeUpstreams]:
    with FakeUpstreams() as upstreams:
        yield upstreams


@pytest.fixture
def pdp(signer: Signer, tmp_path: Path) -> Iterator[PdpProcess]:
    process = start_pdp(signer, tmp_path / "state")
    yield process
    process.stop()


@pytest.fixture
def pep(
    pdp: PdpProcess, fakes: FakeUpstreams, signer: Signer, tmp_path: Path
) -> Iterator[PepProcess]:
    envelope = tmp_path / "envelope.json"
    envelope.write_bytes(signer.freeze(scored_intent(), "scored"))
    process = start_pep(
        pdp.address, {"mcp:kb": fakes.mcp_sse_url}, tmp_path, "--manifest", str(envelope)
    )
    yield process
    process.stop()


async def _call(url: str, arguments: dict[str, Any]) -> Any:
    async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        return await session.call_tool("search", arguments)


# One sidecar and one PDP for every value: each call is its own decision, record and
# forwarded call, so the cases need no process of their own.
SCORES = {"half": 0.5, "negative": -2.25, "six-decimals": 123456.789}


def test_a_fractional_number_argument_is_decided_forwarded_and_logged(
    pep: PepProcess, pdp: PdpProcess, fakes: FakeUpstreams, signer: Signer, tmp_path: Path
) -> None:
    for case, score in SCORES.items():
        result = asyncio.run(_call(f"{pep.url}/mcp/kb", {"query": "refunds", "score": score}))
        assert not result.is_error, case
    # forwarded as decided
    assert fakes.recorder.tool_calls("mcp-sse") == ["search"] * len(SCORES)
    calls = [
        r
        for r in records(tmp_path / "state")
        if r["kind"] == "decision" and "args" in r["input"].get("action", {})
    ]
    assert [c["input"]["action"]["args"] for c in calls] == [
        {"query": "refunds", "score": score} for score in SCORES.values()
    ]
    assert all(c["result"]["allow"] is True and c["reservation_id"] for c in calls)
    assert pdp.stop() == 0
    again = start_pdp(signer, tmp_path / "state")  # the log's head is read back: it restarts
    assert again.stop() == 0
    verified = audit_verify(tmp_path / "state")
    assert verified.returncode == 0, verified.stderr


def _decide(pdp: PdpProcess, request: pdp_pb2.DecideRequest) -> pdp_pb2.DecideResponse:
    with pdp.channel() as channel:
        return pdp_pb2_grpc.DecisionServiceStub(channel).Decide(request, timeout=10)


def _run(pdp: PdpProcess, signer: Signer) -> str:
    with pdp.channel() as channel:
        stub = pdp_pb2_grpc.DecisionServiceStub(channel)
        raw = signer.freeze(scored_intent(), "scored")
        return str(stub.RegisterManifest(pdp_pb2.RegisterManifestRequest(envelope=raw)).run_id)


def _remaining_tool_calls(pdp: PdpProcess, run_id: str) -> int:
    with pdp.channel() as channel:
        stub = pdp_pb2_grpc.DecisionServiceStub(channel)
        return int(stub.GetRun(pdp_pb2.GetRunRequest(run_id=run_id)).remaining.tool_calls)


UNSPELLABLE = {
    "lone-surrogate-value": b'{"query":"\\ud800"}',
    "lone-surrogate-name": b'{"query":"q","\\udfff":1}',
}


def test_an_action_the_log_cannot_spell_is_refused_logged_and_holds_nothing(
    pdp: PdpProcess, signer: Signer, tmp_path: Path
) -> None:
    run_id = _run(pdp, signer)
    for i, (case, args_json) in enumerate(UNSPELLABLE.items()):
        tool = pdp_pb2.Action(kind="tool", target="tool:kb/search", args_json=args_json)
        request = pdp_pb2.DecideRequest(run_id=run_id, request_id=f"bad-{i}", action=tool)
        answer = _decide(pdp, request)
        assert not answer.allow and answer.reasons[0].code == "bad_request", case
        assert answer.decision_id.startswith("dec_") and not answer.reservation_id, case
        assert _remaining_tool_calls(pdp, run_id) == 100 - i, case  # nothing held
        logged = [
            r for r in records(tmp_path / "state") if r.get("decision_id") == answer.decision_id
        ]
        assert len(logged) == 1 and logged[0]["result"]["allow"] is False, case
        assert "args" not in logged[0]["input"].get("action", {}), case  # could not be spelled
        fine = pdp_pb2.Action(kind="tool", target="tool:kb/search", args_json=b'{"query":"q"}')
        request = pdp_pb2.DecideRequest(run_id=run_id, request_id=f"fine-{i}", action=fine)
        assert _decide(pdp, request).allow, case
    assert pdp.stop() == 0
    verified = audit_verify(tmp_path / "state")
    assert verified.returncode == 0, verified.stderr


# ---- a full disk ---------------------------------------------------------------------------
# The PDP's file size limit (RLIMIT_FSIZE, set from outside with prlimit) stands in for a full
# disk: Python ignores SIGXFSZ, so a write past the limit is cut short, then fails with EFBIG,
# as on a full tmpfs. It needs no privileges: the same test runs as root and as a user.


def _fill_disk(pdp: PdpProcess, log_path: Path, room: int) -> None:
    limit = log_path.stat().st_size + room
    resource.prlimit(pdp.process.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def _free_disk(pdp: PdpProcess) -> None:
    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    resource.prlimit(pdp.process.pid, resource.RLIMIT_FSIZE, unlimited)


def _health(pdp: PdpProcess) -> int:
    with pdp.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)


def _search(run_id: str, request_id: str) -> pdp_pb2.DecideRequest:
    tool = pdp_pb2.Action(kind="tool", target="tool:kb/search", args_json=b'{"query":"q"}')
    return pdp_pb2.DecideRequest(run_id=run_id, request_id=request_id, action=tool)


def _until_refused(pdp: PdpProcess, run_id: str) -> tuple[list[str], pdp_pb2.DecideResponse]:
    """Decide until the log is full: the allowed decision ids, and the first refusal."""
    allowed: list[str] = []
    for i in range(40):
        answer = _decide(pdp, _search(run_id, f"fill-{i}"))
        if not answer.allow:
            return allowed, answer
        allowed.append(answer.decision_id)
    raise AssertionError("the log never filled up")


def _whole_records(log_path: Path) -> list[dict[str, Any]]:
    data = log_path.read_bytes()
    assert data.endswith(b"\n")  # no torn tail
    return [json.loads(line) for line in data.splitlines()]


def _wait_health(pdp: PdpProcess, status: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while _health(pdp) != status:
        assert time.monotonic() < deadline, f"health never became {status}"
        time.sleep(0.1)


def test_a_full_disk_refuses_loses_no_answer_and_recovers_by_itself(
    pdp: PdpProcess, signer: Signer, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    log_path = state / "decisions.log"
    run_id = _run(pdp, signer)
    _fill_disk(pdp, log_path, room=2500)
    allowed, refused = _until_refused(pdp, run_id)
    assert allowed and refused.reasons[0].code == "pdp_unavailable"
    assert refused.decision_id.startswith("dec_") and not refused.reservation_id
    # Every answer given is a whole record on disk, and nothing refused is held.
    assert set(allowed) <= {r.get("decision_id") for r in _whole_records(log_path)}
    assert _remaining_tool_calls(pdp, run_id) == 100 - len(allowed)
    assert _health(pdp) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not _decide(pdp, _search(run_id, "while-full")).allow
    # A settlement the log cannot record is "try again" (UNAVAILABLE), not a failed call.
    _fill_disk(pdp, log_path, room=0)  # not even a short settlement record fits now
    held = next(
        r["reservation_id"] for r in _whole_records(log_path) if r.get("decision_id") == allowed[-1]
    )
    with pdp.channel() as channel, pytest.raises(grpc.RpcError) as unrecorded:
        pdp_pb2_grpc.DecisionServiceStub(channel).ReportUsage(
            pdp_pb2.ReportUsageRequest(reservation_id=held), timeout=10
        )
    assert unrecorded.value.code() is grpc.StatusCode.UNAVAILABLE
    _free_disk(pdp)  # space returns: no call needed, health comes back by itself
    _wait_health(pdp, health_pb2.HealthCheckResponse.SERVING)
    again = _decide(pdp, _search(run_id, "after"))
    assert again.allow
    assert pdp.stop() == 0 and "Traceback" not in pdp.output()
    verified = audit_verify(state)
    assert verified.returncode == 0, verified.stderr
    restarted = start_pdp(signer, state)  # the ledger rebuilt from the log agrees
    try:
        assert _remaining_tool_calls(restarted, run_id) == 100 - len(allowed) - 1
    finally:
        restarted.stop()


def test_sigterm_on_a_full_disk_exits_cleanly_and_the_log_restarts(
    pdp: PdpProcess, signer: Signer, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    run_id = _run(pdp, signer)
    _fill_disk(pdp, state / "decisions.log", room=1500)
    allowed, _ = _until_refused(pdp, run_id)
    assert pdp.stop() == 0  # its final checkpoint cannot be written: said, not a crash
    assert "Traceback" not in pdp.output()
    restarted = start_pdp(signer, state)
    try:
        assert _remaining_tool_calls(restarted, run_id) == 100 - len(allowed)
        assert _decide(restarted, _search(run_id, "after")).allow
    finally:
        assert restarted.stop() == 0
    verified = audit_verify(state)
    assert verified.returncode == 0, verified.stderr
