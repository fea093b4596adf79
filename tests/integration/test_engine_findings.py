"""Each place where regopy decided otherwise than OPA, as a decision through the real server.

Found by running the shipped policy under regopy 1.5.2 and under OPA's Go engine on the
same inputs (issue "Decide exactly as OPA does"). Every case here was decided wrongly, or
not at all, before the PDP embedded OPA's engine.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import grpc
import pytest

from pdp.api import pdp_pb2, pdp_pb2_grpc
from pdp.bundle import load_bundle
from pdp.manifest.canonical import canonical_bytes
from pdp.manifest.freeze import freeze
from pdp.manifest.intent import parse_intent
from pdp.manifest.keys import load_private_key
from pdp.manifest.model import Manifest
from tests.factories import envelope_from_payload
from tests.harness import INTENT, POLICIES, PdpProcess, Signer, abcctl

PATTERNS = """apiVersion: abc/v1
kind: RunIntent
tenant: acme
agent: patterns
lineage: acme/patterns
version: 1
goal: Patterns as OPA reads them.
lifetime: 1h
tools:
  - server: t
    name: flags
    args:
      name: {type: string, required: true, pattern: "(?i)^ok.$"}
  - server: t
    name: units
    args:
      two: {type: string, pattern: "^..$"}
      short: {type: string, pattern: "^[^/]{1,4}$"}
budgets: {tokens: 1000, usd_micros: 1000, tool_calls: 1000, requests: 1000}
steps:
  - id: work
    uses: [tool:t/flags, tool:t/units]
