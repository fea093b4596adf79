"""Typed decision-log records: each kind's fields, built by the PDP, read back by every reader.

A record is what one line of the log says, minus its place in the chain. The writer
(``DecisionLog.append``) takes a record object and adds the chain fields ``seq`` and
``prev``; every reader (audit verify, start-up restore, history, replay, what-if,
suggest, explain) turns a line back into a record with ``parse_record``, which refuses
a malformed one with ``RecordInvalid``. On disk nothing changed from the untyped records
of version 1: ``line_fields(parse_record(raw), seq, prev) == raw`` for every record the
PDP has written, so old logs keep their hashes, chain and checkpoint signatures.

Kinds (``KINDS``):

- ``registration``: a manifest accepted (``RegistrationRecord``, with the envelope, so a
  restart can verify it again) or refused (``RegistrationRefusedRecord``, with why);
- ``run_start``: a run started under a registered grant for a run key (``RunStartRecord``);
- ``decision``: one decided action (``DecisionRecord``); a step change is a decision on
  a ``step`` action and carries ``step`` (from, to), it has no kind of its own;
- ``settlement``: a reservation settled with reported usage, or expired at its worst case;
- ``checkpoint``: the writer's signature over the chain head (``CheckpointRecord``).

``time`` is the decision's own ``now`` (the one clock read of the request), written as
``%Y-%m-%dT%H:%M:%S.%fZ`` in UTC; a checkpoint's is the writer's clock. Numbers inside a
decision's ``input`` and results are kept as logged: any finite JSON number (see
``canonical_record_bytes``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from pdp.api.reasons import ReasonCode
from pdp.clock import LOG_TIME_FORMAT, log_time, parse_log_time
from pdp.decisionlog.mac import MAC_FIELD

__all__ = [
    "KINDS",
    "RECORD_VERSION",
    "CheckpointRecord",
    "DecisionRecord",
    "Record",
    "RecordInvalid",
    "RegistrationRecord",
    "RegistrationRefusedRecord",
    "RunStartRecord",
    "SettlementRecord",
    "StepChange",
    "WritableRecord",
    "line_fields",
    "parse_record",
]

RECORD_VERSION: Literal[1] = 1
KINDS = ("registration", "run_start", "decision", "settlement", "checkpoint")
# The writer's fields: where a record sits and who wrote it (``mac.py``), not what it says.
_CHAIN = ("seq", "prev", MAC_FIELD)
_BUDGETS = frozenset({"tokens", "usd_micros", "tool_calls", "requests"})


class RecordInvalid(ValueError):
    """A log line that is not a well-formed record of a known kind (``seq`` if it had one)."""

    def __init__(self, problem: str, seq: int | None = None) -> None:
        super().__init__(problem if seq is None else f"record seq {seq}: {problem}")
        self.problem, self.seq = problem, seq


def _instant(value: Any) -> datetime:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            # A naive time is some zone's local time: which instant it names is a guess.
            raise ValueError("a record's time needs a time zone")
        return value.astimezone(UTC)
    if not isinstance(value, str):
        raise ValueError("a record's time is a string")
    moment = parse_log_time(value)
    if log_time(moment) != value:
        # Only the one spelling the writer uses: re-writing the record gives the same bytes.
        raise ValueError(f"time {value!r} is not spelled {LOG_TIME_FORMAT}")
    return moment


Instant = Annotated[datetime, BeforeValidator(_instant)]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = RECORD_VERSION  # the record format's version, on every line
    time: Instant

    def fields(self) -> dict[str, Any]:
        """The record as written, without ``v`` and the chain fields (``line_fields`` adds
        them)."""
        raise NotImplementedError


class RegistrationRecord(_Record):
    """A manifest accepted as run ``run_id``, with the envelope it came in (base64)."""

    kind: Literal["registration"] = "registration"
    run_id: StrictStr
    manifest_digest: StrictStr
    policy_digest: StrictStr
    lineage: StrictStr
    version: StrictInt
    signer: StrictStr
    envelope: StrictStr

    def fields(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "time": log_time(self.time),
            "result": {"accepted": True},
            "run_id": self.run_id,
            "manifest_digest": self.manifest_digest,
            "policy_digest": self.policy_digest,
            "lineage": self.lineage,
            "version": self.version,
            "signer": self.signer,
            "envelope": self.envelope,
        }


class RegistrationRefusedRecord(_Record):
    """An envelope refused: the reason code and the detail (it names no run)."""

    kind: Literal["registration"] = "registration"
    policy_digest: StrictStr
    reason: ReasonCode
    detail: StrictStr

    def fields(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "time": log_time(self.time),
            "result": {"accepted": False, "reason": self.reason.value, "detail": self.detail},
            "policy_digest": self.policy_digest,
        }


class RunStartRecord(_Record):
    """Run ``run_id`` started for ``run_key`` under the grant registered as ``grant_run_id``;
    a narrowed run also carries its narrower and the digest of its effective grant (the
    grant narrowed by it, canonical JSON), which every reader rebuilds and checks."""

    kind: Literal["run_start"] = "run_start"
    run_id: StrictStr
    manifest_digest: StrictStr
    grant_run_id: StrictStr
    run_key: StrictStr
    narrower: dict[str, Any] | None = None
    effective_digest: StrictStr = ""

    @model_validator(mode="after")
    def _narrowed_whole(self) -> RunStartRecord:
        if (self.narrower is None) != (not self.effective_digest):
            raise ValueError("a narrowed run start carries its narrower and effective digest")
        return self

    def fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "kind": self.kind,
            "time": log_time(self.time),
            "run_id": self.run_id,
            "manifest_digest": self.manifest_digest,
            "grant_run_id": self.grant_run_id,
            "run_key": self.run_key,
        }
        if self.narrower is not None:
            # Only on a narrowed run: every other start is written as before.
            fields["narrower"] = self.narrower
            fields["effective_digest"] = self.effective_digest
        return fields


class StepChange(BaseModel):
    """The run's step before and after a step action (``@completed``/``@failed`` end it)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    from_: StrictStr = Field(alias="from")
    to: StrictStr


