"""Where a decision log stands when it is opened: its head (next seq, last hash) and the
place of its last line, read from the active file or, when that is empty, from the last
sealed segment. A torn last line (a crash mid-write, never acknowledged) is cut off."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pdp.decisionlog.chain import GENESIS
from pdp.decisionlog.segments import sealed_paths
from pdp.manifest.canonical import digest, parse_record

__all__ = ["ActiveFile", "LogHead", "open_state", "read_head"]


@dataclass(frozen=True)
class LogHead:
    seq: int  # the next record's sequence number
    hash: str  # the last record's hash (GENESIS for an empty log)


def read_head(path: Path) -> LogHead:
    """The head of an existing log (its last complete record), for appending after a restart.

    A torn last line (a crash mid-write, never acknowledged) is cut off.
    """
    return open_state(path)[0]


def open_state(path: Path) -> tuple[LogHead, ActiveFile]:
    """The head, and where the active file stands: its first seq, and the place of the last
    record's line (in the last sealed segment when the active file is empty)."""
    complete = _complete(path) if path.exists() else b""
    if complete:
        first = int(parse_record(complete[: complete.index(b"\n")])["seq"])
        return _last_of(complete, first, first)
    sealed = sealed_paths(path)
    if not sealed:
        return LogHead(0, GENESIS), ActiveFile(0, 0, 0, 0)
    # A sealed segment ends with a checkpoint line, unless the file after it could not be
    # made and the log went on in it: then its tail may be torn like an active file's.
    data = _complete(sealed[-1])
    first = int(parse_record(data[: data.index(b"\n")])["seq"])
    head, active = _last_of(data, first, 0)
    return head, replace(active, first=head.seq)


def _complete(path: Path) -> bytes:
    """The file's whole lines; a torn last line (a write a crash cut) is cut off it."""
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with path.open("r+b") as handle:
            handle.truncate(len(complete))
    return complete


def _last_of(data: bytes, segment: int, first: int) -> tuple[LogHead, ActiveFile]:
    start = data.rfind(b"\n", 0, len(data) - 1) + 1
    line = data[start:-1]
    seq = int(parse_record(line)["seq"])
    head = LogHead(seq + 1, digest(line))  # a record's hash is its line's
    return head, ActiveFile(first, segment, start, len(data) - start)


@dataclass(frozen=True)
class ActiveFile:
    first: int  # the active file's first seq (its sealed name once it rotates)
    last_segment: int  # the last record's segment (first seq), offset and line length
    last_offset: int
    last_length: int
