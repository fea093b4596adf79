"""Narrowed runs and runs bound to their manifest, through real PDPs and sidecars on
loopback: every widening is refused at StartRun naming its field; a narrowed run is judged
and budgeted by its narrowed grant (also after a restart, on another replica, and in
``explain`` and ``replay``); a run is usable only by callers of its own manifest."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    abcctl,
    start_pdp,
    start_pep,
)
from tests.integration.test_pdp_grpc import codes, stub, tool_call

INVOICE = "/http/billing.internal/v1/invoices/"
# Only invoice inv-2, and two requests: what the grant (any invoice, 500 requests) allows more.
NARROWER: dict[str, Any] = {
    "capabilities": {
        "http": [
            {"host": "billing.internal", "methods": ["GET"], "path_prefix": "/v1/invoices/inv-2"}
        ]
    },
    "budgets": {"requests": 2},
}
SEARCH = {
    "server": "kb",
    "name": "search",
    "args": {
        "query": {"type": "string", "required": True, "maxLength": 200},
        "top_k": {"type": "integer", "minimum": 1, "maximum": 20},
    },
}


def _intent(lineage: str) -> str:
    return INTENT.read_text().replace("lineage: acme/support-bot", f"lineage: acme/{lineage}")


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("narrowed-state")


@pytest.fixture(scope="module")
def grant(signer: Signer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("narrowed-grant")
    (folder / "narrower.json").write_text(json.dumps(NARROWER))
    path = folder / "envelope.json"
    path.write_bytes(signer.freeze(_intent("narrowed"), "narrowed"))
    return path


@pytest.fixture(scope="module")
def served(signer: Signer, state: Path) -> Iterator[list[PdpProcess]]:
    """The module's PDP, in a list a test may restart it into (same state, same log)."""
    processes = [start_pdp(signer, state)]
    yield processes
    processes[-1].stop()


@pytest.fixture(scope="module")
def digest(served: list[PdpProcess], grant: Path) -> str:
    register = pdp_pb2.RegisterManifestRequest(envelope=grant.read_bytes())
    return str(stub(served[-1]).RegisterManifest(register, timeout=10).manifest_digest)


def _start(
    pdp: PdpProcess, digest: str, key: str, narrower: dict[str, Any] | None
) -> pdp_pb2.StartRunResponse:
    raw = json.dumps(narrower).encode() if narrower is not None else b""
    request = pdp_pb2.StartRunRequest(manifest_digest=digest, run_key=key, narrower=raw)
    response: pdp_pb2.StartRunResponse = stub(pdp).StartRun(request, timeout=5)
    return response


def _refusal(pdp: PdpProcess, digest: str, key: str, narrower: dict[str, Any] | None) -> str:
    with pytest.raises(grpc.RpcError) as refused:
        _start(pdp, digest, key, narrower)
    error: Any = refused.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert dict(error.trailing_metadata())["abc-reason"] == "not_narrower"
    details: str = error.details()
    assert details.startswith("not_narrower: ")
    return details.removeprefix("not_narrower: ")


WIDENINGS = {
    "extra tool": (
        {"capabilities": {"tools": [SEARCH, {"server": "kb", "name": "drop_table"}]}},
        "capabilities.tools[1]: tool:kb/drop_table is not a capability of the grant",
    ),
    "larger budget": (
        {"budgets": {"tokens": 200001}},
        "budgets.tokens: 200001 is more than the grant's 200000",
    ),
    "longer lifetime": (
        {"metadata": {"expires_at": "2099-01-01T00:00:00Z"}},
        "metadata.expires_at: 2099-01-01T00:00:00Z is after the grant's",
    ),
    "looser constraint": (
        {"capabilities": {"tools": [{**SEARCH, "args": {"query": {"type": "string"}}}]}},
        "capabilities.tools[0].args.query.required: the grant requires this argument",
    ),
    "unknown step": (
        {"assembly": {"steps": [{"id": "publish", "uses": ["model:openai/gpt-4o-mini"]}]}},
        "assembly.steps[0]: step 'publish' is not a step of the grant",
    ),
    "larger per-call cap": (
        {
            "capabilities": {
                "models": [
                    {"provider": "openai", "model": "gpt-4o-mini", "max_tokens_per_call": 4096},
                    {
                        "provider": "anthropic",
                        "model": "claude-haiku-4-5",
                        "max_tokens_per_call": 1,
                    },
                ]
            }
        },
        "capabilities.models[0].max_tokens_per_call: 4096 is more than the grant's 2048",
    ),
    "shadow under enforce": ({"enforcement": "shadow"}, "enforcement: shadow"),
}


