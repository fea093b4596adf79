"""``audit verify``: prove a decision log intact, or name its first bad record.

Steps, for each line in order:

1. The line is complete and is the canonical JSON of a record (``v``, ``seq``, ``kind``,
   ``time``, ``prev``): an edit that re-spells JSON, or a torn last line, stops here.
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

from pdp.decisionlog.record import GENESIS, KINDS, RECORD_VERSION, record_hash, verify_checkpoint
from pdp.errors import AbcError, SignatureInvalid
from pdp.manifest.canonical import parse_record

__all__ = ["LogInvalid", "LogReport", "VerifiedLog", "read_verified_log", "verify_log"]


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


def _record(line: bytes, number: int) -> dict[str, Any]:
    try:
        record = parse_record(line)
    except AbcError as exc:
        raise LogInvalid(number, None, f"not a canonical JSON record: {exc}") from exc
    if not isinstance(record, dict) or record.get("v") != RECORD_VERSION:
        raise LogInvalid(number, None, "not a version-1 record")
    if record.get("kind") not in KINDS or not isinstance(record.get("seq"), int):
        raise LogInvalid(number, None, "record without a known kind or an integer seq")
    return record


def verify_log(
    path: Path,
    key: Ed25519PublicKey,
    *,
    allow_tail: bool = False,
    expect_seq: int | None = None,
) -> LogReport:
    return _verify(path.read_bytes(), key, allow_tail, expect_seq)[0]


@dataclass(frozen=True)
class VerifiedLog:
    report: LogReport
    records: list[dict[str, Any]]  # every record, checkpoints included, in log order


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
    report, records = _verify(path.read_bytes(), key, allow_tail, expect_seq)
    return VerifiedLog(report, records)


def _verify(
    data: bytes, key: Ed25519PublicKey, allow_tail: bool, expect_seq: int | None
) -> tuple[LogReport, list[dict[str, Any]]]:
    lines = data.split(b"\n")
    if lines[-1]:
        # (1) a last line without its newline was torn: written, never acknowledged whole.
        raise LogInvalid(len(lines), None, "the log ends inside a record (truncated)")
    lines = lines[:-1]
    prev, checkpoints, since_checkpoint = GENESIS, 0, 0
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        record = _record(line, number)  # (1)
        records.append(record)
        seq = record["seq"]
        if seq != number - 1:  # (2)
            raise LogInvalid(
                number, seq, f"expected seq {number - 1}: a record is missing or out of order"
            )
        if record.get("prev") != prev:  # (3)
            raise LogInvalid(number, seq, "prev is not the hash of the record before (edited)")
        if record["kind"] == "checkpoint":  # (4)
            if record.get("head") != prev:
                raise LogInvalid(number, seq, "checkpoint does not sign the chain head")
            try:
                verify_checkpoint(record, key)
            except (SignatureInvalid, ValueError) as exc:
                raise LogInvalid(
                    number, seq, "checkpoint signature does not verify (forged)"
                ) from exc
            checkpoints, since_checkpoint = checkpoints + 1, 0
        else:
            since_checkpoint += 1
        prev = record_hash(record)
    if since_checkpoint and not allow_tail:  # (5)
        raise LogInvalid(
            len(lines),
            len(lines) - 1 if lines else None,
            f"{since_checkpoint} record(s) after the last checkpoint: truncated, or the PDP"
            " did not stop cleanly (use --allow-tail for a running PDP)",
        )
    if expect_seq is not None and len(lines) <= expect_seq:  # (6)
        raise LogInvalid(len(lines), None, f"the log ends before seq {expect_seq} (truncated)")
    return LogReport(len(lines), checkpoints, prev, since_checkpoint), records
