"""Two abc-pdp replicas sharing one real redis-server: one run, one budget, one answer."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from pdp.api import pdp_pb2
from tests.harness import (
    INTENT,
    POLICIES,
    PdpProcess,
    RedisProcess,
    Signer,
    abcctl,
    log_records,
    start_pdp,
    start_redis,
)
from tests.integration.test_pdp_grpc import codes, register, step, stub, tool_call


@pytest.fixture
def replicas(
    signer: Signer, redis_server: RedisProcess, tmp_path: Path
) -> Iterator[list[PdpProcess]]:
    pdps = [
        start_pdp(signer, tmp_path / f"state-{name}", POLICIES, "--store", redis_server.url)
        for name in "ab"
    ]
    yield pdps
    for pdp in pdps:
        pdp.stop()


def freeze(signer: Signer, lineage: str, version: int = 1) -> bytes:
    text = INTENT.read_text().replace("lineage: acme/support-bot", f"lineage: acme/{lineage}")
    return signer.freeze(text.replace("version: 1", f"version: {version}"), f"{lineage}-{version}")


def run_of(pdp: PdpProcess, run_id: str) -> pdp_pb2.GetRunResponse:
    return stub(pdp).GetRun(pdp_pb2.GetRunRequest(run_id=run_id), timeout=5)


def test_a_run_registered_on_one_replica_is_decided_by_the_other(
    replicas: list[PdpProcess], signer: Signer
) -> None:
    a, b = replicas
    run_id = register(a, freeze(signer, "shared"))
    allowed = stub(b).Decide(tool_call(run_id, "search", {"query": "q"}), timeout=5)
    assert allowed.allow, allowed.reasons
    assert run_of(a, run_id).remaining.requests == 499  # reserved on B, seen on A
    stub(b).ReportUsage(
        pdp_pb2.ReportUsageRequest(reservation_id=allowed.reservation_id, tokens=0), timeout=5
    )
    assert run_of(a, run_id).spent.tool_calls == 1  # settled on B, seen on A


def test_a_replica_logs_the_grants_and_runs_it_decides_for(
    replicas: list[PdpProcess], signer: Signer
) -> None:
    """Registered and started on A, decided on B: B's own log names the grant and the run
    before their first decision there, so its audit tools need no other replica's log."""
    a, b = replicas
    grant_run = register(a, freeze(signer, "logged"))
    digest = run_of(a, grant_run).manifest_digest
    started = (
        stub(a)
        .StartRun(pdp_pb2.StartRunRequest(manifest_digest=digest, run_key="task-1"), timeout=5)
        .run_id
    )
    for run_id in (grant_run, started, started):
        allowed = stub(b).Decide(tool_call(run_id, "search", {"query": "q"}), timeout=5)
        assert allowed.allow, allowed.reasons
    assert b.state is not None
    log = b.state / "decisions.log"
    records = log_records(log)
    kinds = [(r["kind"], r.get("run_id")) for r in records if r["kind"] != "checkpoint"]
    assert kinds == [
        ("registration", grant_run),
        ("decision", grant_run),
        ("run_start", started),  # once: the second decision finds the run loaded
        ("decision", started),
        ("decision", started),
    ]
    assert records[0]["manifest_digest"] == digest
    replayed = abcctl(
        "replay", log, "--bundles", b.state / "bundles", "--pub", b.state / "pdp-log.pub",
        "--allow-tail", check=False,
    )  # fmt: skip
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert replayed.stdout.strip().endswith("3 decisions re-decided: 3 identical, 0 divergent")
    last = records[-1]["decision_id"]
    pub = b.state / "pdp-log.pub"
    explained = abcctl("explain", last, "--log", log, "--pub", pub, "--allow-tail", "--json")
    assert json.loads(explained.stdout)["run_id"] == started


def test_the_step_moves_for_every_replica(replicas: list[PdpProcess], signer: Signer) -> None:
    a, b = replicas
    run_id = register(a, freeze(signer, "steps"))
    assert stub(a).Decide(step(run_id, "answer"), timeout=5).allow
    late = stub(b).Decide(tool_call(run_id, "search", {"query": "q"}), timeout=5)
    assert codes(late) == ["step_out_of_order"]  # B knows the run left "research"
    assert codes(stub(b).Decide(step(run_id, "research"), timeout=5)) == ["step_out_of_order"]
    assert stub(b).Decide(step(run_id, "@completed"), timeout=5).allow
    assert run_of(a, run_id).status == "completed"


