"""The PDP decides as OPA's own engine does: thousands of generated actions, zero differences.

Each action goes to a real abc-pdp over gRPC, as an agent's sidecar sends it; OPA's Go
engine (tests/reference.py) decides the same action, as the agent sent it, with the same
policy and manifest data and the run's step read back from the PDP. Verdict, first reason
and obligations must agree. The one allowed difference fails closed: a value the engine
cannot hold exactly is refused before evaluation (``bad_request``, logged without a policy
result), and only those are.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToDict

from pdp.api import pdp_pb2, pdp_pb2_grpc
from pdp.bundle import load_bundle
from pdp.engine import policy_data
from pdp.manifest.freeze import freeze, sign_manifest
from pdp.manifest.intent import parse_intent
from pdp.manifest.keys import load_private_key
from tests.harness import INTENT, POLICIES, PdpProcess, Signer, log_records, start_pdp
from tests.reference import DEMO_BUDGETS, WIDE_INTENT, Case, Reference, cases, with_version

ACTIONS = 3000  # per manifest
PER_RUN = 250  # actions before the next run (a fresh version), so steps start over


def _demo_intent() -> str:
    text = INTENT.read_text()
    return text[: text.index("budgets:")] + DEMO_BUDGETS + text[text.index("\nsteps:") :]


@dataclass(eq=False)
class Outcome:
    case: Case
    allow: bool
    first: tuple[str, str] | None  # (code, message)
    obligations: dict[str, object]
    decision_id: str
    reference: dict[str, object] | None


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tmp_path_factory.mktemp("reference")) / "state"


@pytest.fixture(scope="module")
def reference_pdp(signer: Signer, state: Path) -> Iterator[PdpProcess]:
    process = start_pdp(signer, state)
    yield process
    process.stop()


def _run(pdp: PdpProcess, signer: Signer, intent_text: str, seed: int) -> list[Outcome]:
    bundle = load_bundle(POLICIES)
    key = load_private_key(signer.key)
    stub = pdp_pb2_grpc.DecisionServiceStub(pdp.channel())
    generated = cases(seed, ACTIONS)
    outcomes: list[Outcome] = []
    for start in range(0, ACTIONS, PER_RUN):
        intent = parse_intent(with_version(intent_text, 1 + start // PER_RUN))
        manifest = freeze(intent, bundle.digest, datetime.now(UTC))
        envelope = sign_manifest(manifest, key)
        run_id = stub.RegisterManifest(
            pdp_pb2.RegisterManifestRequest(envelope=envelope), timeout=10
        ).run_id
        reference = Reference(bundle.rego_modules(), policy_data(manifest))
        try:
            for case in generated[start : start + PER_RUN]:
                run = stub.GetRun(pdp_pb2.GetRunRequest(run_id=run_id), timeout=5)
                expected = None
                if not case.unrepresentable:
                    expected = reference.decide(case, run.step, list(run.completed_steps))
                answer = stub.Decide(
                    pdp_pb2.DecideRequest(
                        run_id=run_id,
                        request_id=uuid.uuid4().hex,
                        action=pdp_pb2.Action(
                            kind=case.kind,
                            target=case.target,
                            args_json=case.args_json(),
                            max_tokens=case.max_tokens,
                            method=case.method,
                            path=case.path,
                            probe=case.probe,
                        ),
                    ),
                    timeout=10,
                )
                reason = answer.reasons[0] if answer.reasons else None
                first = (reason.code, reason.message) if reason else None
                obligations = MessageToDict(answer.obligations)
                outcomes.append(
                    Outcome(case, answer.allow, first, obligations, answer.decision_id, expected)
                )
        finally:
            reference.close()
    return outcomes


def _logged(state: Path) -> dict[str, dict[str, object]]:
    """Decision records by decision id, from the PDP's own log."""
    records = log_records(state / "decisions.log")
    return {r["decision_id"]: r for r in records if r.get("kind") == "decision"}


def _same(outcome: Outcome) -> bool:
    expected = outcome.reference
    assert expected is not None
    reasons = expected["reasons"]
    assert isinstance(reasons, list)
    first = (reasons[0]["code"], reasons[0]["message"]) if reasons else None
    obligations = {k: float(v) for k, v in dict(expected["obligations"]).items()}  # type: ignore[call-overload]
    return (
        outcome.allow == expected["allow"]
        and outcome.first == first
        and outcome.obligations == obligations
    )


def _kind(case: Case) -> str:
    return "probe" if case.probe else case.kind


@pytest.mark.parametrize(
    ("intent", "seed"), [(_demo_intent(), 15), (WIDE_INTENT, 19)], ids=["demo", "wide"]
)
def test_the_pdp_decides_every_generated_action_as_opa_does(
    reference_pdp: PdpProcess, signer: Signer, state: Path, intent: str, seed: int
) -> None:
    outcomes = _run(reference_pdp, signer, intent, seed)
    logged = _logged(state)
    differences = [o for o in outcomes if o.reference is not None and not _same(o)]
    assert differences == [], [
        (o.case, o.allow, o.first, o.obligations, o.reference) for o in differences[:5]
    ]
    # Every decision is in the log; only unrepresentable values are refused unevaluated.
    unevaluated = [o for o in outcomes if "policy_result" not in logged[o.decision_id]]
    early = [o for o in outcomes if o.case.unrepresentable]
    assert {id(o) for o in unevaluated} == {id(o) for o in early}, [
        (o.case, o.first) for o in set(unevaluated) ^ set(early)
    ][:5]
    assert all(not o.allow and o.first and o.first[0] == "bad_request" for o in unevaluated)
    # Not vacuous: every kind of action is both allowed and refused, for several reasons.
    verdicts = Counter((_kind(o.case), o.allow) for o in outcomes)
    for kind in ("model", "tool", "http", "step", "probe"):
        assert verdicts[(kind, True)] > 0 and verdicts[(kind, False)] > 0, (kind, verdicts)
    first_reasons = Counter(o.first[0] for o in outcomes if o.first)
    for code in (
        "model_not_allowed",
        "tool_not_allowed",
        "tool_args_invalid",
        "http_not_allowed",
        "step_out_of_order",
        "bad_request",
    ):
        assert first_reasons[code] > 0, (code, first_reasons)
