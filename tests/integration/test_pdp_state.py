"""Run state: idempotent request ids, expiring reservations, and recovery after kill -9."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from pdp.api import pdp_pb2, pdp_pb2_grpc
from pdp.api.decide_socket import OK, PREAMBLE, frame
from pdp.decisionlog import SettlementRecord
from pdp.decisionlog.chain import record_hash
from pdp.decisionlog.records import line_fields
from pdp.decisionlog.segments import sealed_paths, segment_paths
from pdp.manifest.canonical import canonical_record_bytes
from tests.harness import (
    INTENT,
    POLICIES,
    PdpProcess,
    Signer,
    abcctl,
    audit_verify,
    log_records,
    pdp_flags,
    read_frame,
    start_pdp,
    start_up_error,
)


def stub(pdp: PdpProcess) -> pdp_pb2_grpc.DecisionServiceStub:
    return pdp_pb2_grpc.DecisionServiceStub(pdp.channel())


def tool(run_id: str, request_id: str, name: str = "search") -> pdp_pb2.DecideRequest:
    return pdp_pb2.DecideRequest(
        run_id=run_id,
        request_id=request_id,
        action=pdp_pb2.Action(kind="tool", target=f"tool:kb/{name}", args_json=b'{"query": "q"}'),
    )


def envelope(signer: Signer, lineage: str) -> bytes:
    return signer.freeze(INTENT.read_text().replace("acme/support-bot", f"acme/{lineage}"), lineage)


def run_of(pdp: PdpProcess, raw: bytes) -> str:
    return str(stub(pdp).RegisterManifest(pdp_pb2.RegisterManifestRequest(envelope=raw)).run_id)


def test_a_retried_request_id_gets_the_same_answer_and_one_charge(
    signer: Signer, tmp_path: Path
) -> None:
    pdp = start_pdp(signer, tmp_path / "state")
    try:
        run_id = run_of(pdp, envelope(signer, "idempotent"))
        with ThreadPoolExecutor(8) as pool:  # duplicates racing each other, too
            answers = list(pool.map(lambda _: stub(pdp).Decide(tool(run_id, "same-id")), range(8)))
        assert len({a.decision_id for a in answers}) == 1
        assert len({a.reservation_id for a in answers}) == 1 and answers[0].allow
        run = stub(pdp).GetRun(pdp_pb2.GetRunRequest(run_id=run_id))
        assert run.remaining.tool_calls == 99  # charged once
        assert stub(pdp).Decide(tool(run_id, "other-id")).decision_id != answers[0].decision_id
    finally:
        pdp.stop()


def test_an_unreported_reservation_expires_at_its_worst_case(
    signer: Signer, tmp_path: Path
) -> None:
    pdp = start_pdp(signer, tmp_path / "state", POLICIES, "--reservation-ttl", "0.5")
    try:
        run_id = run_of(pdp, envelope(signer, "expiry"))
        model = pdp_pb2.Action(kind="model", target="model:openai/gpt-4o-mini", max_tokens=300)
        held = stub(pdp).Decide(pdp_pb2.DecideRequest(run_id=run_id, request_id="m", action=model))
        time.sleep(0.7)
        stub(pdp).Decide(
            tool(run_id, "later")
        )  # any decision sweeps the run's expired reservations
        run = stub(pdp).GetRun(pdp_pb2.GetRunRequest(run_id=run_id))
        assert run.spent.tokens == 300  # settled at the worst case it reserved
        late = stub(pdp).ReportUsageBatch(
            pdp_pb2.ReportUsageBatchRequest(
                reports=[pdp_pb2.ReportUsageRequest(reservation_id=held.reservation_id, tokens=5)]
            )
        )
        assert list(late.settled) == [False]  # already settled: never counted twice
    finally:
        pdp.stop()
    records = log_records(tmp_path / "state" / "decisions.log")
    assert any(r["kind"] == "settlement" and r.get("expired") for r in records)


def _logged_decision_ids(log_path: Path) -> set[str]:
    return {
        json.loads(line).get("decision_id")
        for segment in segment_paths(log_path)
        for line in segment.read_text().splitlines()
    }


def _snapshot_written(state: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not list((state / "snapshots").glob("*.snap")):
        assert time.monotonic() < deadline, "no snapshot was taken"
        time.sleep(0.1)


def test_state_survives_kill_9_from_a_snapshot_and_agrees_with_the_log(
    signer: Signer, tmp_path: Path
) -> None:
    """Runs of one grant under load, a snapshot taken meanwhile, more load after it, kill -9:
    the restart loads the snapshot and replays the tail, and every run's GetRun is what it
    was. Damaged snapshots: a full replay, the same state. The log rotated meanwhile, and
    verify, replay and explain read it across its segments."""
    state = tmp_path / "state"
    log_path = state / "decisions.log"
    flags = ("--snapshot-every", "20", "--segment-bytes", "16384")
    pdp = start_pdp(signer, state, POLICIES, *flags)
    grant = run_of(pdp, envelope(signer, "crash"))
    digest = stub(pdp).GetRun(pdp_pb2.GetRunRequest(run_id=grant)).manifest_digest
    runs = [grant] + [
        stub(pdp).StartRun(pdp_pb2.StartRunRequest(manifest_digest=digest, run_key=f"t{k}")).run_id
        for k in range(3)
    ]
    seen: list[pdp_pb2.DecideResponse] = []

    def load(i: int) -> None:
        call = tool(runs[i % 4], f"c{i}", "search" if i % 3 else "rm_rf")
        seen.append(stub(pdp).Decide(call, timeout=5))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(load, range(60)))
    _snapshot_written(state)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(load, range(60, 100)))  # the tail after the snapshot
    step = stub(pdp).Decide(
        pdp_pb2.DecideRequest(
            run_id=runs[1],
            request_id="step",
            action=pdp_pb2.Action(kind="step", target="step:answer"),
        )
    )
    assert step.allow
    first = next(answer for answer in seen if answer.reservation_id)
    stub(pdp).ReportUsage(pdp_pb2.ReportUsageRequest(reservation_id=first.reservation_id, tokens=0))
    before = [stub(pdp).GetRun(pdp_pb2.GetRunRequest(run_id=run_id)) for run_id in runs]
    pdp.stop(signal.SIGKILL)  # no checkpoint, no flush: whatever was answered must be on disk

    assert {answer.decision_id for answer in seen} <= _logged_decision_ids(log_path)
    assert sealed_paths(log_path)  # the log rotated under load

    def restarted() -> tuple[PdpProcess, list[pdp_pb2.GetRunResponse]]:
        again = start_pdp(signer, state, POLICIES, *flags)
        return again, [stub(again).GetRun(pdp_pb2.GetRunRequest(run_id=r)) for r in runs]

    again, after = restarted()
    try:
        assert "restored state from the snapshot at seq" in again.output()
        assert after == before
        assert after[1].step == "answer" and list(after[1].completed_steps) == ["research"]
        replay = stub(again).Decide(tool(runs[1], "c1"))  # an old request id: the old answer
        original = next(a for a in seen if a.decision_id == replay.decision_id)
        assert original.allow == replay.allow
    finally:
        again.stop()  # a clean stop snapshots too
    for snapshot in (state / "snapshots").glob("*.snap"):
        data = bytearray(snapshot.read_bytes())
        data[-2] ^= 1  # one flipped bit in the state: its digest no longer matches
        snapshot.write_bytes(bytes(data))
    third, replayed = restarted()
    try:
        output = third.output()
        assert "does not match its digest (damaged)" in output
        assert "WARNING" in output and "replaying the whole decision log" in output
        assert replayed == before
    finally:
        third.stop()

    verified = audit_verify(state)
    assert verified.returncode == 0, verified.stderr  # every segment, one chain, signed end
    pub = state / "pdp-log.pub"
    decided = abcctl("replay", log_path, "--bundles", state / "bundles", "--pub", pub)
    assert "0 divergent" in decided.stdout and "101 decisions re-decided" in decided.stdout
    first_segment = map(json.loads, sealed_paths(log_path)[0].read_text().splitlines())
    oldest = next(record for record in first_segment if record["kind"] == "decision")
    explained = abcctl("explain", oldest["decision_id"], "--log", log_path, "--pub", pub, "--json")
    assert json.loads(explained.stdout)["decision_id"] == oldest["decision_id"]


def test_a_request_id_reused_for_another_action_is_refused_also_after_restart(
    signer: Signer, tmp_path: Path
) -> None:
    pdp = start_pdp(signer, tmp_path / "state")
    try:
        run_id = run_of(pdp, envelope(signer, "reuse"))
        first = stub(pdp).Decide(tool(run_id, "one-id", "search"))
        assert first.allow
        other = stub(pdp).Decide(tool(run_id, "one-id", "fetch_article"))
        assert not other.allow and other.reasons[0].code == "bad_request"
        # A registration refused before the restart: its record names no run.
        with pytest.raises(grpc.RpcError):
            stub(pdp).RegisterManifest(pdp_pb2.RegisterManifestRequest(envelope=b"{}"))
    finally:
        pdp.stop(signal.SIGKILL)
    again = start_pdp(signer, tmp_path / "state")  # replays the refused registration too
    try:
        retried = stub(again).Decide(tool(run_id, "one-id", "search"))
        # The first answer stays the answer: the logged refusal of the reuse did not replace it.
        assert (retried.allow, retried.decision_id) == (True, first.decision_id)
    finally:
        again.stop()


class _SocketDecider:
    """Decide on the PDP's decide socket, blocking, as the sidecar's frames do."""

    def __init__(self, path: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(2)
        self._sock.connect(str(path))
        self._sock.sendall(PREAMBLE)
        self._reader = self._sock.makefile("rb")

    def Decide(self, request: pdp_pb2.DecideRequest, timeout: float) -> pdp_pb2.DecideResponse:
        self._sock.sendall(frame(request.SerializeToString()))
        answer = read_frame(self._reader)
        if answer is None:
            raise ConnectionResetError("the PDP is gone")
        assert answer[:1] == OK
        return pdp_pb2.DecideResponse.FromString(answer[1:])


def test_kill_9_under_load_loses_no_answer_a_client_saw(signer: Signer, tmp_path: Path) -> None:
    import threading

    import grpc

    state = tmp_path / "state"
    decide_socket = Path(tempfile.mkdtemp(prefix="abc-k9-")) / "decide.sock"  # a short path
    # Half the clients decide over gRPC, half on the decide socket: the same durability.
    flags = ("--snapshot-every", "30", "--decide-socket", str(decide_socket))
    pdp = start_pdp(signer, state, POLICIES, *flags)
    run_id = run_of(pdp, envelope(signer, "underload"))
    seen: list[str] = []
    answered: set[str] = set()
    stop = threading.Event()

    def client(n: int) -> None:
        try:
            service = stub(pdp) if n % 2 else _SocketDecider(decide_socket)
            for i in range(10_000):
                if stop.is_set():
                    return
                answer = service.Decide(
                    tool(run_id, f"{n}-{i}", "search" if i % 4 else "rm"), timeout=2
                )
                seen.append(answer.decision_id)
                answered.add(type(service).__name__)
        except (grpc.RpcError, OSError):
            return  # the PDP died under us: this answer was never seen

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    _snapshot_written(state)  # taken while the clients decide: the state gate holds them back
    time.sleep(0.3)  # and more decisions after it
    pdp.stop(signal.SIGKILL)
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    assert len(seen) > 50 and len(answered) == 2  # over gRPC and on the socket
    logged = {
        json.loads(line).get("decision_id")
        for line in (state / "decisions.log").read_text(errors="replace").splitlines()
        if line.endswith("}")
    }
    assert set(seen) <= logged
    again = start_pdp(signer, state, POLICIES, *flags)  # a torn tail is cut, the tail verifies
    try:
        assert "restored state from the snapshot at seq" in again.output()
        run = stub(again).GetRun(pdp_pb2.GetRunRequest(run_id=run_id))
        records = log_records(state / "decisions.log")
        reserved = sum(
            r.get("cost", {}).get("tool_calls", 0) for r in records if r["kind"] == "decision"
        )
        # The ledger agrees with the log: every logged reservation, and nothing else, is held.
        assert run.spent.tool_calls == 0 and run.remaining.tool_calls == 100 - reserved
        assert reserved > 0
    finally:
        again.stop()
        shutil.rmtree(decide_socket.parent, ignore_errors=True)


def test_a_record_added_while_the_pdp_was_stopped_stops_its_start(
    signer: Signer, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    pdp = start_pdp(signer, state)
    run_id = run_of(pdp, envelope(signer, "forged-tail"))
    reservation = stub(pdp).Decide(tool(run_id, "r1")).reservation_id
    assert pdp.stop() == 0
    # Anyone who can write the file can chain a line after its closing checkpoint: here,
    # one settling the reservation at almost nothing.
    log = state / "decisions.log"
    last = json.loads(log.read_bytes().splitlines()[-1])
    forged = SettlementRecord(
        time=datetime.now(UTC), run_id=run_id, reservation_id=reservation, tokens=1, usd_micros=0
    )
    line = canonical_record_bytes(line_fields(forged, last["seq"] + 1, record_hash(last)))
    with log.open("ab") as handle:
        handle.write(line + b"\n")
    error = start_up_error("abc-pdp", *pdp_flags(signer.trust, state))
    assert "not written by this PDP" in error
