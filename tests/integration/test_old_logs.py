"""A decision log written before records were typed (tests/fixtures/decisionlog_v1, made by
a real abc-pdp at commit 421379f) still verifies, reads back byte for byte, replays,
explains and restores a PDP's state."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from pdp.bundle import load_stored_bundle
from pdp.decisionlog import (
    CheckpointRecord,
    DecisionLog,
    DecisionRecord,
    RegistrationRecord,
    RegistrationRefusedRecord,
    SettlementRecord,
    parse_record,
    read_verified_log,
    verify_log,
)
from pdp.decisionlog.records import line_fields
from pdp.decisionlog.recovery import restore_from_log
from pdp.learn.explain import explain
from pdp.learn.replay import replay_log
from pdp.manifest.canonical import canonical_record_bytes
from pdp.manifest.canonical import parse_record as parse_line
from pdp.manifest.highwater import SqliteHighWater
from pdp.manifest.keys import load_public_key
from pdp.manifest.trust import load_trust_store
from pdp.metrics import PdpMetrics
from pdp.service import DecisionService
from tests.harness import abcctl

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "decisionlog_v1"
LOG, PUB = FIXTURE / "decisions.log", FIXTURE / "pdp-log.pub"


def test_the_old_log_verifies_with_abcctl() -> None:
    done = abcctl("audit", "verify", LOG, "--pub", PUB)
    assert done.stdout.startswith("intact: 13 records, 1 signed checkpoints")


def test_every_old_line_parses_to_a_typed_record_that_writes_the_same_bytes() -> None:
    kinds = []
    for line in LOG.read_bytes().splitlines():
        raw = parse_line(line)
        record = parse_record(raw)
        kinds.append(type(record))
        assert canonical_record_bytes(line_fields(record, raw["seq"], raw["prev"])) == line
    assert kinds[:4] == [
        RegistrationRecord,
        RegistrationRefusedRecord,
        DecisionRecord,
        SettlementRecord,
    ]
    assert kinds[-1] is CheckpointRecord


def test_the_old_log_reads_as_its_typed_records() -> None:
    records = read_verified_log(LOG, load_public_key(PUB)).records
    decisions = [r for r in records if isinstance(r, DecisionRecord)]
    assert [r.action.get("kind") for r in decisions] == [
        "tool",
        "tool",
        "tool",
        "tool",
        "tool",
        "model",
        "step",
        "http",
    ]
    assert decisions[0].masked == ("action.args.query",)
    assert decisions[0].action["args"] == {"query": "***", "top_k": 3}
    assert decisions[2].reused_request_id and decisions[2].policy_result is None
    assert decisions[3].action["args"]["w"] == 0.5  # a fraction, as the agent sent it
    assert decisions[6].step is not None and decisions[6].step.to == "answer"
    expired = [r for r in records if isinstance(r, SettlementRecord) and r.expired]
    assert [r.tokens for r in expired] == [512]  # the model call, never reported


def test_the_old_log_replays_without_divergence() -> None:
    report = replay_log(LOG, FIXTURE / "bundles", load_public_key(PUB))
    assert report.decisions == 7 and report.identical == 7 and not report.divergences


def test_an_old_decision_is_explained() -> None:
    records = read_verified_log(LOG, load_public_key(PUB)).records
    model_call = next(
        r for r in records if isinstance(r, DecisionRecord) and r.action.get("kind") == "model"
    )
    explanation = explain(LOG, model_call.decision_id, load_public_key(PUB))
    assert explanation.time == model_call.fields()["time"]
    assert explanation.result["allow"] and explanation.action["max_tokens"] == 512
    # Before it: one tool call, settled at zero tokens; nothing else was reserved.
    assert explanation.budget["spent"] == {
        "tokens": 0,
        "usd_micros": 0,
        "tool_calls": 1,
        "requests": 1,
    }
    assert explanation.budget["reserved"]["requests"] == 0


def test_a_pdp_restores_its_state_from_the_old_log(tmp_path: Path) -> None:
    digest = next(p.name for p in (FIXTURE / "bundles").iterdir())
    bundle = load_stored_bundle(FIXTURE / "bundles", "sha256:" + digest)
    state = tmp_path / "state"
    shutil.copy(LOG, tmp_path / "decisions.log")
    log = DecisionLog(tmp_path / "decisions.log", Ed25519PrivateKey.generate())
    service = DecisionService(
        bundle,
        load_trust_store(FIXTURE / "trust.yaml"),
        SqliteHighWater(state / "highwater.db"),
        PdpMetrics(CollectorRegistry()),
        log,
    )
    try:
        applied = restore_from_log(service, LOG, load_public_key(PUB))
        assert applied == 12  # every record but the checkpoint
        records = read_verified_log(LOG, load_public_key(PUB)).records
        registration = next(r for r in records if isinstance(r, RegistrationRecord))
        run = service.get_run(registration.run_id, registration.time)
        assert run.step == "answer" and run.completed_steps == ("research",)
        # The reported tool call, and the model call that expired at its worst case.
        assert run.spent == {"tokens": 512, "usd_micros": 0, "tool_calls": 1, "requests": 2}
        assert run.remaining["requests"] == 500 - 2
    finally:
        log.close()
        service.close()


@pytest.mark.parametrize("line", [0, 2, 3])
def test_an_edited_old_record_still_fails_verification(tmp_path: Path, line: int) -> None:
    lines = LOG.read_bytes().splitlines(keepends=True)
    lines[line] = lines[line].replace(b'"v":1', b'"v":1 ')
    edited = tmp_path / "decisions.log"
    edited.write_bytes(b"".join(lines))
    with pytest.raises(Exception, match="canonical"):
        verify_log(edited, load_public_key(PUB))