"""


def _stub(pdp: PdpProcess) -> pdp_pb2_grpc.DecisionServiceStub:
    return pdp_pb2_grpc.DecisionServiceStub(pdp.channel())


def _register(pdp: PdpProcess, envelope: bytes) -> str:
    request = pdp_pb2.RegisterManifestRequest(envelope=envelope)
    return str(_stub(pdp).RegisterManifest(request, timeout=10).run_id)


def _decide(pdp: PdpProcess, run_id: str, **action: object) -> pdp_pb2.DecideResponse:
    request = pdp_pb2.DecideRequest(
        run_id=run_id, request_id=uuid.uuid4().hex, action=pdp_pb2.Action(**action)
    )
    return _stub(pdp).Decide(request, timeout=10)


def _tool(pdp: PdpProcess, run_id: str, target: str, args: dict[str, object]) -> list[str]:
    answer = _decide(pdp, run_id, kind="tool", target=target, args_json=json.dumps(args).encode())
    return [reason.code for reason in answer.reasons]


@pytest.fixture(scope="module")
def demo_run(pdp: PdpProcess, demo_envelope: bytes) -> str:
    return _register(pdp, demo_envelope)


@pytest.fixture(scope="module")
def patterns_run(pdp: PdpProcess, signer: Signer) -> str:
    return _register(pdp, signer.freeze(PATTERNS, "patterns"))


def test_a_backslash_path_is_not_clean(pdp: PdpProcess, demo_run: str) -> None:
    # rego-cpp read the policy's "\\" as two characters: this GET was allowed.
    for path in ("/v1/invoices/..\\..\\admin", "/v1/invoices/a\\b"):
        answer = _decide(pdp, demo_run, kind="http", target="http:billing.internal",
                         method="GET", path=path)  # fmt: skip
        assert not answer.allow
        assert answer.reasons[0].code == "http_not_allowed"
        assert answer.reasons[0].message.startswith("path is not clean")
    allowed = _decide(pdp, demo_run, kind="http", target="http:billing.internal",
                      method="GET", path="/v1/invoices/42")  # fmt: skip
    assert allowed.allow


def test_a_nul_character_does_not_end_the_string(pdp: PdpProcess, demo_run: str) -> None:
    # rego-cpp cut input strings at NUL: the pattern judged "KB-1" and allowed the call.
    attack = {"article_id": "KB-1\u0000../../etc/passwd"}
    assert _tool(pdp, demo_run, "tool:kb/fetch_article", attack) == ["tool_args_invalid"]
    assert _tool(pdp, demo_run, "tool:kb/fetch_article", {"article_id": "KB-1"}) == []
    # 201 characters, one a NUL: over maxLength 200 (rego-cpp counted up to the NUL).
    long_query = {"query": "a" * 100 + "\u0000" + "b" * 100}
    assert _tool(pdp, demo_run, "tool:kb/search", long_query) == ["tool_args_invalid"]
    assert _tool(pdp, demo_run, "tool:kb/search", {"query": "a" * 99 + "\u0000" + "b" * 100}) == []


def test_regex_flags_work_as_in_opa(pdp: PdpProcess, patterns_run: str) -> None:
    # rego-cpp refused (?i): every call that used it answered pdp_unavailable.
    assert _tool(pdp, patterns_run, "tool:t/flags", {"name": "OKé"}) == []
    assert _tool(pdp, patterns_run, "tool:t/flags", {"name": "ok!"}) == []
    assert _tool(pdp, patterns_run, "tool:t/flags", {"name": "nope"}) == ["tool_args_invalid"]


def test_regexes_match_characters_not_bytes(pdp: PdpProcess, patterns_run: str) -> None:
    # rego-cpp matched bytes: "^..$" took the one character é, "^[^/]{1,4}$" refused １２３.
    assert _tool(pdp, patterns_run, "tool:t/units", {"two": "é"}) == ["tool_args_invalid"]
    assert _tool(pdp, patterns_run, "tool:t/units", {"two": "éé"}) == []
    assert _tool(pdp, patterns_run, "tool:t/units", {"short": "１２３"}) == []
    assert _tool(pdp, patterns_run, "tool:t/units", {"short": "１２３４５"}) == [
        "tool_args_invalid"
    ]


def test_the_first_reason_follows_the_policy_precedence(pdp: PdpProcess, demo_run: str) -> None:
    # Unknown argument, too-long query, and (first, by precedence) nothing else: arguments.
    codes = _tool(pdp, demo_run, "tool:kb/search", {"query": "x" * 201, "zzz": 1, "aaa": 2})
    assert codes == ["tool_args_invalid"] * 3
    http = _decide(pdp, demo_run, kind="http", target="http:evil.example",
                   method="GET", path="/../x")  # fmt: skip
    assert http.reasons[0].message == "http:evil.example is not in the manifest"


def test_a_lone_surrogate_is_refused_before_evaluation(pdp: PdpProcess, demo_run: str) -> None:
    # OPA's JSON would read it as U+FFFD, another string: refused, never substituted.
    answer = _decide(pdp, demo_run, kind="tool", target="tool:kb/search",
                     args_json=b'{"query": "ok\\ud800"}')  # fmt: skip
    assert not answer.allow
    assert answer.reasons[0].code == "bad_request"


def test_freeze_refuses_a_pattern_opa_does_not_compile(signer: Signer) -> None:
    intent = signer.dir / "lookahead.yaml"
    intent.write_text(PATTERNS.replace('"^..$"', '"^(?=a)..$"'))
    done = abcctl("freeze", intent, "--key", signer.key, "--policies", POLICIES,
                  "-o", signer.dir / "x.json", check=False)  # fmt: skip
    assert done.returncode == 1
    assert "args.two.pattern" in done.stderr and "Go RE2" in done.stderr


def test_registration_refuses_a_signed_pattern_opa_does_not_compile(
    pdp: PdpProcess, signer: Signer
) -> None:
    # Signed outside abcctl, so freeze never saw it: verify checks the pattern again.
    text = INTENT.read_text().replace("acme/support-bot", "acme/signed-lookbehind")
    manifest = freeze(parse_intent(text), load_bundle(POLICIES).digest, datetime.now(UTC))
    document = manifest.document()
    document["capabilities"]["tools"][0]["args"]["query"]["pattern"] = "\\d+(?<=1)"
    envelope = envelope_from_payload(canonical_bytes(document), load_private_key(signer.key))
    with pytest.raises(grpc.RpcError) as refused:
        _register(pdp, envelope)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("bad_request: ")
    assert "pattern" in pdp.output()  # the detail goes to the operator's log (and the caller)
    with pytest.raises(ValueError, match="Go RE2"):
        Manifest.model_validate_json(canonical_bytes(document))
