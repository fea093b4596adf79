"""Every decision is in the log: through the real sidecar and PDP, with the official MCP client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from pdp.api import pdp_pb2, pdp_pb2_grpc
from tests.fakes.serve import FakeUpstreams
from tests.harness import INTENT, PdpProcess, PepProcess, Signer, audit_verify, start_pdp, start_pep


def scored_intent() -> str:
    """The demo intent, its search tool also taking a fractional ``score`` (``type: number``)."""
    text = INTENT.read_text().replace("lineage: acme/support-bot", "lineage: acme/log-tests")
    return text.replace(
        "      top_k: {type: integer, minimum: 1, maximum: 20}\n",
        "      top_k: {type: integer, minimum: 1, maximum: 20}\n      score: {type: number}\n",
    )


def records(state: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state / "decisions.log").read_text().splitlines()]


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


@pytest.mark.parametrize(
    "score", [0.5, -2.25, 123456.789], ids=["half", "negative", "six-decimals"]
)
def test_a_fractional_number_argument_is_decided_forwarded_and_logged(
    score: float,
    pep: PepProcess,
    pdp: PdpProcess,
    fakes: FakeUpstreams,
    signer: Signer,
    tmp_path: Path,
) -> None:
    result = asyncio.run(_call(f"{pep.url}/mcp/kb", {"query": "refunds", "score": score}))
    assert not result.is_error
    assert fakes.recorder.tool_calls("mcp-sse") == ["search"]  # forwarded as decided
    calls = [
        r
        for r in records(tmp_path / "state")
        if r["kind"] == "decision" and "args" in r["input"].get("action", {})
    ]
    assert [c["input"]["action"]["args"] for c in calls] == [{"query": "refunds", "score": score}]
    assert calls[0]["result"]["allow"] is True and calls[0]["reservation_id"]
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


@pytest.mark.parametrize(
    "args_json",
    [b'{"query":"\\ud800"}', b'{"query":"q","\\udfff":1}'],
    ids=["lone-surrogate-value", "lone-surrogate-name"],
)
def test_an_action_the_log_cannot_spell_is_refused_logged_and_holds_nothing(
    args_json: bytes, pdp: PdpProcess, signer: Signer, tmp_path: Path
) -> None:
    run_id = _run(pdp, signer)
    tool = pdp_pb2.Action(kind="tool", target="tool:kb/search", args_json=args_json)
    answer = _decide(pdp, pdp_pb2.DecideRequest(run_id=run_id, request_id="r1", action=tool))
    assert not answer.allow and answer.reasons[0].code == "bad_request"
    assert answer.decision_id.startswith("dec_") and not answer.reservation_id
    assert _remaining_tool_calls(pdp, run_id) == 100  # nothing held
    logged = [r for r in records(tmp_path / "state") if r.get("decision_id") == answer.decision_id]
    assert len(logged) == 1 and logged[0]["result"]["allow"] is False
    assert "args" not in logged[0]["input"].get("action", {})  # what could not be spelled
    fine = pdp_pb2.Action(kind="tool", target="tool:kb/search", args_json=b'{"query":"q"}')
    assert _decide(pdp, pdp_pb2.DecideRequest(run_id=run_id, request_id="r2", action=fine)).allow
    assert pdp.stop() == 0
    verified = audit_verify(tmp_path / "state")
    assert verified.returncode == 0, verified.stderr
