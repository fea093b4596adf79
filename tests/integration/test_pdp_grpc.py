"""The real abc-pdp over gRPC on loopback: registration, decisions, health, metrics, budgets."""

from __future__ import annotations

import json
import random
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdp.api import pdp_pb2, pdp_pb2_grpc
from tests.harness import INTENT, PdpProcess, Signer, log_records, sample, start_pdp
from tests.harness import POLICIES as POLICIES_DIR


def stub(pdp: PdpProcess) -> pdp_pb2_grpc.DecisionServiceStub:
    return pdp_pb2_grpc.DecisionServiceStub(pdp.channel())


def register(pdp: PdpProcess, envelope: bytes) -> str:
    response = stub(pdp).RegisterManifest(
        pdp_pb2.RegisterManifestRequest(envelope=envelope), timeout=10
    )
    assert response.manifest_digest.startswith("sha256:")
    return str(response.run_id)


def tool_call(
    run_id: str, name: str, args: dict[str, object], request_id: str | None = None
) -> pdp_pb2.DecideRequest:
    return pdp_pb2.DecideRequest(
        run_id=run_id,
        request_id=request_id or f"r-{uuid.uuid4().hex}",
        action=pdp_pb2.Action(
            kind="tool", target=f"tool:kb/{name}", args_json=json.dumps(args).encode()
        ),
    )


def codes(response: pdp_pb2.DecideResponse) -> list[str]:
    return [reason.code for reason in response.reasons]


def test_allowed_and_refused_tool(pdp: PdpProcess, demo_envelope: bytes) -> None:
    run_id = register(pdp, demo_envelope)
    allowed = stub(pdp).Decide(tool_call(run_id, "search", {"query": "refund policy"}), timeout=5)
    assert allowed.allow and not allowed.reasons
    assert allowed.decision_id.startswith("dec_") and allowed.reservation_id.startswith("rsv_")
    refused = stub(pdp).Decide(tool_call(run_id, "delete_everything", {}), timeout=5)
    assert not refused.allow
    assert codes(refused) == ["tool_not_allowed"]
    assert refused.decision_id and refused.decision_id != allowed.decision_id


def test_registering_the_same_manifest_again_returns_the_same_run(
    pdp: PdpProcess, demo_envelope: bytes
) -> None:
    assert register(pdp, demo_envelope) == register(pdp, demo_envelope)


def test_struct_args_integers_arrive_as_doubles_and_are_judged_exactly(
    pdp: PdpProcess, demo_envelope: bytes
) -> None:
    run_id = register(pdp, demo_envelope)
    args = struct_pb2.Struct()
    args.update({"query": "x", "top_k": 5})  # Struct turns 5 into 5.0
    assert args.fields["top_k"].number_value == 5.0
    request = pdp_pb2.DecideRequest(
        run_id=run_id,
        request_id="s1",
        action=pdp_pb2.Action(kind="tool", target="tool:kb/search", args=args),
    )
    assert stub(pdp).Decide(request, timeout=5).allow
    # 2^53 + 1 cannot be a double: as JSON bytes it is refused, never rounded.
    big = stub(pdp).Decide(
        tool_call(run_id, "search", {"query": "x", "top_k": 2**53 + 1}), timeout=5
    )
    assert codes(big) == ["bad_request"]
    args.update({"top_k": 2**53 + 1})  # arrives as 9007199254740992.0
    request.action.args.CopyFrom(args)
    request.request_id = "s2"
    assert codes(stub(pdp).Decide(request, timeout=5)) == ["bad_request"]
    over = stub(pdp).Decide(tool_call(run_id, "search", {"query": "x", "top_k": 21}), timeout=5)
    assert codes(over) == ["tool_args_invalid"]


