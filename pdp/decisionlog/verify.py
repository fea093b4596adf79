"""``audit verify``: prove a decision log intact, or name its first bad record.

The log is read across its segments (``segments.py``) as one sequence of lines; steps, for
each line in order:

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
7. When ``mac_key`` is given (the PDP itself, at start-up), each record carries its MAC
   (``mac.py``), checked before it is yielded: a tail the PDP is about to replay, and then
   sign, is one it wrote. Required after a checkpoint that says its records carry MACs,
   and after any record that carries one; so the log or snapshot of a version before
   MACs, crash tail included, reads as it did.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pdp.decisionlog.chain import GENESIS, record_hash, verify_checkpoint
from pdp.decisionlog.mac import MAC_FIELD, carries_mac
from pdp.decisionlog.records import CheckpointRecord, Record, RecordInvalid, parse_record
from pdp.decisionlog.segments import LogPosition, read_segments, segment_of
from pdp.errors import AbcError, SignatureInvalid
from pdp.manifest.canonical import parse_record as parse_line

__all__ = [
    "LogInvalid",
    "LogReader",
    "LogReport",
    "Logged",
    "VerifiedLog",
    "read_verified_log",
    "verify_log",
]


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
    """Verify every segment of the log at ``path``, holding one segment at a time."""
    reader = LogReader(path, key, allow_tail=allow_tail, expect_seq=expect_seq)
    for _ in reader:
        pass
    return reader.report


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

    Reading each segment once for both keeps a writer (or an attacker) from changing it
    between the check and the reading: what is analysed is what was proven intact.
    """
    reader = LogReader(path, key, allow_tail=allow_tail, expect_seq=expect_seq)
    logged = list(reader)
    return VerifiedLog(reader.report, logged)


class LogReader:
    """The one reader of a decision log: iterating yields each record of every segment in
    order, verified (steps 1 to 4) before it is yielded; the end checks (5, 6) run when the
    last record was read, and ``report`` is set then. ``start`` begins after a known
    position (a snapshot's, whose record the caller has checked): records before it are
    not read, so not verified either."""

    def __init__(
        self,
        path: Path,
        key: Ed25519PublicKey,
        *,
        allow_tail: bool = False,
        expect_seq: int | None = None,
        start: LogPosition | None = None,
        mac_key: bytes | None = None,
    ) -> None:
        self._path, self._key, self._start = path, key, start
        self._allow_tail, self._expect_seq = allow_tail, expect_seq
        self._mac_key = mac_key
        self._report: LogReport | None = None

    @property
    def report(self) -> LogReport:
        if self._report is None:
            raise RuntimeError("the log was not read to its end")
        return self._report

    def __iter__(self) -> Iterator[Logged]:
        start = self._start
        prev = start.hash if start else GENESIS
        number = start.seq if start else 0  # lines read so far: record seq n is line n + 1
        checkpoints = since_checkpoint = 0
        # (7) Whether records must carry MACs: as the record before the start says.
        macs = start is not None and self._mac_key is not None and _has_macs(self._path, start)
        for segment in read_segments(self._path, start):
            lines = segment.data.split(b"\n")
            if lines[-1]:
                # (1) a last line without its newline was torn: written, never acknowledged.
                where = "" if segment.path == self._path else f" segment {segment.path.name}"
                raise LogInvalid(
                    number + len(lines), None, f"the log{where} ends inside a record (truncated)"
                )
            for line in lines[:-1]:
                number += 1
                raw, record = _line(line, number)  # (1)
                seq = raw["seq"]
                if seq != number - 1:  # (2)
                    raise LogInvalid(
                        number,
                        seq,
                        f"expected seq {number - 1}: a record is missing or out of order",
                    )
                if raw["prev"] != prev:  # (3)
                    raise LogInvalid(
                        number, seq, "prev is not the hash of the record before (edited)"
                    )
                if isinstance(record, CheckpointRecord):  # (4)
                    _check_signed(raw, record, prev, self._key, number, seq)
                    checkpoints, since_checkpoint = checkpoints + 1, 0
                    macs = record.macs
                else:
                    since_checkpoint += 1
                    if self._mac_key is not None:  # (7)
                        # A record with a MAC was written by a writer that gives every
                        # record one: all after it must carry theirs.
                        macs = macs or MAC_FIELD in raw
                        if macs and not carries_mac(line, self._mac_key):
                            raise LogInvalid(
                                number,
                                seq,
                                "a record not written by this PDP (its MAC does not verify):"
                                " the log was written to while the PDP was not running",
                            )
                prev = record_hash(raw)
                yield Logged(seq, record)
        if since_checkpoint and not self._allow_tail:  # (5)
            raise LogInvalid(
                number,
                number - 1,
                f"{since_checkpoint} record(s) after the last checkpoint: truncated, or the PDP"
                " did not stop cleanly (use --allow-tail for a running PDP)",
            )
        if self._expect_seq is not None and number <= self._expect_seq:  # (6)
            raise LogInvalid(
                number, None, f"the log ends before seq {self._expect_seq} (truncated)"
            )
        self._report = LogReport(number, checkpoints, prev, since_checkpoint)


def _has_macs(path: Path, start: LogPosition) -> bool:
    """Whether the record at ``start`` (a snapshot's, checked by its reader) says that
    the records after it carry MACs: it carries one, or is a checkpoint saying so."""
    with segment_of(path, start.segment).open("rb") as handle:
        handle.seek(start.offset)
        line = handle.read(start.length).rstrip(b"\n")
    raw = parse_line(line)
    return MAC_FIELD in raw or bool(raw.get("kind") == "checkpoint" and raw.get("macs"))


def _check_signed(
    raw: dict[str, Any], record: CheckpointRecord, prev: str, key: Ed25519PublicKey,
    number: int, seq: int,
) -> None:  # fmt: skip
    if record.head != prev:
        raise LogInvalid(number, seq, "checkpoint does not sign the chain head")
    try:
        verify_checkpoint(raw, key)
    except (SignatureInvalid, ValueError) as exc:
        raise LogInvalid(number, seq, "checkpoint signature does not verify (forged)") from exc
