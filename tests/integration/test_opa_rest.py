"""The OPA-compatible REST door of a real abc-pdp, driven by an unmodified opa-python-client.

One decision path: a REST decision is the gRPC ``Decide`` of the same request (same
decision id for the same request id, same ledger, same log record, same metrics).
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opa_client import OpaClient
from opa_client.errors import DeleteDataError, DeletePolicyError, PatchDataError, RegoParseError

from pdp.api import pdp_pb2, pdp_pb2_grpc
from tests.harness import (
    INTENT,
    POLICIES,
    PdpProcess,
    Signer,
    abcctl,
    log_records,
    sample,
    start_pdp,
)

DECISION = "/v1/data/abc/authz/decision"
SEARCH = {"kind": "tool", "target": "tool:kb/search", "args": {"query": "refund policy"}}


@pytest.fixture(scope="module")
def rest_pdp(signer: Signer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PdpProcess]:
    process = start_pdp(signer, tmp_path_factory.mktemp("rest-pdp") / "state", http=True)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def run_id(rest_pdp: PdpProcess, demo_envelope: bytes) -> str:
    stub = pdp_pb2_grpc.DecisionServiceStub(rest_pdp.channel())
    reply = stub.RegisterManifest(
        pdp_pb2.RegisterManifestRequest(envelope=demo_envelope), timeout=10
    )
    return str(reply.run_id)


def opa(pdp: PdpProcess) -> OpaClient:
    host, port = pdp.http_address.rsplit(":", 1)
    return OpaClient(host=host, port=int(port))


def call(
    address: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, Any]]:
    host, port = address.rsplit(":", 1)
    connection = (
        http.client.HTTPSConnection(host, int(port), timeout=10, context=context)
        if context is not None
        else http.client.HTTPConnection(host, int(port), timeout=10)
    )
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def decide(address: str, doc: dict[str, Any], path: str = DECISION) -> tuple[int, dict[str, Any]]:
    return call(address, "POST", path, json.dumps({"input": doc}).encode())


def test_opa_python_client_as_a_new_user_would_use_it(rest_pdp: PdpProcess, run_id: str) -> None:
    client = opa(rest_pdp)
    assert client.check_health()
    allowed = client.query_rule(
        {"run_id": run_id, "request_id": "opa-1", "action": SEARCH}, "abc.authz", "decision"
    )
    assert allowed["result"]["allow"] is True and allowed["result"]["reasons"] == []
    assert allowed["result"]["reservation_id"].startswith("rsv_")
    assert allowed["decision_id"] == allowed["result"]["decision_id"]
    refused = client.query_rule(
        {
            "run_id": run_id,
            "request_id": "opa-2",
            "action": {"kind": "tool", "target": "tool:kb/drop"},
        },
        "abc.authz",
        "decision",
    )
    assert refused["result"]["allow"] is False
    assert [r["code"] for r in refused["result"]["reasons"]] == ["tool_not_allowed"]
    assert (
        client.query_rule(
            {"run_id": run_id, "request_id": "opa-3", "action": SEARCH}, "abc.authz", "allow"
        )["result"]
        is True
    )
    policies = client.get_policies_list()
    assert set(policies) == {"abc/authz.rego", "abc/authz_test.rego"}
    assert client.get_policies_info()["abc/authz.rego"]["path"].endswith("/v1/data/abc/authz")
    with pytest.raises(RegoParseError) as refused_write:
        client.update_policy_from_string("package abc.authz\n\nallow := true\n", "abc/authz.rego")
    assert refused_write.value.expression == "invalid_parameter"
    assert "signed manifest" in refused_write.value.message
    with pytest.raises(DeletePolicyError):
        client.delete_policy("abc/authz.rego")
    with pytest.raises(RegoParseError):
        client.update_or_create_data({"allow": True}, "abc/authz")
    with pytest.raises(PatchDataError):
        client.patch_data("abc/manifest", [{"op": "add", "path": "/x", "value": 1}])
    with pytest.raises(DeleteDataError):
        client.delete_data("abc")
    assert client.get_policies_list() == policies  # nothing changed
    again = client.query_rule(
        {
            "run_id": run_id,
            "request_id": "opa-4",
            "action": {"kind": "tool", "target": "tool:kb/drop"},
        },
        "abc.authz",
        "decision",
    )
    assert again["result"]["allow"] is False
    client.close_connection()


def test_policies_carry_the_bundle_digest(rest_pdp: PdpProcess) -> None:
    digest = abcctl("policy", "digest", POLICIES).stdout.strip()
    status, listed = call(rest_pdp.http_address, "GET", "/v1/policies")
    assert status == 200 and listed["bundle_digest"] == digest
    status, one = call(rest_pdp.http_address, "GET", "/v1/policies/abc/authz.rego")
    assert status == 200 and one["result"]["raw"] == (POLICIES / "abc/authz.rego").read_text()
    status, missing = call(rest_pdp.http_address, "GET", "/v1/policies/abc/nope.rego")
    assert status == 404 and missing["code"] == "resource_not_found"


def _stub(pdp: PdpProcess) -> pdp_pb2_grpc.DecisionServiceStub:
    return pdp_pb2_grpc.DecisionServiceStub(pdp.channel())


def test_one_decision_path_for_both_doors(
    rest_pdp: PdpProcess, signer: Signer, tmp_path: Path
) -> None:
    """Same request id through REST and gRPC: one decision, one charge, one log record."""
    text = INTENT.read_text().replace("lineage: acme/support-bot", "lineage: acme/rest-door")
    stub = _stub(rest_pdp)
    run = stub.RegisterManifest(
        pdp_pb2.RegisterManifestRequest(envelope=signer.freeze(text, "rest-door")), timeout=10
    ).run_id
    before = rest_pdp.metrics()
    model = {"kind": "model", "target": "model:openai/gpt-4o-mini", "max_tokens": 300}
    status, rest = decide(
        rest_pdp.http_address, {"run_id": run, "request_id": "same", "action": model}
    )
    assert status == 200 and rest["result"]["allow"] is True
    assert rest["result"]["obligations"] == {"max_tokens": 300}
    grpc_answer = stub.Decide(
        pdp_pb2.DecideRequest(
            run_id=run,
            request_id="same",
            action=pdp_pb2.Action(kind="model", target="model:openai/gpt-4o-mini", max_tokens=300),
        ),
        timeout=5,
    )
    assert grpc_answer.decision_id == rest["decision_id"]
    assert grpc_answer.reservation_id == rest["result"]["reservation_id"]
    remaining = stub.GetRun(pdp_pb2.GetRunRequest(run_id=run), timeout=5).remaining
    assert remaining.tokens == 200000 - 300 and remaining.requests == 500 - 1  # charged once
    # The same request id for another action is refused by either door.
    status, reused = decide(
        rest_pdp.http_address, {"run_id": run, "request_id": "same", "action": SEARCH}
    )
    assert status == 400 and reused["reason"] == "bad_request"
    status, denied = decide(
        rest_pdp.http_address,
        {"run_id": run, "request_id": "d1", "action": {"kind": "tool", "target": "tool:kb/rm"}},
    )
    after = rest_pdp.metrics()
    assert (
        sample(after, "abc_pdp_decisions_total", decision="allow", mode="enforce", reason="none")
        == sample(
            before, "abc_pdp_decisions_total", decision="allow", mode="enforce", reason="none"
        )
        + 1
    )
    assert (
        sample(
            after,
            "abc_pdp_decisions_total",
            decision="deny",
            mode="enforce",
            reason="tool_not_allowed",
        )
        == sample(
            before,
            "abc_pdp_decisions_total",
            decision="deny",
            mode="enforce",
            reason="tool_not_allowed",
        )
        + 1
    )
    state = rest_pdp.log.parent / "state"
    records = log_records(state / "decisions.log")
    logged = {r["decision_id"]: r for r in records if r["kind"] == "decision"}
    assert logged[rest["decision_id"]]["request_id"] == "same"
    assert logged[rest["decision_id"]]["input"]["action"]["max_tokens"] == 300
    assert logged[denied["decision_id"]]["result"]["reasons"][0]["code"] == "tool_not_allowed"


def test_integer_arguments_stay_exact(rest_pdp: PdpProcess, run_id: str) -> None:
    def ask(args: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        action = {"kind": "tool", "target": "tool:kb/search", "args": args}
        return decide(rest_pdp.http_address, {"run_id": run_id, "action": action})

    assert ask({"query": "q", "top_k": 20})[1]["result"]["allow"] is True
    over = ask({"query": "q", "top_k": 21})[1]["result"]
    assert [r["code"] for r in over["reasons"]] == ["tool_args_invalid"]
    status, big = ask({"query": "q", "top_k": 2**53 + 1})  # never rounded to 2^53
    assert status == 400 and big["reason"] == "bad_request"


def test_a_missing_request_id_gets_a_fresh_one(rest_pdp: PdpProcess, run_id: str) -> None:
    answers = [decide(rest_pdp.http_address, {"run_id": run_id, "action": SEARCH})[1] for _ in "ab"]
    assert answers[0]["decision_id"] != answers[1]["decision_id"]
    reservations = {a["result"]["reservation_id"] for a in answers}
    assert len(reservations) == 2  # a retry without an id is a second decision


@pytest.mark.parametrize(
    ("body", "status", "code", "reason"),
    [
        (b"{not json", 400, "invalid_parameter", "bad_request"),
        (b'{"input": {"run_id": "a", "run_id": "b"}}', 400, "invalid_parameter", "bad_request"),
        (b'{"input": [1]}', 400, "invalid_parameter", "bad_request"),
        (b'{"input": {"run_id": 7}}', 400, "invalid_parameter", "bad_request"),
        (b'{"input": {}, "extra": 1}', 400, "invalid_parameter", "bad_request"),
        (b'{"input": {"x": "' + b"a" * 300_000 + b'"}}', 413, "invalid_parameter", "bad_request"),
    ],
    ids=[
        "malformed",
        "duplicate-key",
        "input-not-object",
        "run-not-string",
        "extra-key",
        "too-big",
    ],
)
def test_malformed_bodies_are_refused_and_the_server_keeps_serving(
    rest_pdp: PdpProcess, run_id: str, body: bytes, status: int, code: str, reason: str
) -> None:
    got, answer = call(rest_pdp.http_address, "POST", DECISION, body)
    assert (got, answer["code"], answer["reason"]) == (status, code, reason)
    assert answer["message"].startswith(f"{reason}: ")
    assert decide(rest_pdp.http_address, {"run_id": run_id, "action": SEARCH})[1]["result"]["allow"]


def test_an_oversized_chunked_body_is_refused(rest_pdp: PdpProcess, run_id: str) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b" " * 10_000

    host, port = rest_pdp.http_address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("POST", DECISION, body=chunks(), encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["reason"] == "bad_request"
    connection.close()


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ({"run_id": "run_nope", "action": SEARCH}, "manifest_unknown"),
        ({"action": SEARCH}, "manifest_unknown"),
        ({"run_id": "RUN", "action": {"kind": "teleport", "target": "x"}}, "bad_request"),
        (
            {"run_id": "RUN", "action": {"kind": "tool", "target": "tool:kb/search", "argz": {}}},
            "bad_request",
        ),
        (
            {"run_id": "RUN", "action": {"kind": "tool", "target": "tool:kb/search", "args": [1]}},
            "bad_request",
        ),
        (
            {
                "run_id": "RUN",
                "action": {"kind": "model", "target": "model:openai/x", "max_tokens": "many"},
            },
            "bad_request",
        ),
        ({"run_id": "RUN", "request_id": "x" * 129, "action": SEARCH}, "bad_request"),
        ({"run_id": "RUN"}, "bad_request"),
    ],
    ids=[
        "unknown-run",
        "no-run",
        "bad-kind",
        "unknown-field",
        "args-list",
        "tokens-text",
        "long-id",
        "no-action",
    ],
)
def test_refusals_that_are_the_callers_mistake_are_errors_with_a_logged_decision(
    rest_pdp: PdpProcess, run_id: str, doc: dict[str, Any], reason: str
) -> None:
    if doc.get("run_id") == "RUN":
        doc = {**doc, "run_id": run_id}
    status, answer = decide(rest_pdp.http_address, doc)
    assert status == 400 and answer["code"] == "invalid_parameter"
    assert answer["reason"] == reason and answer["decision_id"].startswith("dec_")
    status, allowed = decide(rest_pdp.http_address, doc, "/v1/data/abc/authz/allow")
    assert status == 400 and allowed["reason"] == reason


def test_undefined_documents_and_unknown_routes(rest_pdp: PdpProcess, run_id: str) -> None:
    address = rest_pdp.http_address
    body = json.dumps({"input": {"run_id": run_id, "action": SEARCH}}).encode()
    for path in (
        "/v1/data/abc/authz/nope",
        "/v1/data/abc/manifest",
        "/v1/data",
        "/v1/data/abc%2Fauthz/decision",
    ):
        assert call(address, "POST", path, body) == (200, {})
        assert call(address, "GET", path) == (200, {})
    status, answer = call(address, "GET", "/v1/query?q=data")
    assert status == 404 and answer["code"] == "resource_not_found"


def test_health_and_decisions_stop_during_the_drain(signer: Signer, tmp_path: Path) -> None:
    pdp = start_pdp(signer, tmp_path / "state", POLICIES, "--grace", "5", http=True)
    address = pdp.http_address
    assert call(address, "GET", "/health") == (200, {})
    host, port = address.rsplit(":", 1)
    # A request in flight: its headers are in, its body is not.
    slow = socket.create_connection((host, int(port)), timeout=10)
    body = json.dumps({"input": {"run_id": "run_x", "action": SEARCH}}).encode()
    slow.sendall(
        f"POST {DECISION} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body[:10]
    )
    time.sleep(1.0)  # its handler has started (headers parsed) before the signal
    pdp.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 4
    while call(address, "GET", "/health")[0] == 200:
        assert time.monotonic() < deadline, "still healthy while draining"
        time.sleep(0.02)
    status, health = call(address, "GET", "/health")
    assert status == 500 and health["code"] == "internal_error"
    status, refused = decide(address, {"run_id": "run_x", "action": SEARCH})
    assert status == 503 and refused["reason"] == "pdp_unavailable"
    slow.sendall(body[10:])  # the request in flight is still answered (a decision, logged)
    answer = slow.recv(65536).decode()
    slow.close()
    assert answer.startswith("HTTP/1.1 400") and "manifest_unknown" in answer
    assert pdp.process.wait(timeout=10) == 0


def test_rest_is_off_unless_asked(pdp: PdpProcess) -> None:
    assert "OPA REST API" not in pdp.output()


def test_the_rest_door_uses_the_grpc_ports_tls_and_client_certificate_rule(
    signer: Signer, demo_envelope: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import grpc

    from tests.integration.test_tls import make_pki

    ours, other = make_pki(tmp_path / "ours"), make_pki(tmp_path / "other")
    pdp = start_pdp(
        signer,
        tmp_path / "state",
        POLICIES,
        "--tls-cert",
        ours.path("pdp.pem"),
        "--tls-key",
        ours.path("pdp.key"),
        "--tls-client-ca",
        ours.path("ca.pem"),
        credentials=grpc.ssl_channel_credentials(
            ours.read("ca.pem"), ours.read("pep.key"), ours.read("pep.pem")
        ),
        http=True,
    )
    try:
        run = (
            _stub(pdp)
            .RegisterManifest(pdp_pb2.RegisterManifestRequest(envelope=demo_envelope), timeout=10)
            .run_id
        )

        def context(client: Any, name: str = "pep") -> ssl.SSLContext:
            tls = ssl.create_default_context(cafile=ours.path("ca.pem"))
            if client is not None:
                tls.load_cert_chain(client.path(f"{name}.pem"), client.path(f"{name}.key"))
            return tls

        body = json.dumps({"input": {"run_id": run, "action": SEARCH}}).encode()
        status, answer = call(pdp.http_address, "POST", DECISION, body, context=context(ours))
        assert status == 200 and answer["result"]["allow"] is True
        for refused in (context(None), context(other), context(ours, "pdp")):
            # No client certificate, one from another CA, a serverAuth-only one.
            with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
                call(pdp.http_address, "GET", "/health", context=refused)
        with pytest.raises((http.client.HTTPException, ConnectionResetError)):
            call(pdp.http_address, "GET", "/health")  # plaintext
        # opa-python-client over mTLS, configured as requests is: the CA in REQUESTS_CA_BUNDLE.
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", ours.path("ca.pem"))
        port = int(pdp.http_address.rsplit(":", 1)[1])
        client = OpaClient(
            host="localhost", port=port, ssl=True, cert=(ours.path("pep.pem"), ours.path("pep.key"))
        )
        assert client.check_health()
        result = client.query_rule({"run_id": run, "action": SEARCH}, "abc.authz", "allow")
        assert result["result"] is True
        client.close_connection()
    finally:
        assert pdp.stop() == 0


def test_a_taken_rest_port_stops_start_up_with_one_line(signer: Signer, tmp_path: Path) -> None:
    from tests.harness import pdp_flags, start_up_error

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        stderr = start_up_error(
            "abc-pdp",
            *pdp_flags(signer.trust, tmp_path / "state"),
            "--http",
            f"127.0.0.1:{port}",
            "--log-level",
            "ERROR",  # the state's first start warns that it made a log key
        )
    assert f"abc-pdp: error: cannot serve REST on 127.0.0.1:{port}" in stderr