@pytest.mark.parametrize(
    ("request_fields", "code"),
    [
        (
            {"run_id": "run_nope", "action": pdp_pb2.Action(kind="tool", target="tool:kb/search")},
            "manifest_unknown",
        ),
        ({"action": pdp_pb2.Action(kind="tool", target="")}, "bad_request"),
        ({"action": pdp_pb2.Action(kind="teleport", target="tool:kb/search")}, "bad_request"),
        (
            {"action": pdp_pb2.Action(kind="tool", target="tool:kb/search", args_json=b"[1]")},
            "bad_request",
        ),
        (
            {
                "action": pdp_pb2.Action(
                    kind="tool", target="tool:kb/search", args_json=b'{"a":1,"a":2}'
                )
            },
            "bad_request",
        ),
        (
            {
                "action": pdp_pb2.Action(
                    kind="tool", target="tool:kb/search", args_json=b'{"q":"' + b"x" * 70000 + b'"}'
                )
            },
            "bad_request",
        ),
        (
            {"request_id": "", "action": pdp_pb2.Action(kind="tool", target="tool:kb/search")},
            "bad_request",
        ),
        (
            {
                "action": pdp_pb2.Action(
                    kind="http", target="http:billing.internal", method="BREW", path="/"
                )
            },
            "bad_request",
        ),
        ({"action": pdp_pb2.Action(kind="tool", target='tool:kb/se"arch')}, "bad_request"),
    ],
    ids=[
        "unknown-run",
        "empty-target",
        "bad-kind",
        "args-not-object",
        "duplicate-arg",
        "oversized-args",
        "no-request-id",
        "bad-method",
        "quote-in-target",
    ],
)
def test_invalid_requests_are_refused_not_crashed(
    pdp: PdpProcess, demo_envelope: bytes, request_fields: dict[str, object], code: str
) -> None:
    fields: dict[str, object] = {"run_id": register(pdp, demo_envelope), "request_id": "bad-1"}
    fields.update(request_fields)
    response = stub(pdp).Decide(pdp_pb2.DecideRequest(**fields), timeout=5)  # type: ignore[arg-type]
    assert not response.allow
    assert codes(response) == [code]
    assert response.decision_id