@pytest.mark.parametrize("kind", sorted(WIDENINGS))
def test_every_widening_is_refused_at_start_run_naming_its_field(
    served: list[PdpProcess], digest: str, kind: str
) -> None:
    narrower, message = WIDENINGS[kind]
    key = "widen-" + kind.replace(" ", "-")
    assert _refusal(served[-1], digest, key, narrower).startswith(message)
    # Nothing was started: the key is still free for a run that only takes away.
    assert _start(served[-1], digest, key, NARROWER).started


def _get(pep: PepProcess, invoice: str, key: str | None) -> httpx.Response:
    headers = {"x-abc-run-key": key} if key is not None else {}
    return httpx.get(pep.url + INVOICE + invoice, headers=headers, timeout=10)


def _outcome(reply: httpx.Response) -> str:
    return "allow" if reply.status_code == 200 else reply.headers["x-abc-reason"]


def test_a_narrowed_run_is_refused_what_its_manifest_allows(
    served: list[PdpProcess], fakes: FakeUpstreams, grant: Path, digest: str, state: Path
) -> None:
    upstreams = {"http:billing.internal": fakes.http_url}
    narrower = grant.parent / "narrower.json"
    narrowing = start_pep(
        served[-1].address, upstreams, state, "--manifest", str(grant), "--narrower", str(narrower)
    )
    plain = start_pep(served[-1].address, upstreams, state, "--manifest", str(grant))
    try:
        # The grant allows any invoice; the narrowed run only inv-2, and two requests.
        assert _outcome(_get(plain, "inv-1", "conv-plain")) == "allow"
        got = [_outcome(_get(narrowing, inv, "conv-1")) for inv in ("inv-1", "inv-2", "inv-2")]
        assert got == ["http_not_allowed", "allow", "allow"]
        assert _outcome(_get(narrowing, "inv-2", "conv-1")) == "budget_exhausted"
        # Its default run is the grant as signed: a narrowing sidecar never uses it.
        assert _get(narrowing, "inv-2", None).status_code == 400
        # The same run key without the narrower would be another grant: refused.
        assert _outcome(_get(plain, "inv-2", "conv-1")) == "not_narrower"
    finally:
        narrowing.stop()
        plain.stop()
    run = stub(served[-1]).GetRun(
        pdp_pb2.GetRunRequest(run_id=run_id_for(digest, "conv-1")), timeout=5
    )
    assert run.run_key == "conv-1"
    assert run.spent.requests + run.reserved.requests == 2 and run.remaining.requests == 0
    # Judged under its narrowed grant, which GetRun names beside the manifest's.
    assert run.manifest_digest == digest
    assert run.effective_digest.startswith("sha256:") and run.effective_digest != digest
    assert not run.HasField("fleet")  # the grant sets no fleet limits


def test_the_same_key_and_narrower_is_the_same_run_another_narrower_is_refused(
    served: list[PdpProcess], digest: str
) -> None:
    first = _start(served[-1], digest, "job-7", NARROWER)
    respelled = json.loads(json.dumps(NARROWER, indent=1))  # the same narrower, re-spelled
    again = _start(served[-1], digest, "job-7", respelled)
    assert first.started and not again.started and again.run_id == first.run_id
    other = {"budgets": {"requests": 1}}
    message = _refusal(served[-1], digest, "job-7", other)
    assert message == "run key 'job-7' was started with another narrower: one run key is one run"
    assert "another narrower" in _refusal(served[-1], digest, "job-7", None)


def test_abcctl_run_start_starts_a_narrowed_run_or_says_which_field_widens(
    served: list[PdpProcess], grant: Path, digest: str
) -> None:
    pdp = ["--pdp", served[-1].address]
    narrower = grant.parent / "narrower.json"
    started = abcctl("run", "start", grant, "cli-1", "--narrower", narrower, *pdp)
    assert started.stdout == f"{run_id_for(digest, 'cli-1')} started\n"
    wider = grant.parent / "wider.json"
    wider.write_text(json.dumps({"budgets": {"requests": 501}}))
    refused = abcctl("run", "start", grant, "cli-2", "--narrower", wider, *pdp, check=False)
    assert refused.returncode == 1
    assert refused.stderr == (
        "abcctl: error: the PDP refused: not_narrower: budgets.requests: 501 is more than"
        " the grant's 500\n"
    )


