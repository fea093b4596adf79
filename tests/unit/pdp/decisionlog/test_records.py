"""Typed decision-log records: each kind round-trips to the same line, and a malformed one
is refused with ``RecordInvalid`` naming what is wrong."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from pdp.decisionlog import (
    CheckpointRecord,
    DecisionRecord,
    Record,
    RecordInvalid,
    RegistrationRecord,
    RegistrationRefusedRecord,
    RunStartRecord,
    SettlementRecord,
    StepChange,
    parse_record,
)
from pdp.decisionlog.records import RECORD_VERSION, line_fields
from pdp.errors import ReasonCode
from pdp.manifest.canonical import canonical_record_bytes
from pdp.manifest.canonical import parse_record as parse_line

NOW = datetime(2026, 11, 22, 10, 5, 0, 123456, tzinfo=UTC)
DIGEST = "sha256:" + "ab" * 32
PREV = "sha256:" + "cd" * 32
ALLOW = {"allow": True, "reasons": [], "obligations": {"max_tokens": 512}}
DENY = {
    "allow": False,
    "reasons": [{"code": "tool_not_allowed", "message": "no", "evidence": {"target": "t"}}],
    "obligations": {},
}


def _decision(**fields: Any) -> DecisionRecord:
    base: dict[str, Any] = {
        "time": NOW,
        "decision_id": "dec_1",
        "request_id": "req_1",
        "run_id": "run_1",
        "manifest_digest": DIGEST,
        "policy_digest": DIGEST,
        "input": {"action": {"kind": "tool", "target": "tool:kb/search", "args": {"w": 0.5}}},
        "result": ALLOW,
        "reservation_id": "rsv_1",
    }
    return DecisionRecord(**{**base, **fields})


RECORDS: list[tuple[str, Record]] = [
    (
        "registration accepted",
        RegistrationRecord(
            time=NOW,
            run_id="run_1",
            manifest_digest=DIGEST,
            policy_digest=DIGEST,
            lineage="acme/bot",
            version=7,
            signer="sha256:" + "ef" * 32,
            envelope="e30=",
        ),
    ),
    (
        "registration refused",
        RegistrationRefusedRecord(
            time=NOW, policy_digest=DIGEST, reason=ReasonCode.SIGNATURE_INVALID, detail="bad sig"
        ),
    ),
    ("decision, plain", _decision(reservation_id="")),
    (
        "decision, every optional field",
        _decision(
            policy_result=ALLOW,
            cost={"tokens": 512, "usd_micros": 0, "tool_calls": 0, "requests": 1},
            expires=NOW + timedelta(minutes=10),
            step=StepChange(from_="research", to="answer"),
            enforced=False,
            over_budget=True,
            reused_request_id=True,
            unloggable=True,
            masked=("action.args.password",),
        ),
    ),
    ("decision, refused", _decision(result=DENY, policy_result=DENY, reservation_id="")),
    (
        "settlement reported",
        SettlementRecord(time=NOW, run_id="run_1", reservation_id="rsv_1", tokens=40, usd_micros=7),
    ),
    (
        "settlement expired",
        SettlementRecord(
            time=NOW, run_id="run_1", reservation_id="rsv_1", tokens=512, usd_micros=0, expired=True
        ),
    ),
    ("checkpoint", CheckpointRecord(time=NOW, head=PREV, keyid=DIGEST, sig="c2ln")),
    (
        "run start",
        RunStartRecord(
            time=NOW, run_id="run_2", manifest_digest=DIGEST, grant_run_id="run_1", run_key="t-1"
        ),
    ),
    (
        "run start, narrowed",
        RunStartRecord(
            time=NOW,
            run_id="run_2",
            manifest_digest=DIGEST,
            grant_run_id="run_1",
            run_key="t-1",
            narrower={"budgets": {"tokens": 4000}},
            effective_digest=PREV,
        ),
    ),
]


@pytest.mark.parametrize("record", [r for _, r in RECORDS], ids=[n for n, _ in RECORDS])
def test_a_record_round_trips_through_its_line(record: Record) -> None:
    line = canonical_record_bytes(line_fields(record, 4, PREV))
    raw = parse_line(line)
    assert raw["v"] == RECORD_VERSION and raw["seq"] == 4 and raw["prev"] == PREV
    parsed = parse_record(raw)
    assert parsed == record and type(parsed) is type(record)
    assert canonical_record_bytes(line_fields(parsed, 4, PREV)) == line


def test_optional_fields_are_written_only_when_they_say_something() -> None:
    fields = line_fields(_decision(reservation_id=""), 0, PREV)
    assert set(fields) == {
        "v",
        "seq",
        "prev",
        "kind",
        "time",
        "decision_id",
        "request_id",
        "run_id",
        "manifest_digest",
        "policy_digest",
        "input",
        "result",
        "reservation_id",
    }
    assert fields["time"] == "2026-11-22T10:05:00.123456Z"


def test_a_run_start_is_written_as_before_unless_narrowed() -> None:
    plain = RunStartRecord(
        time=NOW, run_id="run_2", manifest_digest=DIGEST, grant_run_id="run_1", run_key="t-1"
    )
    assert "narrower" not in line_fields(plain, 0, PREV)  # old logs keep their bytes
    with pytest.raises(ValidationError, match="narrower and effective digest"):
        RunStartRecord(**{**plain.model_dump(), "narrower": {"budgets": {}}})


def test_the_time_is_the_instant_given_written_in_utc() -> None:
    paris = timezone(timedelta(hours=1))
    record = _decision(time=datetime(2026, 11, 22, 11, 5, 0, 123456, tzinfo=paris))
    assert record.time == NOW
    assert line_fields(record, 0, PREV)["time"] == "2026-11-22T10:05:00.123456Z"


def test_a_naive_time_is_refused_when_built() -> None:
    with pytest.raises(ValidationError, match="time zone"):
        _decision(time=datetime(2026, 11, 22, 10, 5))


def _line(record: Record, **change: Any) -> dict[str, Any]:
    raw = line_fields(record, 3, PREV)
    for key, value in change.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    return raw


REGISTRATION, REFUSAL = RECORDS[0][1], RECORDS[1][1]
DECISION, SETTLEMENT, CHECKPOINT = RECORDS[3][1], RECORDS[5][1], RECORDS[7][1]

MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    ("not an object", [], "JSON object"),  # type: ignore[list-item]
    ("no seq", _line(SETTLEMENT, seq=None), "integer seq"),
    ("seq a bool", _line(SETTLEMENT, seq=True), "integer seq"),
    ("version 2", _line(SETTLEMENT, v=2), "version-1"),
    ("no prev", _line(SETTLEMENT, prev=None), "prev"),
    ("the never-written step kind", _line(SETTLEMENT, kind="step"), "unknown kind 'step'"),
    ("no kind", _line(SETTLEMENT, kind=None), "unknown kind None"),
    ("time in another spelling", _line(SETTLEMENT, time="2026-11-22T10:05:00Z"), "time"),
    ("time not a string", _line(SETTLEMENT, time=5), "time"),
    ("tokens a float", _line(SETTLEMENT, tokens=1.0), "tokens"),
    ("tokens a string", _line(SETTLEMENT, tokens="1"), "tokens"),
    ("an unknown field", _line(SETTLEMENT, extra=1), "extra"),
    ("settlement without its run", _line(SETTLEMENT, run_id=None), "run_id"),
    ("decision without its id", _line(DECISION, decision_id=None), "decision_id"),
    ("decision result without allow", _line(DECISION, result={"reasons": []}), "allow"),
    (
        "decision reason without a code",
        _line(DECISION, result={"allow": False, "reasons": [{}], "obligations": {}}),
        "code",
    ),
    ("cost without expiry", _line(DECISION, expires=None), "cost and expiry"),
    ("cost missing a budget", _line(DECISION, cost={"tokens": 1}), "budgets"),
    ("step without its target", _line(DECISION, step={"from": "a"}), "step.to"),
    ("masked not strings", _line(DECISION, masked=[1]), "masked"),
    ("registration without a result", _line(REGISTRATION, result=None), "accepted"),
    (
        "accepted registration without its envelope",
        _line(REGISTRATION, envelope=None),
        "envelope",
    ),
    (
        "refusal with an unknown reason",
        _line(REFUSAL, result={"accepted": False, "reason": "nope", "detail": ""}),
        "reason",
    ),
    (
        "refusal without its detail",
        _line(REFUSAL, result={"accepted": False, "reason": "bad_request"}),
        "reason and detail",
    ),
    ("checkpoint without a signature", _line(CHECKPOINT, sig=None), "sig"),
]


@pytest.mark.parametrize(
    ("raw", "problem"), [(r, p) for _, r, p in MALFORMED], ids=[n for n, _, _ in MALFORMED]
)
def test_a_malformed_record_is_refused_with_what_is_wrong(raw: Any, problem: str) -> None:
    with pytest.raises(RecordInvalid, match=problem) as caught:
        parse_record(raw)
    if isinstance(raw, dict) and type(raw.get("seq")) is int and "v" in raw:
        assert caught.value.seq == 3  # the record is named by its place in the log