def _registration_error(pdp: PdpProcess, envelope: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        register(pdp, envelope)
    return caught.value


def test_tampered_envelope_refused(pdp: PdpProcess, demo_envelope: bytes) -> None:
    error = _registration_error(pdp, demo_envelope.replace(b'"sig":"', b'"sig":"AAAA', 1))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details().startswith("signature_invalid: ")


def test_manifest_pinned_to_another_policy_refused(
    pdp: PdpProcess, signer: Signer, tmp_path: Path
) -> None:
    other = tmp_path / "other-policies"
    (other / "abc").mkdir(parents=True)
    for source in (Path(__file__).resolve().parents[2] / "policies" / "abc").glob("*.rego"):
        (other / "abc" / source.name).write_text(source.read_text() + "\n# another revision\n")
    envelope = signer.freeze(
        INTENT.read_text().replace("version: 1", "version: 50"), "other", other
    )
    error = _registration_error(pdp, envelope)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details().startswith("policy_mismatch: ")


def test_steps_and_budget(pdp: PdpProcess, signer: Signer) -> None:
    text = (
        INTENT.read_text()
        .replace("version: 1", "version: 2")
        .replace("lineage: acme/support-bot", "lineage: acme/budget-test")
    )
    text = text.replace("tool_calls: 100", "tool_calls: 3")
    run_id = register(pdp, signer.freeze(text, "budget"))
    service = stub(pdp)
    results = [
        service.Decide(tool_call(run_id, "search", {"query": "q"}, f"b{i}"), timeout=5)
        for i in range(4)
    ]
    assert [r.allow for r in results] == [True, True, True, False]
    assert codes(results[3]) == ["budget_exhausted"]
    model = pdp_pb2.Action(kind="model", target="model:openai/gpt-4o-mini", max_tokens=5000)
    answer_model = pdp_pb2.Action(kind="model", target="model:anthropic/claude-haiku-4-5")
    allowed = service.Decide(
        pdp_pb2.DecideRequest(run_id=run_id, request_id="m1", action=model), timeout=5
    )
    assert allowed.allow and allowed.obligations["max_tokens"] == 2048
    early = service.Decide(
        pdp_pb2.DecideRequest(run_id=run_id, request_id="m2", action=answer_model), timeout=5
    )
    assert codes(early) == ["step_out_of_order"]
    step = pdp_pb2.Action(kind="step", target="step:answer")
    assert service.Decide(
        pdp_pb2.DecideRequest(run_id=run_id, request_id="st1", action=step), timeout=5
    ).allow
    # Naming the step the run is in again changes nothing; going back is refused.
    assert service.Decide(
        pdp_pb2.DecideRequest(run_id=run_id, request_id="st2", action=step), timeout=5
    ).allow
    back = pdp_pb2.Action(kind="step", target="step:research")
    assert codes(
        service.Decide(
            pdp_pb2.DecideRequest(run_id=run_id, request_id="st3", action=back), timeout=5
        )
    ) == ["step_out_of_order"]
    assert service.Decide(
        pdp_pb2.DecideRequest(run_id=run_id, request_id="m3", action=answer_model), timeout=5
    ).allow
    service.ReportUsage(
        pdp_pb2.ReportUsageRequest(
            reservation_id=allowed.reservation_id, tokens=700, usd_micros=12
        ),
        timeout=5,
    )
    with pytest.raises(grpc.RpcError) as again:
        service.ReportUsage(
            pdp_pb2.ReportUsageRequest(reservation_id=allowed.reservation_id, tokens=700), timeout=5
        )
    assert again.value.code() == grpc.StatusCode.NOT_FOUND
    batch = service.ReportUsageBatch(
        pdp_pb2.ReportUsageBatchRequest(
            reports=[
                pdp_pb2.ReportUsageRequest(reservation_id=results[0].reservation_id),
                pdp_pb2.ReportUsageRequest(reservation_id="rsv_unknown"),
            ]
        ),
        timeout=5,
    )
    assert list(batch.settled) == [True, False]
    run = service.GetRun(pdp_pb2.GetRunRequest(run_id=run_id), timeout=5)
    assert run.step == "answer" and list(run.completed_steps) == ["research"]
    assert run.status == "running"
    assert run.spent.tokens == 700 and run.spent.usd_micros == 12 and run.spent.tool_calls == 1
    assert run.remaining.tool_calls == 0
    assert run.remaining.tokens == 200000 - 700 - 1024  # the claude call is still reserved


def test_concurrent_mixed_decisions_never_leak(pdp: PdpProcess, signer: Signer) -> None:
    """Threads deciding at once each see their own input (an engine shared by threads would not)."""
    text = INTENT.read_text().replace("lineage: acme/support-bot", "lineage: acme/concurrency")
    text = text.replace("tool_calls: 100", "tool_calls: 100000").replace(
        "requests: 500", "requests: 100000"
    )
    run_id = register(pdp, signer.freeze(text, "concurrency"))
    service = stub(pdp)
    rng = random.Random(7)
    cases = []
    for i in range(400):
        # Unique arguments defeat the decision cache, so every call really evaluates.
        query = f"q{i}-" + "x" * rng.randint(0, 40)
        if i % 2:
            cases.append((tool_call(run_id, "search", {"query": query + "y" * 200}, f"c{i}"), []))
        else:
            cases.append(
                (tool_call(run_id, "fetch_article", {"article_id": f"KB-{i}"}, f"c{i}"), None)
            )
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda case: service.Decide(case[0], timeout=10), cases))
    wrong = 0
    for response, (_, expected) in zip(results, cases, strict=True):
        if expected is None:
            wrong += not response.allow
        else:
            wrong += response.allow or codes(response) != ["tool_args_invalid"]
    assert wrong == 0


def test_health_and_reflection(pdp: PdpProcess) -> None:
    with pdp.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "abc.pdp.v1.DecisionService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for answer in answers for s in answer.list_services_response.service}
    assert {"abc.pdp.v1.DecisionService", "grpc.health.v1.Health"} <= names


