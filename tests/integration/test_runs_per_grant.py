"""Many runs of one signed manifest: each run key (the agent's task id) is its own run, with
its own budget and step, through real sidecars in front of a real PDP, and across PDP
replicas sharing one redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx2 as httpx
import pytest

from pdp.api import pdp_pb2
from pdp.ledger import run_id_for
from tests.fakes.serve import FakeUpstreams
from tests.harness import (
    INTENT,
    POLICIES,
    PdpProcess,
    PepProcess,
    RedisProcess,
    Signer,
    start_pdp,
    start_pep,
)
from tests.integration.test_pdp_grpc import codes, step, stub, tool_call

INVOICE = "/http/billing.internal/v1/invoices/inv-1"


def _intent(lineage: str) -> str:
    """The demo intent with room for two HTTP calls per run."""
    text = INTENT.read_text().replace("lineage: acme/support-bot", f"lineage: acme/{lineage}")
    return text.replace("requests: 500", "requests: 2")


@pytest.fixture(scope="module")
def grant(signer: Signer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("grant") / "envelope.json"
    path.write_bytes(signer.freeze(_intent("many-runs"), "many-runs"))
    return path


@pytest.fixture(scope="module")
def sidecars(
    pdp: PdpProcess, fakes: FakeUpstreams, grant: Path
) -> Iterator[tuple[PepProcess, PepProcess]]:
    upstreams = {"http:billing.internal": fakes.http_url}
    peps = [start_pep(pdp.address, upstreams, grant.parent, "--manifest", str(grant)) for _ in "ab"]
    yield peps[0], peps[1]
    for pep in peps:
        pep.stop()


def _get(pep: PepProcess, run_key: str | None) -> httpx.Response:
    headers = {"x-abc-run-key": run_key} if run_key is not None else {}
    return httpx.get(pep.url + INVOICE, headers=headers, timeout=10)


def _digest(pdp: PdpProcess, grant: Path) -> str:
    response = stub(pdp).RegisterManifest(
        pdp_pb2.RegisterManifestRequest(envelope=grant.read_bytes()), timeout=10
    )
    return str(response.manifest_digest)


def test_each_run_key_spends_its_own_budget(
    sidecars: tuple[PepProcess, PepProcess], pdp: PdpProcess, grant: Path
) -> None:
    one, _ = sidecars
    assert [_get(one, "conversation-1").status_code for _ in range(3)] == [200, 200, 403]
    refused = _get(one, "conversation-1")
    assert refused.headers["x-abc-reason"] == "budget_exhausted"
    assert [_get(one, "conversation-2").status_code for _ in range(2)] == [200, 200]
    digest = _digest(pdp, grant)
    for key in ("conversation-1", "conversation-2"):
        run = stub(pdp).GetRun(pdp_pb2.GetRunRequest(run_id=run_id_for(digest, key)), timeout=5)
        assert run.run_key == key
        assert run.remaining.requests == 0 and run.reserved.requests + run.spent.requests == 2


def test_the_same_run_key_through_two_sidecars_is_one_run(
    sidecars: tuple[PepProcess, PepProcess],
) -> None:
    one, two = sidecars
    assert _get(one, "ticket-9").status_code == 200
    assert _get(two, "ticket-9").status_code == 200
    assert _get(two, "ticket-9").headers["x-abc-reason"] == "budget_exhausted"
    assert _get(one, "ticket-9").headers["x-abc-reason"] == "budget_exhausted"


def test_without_a_run_key_the_grants_default_run_is_used(
    sidecars: tuple[PepProcess, PepProcess],
) -> None:
    one, two = sidecars
    statuses = [_get(pep, None).status_code for pep in (one, two, one)]
    assert statuses == [200, 200, 403]  # one default run, shared by both sidecars


@pytest.mark.parametrize("key", ["", "-x", "two words", "x" * 129])
def test_a_malformed_run_key_is_refused_as_a_bad_request(
    sidecars: tuple[PepProcess, PepProcess], key: str
) -> None:
    reply = _get(sidecars[0], key)
    assert reply.status_code == 400 and reply.headers["x-abc-reason"] == "bad_request"


def test_a_run_key_sent_twice_is_refused(sidecars: tuple[PepProcess, PepProcess]) -> None:
    headers = [("x-abc-run-key", "a-1"), ("x-abc-run-key", "b-2")]
    reply = httpx.get(sidecars[0].url + INVOICE, headers=headers, timeout=10)
    assert reply.status_code == 400 and reply.headers["x-abc-reason"] == "bad_request"


def test_a_run_started_on_one_replica_is_decided_by_another(
    signer: Signer, redis_server: RedisProcess, tmp_path: Path
) -> None:
    """And, released at once after it ended (retention 0), it is released for both
    replicas, also for one restarted from its log."""
    flags = ("--store", redis_server.url, "--run-retention", "0")
    replicas = [start_pdp(signer, tmp_path / f"state-{name}", POLICIES, *flags) for name in "ab"]
    try:
        a, b = replicas
        envelope = signer.freeze(_intent("replicated-runs"), "replicated-runs")
        digest = str(
            stub(a)
            .RegisterManifest(pdp_pb2.RegisterManifestRequest(envelope=envelope), timeout=10)
            .manifest_digest
        )
        start = pdp_pb2.StartRunRequest(manifest_digest=digest, run_key="job-1")
        started = stub(a).StartRun(start, timeout=5)
        assert started.started and started.run_id == run_id_for(digest, "job-1")
        again = stub(b).StartRun(start, timeout=5)  # the same run, already started on A
        assert again.run_id == started.run_id and not again.started
        call = tool_call(started.run_id, "search", {"query": "q"})
        assert stub(b).Decide(call, timeout=5).allow
        assert stub(a).Decide(tool_call(started.run_id, "search", {"query": "q"}), timeout=5).allow
        third = stub(b).Decide(tool_call(started.run_id, "search", {"query": "q"}), timeout=5)
        assert codes(third) == ["budget_exhausted"]  # two requests per run, across replicas
        with pytest.raises(grpc.RpcError) as unknown:
            stub(b).StartRun(
                pdp_pb2.StartRunRequest(manifest_digest="sha256:" + "0" * 64, run_key="job-1"),
                timeout=5,
            )
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert stub(b).Decide(step(started.run_id, "@completed"), timeout=5).allow
        assert _start(b, digest, "job-2").started  # B ended job-1: its StartRun released it
        _assert_released(a, digest, started.run_id)  # A compiled it, Redis no longer has it
        a.stop()
        replicas[0] = a = start_pdp(signer, tmp_path / "state-a", POLICIES, *flags)
        _assert_released(a, digest, started.run_id)  # A's log does not bring it back
    finally:
        for replica in replicas:
            replica.stop()


RUNS = 500
CLIENTS = 16
# The fleet's limit on requests over all runs together: below RUNS, so the load presses
# against it and most of the last runs to spend find the fleet spent, not their own budget.
FLEET_REQUESTS = RUNS - 50


def _start(pdp: PdpProcess, digest: str, key: str) -> pdp_pb2.StartRunResponse:
    request = pdp_pb2.StartRunRequest(manifest_digest=digest, run_key=key)
    return stub(pdp).StartRun(request, timeout=5)


def _refused_start(pdp: PdpProcess, digest: str, key: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        _start(pdp, digest, key)
    return refused.value


@pytest.mark.timeout(400)  # about 100 s alone; a CI machine running other tests doubles it
@pytest.mark.parametrize("replicas_count", [1, 3], ids=["one-pdp", "three-replicas"])
def test_500_runs_from_16_clients_each_spend_exactly_their_own_budget(
    replicas_count: int,
    signer: Signer,
    redis_server: RedisProcess,
    fakes: FakeUpstreams,
    tmp_path: Path,
) -> None:
    """Every run key tries one call more than its budget (one request), through 16 concurrent
    clients and three sidecars, in front of one PDP (its own memory store) or each in front
    of its own PDP replica, all sharing one redis-server: each key gets exactly its one
    call, and the second is refused.

    A call the PDP decided after the sidecar's deadline (a loaded machine) was refused
    ``pdp_unavailable`` although its reservation was made: it holds budget until it
    expires, so that key may get fewer calls, never more. The client retries such a call
    as an SDK would."""
    grant = tmp_path / "envelope.json"
    text = _intent("fleet").replace("requests: 2", "requests: 1")
    text += f"fleet:\n  requests: {FLEET_REQUESTS}\n  runs: {RUNS + 1}\n"
    grant.write_bytes(signer.freeze(text, "fleet"))
    store = ("--store", redis_server.url) if replicas_count > 1 else ()
    replicas = [
        start_pdp(signer, tmp_path / f"state-{n}", POLICIES, *store) for n in range(replicas_count)
    ]
    upstreams = {"http:billing.internal": fakes.http_url}
    peps = [
        start_pep(
            replicas[n % len(replicas)].address, upstreams, tmp_path, "--manifest", str(grant)
        )
        for n in range(3)
    ]

    def call(item: tuple[str, int]) -> tuple[str, str, int]:
        key, attempt = item
        pep = peps[(hash(key) + attempt) % len(peps)]
        late = 0
        for _ in range(5):
            reply = _get(pep, key)
            outcome = "allow" if reply.status_code == 200 else reply.headers["x-abc-reason"]
            if outcome != "pdp_unavailable":
                break
            late += 1
        return key, outcome, late

    outcomes: dict[str, list[str]] = {}
    late_calls: dict[str, int] = {}
    try:
        calls = [(f"task-{n}", attempt) for n in range(RUNS) for attempt in range(2)]
        with ThreadPoolExecutor(CLIENTS) as pool:
            for key, outcome, late in pool.map(call, calls):
                outcomes.setdefault(key, []).append(outcome)
                if late:
                    late_calls[key] = late_calls.get(key, 0) + late
        _fleet_books_in_get_run(replicas, grant)
        _runs_at_once_across_replicas((replicas * 3)[:3], grant)
    finally:
        for process in (*peps, *replicas):
            process.stop()
    assert len(outcomes) == RUNS
    allowed = 0
    for key, got in outcomes.items():
        assert got.count("allow") <= 1, key  # never past a run's budget
        allowed += got.count("allow")
        refusals = {"allow", "budget_exhausted", "fleet_budget_exhausted", "pdp_unavailable"}
        assert set(got) <= refusals, key
        if key not in late_calls:
            # Its own call and then its own budget spent; or the fleet spent before it.
            assert sorted(got) in (["allow", "budget_exhausted"], ["fleet_budget_exhausted"] * 2)
    # Never past the fleet's limit; reached but for calls decided late, each of which may
    # hold one request of the fleet until its reservation expires.
    assert FLEET_REQUESTS - sum(late_calls.values()) <= allowed <= FLEET_REQUESTS
    assert len(late_calls) < RUNS // 10, "most keys must have been decided in time"


def _fleet_books_in_get_run(replicas: list[PdpProcess], grant: Path) -> None:
    """GetRun of a run, on every replica, shows its grant's fleet books beside its own:
    the limit on requests and what is left of it, the budgets left open, the runs holding
    a slot and how many may."""
    digest = _digest(replicas[0], grant)
    request = pdp_pb2.GetRunRequest(run_id=run_id_for(digest, "task-0"))
    for replica in replicas:
        run = stub(replica).GetRun(request, timeout=5)
        assert run.effective_digest == run.manifest_digest == digest  # not narrowed
        fleet = run.fleet
        assert 0 < fleet.runs <= RUNS and fleet.max_runs == RUNS + 1
        assert sorted(fleet.open) == ["tokens", "tool_calls", "usd_micros"]
        assert fleet.remaining.tokens == fleet.remaining.tool_calls == 0
        used = fleet.spent.requests + fleet.reserved.requests
        assert 0 < used <= FLEET_REQUESTS
        assert fleet.remaining.requests == FLEET_REQUESTS - used


def _runs_at_once_across_replicas(replicas: list[PdpProcess], grant: Path) -> None:
    """The grant allows RUNS + 1 runs at once (its default run takes no slot): one more
    start fills it on one replica, the next is refused on another, an ending on the third
    frees a slot."""
    a, b, c = replicas
    digest = _digest(a, grant)
    assert _start(a, digest, "one-more").started
    refused = _refused_start(b, digest, "too-many")
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.details().startswith(
        f"fleet_runs_exhausted: the grant's fleet limit of {RUNS + 1} runs at once"
    )
    assert stub(c).Decide(step(run_id_for(digest, "task-0"), "@completed"), timeout=5).allow
    assert _start(b, digest, "too-many").started


def test_runs_at_once_released_runs_and_a_restart(signer: Signer, tmp_path: Path) -> None:
    """One PDP (memory store) whose ended runs are released at once (retention 0): a run
    that ends frees its slot; once released, GetRun, Decide and StartRun say so; a restart
    replaying the log brings the released run's state back no more than it was."""
    envelope = signer.freeze(_intent("at-once") + "fleet:\n  runs: 2\n", "at-once")
    flags = ("--run-retention", "0")
    pdp = start_pdp(signer, tmp_path / "state", POLICIES, *flags)
    try:
        digest = str(
            stub(pdp)
            .RegisterManifest(pdp_pb2.RegisterManifestRequest(envelope=envelope), timeout=10)
            .manifest_digest
        )
        first, second = (_start(pdp, digest, key).run_id for key in ("job-1", "job-2"))
        refused = _refused_start(pdp, digest, "job-3")
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "fleet limit of 2 runs at once" in refused.details()
        assert stub(pdp).Decide(tool_call(second, "search", {"query": "q"}), timeout=5).allow
        assert stub(pdp).Decide(step(first, "@completed"), timeout=5).allow
        assert _start(pdp, digest, "job-3").started  # the ending freed a slot ...
        _assert_released(pdp, digest, first)  # ... and its StartRun released the ended run
    finally:
        pdp.stop()
    again = start_pdp(signer, tmp_path / "state", POLICIES, *flags)
    try:
        _assert_released(again, digest, first)  # replayed, then released again at start-up
        kept = stub(again).GetRun(pdp_pb2.GetRunRequest(run_id=second), timeout=5)
        assert (kept.status, kept.spent.requests + kept.reserved.requests) == ("running", 1)
        assert _refused_start(again, digest, "job-4").code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        again.stop()


def _assert_released(pdp: PdpProcess, digest: str, run_id: str) -> None:
    with pytest.raises(grpc.RpcError) as gone:
        stub(pdp).GetRun(pdp_pb2.GetRunRequest(run_id=run_id), timeout=5)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert gone.value.details().startswith("run_released: the run completed")
    decided = stub(pdp).Decide(tool_call(run_id, "search", {"query": "q"}), timeout=5)
    assert codes(decided) == ["run_released"]
    assert _refused_start(pdp, digest, "job-1").code() == grpc.StatusCode.FAILED_PRECONDITION
