"""``audit verify``: prove a decision log intact, or name its first bad record.

Steps, for each line in order:

1. The line is complete and is the canonical JSON of a well-formed record
   (``records.parse_record``: version, ``seq``, ``prev``, a known kind with its fields):
   an edit that re-spells JSON or breaks a record's shape, or a torn last line, stops here.
2. ``seq`` is 0 for the first record and one more than the previous: a deleted,
   inserted or reordered record stops here.
3. ``prev`` is the hash of the previous record (``GENESIS`` for the first): any edited
   field of the previous record stops here.
4. A checkpoint names the chain head it signs (``head == prev``) and its signature
   verifies under the PDP's public key, given by the caller, never read from the log.

Then, at the end:

5. The log ends with a checkpoint, unless ``allow_tail`` (a PDP still running): records
   after the last checkpoint are not signed, and a log cut after its last checkpoint
   would look complete, so a cleanly stopped PDP always ends its log with one.
6. When ``expect_seq`` is given (an anchor kept elsewhere, e.g. the PDP's last reported
   ``seq``), the log reaches at least that record: truncation at a record boundary
   cannot be seen from inside the log alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pdp.decisionlog.chain import GENESIS, record_hash, verify_checkpoint
from pdp.decisionlog.records import CheckpointRecord, Record, RecordInvalid, parse_record
from pdp.errors import AbcError, SignatureInvalid
from pdp.manifest.canonical import parse_record as parse_line

__all__ = ["LogInvalid", "LogReport", "Logged", "VerifiedLog", "read_verified_log", "verify_log"]


class LogInvalid(Exception):
    """The log is not intact; ``seq`` (or ``line``) names the first bad record."""

    def __init__(self, line: int, seq: int | None, problem: str) -> None:
        where = f"record seq {seq}" if seq is not None else f"line {line}"
        super().__init__(f"{where} (line {line}): {problem}")
        self.line, self.seq, self.problem = line, seq, problem


@dataclass(frozen=True)
class LogReport:
    records: int
    checkpoints: int
    head: str
    unsigned_tail: int  # records after the last checkpoint


def _line(line: bytes, number: int) -> tuple[dict[str, Any], Record]:
    """The line as read (what its hash and signature cover) and the record it holds."""
    try:
        raw = parse_line(line)
    except AbcError as exc:
        raise LogInvalid(number, None, f"not a canonical JSON record: {exc}") from exc
    try:
        return raw, parse_record(raw)
    except RecordInvalid as exc:
        raise LogInvalid(number, exc.seq, exc.problem) from exc


def verify_log(
    path: Path,
    key: Ed25519PublicKey,
    *,
    allow_tail: bool = False,
    expect_seq: int | None = None,
) -> LogReport:
    return _verify(path.read_bytes(), key, allow_tail, expect_seq)[0]


@dataclass(frozen=True)
class Logged:
    """A record and its place in the log."""

    seq: int
    record: Record


@dataclass(frozen=True)
class VerifiedLog:
    report: LogReport
    logged: list[Logged]  # every record, checkpoints included, in log order

    @property
    def records(self) -> list[Record]:
        return [entry.record for entry in self.logged]


def read_verified_log(
    path: Path,
    key: Ed25519PublicKey,
    *,
    allow_tail: bool = False,
    expect_seq: int | None = None,
) -> VerifiedLog:
    """The log's records, parsed from exactly the bytes that verified.

    Reading the file once for both keeps a writer (or an attacker) from changing it
    between the check and the reading: what is analysed is what was proven intact.
    """
    report, logged = _verify(path.read_bytes(), key, allow_tail, expect_seq)
    return VerifiedLog(report, logged)


def _verify(
    data: bytes, key: Ed25519PublicKey, allow_tail: bool, expect_seq: int | None
) -> tuple[LogReport, list[Logged]]:
    lines = data.split(b"\n")
    if lines[-1]:
        # (1) a last line without its newline was torn: written, never acknowledged whole.
        raise LogInvalid(len(lines), None, "the log ends inside a record (truncated)")
    lines = lines[:-1]
    prev, checkpoints, since_checkpoint = GENESIS, 0, 0
    logged: list[Logged] = []
    for number, line in enumerate(lines, start=1):
        raw, record = _line(line, number)  # (1)
        seq = raw["seq"]
        logged.append(Logged(seq, record))
        if seq != number - 1:  # (2)
            raise LogInvalid(
                number, seq, f"expected seq {number - 1}: a record is missing or out of order"
            )
        if raw["prev"] != prev:  # (3)
            raise LogInvalid(number, seq, "prev is not the hash of the record before (edited)")
        if isinstance(record, CheckpointRecord):  # (4)
            if record.head != prev:
                raise LogInvalid(number, seq, "checkpoint does not sign the chain head")
            try:
                verify_checkpoint(raw, key)
            except (SignatureInvalid, ValueError) as exc:
                raise LogInvalid(
                    number, seq, "checkpoint signature does not verify (forged)"
                ) from exc
            checkpoints, since_checkpoint = checkpoints + 1, 0
        else:
            since_checkpoint += 1
        prev = record_hash(raw)
    if since_checkpoint and not allow_tail:  # (5)
        raise LogInvalid(
            len(lines),
            len(lines) - 1 if lines else None,
            f"{since_checkpoint} record(s) after the last checkpoint: truncated, or the PDP"
            " did not stop cleanly (use --allow-tail for a running PDP)",
        )
    if expect_seq is not None and len(lines) <= expect_seq:  # (6)
        raise LogInvalid(len(lines), None, f"the log ends before seq {expect_seq} (truncated)")
    return LogReport(len(lines), checkpoints, prev, since_checkpoint), logged