def test_metrics_are_scraped(pdp: PdpProcess, demo_envelope: bytes) -> None:
    run_id = register(pdp, demo_envelope)
    before = sample(
        pdp.metrics(),
        "abc_pdp_decisions_total",
        decision="deny",
        mode="enforce",
        reason="tool_not_allowed",
    )
    assert stub(pdp).Decide(tool_call(run_id, "search", {"query": "q"}), timeout=5).allow
    stub(pdp).Decide(tool_call(run_id, "rm_rf", {}, "m-1"), timeout=5)
    stub(pdp).Decide(tool_call(run_id, "made_up_name_12345", {}, "m-2"), timeout=5)
    text = pdp.metrics()
    assert (
        sample(
            text,
            "abc_pdp_decisions_total",
            decision="deny",
            mode="enforce",
            reason="tool_not_allowed",
        )
        == before + 2
    )
    assert (
        sample(text, "abc_pdp_decisions_total", decision="allow", mode="enforce", reason="none")
        >= 1
    )
    assert sample(text, "abc_pdp_decide_seconds_count") >= 3
    assert (
        sample(
            text,
            "abc_pdp_decisions_total",
            decision="deny",
            mode="shadow",
            reason="tool_not_allowed",
        )
        == 0
    )
    assert sample(text, "abc_pdp_manifests_rejected_total", reason="signature_invalid") >= 0
    assert 'budget="tool_calls"' in text
    assert "made_up_name" not in text  # caller text never becomes a label


def test_sigterm_stops_cleanly(signer: Signer, tmp_path: Path) -> None:
    pdp = start_pdp(signer, tmp_path / "state")
    assert pdp.stop(signal.SIGTERM) == 0
    assert "abc-pdp stopped" in pdp.output()


@pytest.mark.parametrize("problem", ["broken-policy", "missing-trust"])
def test_misconfiguration_stops_startup(signer: Signer, tmp_path: Path, problem: str) -> None:
    from tests.harness import POLICIES, pdp_flags, start_up_error

    policies, trust = POLICIES, signer.trust
    if problem == "broken-policy":
        policies = tmp_path / "broken"
        (policies / "abc").mkdir(parents=True)
        (policies / "abc" / "authz.rego").write_text("package abc.authz\n\ndecision := {\n")
    else:
        trust = tmp_path / "absent.yaml"
    start_up_error("abc-pdp", *pdp_flags(trust, tmp_path / "s", policies))


def test_every_decision_is_logged_masked_and_the_log_verifies(
    signer: Signer, demo_envelope: bytes, tmp_path: Path
) -> None:
    from tests.harness import audit_verify

    state = tmp_path / "state"
    pdp = start_pdp(signer, state, POLICIES_DIR, "--log-mask", "action.args.query")
    run_id = register(pdp, demo_envelope)
    answers = [
        stub(pdp).Decide(
            tool_call(run_id, "search", {"query": "secret question"}, f"l{i}"), timeout=5
        )
        for i in range(3)
    ] + [stub(pdp).Decide(tool_call(run_id, "drop_tables", {}, "l-deny"), timeout=5)]
    assert pdp.stop() == 0
    log = state / "decisions.log"
    records = log_records(log)
    decisions = [r for r in records if r["kind"] == "decision"]
    assert [d["decision_id"] for d in decisions] == [a.decision_id for a in answers]
    assert decisions[-1]["result"]["reasons"][0]["code"] == "tool_not_allowed"
    assert "secret question" not in log.read_text()
    assert decisions[0]["masked"] == ["action.args.query"]
    assert records[-1]["kind"] == "checkpoint"  # a clean stop signs the tail
    verified = audit_verify(state)
    assert verified.returncode == 0, verified.stderr


def test_a_newer_version_retires_the_older_run(pdp: PdpProcess, signer: Signer) -> None:
    base = INTENT.read_text().replace("lineage: acme/support-bot", "lineage: acme/versions")
    v1 = register(pdp, signer.freeze(base, "v1"))
    assert stub(pdp).Decide(tool_call(v1, "search", {"query": "q"}, "v1-a"), timeout=5).allow
    v2 = register(pdp, signer.freeze(base.replace("version: 1", "version: 2"), "v2"))
    old = stub(pdp).Decide(tool_call(v1, "search", {"query": "q"}, "v1-b"), timeout=5)
    assert codes(old) == ["run_closed"] and "superseded" in old.reasons[0].message
    assert stub(pdp).GetRun(pdp_pb2.GetRunRequest(run_id=v1), timeout=5).status == "revoked"
    assert stub(pdp).Decide(tool_call(v2, "search", {"query": "q"}, "v2-a"), timeout=5).allow