def test_a_request_id_gets_one_answer_and_one_charge_across_replicas(
    replicas: list[PdpProcess], signer: Signer
) -> None:
    a, b = replicas
    run_id = register(a, freeze(signer, "retries"))
    request = tool_call(run_id, "search", {"query": "q"}, request_id="retry-1")
    first, again = stub(a).Decide(request, timeout=5), stub(b).Decide(request, timeout=5)
    assert first.allow and again.allow
    assert (again.decision_id, again.reservation_id) == (first.decision_id, first.reservation_id)
    assert run_of(b, run_id).remaining.requests == 499  # charged once


def test_rollback_marks_are_shared(replicas: list[PdpProcess], signer: Signer) -> None:
    a, b = replicas
    old = freeze(signer, "rollback", 1)
    old_run = register(b, old)
    register(a, freeze(signer, "rollback", 2))
    assert run_of(b, old_run).status == "revoked"  # B learns of version 2 through Redis
    refused = codes(stub(b).Decide(tool_call(old_run, "search", {"query": "q"}), timeout=5))
    assert refused == ["run_closed"]
    # A version 1 that no replica has seen: B refuses it by the mark A raised.
    text = INTENT.read_text().replace("lineage: acme/support-bot", "lineage: acme/rollback")
    unseen = signer.freeze(text.replace("goal: ", "goal: Again. "), "rollback-unseen")
    with pytest.raises(grpc.RpcError) as caught:
        register(b, unseen)
    assert caught.value.details().startswith("manifest_rollback: ")


def test_a_replica_killed_and_restarted_keeps_the_books_from_redis(
    replicas: list[PdpProcess], signer: Signer, redis_server: RedisProcess, tmp_path: Path
) -> None:
    a, b = replicas
    run_id = register(a, freeze(signer, "restart"))
    for _ in range(3):
        assert stub(a).Decide(tool_call(run_id, "search", {"query": "q"}), timeout=5).allow
    a.stop(signal.SIGKILL)
    restarted = start_pdp(signer, tmp_path / "state-a", POLICIES, "--store", redis_server.url)
    try:
        # The log was replayed for the run, not for the books: nothing is counted twice.
        assert run_of(restarted, run_id).remaining.requests == 497
        assert run_of(b, run_id).remaining.requests == 497
    finally:
        restarted.stop()


def test_a_run_whose_replica_restarted_is_still_released_from_redis(
    signer: Signer, redis_server: RedisProcess, tmp_path: Path
) -> None:
    flags = ("--store", redis_server.url, "--run-retention", "0")
    a = start_pdp(signer, tmp_path / "state-a", POLICIES, *flags)
    envelope = freeze(signer, "orphans")
    registered = stub(a).RegisterManifest(
        pdp_pb2.RegisterManifestRequest(envelope=envelope), timeout=10
    )
    digest = registered.manifest_digest
    started = stub(a).StartRun(
        pdp_pb2.StartRunRequest(manifest_digest=digest, run_key="job-1"), timeout=5
    )
    held = stub(a).Decide(tool_call(started.run_id, "search", {"query": "q"}), timeout=5)
    assert held.allow
    assert stub(a).Decide(step(started.run_id, "@completed"), timeout=5).allow
    a.stop(signal.SIGKILL)
    # Restarted, it holds no run of Redis's: the ended run is released all the same, by it
    # (its start-up sweep) or any replica, and what it still held is settled and logged.
    restarted = start_pdp(signer, tmp_path / "state-a", POLICIES, *flags)
    try:
        with pytest.raises(grpc.RpcError) as gone:
            run_of(restarted, started.run_id)
        assert "run_released" in str(gone.value.details())
        keys = redis.Redis.from_url(redis_server.url).keys(f"*{started.run_id}*")
        assert keys == []
        lines = (tmp_path / "state-a" / "decisions.log").read_text().splitlines()
        settled = [json.loads(line) for line in lines if '"kind":"settlement"' in line]
        assert [(s["reservation_id"], s["expired"]) for s in settled] == [
            (held.reservation_id, True)
        ]
    finally:
        restarted.stop()


def test_without_redis_every_decision_is_refused_as_unavailable(
    signer: Signer, tmp_path: Path
) -> None:
    own = start_redis(tmp_path / "redis")
    pdp = start_pdp(signer, tmp_path / "state", POLICIES, "--store", own.url)
    try:
        run_id = register(pdp, freeze(signer, "outage"))
        assert stub(pdp).Decide(tool_call(run_id, "search", {"query": "q"}), timeout=5).allow
        own.stop()
        refused = stub(pdp).Decide(tool_call(run_id, "search", {"query": "q"}), timeout=10)
        assert not refused.allow and codes(refused) == ["pdp_unavailable"]
    finally:
        pdp.stop()
        own.stop()