def _answer(value: Any) -> dict[str, Any]:
    """A decision as the policy writes it: ``allow``, ``reasons`` with codes, ``obligations``."""
    if not isinstance(value, dict) or not isinstance(value.get("allow"), bool):
        raise ValueError("a decision result is an object with a boolean allow")
    reasons = value.get("reasons")
    if not isinstance(reasons, list) or not all(
        isinstance(r, dict) and isinstance(r.get("code"), str) for r in reasons
    ):
        raise ValueError("a decision result's reasons are objects with a code")
    return value


Answer = Annotated[dict[str, Any], BeforeValidator(_answer)]


class DecisionRecord(_Record):
    """One decided action: the policy input, the final result and what it changed.

    ``policy_result`` is the policy's own answer (before the ledger), present when the
    policy was asked; ``cost`` and ``expires`` the reservation it made; ``step`` the step
    change it made. ``enforced`` is False for a shadow run. ``masked`` lists the
    ``input`` paths the writer replaced with ``***``.
    """

    kind: Literal["decision"] = "decision"
    decision_id: StrictStr
    request_id: StrictStr
    run_id: StrictStr
    manifest_digest: StrictStr  # "" when the run was unknown
    policy_digest: StrictStr
    input: dict[str, Any]
    result: Answer
    reservation_id: StrictStr
    policy_result: Answer | None = None
    cost: dict[str, StrictInt] | None = None
    expires: Instant | None = None
    step: StepChange | None = None
    enforced: StrictBool = True
    over_budget: StrictBool = False
    reused_request_id: StrictBool = False
    unloggable: StrictBool = False
    masked: tuple[StrictStr, ...] = ()

    @field_validator("cost")
    @classmethod
    def _every_budget(cls, cost: dict[str, int] | None) -> dict[str, int] | None:
        if cost is not None and set(cost) != _BUDGETS:
            raise ValueError(f"a cost names exactly the budgets {sorted(_BUDGETS)}")
        return cost

    @model_validator(mode="after")
    def _reservation_expires(self) -> DecisionRecord:
        if (self.cost is None) != (self.expires is None):
            raise ValueError("a reservation's cost and expiry come together")
        return self

    @property
    def action(self) -> dict[str, Any]:
        """The logged action (``{}`` when the request was refused before it had one)."""
        action = self.input.get("action")
        return action if isinstance(action, dict) else {}

    def fields(self) -> dict[str, Any]:
        # Optional fields are written only when they say something, as they always were.
        fields: dict[str, Any] = {
            "kind": self.kind,
            "time": log_time(self.time),
            "decision_id": self.decision_id,
            "request_id": self.request_id,
            "run_id": self.run_id,
            "manifest_digest": self.manifest_digest,
            "policy_digest": self.policy_digest,
            "input": self.input,
            "result": self.result,
            "reservation_id": self.reservation_id,
        }
        if self.policy_result is not None:
            fields["policy_result"] = self.policy_result
        if self.cost is not None and self.expires is not None:
            fields["cost"] = self.cost
            fields["expires"] = log_time(self.expires)
        if self.step is not None:
            fields["step"] = {"from": self.step.from_, "to": self.step.to}
        if not self.enforced:
            fields["enforced"] = False
        if self.over_budget:
            fields["over_budget"] = True
        if self.reused_request_id:
            fields["reused_request_id"] = True
        if self.unloggable:
            fields["unloggable"] = True
        if self.masked:
            fields["masked"] = list(self.masked)
        return fields