def test_a_run_registered_ahead_of_its_window_is_pending(pdp: PdpProcess, signer: Signer) -> None:
    start = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = INTENT.read_text().replace("lineage: acme/support-bot", "lineage: acme/later")
    run_id = register(pdp, signer.freeze(f"{text}\nnot_before: {start}\n", "later"))
    assert stub(pdp).GetRun(pdp_pb2.GetRunRequest(run_id=run_id), timeout=5).status == "pending"
    early = stub(pdp).Decide(tool_call(run_id, "search", {"query": "q"}), timeout=5)
    assert codes(early) == ["manifest_expired"] and "pending" in early.reasons[0].message


def step(run_id: str, target: str) -> pdp_pb2.DecideRequest:
    return pdp_pb2.DecideRequest(
        run_id=run_id,
        request_id=f"r-{uuid.uuid4().hex}",
        action=pdp_pb2.Action(kind="step", target=f"step:{target}"),
    )


@pytest.mark.parametrize("ending", ["completed", "failed"])
def test_a_run_ends_and_then_decides_nothing(pdp: PdpProcess, signer: Signer, ending: str) -> None:
    text = INTENT.read_text().replace("lineage: acme/support-bot", f"lineage: acme/{ending}")
    run_id = register(pdp, signer.freeze(text, ending))
    assert stub(pdp).Decide(step(run_id, "answer"), timeout=5).allow
    assert stub(pdp).Decide(step(run_id, f"@{ending}"), timeout=5).allow
    run = stub(pdp).GetRun(pdp_pb2.GetRunRequest(run_id=run_id), timeout=5)
    assert (run.status, run.step, list(run.completed_steps)) == (ending, "answer", ["research"])
    after = stub(pdp).Decide(tool_call(run_id, "search", {"query": "q"}), timeout=5)
    assert codes(after) == ["run_closed"] and ending in after.reasons[0].message
    assert codes(stub(pdp).Decide(step(run_id, "@failed"), timeout=5)) == ["run_closed"]
    assert codes(stub(pdp).Decide(step(run_id, "@paused"), timeout=5)) == ["run_closed"]


def test_model_reservation_covers_the_prompt_bound(pdp: PdpProcess, signer: Signer) -> None:
    text = INTENT.read_text().replace("lineage: acme/support-bot", "lineage: acme/prompt")
    run_id = register(pdp, signer.freeze(text, "prompt"))
    action = pdp_pb2.Action(
        kind="model", target="model:openai/gpt-4o-mini", max_tokens=100, input_bytes=5000
    )
    assert (
        stub(pdp)
        .Decide(pdp_pb2.DecideRequest(run_id=run_id, request_id="p1", action=action), timeout=5)
        .allow
    )
    run = stub(pdp).GetRun(pdp_pb2.GetRunRequest(run_id=run_id), timeout=5)
    assert run.remaining.tokens == 200000 - 100 - 5000
    too_big = pdp_pb2.Action(
        kind="model", target="model:openai/gpt-4o-mini", max_tokens=100, input_bytes=500000
    )
    refused = stub(pdp).Decide(
        pdp_pb2.DecideRequest(run_id=run_id, request_id="p2", action=too_big), timeout=5
    )
    assert codes(refused) == ["budget_exhausted"]