def test_explain_and_replay_judge_the_narrowed_run_by_its_narrowed_grant(
    served: list[PdpProcess], digest: str, state: Path
) -> None:
    run_id = _start(served[-1], digest, "explained", NARROWER).run_id
    call = pdp_pb2.DecideRequest(
        run_id=run_id,
        request_id="explain-1",
        action=pdp_pb2.Action(
            kind="http", target="http:billing.internal", method="GET", path="/v1/invoices/inv-1"
        ),
    )
    refused = stub(served[-1]).Decide(call, timeout=5)
    assert codes(refused) == ["http_not_allowed"]
    shown = abcctl(
        "explain",
        refused.decision_id,
        "--log",
        state / "decisions.log",
        "--pub",
        state / "pdp-log.pub",
        "--allow-tail",  # the PDP is still running
        "--json",
    )
    explained = json.loads(shown.stdout)
    assert explained["narrower"] == NARROWER
    assert explained["effective_digest"].startswith("sha256:")
    assert explained["effective_digest"] != digest
    consulted = explained["consulted"]["capability"]["http:billing.internal"]
    assert consulted["rules"] == [{"methods": ["GET"], "path_prefix": "/v1/invoices/inv-2"}]
    assert explained["budget"]["limits"]["requests"] == 2
    text = abcctl("explain", refused.decision_id, "--log", state / "decisions.log", "--pub",
                  state / "pdp-log.pub", "--allow-tail").stdout  # fmt: skip
    assert f"narrowed {explained['effective_digest']} by " in text
    # Judged again by the narrowed grant, every decision replays identically (the grant
    # itself would have allowed inv-1).
    replayed = abcctl(
        "replay",
        state / "decisions.log",
        "--bundles",
        state / "bundles",
        "--pub",
        state / "pdp-log.pub",
        "--allow-tail",
    )
    assert replayed.stdout.strip().endswith("identical, 0 divergent"), replayed.stdout
    # What-if with the same policy as candidate: each run keeps its own (narrowed) grant,
    # so nothing flips; judged by the grant, the inv-1 refusal would become an allow.
    what_if = abcctl(
        "replay", state / "decisions.log", "--pub", state / "pdp-log.pub", "--allow-tail",
        "--policies", POLICIES, "--json",
    )  # fmt: skip
    report = json.loads(what_if.stdout)
    assert report["deny_to_allow"] == 0 and report["allow_to_deny"] == 0, report
    assert report["unchanged"]["deny"] >= 1


def test_a_restart_restores_narrowed_runs(
    served: list[PdpProcess], signer: Signer, digest: str, state: Path
) -> None:
    run_id = _start(served[-1], digest, "restarted", NARROWER).run_id
    assert served[-1].stop() == 0
    served.append(start_pdp(signer, state))
    run = stub(served[-1]).GetRun(pdp_pb2.GetRunRequest(run_id=run_id), timeout=5)
    assert run.remaining.requests == 2  # the narrowed budget, not the grant's 500
    call = pdp_pb2.DecideRequest(
        run_id=run_id,
        request_id="after-restart",
        action=pdp_pb2.Action(
            kind="http", target="http:billing.internal", method="GET", path="/v1/invoices/inv-1"
        ),
    )
    assert codes(stub(served[-1]).Decide(call, timeout=5)) == ["http_not_allowed"]
    assert not _start(served[-1], digest, "restarted", NARROWER).started


def test_replicas_sharing_redis_know_each_runs_narrower(
    signer: Signer, redis_server: RedisProcess, tmp_path: Path
) -> None:
    replicas = [
        start_pdp(signer, tmp_path / f"state-{name}", POLICIES, "--store", redis_server.url)
        for name in "ab"
    ]
    try:
        a, b = replicas
        envelope = signer.freeze(_intent("narrowed-replicas"), "narrowed-replicas")
        register = pdp_pb2.RegisterManifestRequest(envelope=envelope)
        digest = str(stub(a).RegisterManifest(register, timeout=10).manifest_digest)
        research = ["model:openai/gpt-4o-mini", "tool:kb/search", "http:billing.internal"]
        only_search = {
            "capabilities": {"tools": [SEARCH]},
            "budgets": {"tool_calls": 1},
            # A capability dropped is dropped from the steps too: still a valid Assembly.
            "assembly": {"steps": [{"id": "research", "uses": research}]},
        }
        started = _start(a, digest, "task-1", only_search)
        # B never saw the start: it finds the narrower in Redis and refuses another one.
        assert "another narrower" in _refusal(b, digest, "task-1", None)
        again = _start(b, digest, "task-1", only_search)
        assert again.run_id == started.run_id and not again.started
        fetch = tool_call(started.run_id, "fetch_article", {"article_id": "KB-1"})
        assert codes(stub(b).Decide(fetch, timeout=5)) == ["tool_not_allowed"]
        assert stub(b).Decide(tool_call(started.run_id, "search", {"query": "q"}), timeout=5).allow
        second = stub(a).Decide(tool_call(started.run_id, "search", {"query": "q"}), timeout=5)
        assert codes(second) == ["budget_exhausted"]  # one tool call, across replicas
    finally:
        for replica in replicas:
            replica.stop()


