"""The decision log's files: sealed segments, then the active file, one chain across them.

The log at ``PATH`` (``STATE/decisions.log``) is written to ``PATH`` itself, the active
segment. Once it holds ``--segment-bytes``, the writer ends it with a signed checkpoint and
renames it to ``PATH.<first seq>`` (twelve digits, so names sort in log order): a sealed
segment, never written again. The next record goes to a fresh ``PATH`` and names the hash
of the sealed segment's last record as its ``prev``, as if the files were one. A log that
never rotated is the single file it always was.

Every reader goes through ``segment_paths`` and ``read_segments``: records of all segments in
order, one segment in memory at a time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LogPosition",
    "Segment",
    "read_segments",
    "seal",
    "sealed_path",
    "sealed_paths",
    "segment_of",
    "segment_paths",
]

_DIGITS = 12


@dataclass(frozen=True)
class LogPosition:
    """Where a log stood after its record ``seq - 1``: that record's hash, and where its
    line lies (the segment named by its first seq; byte offset and length in it)."""

    seq: int  # the next record's seq: records 0 .. seq-1 are before this position
    hash: str  # the hash of record seq-1
    segment: int  # the first seq of the segment holding record seq-1
    offset: int
    length: int


@dataclass(frozen=True)
class Segment:
    path: Path
    data: bytes


def sealed_path(path: Path, first_seq: int) -> Path:
    return path.with_name(f"{path.name}.{first_seq:0{_DIGITS}d}")


def _sealed(path: Path) -> list[tuple[int, Path]]:
    pattern = re.compile(re.escape(path.name) + rf"\.(\d{{{_DIGITS}}})")
    if not path.parent.is_dir():
        return []
    found = []
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    return sorted(found)


def sealed_paths(path: Path) -> list[Path]:
    return [entry for _, entry in _sealed(path)]


def segment_paths(path: Path) -> list[Path]:
    """The log's files in order: sealed segments, then the active file if it exists."""
    paths = sealed_paths(path)
    return [*paths, path] if path.exists() else paths


def segment_of(path: Path, first_seq: int) -> Path:
    """The file of the segment starting at ``first_seq``: sealed, or still the active one."""
    sealed = sealed_path(path, first_seq)
    return sealed if sealed.exists() else path


def read_segments(path: Path, start: LogPosition | None = None) -> Iterator[Segment]:
    """Each segment's bytes in log order; from ``start`` on, only what follows it (the first
    segment cut after the line of record ``start.seq - 1``)."""
    files = [entry for first, entry in _sealed(path) if start is None or first >= start.segment]
    if start is not None and not sealed_path(path, start.segment).exists():
        files = []  # the bound record is in the active file
    if path.exists():
        files.append(path)
    for index, entry in enumerate(files):
        data = entry.read_bytes()
        if start is not None and index == 0:
            data = data[start.offset + start.length :]
        yield Segment(entry, data)


def seal(path: Path, first_seq: int) -> Path:
    """Rename the active file to its sealed name, durably (the directory is fsynced)."""
    target = sealed_path(path, first_seq)
    os.rename(path, target)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return target