def test_an_impossible_usage_report_is_refused_and_the_reservation_kept(
    pdp: PdpProcess, signer: Signer
) -> None:
    text = INTENT.read_text().replace("lineage: acme/support-bot", "lineage: acme/huge")
    run_id = register(pdp, signer.freeze(text, "huge"))
    held = stub(pdp).Decide(tool_call(run_id, "search", {"query": "q"}), timeout=5)
    with pytest.raises(grpc.RpcError) as refused:
        stub(pdp).ReportUsage(
            pdp_pb2.ReportUsageRequest(reservation_id=held.reservation_id, tokens=2**63 - 1),
            timeout=5,
        )
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    stub(pdp).ReportUsage(
        pdp_pb2.ReportUsageRequest(reservation_id=held.reservation_id, tokens=7), timeout=5
    )
    run = stub(pdp).GetRun(pdp_pb2.GetRunRequest(run_id=run_id), timeout=5)
    assert (run.spent.tokens, run.spent.tool_calls) == (7, 1)


def _model(
    run_id: str, request_id: str, carried: list[str], **kwargs: object
) -> pdp_pb2.DecideRequest:
    return pdp_pb2.DecideRequest(
        run_id=run_id,
        request_id=request_id,
        action=pdp_pb2.Action(kind="model", target="model:openai/gpt-4o-mini", max_tokens=2000),
        settlements=[
            pdp_pb2.ReportUsageRequest(reservation_id=held, tokens=100) for held in carried
        ],
        **kwargs,  # type: ignore[arg-type]
    )


def test_a_decision_carries_settlements_settled_before_it_is_judged_and_logged_with_it(
    pdp: PdpProcess, signer: Signer
) -> None:
    text = INTENT.read_text().replace("lineage: acme/support-bot", "lineage: acme/carried")
    envelope = signer.freeze(text.replace("tokens: 200000", "tokens: 3000"), "carried")
    registered = stub(pdp).RegisterManifest(
        pdp_pb2.RegisterManifestRequest(envelope=envelope), timeout=10
    )
    run_id, digest = registered.run_id, registered.manifest_digest
    first = stub(pdp).Decide(_model(run_id, "c1", []), timeout=5)
    assert first.allow and not first.settled
    # Its 2000 tokens still held, another 2000 would not fit 3000; settled at 100 first, it does.
    assert codes(stub(pdp).Decide(_model(run_id, "c2", []), timeout=5)) == ["budget_exhausted"]
    second = stub(pdp).Decide(
        _model(run_id, "c3", [first.reservation_id], manifest_digest=digest), timeout=5
    )
    assert second.allow and list(second.settled) == [True]
    assert pdp.state is not None
    lines = log_records(pdp.state / "decisions.log")
    kinds = [
        (line["kind"], line["request_id" if line["kind"] == "decision" else "reservation_id"])
        for line in lines
        if line["kind"] in ("decision", "settlement")
    ]
    at = kinds.index(("settlement", first.reservation_id))
    assert kinds[at + 1] == ("decision", "c3")  # written together, the settlement first
    # Settled once only; a reservation of another grant is not this caller's to settle.
    other = stub(pdp).RegisterManifest(
        pdp_pb2.RegisterManifestRequest(
            envelope=signer.freeze(text.replace("acme/carried", "acme/carried-other"), "other")
        ),
        timeout=10,
    )
    theirs = stub(pdp).Decide(_model(other.run_id, "o1", []), timeout=5)
    third = stub(pdp).Decide(
        _model(run_id, "c4", [first.reservation_id, theirs.reservation_id], manifest_digest=digest),
        timeout=5,
    )
    assert list(third.settled) == [False, False]
    # Nor by naming that grant in the report: a caller bound to a manifest settles under it.
    smuggled = _model(run_id, "c6", [theirs.reservation_id], manifest_digest=digest)
    smuggled.settlements[0].manifest_digest = other.manifest_digest
    assert list(stub(pdp).Decide(smuggled, timeout=5).settled) == [False]
    run = stub(pdp).GetRun(pdp_pb2.GetRunRequest(run_id=other.run_id), timeout=5)
    assert run.reserved.tokens == 2000 and run.spent.tokens == 0
    with pytest.raises(grpc.RpcError) as too_many:
        stub(pdp).Decide(_model(run_id, "c5", ["rsv_x"] * 1025), timeout=5)
    assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