class SettlementRecord(_Record):
    """A reservation settled: reported usage, or its worst case when it ``expired``."""

    kind: Literal["settlement"] = "settlement"
    run_id: StrictStr
    reservation_id: StrictStr
    tokens: StrictInt
    usd_micros: StrictInt
    expired: StrictBool = False

    def fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "kind": self.kind,
            "time": log_time(self.time),
            "run_id": self.run_id,
            "reservation_id": self.reservation_id,
            "tokens": self.tokens,
            "usd_micros": self.usd_micros,
        }
        if self.expired:
            fields["expired"] = True
        return fields


class CheckpointRecord(_Record):
    """The writer's Ed25519 signature (``sig``, by ``keyid``) over the chain up to ``head``."""

    kind: Literal["checkpoint"] = "checkpoint"
    head: StrictStr
    keyid: StrictStr
    sig: StrictStr
    # The records after it carry MACs (``mac.py``); absent in logs written before them.
    macs: StrictBool = False

    def fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "kind": self.kind,
            "time": log_time(self.time),
            "head": self.head,
            "keyid": self.keyid,
            "sig": self.sig,
        }
        if self.macs:
            fields["macs"] = True
        return fields


WritableRecord = (
    RegistrationRecord
    | RegistrationRefusedRecord
    | RunStartRecord
    | DecisionRecord
    | SettlementRecord
)
Record = WritableRecord | CheckpointRecord


def line_fields(record: Record, seq: int, prev: str) -> dict[str, Any]:
    """The whole line of ``record`` at position ``seq`` after the record hashed ``prev``."""
    return {**record.fields(), "v": record.v, "seq": seq, "prev": prev}


def _registration(body: dict[str, Any]) -> RegistrationRecord | RegistrationRefusedRecord:
    result = body.pop("result", None)
    if result == {"accepted": True}:
        return RegistrationRecord.model_validate(body)
    if isinstance(result, dict) and result.get("accepted") is False:
        if set(result) != {"accepted", "reason", "detail"}:
            raise ValueError("a refused registration's result is accepted, reason and detail")
        return RegistrationRefusedRecord.model_validate(
            {**body, "reason": result["reason"], "detail": result["detail"]}
        )
    raise ValueError("a registration's result is {accepted: true} or a refusal")


_MODELS: dict[str, type[RunStartRecord | DecisionRecord | SettlementRecord | CheckpointRecord]] = {
    "run_start": RunStartRecord,
    "decision": DecisionRecord,
    "settlement": SettlementRecord,
    "checkpoint": CheckpointRecord,
}


def parse_record(raw: Mapping[str, Any]) -> Record:
    """The record one parsed log line holds; ``RecordInvalid`` names what is wrong.

    Checked: version 1, an integer ``seq`` and a string ``prev`` (where the record sits,
    which the caller checks against the chain), a known kind, and that kind's fields
    with their types, nothing missing and nothing extra.
    """
    if not isinstance(raw, Mapping):
        raise RecordInvalid("a record is a JSON object")
    seq = raw.get("seq")
    if type(seq) is not int or seq < 0:
        raise RecordInvalid("a record has an integer seq")
    if type(raw.get("v")) is not int or raw["v"] != RECORD_VERSION:
        raise RecordInvalid(f"not a version-{RECORD_VERSION} record", seq)
    if not isinstance(raw.get("prev"), str):
        raise RecordInvalid("a record has the hash of the one before (prev)", seq)
    if not isinstance(raw.get(MAC_FIELD, ""), str):
        raise RecordInvalid("a record's MAC is a string", seq)
    kind = raw.get("kind")
    body = {k: v for k, v in raw.items() if k not in _CHAIN}
    try:
        if kind == "registration":
            return _registration(body)
        if isinstance(kind, str) and kind in _MODELS:
            return _MODELS[kind].model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc'])) or kind}: {error['msg']}" for error in exc.errors()
        )
        raise RecordInvalid(f"not a well-formed {kind} record: {problems}", seq) from None
    except ValueError as exc:
        raise RecordInvalid(f"not a well-formed {kind} record: {exc}", seq) from None
    raise RecordInvalid(f"unknown kind {kind!r} (known: {', '.join(KINDS)})", seq)
