"""The decision path writes typed records stamped with the request's own ``now``: the
writer's clock is read only for the checkpoints it signs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from pdp.action import validate_action
from pdp.bundle import load_bundle
from pdp.decisionlog import (
    CheckpointRecord,
    DecisionLog,
    DecisionRecord,
    RegistrationRecord,
    RegistrationRefusedRecord,
    SettlementRecord,
    read_verified_log,
)
from pdp.errors import AbcError, ReasonCode
from pdp.manifest.highwater import SqliteHighWater
from pdp.metrics import PdpMetrics
from pdp.service import DecisionService
from tests.factories import NOW, manifest_document, signed_envelope, trust_entry, trust_store
from tests.harness import POLICIES

SIGNER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
LOG_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))
WRITER_CLOCK = datetime(2000, 1, 1, tzinfo=UTC)  # far from any request's now


@dataclass
class Pdp:
    service: DecisionService
    log: DecisionLog
    path: Path
    envelope: bytes


@pytest.fixture
def pdp(tmp_path: Path) -> Iterator[Pdp]:
    bundle = load_bundle(POLICIES)
    document = manifest_document()
    document["policy"]["bundle_digest"] = bundle.digest
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, LOG_KEY, clock=lambda: WRITER_CLOCK)
    service = DecisionService(
        bundle,
        trust_store(trust_entry(SIGNER)),
        SqliteHighWater(tmp_path / "highwater.db"),
        PdpMetrics(CollectorRegistry()),
        log,
    )
    yield Pdp(service, log, path, signed_envelope(SIGNER, document))
    service.close()
    log.close()


def test_each_record_carries_its_requests_own_time(pdp: Pdp) -> None:
    registered_at, decided_at, reported_at = (NOW + timedelta(seconds=s) for s in (1, 2, 3))
    run = pdp.service.register_manifest(pdp.envelope, registered_at)
    with pytest.raises(AbcError):
        pdp.service.register_manifest(b"{}", registered_at + timedelta(microseconds=5))
    outcome = pdp.service.decide(
        run.run_id,
        "req_1",
        validate_action("tool", "tool:kb/search", args={"query": "q"}),
        decided_at,
    )
    assert outcome.decision.allow and outcome.reservation_id
    assert pdp.service.report_usage(outcome.reservation_id, 0, 0, reported_at)
    pdp.log.close()
    records = read_verified_log(pdp.path, LOG_KEY.public_key()).records
    assert [type(r) for r in records] == [
        RegistrationRecord,
        RegistrationRefusedRecord,
        DecisionRecord,
        SettlementRecord,
        CheckpointRecord,
    ]
    registration, refusal, decision, settlement, checkpoint = records
    assert registration.time == registered_at
    assert refusal.time == registered_at + timedelta(microseconds=5)
    assert isinstance(refusal, RegistrationRefusedRecord)
    assert refusal.reason is ReasonCode.SIGNATURE_INVALID  # a malformed envelope
    assert isinstance(decision, DecisionRecord)
    assert decision.time == decided_at and decision.expires == decided_at + timedelta(minutes=10)
    assert decision.policy_result is not None and decision.cost is not None
    assert settlement.time == reported_at
    assert checkpoint.time == WRITER_CLOCK  # the writer's own record, on its own clock


def test_an_expired_reservation_is_settled_at_the_time_of_the_decision_that_found_it(
    pdp: Pdp,
) -> None:
    run = pdp.service.register_manifest(pdp.envelope, NOW)
    first = pdp.service.decide(
        run.run_id,
        "req_1",
        validate_action("model", "model:openai/gpt-4o-mini", max_tokens=100),
        NOW,
    )
    later = NOW + timedelta(hours=1)  # past the reservation's ten minutes
    pdp.service.decide(
        run.run_id,
        "req_2",
        validate_action("tool", "tool:kb/search", args={"query": "q"}),
        later,
    )
    pdp.log.close()
    records = read_verified_log(pdp.path, LOG_KEY.public_key()).records
    (expired,) = [r for r in records if isinstance(r, SettlementRecord)]
    assert expired.expired and expired.reservation_id == first.reservation_id
    assert expired.time == later
