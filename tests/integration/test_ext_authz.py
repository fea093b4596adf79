"""Envoy ext_authz v3 on the real abc-pdp's gRPC port, asked by a client built from xds-protos.

Every Check goes through the decision path of ``Decide``: the same decision for the same
request id, logged, charged once. Fail closed: no run, an unknown run, a request that
cannot be mapped or a body that was not forwarded whole is refused, never OK.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdp.api import pdp_pb2, pdp_pb2_grpc
from tests.harness import INTENT, PdpProcess, Signer

CHAT = "/openai/v1/chat/completions"


def fresh_run(pdp: PdpProcess, signer: Signer, name: str) -> str:
    text = INTENT.read_text().replace("lineage: acme/support-bot", f"lineage: acme/{name}")
    stub = pdp_pb2_grpc.DecisionServiceStub(pdp.channel())
    envelope = signer.freeze(text, name)
    return str(
        stub.RegisterManifest(pdp_pb2.RegisterManifestRequest(envelope=envelope), timeout=10).run_id
    )


@pytest.fixture(scope="module")
def run_id(pdp: PdpProcess, signer: Signer) -> str:
    """A run that stays in its first step ("research")."""
    return fresh_run(pdp, signer, "ext-authz")


def check(
    pdp: PdpProcess,
    method: str,
    path: str,
    headers: dict[str, str],
    *,
    host: str = "billing.internal",
    body: bytes | None = None,
    size: int | None = None,
    route: str | None = None,
) -> Any:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id=uuid.uuid4().hex,
        method=method,
        path=path,
        host=host,
        scheme="http",
        protocol="HTTP/1.1",
        headers={
            ":authority": host,
            ":path": path,
            ":method": method,
            **({"content-type": "application/json"} if body is not None else {}),
            **headers,
        },
        size=len(body) if size is None and body is not None else (-1 if size is None else size),
    )
    if body is not None:
        http.body = body.decode()  # what Envoy sends with with_request_body (no pack_as_bytes)
    if route is None:  # as deploy/envoy/envoy.yaml tags its routes
        route = next((p for p in ("openai", "anthropic") if path.startswith(f"/{p}/")), "")
    request = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http),
            context_extensions={"abc_route": route} if route else {},
        )
    )
    return external_auth_pb2_grpc.AuthorizationStub(pdp.channel()).Check(request, timeout=10)


def headers_of(options: Any) -> dict[str, str]:
    return {option.header.key: option.header.value for option in options}


def allowed(response: Any) -> str:
    assert response.status.code == grpc.StatusCode.OK.value[0], response
    assert response.WhichOneof("http_response") == "ok_response"
    decision_id = headers_of(response.ok_response.headers)["x-abc-decision-id"]
    assert decision_id.startswith("dec_")
    # The sidecar's headers (x-abc-run at least) never reach the upstream.
    assert "x-abc-run" in response.ok_response.headers_to_remove
    return decision_id


def refused(response: Any, status: int, reason: str) -> dict[str, Any]:
    assert response.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0], response
    denied = response.denied_response
    assert denied.status.code == status
    headers = headers_of(denied.headers)
    assert headers["x-abc-reason"] == reason
    assert headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = json.loads(denied.body)
    assert body["reason"] == reason and body["decision_id"] == headers["x-abc-decision-id"]
    return body


def chat(model: str, max_tokens: int | None = 100, **extra: Any) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return json.dumps({**body, **extra}).encode()


def test_http_requests_allowed_and_refused(pdp: PdpProcess, run_id: str) -> None:
    run = {"x-abc-run": run_id}
    allowed(check(pdp, "GET", "/v1/invoices/42?expand=lines", run))
    refused(check(pdp, "DELETE", "/v1/invoices/42", run), 403, "http_not_allowed")
    refused(check(pdp, "GET", "/admin/users", run), 403, "http_not_allowed")
    refused(check(pdp, "GET", "/v1/invoices/42", run, host="evil.example"), 403, "http_not_allowed")
    refused(check(pdp, "GET", "/v1/invoices/../admin", run), 403, "http_not_allowed")
    refused(
        check(pdp, "GET", "/v1/invoices/1", {**run, "x-http-method-override": "DELETE"}),
        400,
        "bad_request",
    )


def test_model_requests_allowed_and_refused(pdp: PdpProcess, signer: Signer) -> None:
    run = {
        "x-abc-run": fresh_run(pdp, signer, "ext-authz-models"),
        "content-type": "application/json",
    }
    allowed(check(pdp, "POST", CHAT, run, body=chat("gpt-4o-mini")))
    body = refused(check(pdp, "POST", CHAT, run, body=chat("gpt-5")), 403, "model_not_allowed")
    assert "gpt-5" in body["detail"]
    claude = json.dumps({"model": "claude-haiku-4-5", "max_tokens": 64, "messages": []}).encode()
    # Claude is granted in the "answer" step only; x-abc-step moves the run there first.
    refused(
        check(pdp, "POST", "/anthropic/v1/messages", run, body=claude), 403, "step_out_of_order"
    )
    moved = {**run, "x-abc-step": "answer"}
    allowed(check(pdp, "POST", "/anthropic/v1/messages", moved, body=claude))


@pytest.mark.parametrize(
    ("headers", "body", "size", "reason"),
    [
        ({}, chat("gpt-4o-mini"), None, "manifest_unknown"),
        ({"x-abc-run": "run_nope"}, chat("gpt-4o-mini"), None, "manifest_unknown"),
        ({"x-abc-run": "RUN"}, None, None, "bad_request"),  # body not forwarded
        ({"x-abc-run": "RUN"}, chat("gpt-4o-mini"), 10_000, "bad_request"),  # cut short
        (
            {"x-abc-run": "RUN", "x-envoy-auth-partial-body": "true"},
            chat("gpt-4o-mini"),
            None,
            "bad_request",
        ),
        ({"x-abc-run": "RUN"}, b"{not json", None, "bad_request"),
        ({"x-abc-run": "RUN"}, b'{"model": "a", "model": "gpt-4o-mini"}', None, "bad_request"),
        ({"x-abc-run": "RUN"}, chat("gpt-4o-mini", max_tokens=None), None, "bad_request"),
        (
            {"x-abc-run": "RUN"},
            chat("gpt-4o-mini", tools=[{"type": "web_search"}]),
            None,
            "bad_request",
        ),
        (
            {"x-abc-run": "RUN", "content-encoding": "gzip"},
            chat("gpt-4o-mini"),
            None,
            "bad_request",
        ),
    ],
    ids=[
        "no-run",
        "unknown-run",
        "no-body",
        "partial-by-size",
        "partial-by-header",
        "malformed",
        "duplicate-key",
        "no-max-tokens",
        "provider-tool",
        "compressed",
    ],
)
def test_what_cannot_be_judged_is_refused_never_ok(
    pdp: PdpProcess,
    run_id: str,
    headers: dict[str, str],
    body: bytes | None,
    size: int | None,
    reason: str,
) -> None:
    if headers.get("x-abc-run") == "RUN":
        headers = {**headers, "x-abc-run": run_id}
    response = check(pdp, "POST", CHAT, headers, body=body, size=size)
    refused(response, 400, reason)


def test_a_model_path_on_a_route_not_tagged_for_models_is_refused(
    pdp: PdpProcess, run_id: str
) -> None:
    # Envoy routes it by host to billing (a route forwarding bodies, say): judged as a
    # model call, it would pass there unjudged.
    body = chat("gpt-4o-mini", max_tokens=10)
    untagged = check(
        pdp, "POST", CHAT, {"x-abc-run": run_id}, host="billing.internal", body=body, route=""
    )
    assert "not tagged abc_route: openai" in refused(untagged, 400, "bad_request")["detail"]
    as_http = check(
        pdp, "POST", CHAT, {"x-abc-run": run_id}, host="billing.internal", body=body, route="http"
    )
    refused(as_http, 403, "http_not_allowed")  # the manifest grants billing GET /v1/ only


def test_a_cap_ext_authz_cannot_write_is_refused_and_its_reservation_released(
    pdp: PdpProcess, signer: Signer
) -> None:
    run = fresh_run(pdp, signer, "ext-authz-cap")
    stub = pdp_pb2_grpc.DecisionServiceStub(pdp.channel())
    body = refused(
        check(pdp, "POST", CHAT, {"x-abc-run": run}, body=chat("gpt-4o-mini", max_tokens=5000)),
        400,
        "bad_request",
    )
    assert "2048" in body["detail"]
    remaining = stub.GetRun(pdp_pb2.GetRunRequest(run_id=run), timeout=5).remaining
    assert remaining.tokens == 200000  # the decision's reservation was given back
    allowed(check(pdp, "POST", CHAT, {"x-abc-run": run}, body=chat("gpt-4o-mini", 2048)))


def test_the_same_request_id_is_the_same_decision_through_either_door(
    pdp: PdpProcess, run_id: str
) -> None:
    request_id = f"envoy-{uuid.uuid4().hex}"
    headers = {"x-abc-run": run_id, "x-request-id": request_id}
    first = allowed(check(pdp, "GET", "/v1/invoices/7", headers))
    assert allowed(check(pdp, "GET", "/v1/invoices/7", headers)) == first  # idempotent
    reply = pdp_pb2_grpc.DecisionServiceStub(pdp.channel()).Decide(
        pdp_pb2.DecideRequest(
            run_id=run_id,
            request_id=request_id,
            action=pdp_pb2.Action(
                kind="http", target="http:billing.internal", method="GET", path="/v1/invoices/7"
            ),
        ),
        timeout=5,
    )
    assert reply.allow and reply.decision_id == first


def test_ext_authz_is_served_reported_healthy_and_reflected(pdp: PdpProcess) -> None:
    name = "envoy.service.auth.v3.Authorization"
    with pdp.channel() as channel:
        status = (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            .status
        )
        assert status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for answer in answers for s in answer.list_services_response.service}
    assert name in names
