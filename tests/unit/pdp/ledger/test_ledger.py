"""The Ledger on its own: what a decision changes (reservations, steps, kept answers) and the
same changes replayed from the log, over the real memory store and a real decision log."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pdp.action import validate_action
from pdp.bundle import load_bundle
from pdp.decisionlog import DecisionLog, SettlementRecord, read_verified_log
from pdp.engine import Decision, PreparedPolicy, policy_data
from pdp.errors import ReasonCode, RequestIdReused, RunReleased, StoreUnavailable
from pdp.ledger import DecisionOutcome, Ledger, MemoryRunStore, Run, RunState, Usage
from pdp.manifest import VerificationPolicy, verify_envelope
from tests.factories import NOW, manifest_document, signed_envelope, trust_entry, trust_store

POLICIES = Path(__file__).resolve().parents[4] / "policies"
KEY = Ed25519PrivateKey.generate()
LOG_KEY = Ed25519PrivateKey.generate()
ALLOW = Decision(True, (), {"max_tokens": 100})
MODEL = validate_action("model", "model:openai/gpt-4o-mini", max_tokens=100)


def _ledger(
    tmp_path: Path, fleet: dict[str, int] | None = None, **budgets: int
) -> tuple[Ledger, Run, DecisionLog]:
    bundle = load_bundle(POLICIES)
    document = manifest_document()
    document["policy"]["bundle_digest"] = bundle.digest
    document["budgets"].update(budgets)
    if fleet is not None:
        document["fleet"] = fleet
    trust = trust_store(trust_entry(KEY, modes=("enforce", "shadow")))
    envelope = signed_envelope(KEY, document)
    verified = verify_envelope(envelope, trust, NOW, VerificationPolicy.registration(bundle.digest))
    policy = PreparedPolicy(
        bundle.rego_modules(), policy_data(verified.manifest), bundle.digest, verified.digest
    )
    log = DecisionLog(tmp_path / "decisions.log", LOG_KEY)
    ledger = Ledger(MemoryRunStore(), log, timedelta(minutes=10), timedelta(minutes=5))
    return ledger, ledger.runs.register(verified, policy, envelope, NOW), log


def test_an_allowed_model_call_reserves_its_worst_case(tmp_path: Path) -> None:
    ledger, run, _ = _ledger(tmp_path)
    applied = ledger.apply(run, MODEL, ALLOW, "research", NOW)
    assert applied.decision is ALLOW and applied.reservation_id
    assert applied.cost == Usage(tokens=100, requests=1)
    assert ledger.books(run.run_id).reserved == Usage(tokens=100, requests=1)
    ledger.release(run.run_id, applied)
    assert ledger.books(run.run_id).reserved == Usage()


def test_a_call_past_the_budget_is_refused_with_what_remains(tmp_path: Path) -> None:
    ledger, run, _ = _ledger(tmp_path, tokens=50)
    applied = ledger.apply(run, MODEL, ALLOW, "research", NOW)
    assert not applied.decision.allow and not applied.reservation_id
    (reason,) = applied.decision.reasons
    assert reason.code is ReasonCode.BUDGET_EXHAUSTED
    assert reason.evidence["remaining"]["tokens"] == 50
    assert ledger.books(run.run_id).reserved == Usage()


def test_a_call_past_a_fleet_limit_is_refused_naming_it_while_the_run_has_room(
    tmp_path: Path,
) -> None:
    ledger, grant, _ = _ledger(tmp_path, fleet={"tokens": 150})
    one = ledger.runs.start(grant, "job-1", NOW)
    two = ledger.runs.start(grant, "job-2", NOW)
    assert ledger.apply(one, MODEL, ALLOW, "research", NOW).reservation_id
    refused = ledger.apply(two, MODEL, ALLOW, "research", NOW)
    (reason,) = refused.decision.reasons
    assert reason.code is ReasonCode.FLEET_BUDGET_EXHAUSTED
    assert "fleet limit on tokens" in reason.message
    assert reason.evidence["fleet_remaining"] == {"tokens": 50}  # open limits left out
    assert ledger.books(two.run_id).reserved == Usage()


def test_an_ended_run_is_released_after_the_retention_and_remembered(tmp_path: Path) -> None:
    ledger, grant, log = _ledger(tmp_path)
    run = ledger.runs.start(grant, "job-1", NOW)
    held = ledger.apply(run, MODEL, ALLOW, "research", NOW)
    end = validate_action("step", "step:@completed")
    assert ledger.apply(run, end, Decision(True, (), {}), "research", NOW).step
    ledger.sweep(NOW + timedelta(minutes=4))  # within the retention: kept
    assert ledger.books(run.run_id).reserved == Usage(tokens=100, requests=1)
    ledger.sweep(NOW + timedelta(minutes=5))
    assert ledger.runs.find(run.run_id) is None
    with pytest.raises(RunReleased, match="the run completed"):
        ledger.check_released(run.run_id)
    log.close()
    records = read_verified_log(tmp_path / "decisions.log", LOG_KEY.public_key()).records
    settled = [r for r in records if isinstance(r, SettlementRecord)]
    # What it still held was settled at its worst case, and logged, before it went.
    assert [(r.reservation_id, r.tokens, r.expired) for r in settled] == [
        (held.reservation_id, 100, True)
    ]
    ledger.sweep(NOW + timedelta(hours=6))  # the grant is in its window: it stays
    assert ledger.runs.find(grant.run_id) is grant


def test_an_expired_grant_goes_after_its_runs_with_its_fleet_books(tmp_path: Path) -> None:
    ledger, grant, log = _ledger(tmp_path, fleet={"tokens": 1000, "runs": 2})
    store = ledger.store
    assert isinstance(store, MemoryRunStore)
    run = ledger.runs.start(grant, "job-1", NOW)
    held = ledger.apply(run, MODEL, ALLOW, "research", NOW)
    assert held.reservation_id
    # Expired at 18:00, released from 18:05. The sweep meets the grant first: the run
    # started under it is still held, so the grant waits for it.
    later = grant.manifest.expires_at + timedelta(minutes=6)
    ledger.sweep(later, limit=1)
    assert ledger.runs.find(grant.run_id) is grant and ledger.runs.find(run.run_id) is run
    ledger.sweep(later, limit=1)
    assert ledger.runs.find(run.run_id) is None
    ledger.sweep(later + timedelta(minutes=4), limit=1)  # looked at again a retention on
    assert ledger.runs.find(grant.run_id) is grant
    # What the service drops its narrowed policies of.
    assert ledger.sweep(later + timedelta(minutes=5), limit=1) == [grant.verified.digest]
    assert ledger.runs.find(grant.run_id) is None
    with pytest.raises(RunReleased, match="the run expired"):
        ledger.check_released(grant.run_id)
    # Nothing of it is left: no fleet books, no envelope for a snapshot, no due entry.
    assert store.fleet_books(grant.run_id) is None
    assert ledger.runs.export_state().grants == ()
    assert store.export_state()["runs"] == {} and store.export_state()["fleets"] == {}
    log.close()
    records = read_verified_log(tmp_path / "decisions.log", LOG_KEY.public_key()).records
    assert [r.reservation_id for r in records if isinstance(r, SettlementRecord)] == [
        held.reservation_id
    ]


def test_a_sweep_the_store_interrupts_keeps_what_it_had_not_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger, grant, _ = _ledger(tmp_path)
    runs = [ledger.runs.start(grant, f"job-{n}", NOW) for n in range(3)]
    state = ledger.store.state
    failures = iter([StoreUnavailable("a blip")])

    def blip(run_id: str, lineage: str) -> RunState:
        for failure in failures:  # the first call only
            raise failure
        return state(run_id, lineage)

    monkeypatch.setattr(ledger.store, "state", blip)
    later = grant.manifest.expires_at + timedelta(minutes=6)
    with pytest.raises(StoreUnavailable):
        ledger.sweep(later)
    ledger.sweep(later)  # not at once: one that fails every time must not fail every call
    assert all(ledger.runs.find(run.run_id) is run for run in runs)
    # The runs popped for the failed sweep are looked at a minute later, then the grant.
    ledger.sweep(later + timedelta(minutes=1))
    assert all(ledger.runs.find(run.run_id) is None for run in runs)
    ledger.sweep(later + timedelta(minutes=6))
    assert ledger.runs.find(grant.run_id) is None


def test_a_step_is_entered_only_from_the_step_that_was_seen(tmp_path: Path) -> None:
    ledger, run, _ = _ledger(tmp_path)
    enter = validate_action("step", "step:answer")
    allow = Decision(True, (), {})
    assert ledger.apply(run, enter, allow, "research", NOW).step == ("research", "answer")
    assert ledger.state(run).step == "answer"
    # Another decision moved the run meanwhile: this one saw "research", which is gone.
    raced = ledger.apply(run, enter, allow, "research", NOW)
    assert raced.step is None and raced.decision.reasons[0].code is ReasonCode.STEP_OUT_OF_ORDER


def test_a_claimed_request_id_answers_its_kept_answer_and_refuses_another_action(
    tmp_path: Path,
) -> None:
    ledger, run, _ = _ledger(tmp_path)
    acted: dict[str, Any] = MODEL.policy_input()
    assert ledger.claim(run.run_id, "req-1", acted) is None
    outcome = DecisionOutcome(ALLOW, "dec_1", "rsv_1")
    ledger.keep(run.run_id, "req-1", acted, outcome)
    assert ledger.claim(run.run_id, "req-1", acted) == outcome
    other = validate_action("model", "model:openai/gpt-4o-mini", max_tokens=5).policy_input()
    with pytest.raises(RequestIdReused):
        ledger.claim(run.run_id, "req-1", other)


def test_settling_writes_a_settlement_and_refuses_impossible_amounts(tmp_path: Path) -> None:
    ledger, run, log = _ledger(tmp_path)
    applied = ledger.apply(run, MODEL, ALLOW, "research", NOW)
    assert not ledger.settle(applied.reservation_id, -1, 0, NOW)
    assert not ledger.settle(applied.reservation_id, 2**41, 0, NOW)
    assert ledger.settle(applied.reservation_id, 40, 7, NOW)
    assert not ledger.settle(applied.reservation_id, 40, 7, NOW)  # settled once only
    assert ledger.books(run.run_id).spent == Usage(tokens=40, usd_micros=7, requests=1)
    log.close()
    records = read_verified_log(tmp_path / "decisions.log", LOG_KEY.public_key()).records
    (settlement,) = [r for r in records if isinstance(r, SettlementRecord)]
    assert (settlement.tokens, settlement.usd_micros, settlement.expired) == (40, 7, False)


def test_an_unreported_reservation_expires_at_its_worst_case(tmp_path: Path) -> None:
    ledger, run, log = _ledger(tmp_path)
    applied = ledger.apply(run, MODEL, ALLOW, "research", NOW)
    ledger.expire(run.run_id, NOW + timedelta(minutes=5))
    assert ledger.books(run.run_id).reserved == Usage(tokens=100, requests=1)
    ledger.expire(run.run_id, NOW + timedelta(minutes=11))
    assert ledger.books(run.run_id).spent == Usage(tokens=100, requests=1)
    log.close()
    records = read_verified_log(tmp_path / "decisions.log", LOG_KEY.public_key()).records
    (expired,) = [r for r in records if isinstance(r, SettlementRecord)]
    assert expired.expired and expired.reservation_id == applied.reservation_id