def test_a_run_is_usable_only_by_callers_of_its_own_manifest(
    served: list[PdpProcess], fakes: FakeUpstreams, signer: Signer, grant: Path, state: Path
) -> None:
    """Two sidecars on two manifests: B's cannot spend A's run, neither by naming it to its
    sidecar nor by stating its own manifest to the PDP as a sidecar does on every call."""
    pdp = served[-1]
    other = state / "other.json"
    other.write_bytes(signer.freeze(_intent("other-agent"), "other-agent"))
    upstreams = {"http:billing.internal": fakes.http_url}
    peps = [
        start_pep(pdp.address, upstreams, state, "--manifest", str(path)) for path in (grant, other)
    ]
    try:
        a, b = peps
        assert _outcome(_get(a, "inv-1", "shared-task")) == "allow"
        digests = [
            str(stub(pdp).RegisterManifest(
                pdp_pb2.RegisterManifestRequest(envelope=path.read_bytes()), timeout=10
            ).manifest_digest)
            for path in (grant, other)
        ]  # fmt: skip
        a_run = run_id_for(digests[0], "shared-task")
        named = httpx.get(b.url + INVOICE + "inv-1", headers={"x-abc-run": a_run}, timeout=10)
        assert named.status_code == 400  # B's sidecar is bound to B's runs
        # What B's sidecar sends the PDP: its own manifest's digest, on A's run.
        call = tool_call(a_run, "search", {"query": "q"})
        call.manifest_digest = digests[1]
        refused = stub(pdp).Decide(call, timeout=5)
        assert codes(refused) == ["run_not_bound"]
        assert a_run in refused.reasons[0].message and digests[1] in refused.reasons[0].message
        malformed = tool_call(a_run, "search", {"query": "q"})
        malformed.manifest_digest, malformed.action.kind = digests[1], "teleport"
        assert codes(stub(pdp).Decide(malformed, timeout=5)) == ["run_not_bound"]
        # Nor read A's run, nor log a refusal under it, stating B's manifest.
        for call in (
            lambda: stub(pdp).GetRun(
                pdp_pb2.GetRunRequest(run_id=a_run, manifest_digest=digests[1]), timeout=5
            ),
            lambda: stub(pdp).RecordRefusal(
                pdp_pb2.RecordRefusalRequest(
                    run_id=a_run,
                    request_id="pep_x",
                    route="http",
                    reason="budget_exhausted",
                    message="forged",
                    manifest_digest=digests[1],
                ),
                timeout=5,
            ),
        ):
            with pytest.raises(grpc.RpcError) as denied:
                call()
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        allowed = stub(pdp).Decide(tool_call(a_run, "search", {"query": "q"}), timeout=5)
        report = pdp_pb2.ReportUsageRequest(
            reservation_id=allowed.reservation_id, tokens=0, manifest_digest=digests[1]
        )
        with pytest.raises(grpc.RpcError) as unsettled:
            stub(pdp).ReportUsage(report, timeout=5)
        error: Any = unsettled.value
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error.details().startswith("run_not_bound: ")
        batch = pdp_pb2.ReportUsageBatchRequest(reports=[report])
        assert list(stub(pdp).ReportUsageBatch(batch, timeout=5).settled) == [False]
        report.manifest_digest = digests[0]
        stub(pdp).ReportUsage(report, timeout=5)  # A's own sidecar settles it
        # A's sidecar settles its own call in a batch once 100 ms passed with no decision to
        # carry it: waited for, not assumed.
        for _ in range(100):
            run = stub(pdp).GetRun(pdp_pb2.GetRunRequest(run_id=a_run), timeout=5)
            if not run.reserved.requests:
                break
            time.sleep(0.05)
        assert run.spent.requests == 2 and run.reserved.requests == 0
    finally:
        for pep in peps:
            pep.stop()
