"""A verified decision log, read for learning: its runs, their manifests, their records.

``abcctl suggest`` and the what-if ``abcctl replay`` read history through this module
only, so both start the same way: the log is verified (the same checks as ``abcctl
audit verify``) and every record is parsed from the very bytes that verified. A run's
manifest comes from its registration record, whose envelope the PDP verified when it
accepted it; the log's hash chain and signed checkpoints vouch that the record is the
PDP's, and the envelope's payload must hash to the digest the record names. Records are
the typed records of ``pdp.decisionlog`` (``parse_record``), never read by string key.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from pdp.decisionlog import (
    CheckpointRecord,
    DecisionRecord,
    LogReport,
    RegistrationRecord,
    RunStartRecord,
    WritableRecord,
    read_verified_log,
)
from pdp.errors import AbcError, ConfigError
from pdp.manifest.canonical import canonical_bytes, digest
from pdp.manifest.envelope import parse_envelope
from pdp.manifest.model import Manifest
from pdp.manifest.narrow import narrow

__all__ = [
    "CALL_KINDS",
    "History",
    "RunInfo",
    "is_call",
    "load_history",
    "parse_since",
    "policy_answer",
]

CALL_KINDS = ("model", "tool", "http")


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    manifest_digest: str  # the signed grant's
    manifest: Manifest  # what the run was judged by: the grant, or its narrowed grant
    narrower: dict[str, Any] | None = None  # a narrowed run's narrower, as logged
    effective_digest: str = ""  # a narrowed run's effective grant, checked when read

    @property
    def judged_digest(self) -> str:
        """The digest of what the run was judged by (its effective grant's if narrowed)."""
        return self.effective_digest or self.manifest_digest

    @property
    def lineage(self) -> str:
        return self.manifest.metadata.lineage

    @property
    def version(self) -> int:
        return self.manifest.metadata.version


@dataclass(frozen=True)
class History:
    path: Path
    report: LogReport
    records: list[WritableRecord]  # every record but checkpoints, in log order
    runs: dict[str, RunInfo]  # accepted registrations, by run id

    def decisions(self) -> Iterator[DecisionRecord]:
        """Decision records that reached the policy (they carry its own answer)."""
        for record in self.records:
            if isinstance(record, DecisionRecord) and record.policy_result is not None:
                yield record

    def lineage_runs(self, lineage: str) -> dict[str, RunInfo]:
        return {run_id: run for run_id, run in self.runs.items() if run.lineage == lineage}


def parse_since(text: str) -> datetime:
    """An ISO 8601 instant with its offset (``2026-11-22T10:00:00Z``, ``...+01:00``)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an ISO 8601 date and time") from exc
    if moment.tzinfo is None:
        # A log spans time zones no better than its reader: say which instant is meant.
        raise ValueError(f"{text!r} has no time zone (add Z or an offset such as +01:00)")
    return moment.astimezone(UTC)


def is_call(record: DecisionRecord) -> bool:
    """A model, tool or HTTP call the agent made; a tools/list probe is not one."""
    action = record.action
    return action.get("kind") in CALL_KINDS and not action.get("probe")


def policy_answer(record: DecisionRecord) -> dict[str, Any]:
    """The policy's own answer (before the ledger), as logged; ``ValueError`` for a
    decision refused before the policy was asked (``History.decisions`` has none)."""
    if record.policy_result is None:
        raise ValueError(f"decision {record.decision_id} never reached the policy")
    return record.policy_result


def _registered_manifest(record: RegistrationRecord) -> Manifest | None:
    """The manifest of an accepted registration, if its envelope is the one the record names."""
    try:
        payload = parse_envelope(base64.b64decode(record.envelope, validate=True))
    except (AbcError, ValueError):
        return None
    if digest(payload.unverified_payload) != record.manifest_digest:
        return None
    try:
        return Manifest.model_validate_json(payload.unverified_payload)
    except ValidationError:
        return None


def _started_run(record: RunStartRecord, grant: RunInfo) -> RunInfo | None:
    """The run a start record began: its grant's own, or narrowed exactly as logged."""
    if record.narrower is None:
        return RunInfo(record.run_id, grant.manifest_digest, grant.manifest)
    try:
        narrowed = narrow(grant.manifest, canonical_bytes(record.narrower))
    except AbcError:
        return None
    if narrowed is None or narrowed.digest != record.effective_digest:
        return None
    return RunInfo(
        record.run_id, grant.manifest_digest, narrowed.manifest, record.narrower, narrowed.digest
    )


def load_history(
    path: Path,
    key: Ed25519PublicKey,
    *,
    allow_tail: bool = False,
    expect_seq: int | None = None,
) -> History:
    """Verify ``path`` with the PDP's public ``key`` and read it; ``LogInvalid`` if tampered."""
    try:
        verified = read_verified_log(path, key, allow_tail=allow_tail, expect_seq=expect_seq)
    except OSError as exc:
        raise ConfigError(f"cannot read log {path}: {exc.strerror}") from exc
    records = [r for r in verified.records if not isinstance(r, CheckpointRecord)]
    runs: dict[str, RunInfo] = {}
    for record in records:
        if isinstance(record, RegistrationRecord):
            manifest = _registered_manifest(record)
            if manifest is not None:
                runs[record.run_id] = RunInfo(record.run_id, record.manifest_digest, manifest)
        elif isinstance(record, RunStartRecord) and record.grant_run_id in runs:
            # A run of a registered grant (its run key): judged by the grant's manifest, or
            # by the grant narrowed as logged (rebuilt, and its digest checked).
            run = _started_run(record, runs[record.grant_run_id])
            if run is not None:
                runs[record.run_id] = run
    return History(path, verified.report, records, runs)
