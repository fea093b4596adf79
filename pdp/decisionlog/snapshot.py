"""Snapshots of live state, bound to a place in the decision log, so that start-up replays
only the log's tail instead of its whole history.

A snapshot file (``STATE/snapshots/snapshot-<seq>.snap``) is one header line, then the
state as JSON. The header is canonical JSON naming the log position the state is the fold
of (the record before it: seq, hash, segment, offset and length of its line), the digest
of the body, and an Ed25519 signature by the log's checkpoint key over the header without
``sig``. Nothing of a snapshot is trusted before it is checked: the signature, then the
body's digest, then the binding (the line at that place in the log hashes to the named
record hash); only then is the body parsed. A snapshot that is not the log key's, or is
damaged, is a WARNING and the next older snapshot is tried, then a full replay: never a
wrong state. One that is, but whose record the log does not hold, stops start-up
(``LogInvalid``): the PDP wrote that record, durably, before it signed the snapshot, so
the log was cut or replaced since, and replaying what is left would lose what it had
answered. (Truncation at a record boundary cannot be seen from inside the log alone.)

What the state holds is the caller's (``Restorable.export_state``); this module does not
read it. Records before a snapshot's position are not read again at start-up, so not
verified again either: ``abcctl audit verify`` proves the whole log.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pdp.decisionlog.segments import LogPosition, segment_of
from pdp.decisionlog.verify import LogInvalid
from pdp.errors import AbcError, LogUnavailable
from pdp.manifest.canonical import canonical_record_bytes, digest, parse_record
from pdp.manifest.keys import keyid, raw_public_key, verify_signature

__all__ = ["KEEP", "Snapshot", "SnapshotUnusable", "Snapshotter", "load_snapshot", "write_snapshot"]

log = logging.getLogger("abc.pdp")

SNAPSHOT_VERSION = 1
KEEP = 2  # the newest ones kept: an older one still serves if the newest is damaged
_NAME = re.compile(r"snapshot-(\d{12})\.snap")


class SnapshotUnusable(Exception):
    """A snapshot that cannot be trusted; the message says why."""


@dataclass(frozen=True)
class Snapshot:
    path: Path
    position: LogPosition
    state: dict[str, Any]


def _unsigned(header: dict[str, Any]) -> bytes:
    return canonical_record_bytes({k: v for k, v in header.items() if k != "sig"})


def write_snapshot(
    directory: Path, position: LogPosition, state: dict[str, Any], key: Ed25519PrivateKey
) -> Path:
    """Write a snapshot durably (temporary file, fsync, rename) and drop all but the newest
    ``KEEP``; its path."""
    body = json.dumps(state, separators=(",", ":")).encode()
    header: dict[str, Any] = {
        "v": SNAPSHOT_VERSION,
        "log": {
            "seq": position.seq,
            "hash": position.hash,
            "segment": position.segment,
            "offset": position.offset,
            "length": position.length,
        },
        "body": digest(body),
        "keyid": keyid(raw_public_key(key.public_key())),
    }
    header["sig"] = base64.b64encode(key.sign(_unsigned(header))).decode("ascii")
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"snapshot-{position.seq:012d}.snap"
    temporary = directory / f".{target.name}.tmp"
    with temporary.open("wb") as handle:
        handle.write(canonical_record_bytes(header) + b"\n" + body)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(temporary, target)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for old in _snapshots(directory)[KEEP:]:
        old.unlink(missing_ok=True)
    return target


def _numbered(directory: Path) -> list[tuple[int, Path]]:
    """Snapshot files with the seq their name gives, newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name))]
    return sorted(found, reverse=True)


def _snapshots(directory: Path) -> list[Path]:
    """Snapshot files, newest first."""
    return [path for _, path in _numbered(directory)]


def load_snapshot(directory: Path, log_path: Path, key: Ed25519PublicKey) -> Snapshot | None:
    """The newest snapshot that verifies and matches the log, or None (each one passed over
    is a WARNING line saying why)."""
    for path in _snapshots(directory):
        try:
            return _load(path, log_path, key)
        except SnapshotUnusable as exc:
            log.warning("snapshot %s not used: %s", path, exc)
    return None


def _load(path: Path, log_path: Path, key: Ed25519PublicKey) -> Snapshot:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SnapshotUnusable(f"unreadable: {exc.strerror}") from exc
    head, newline, body = data.partition(b"\n")
    try:
        header = parse_record(head)
        if not isinstance(header, dict):
            raise ValueError("not an object")
        signature = base64.b64decode(str(header.get("sig", "")), validate=True)
        verify_signature(key, signature, _unsigned(header))
    except (AbcError, ValueError) as exc:
        raise SnapshotUnusable("its header is not signed by this log's key (damaged)") from exc
    if header.get("v") != SNAPSHOT_VERSION or not newline:
        raise SnapshotUnusable(f"not a version {SNAPSHOT_VERSION} snapshot")
    if digest(body) != header.get("body"):
        raise SnapshotUnusable("its state does not match its digest (damaged)")
    try:
        position = LogPosition(**header["log"])
    except (KeyError, TypeError) as exc:
        raise SnapshotUnusable("it names no log position") from exc
    numbers = (position.seq, position.segment, position.offset, position.length)
    if not (all(type(n) is int for n in numbers) and isinstance(position.hash, str)):
        raise SnapshotUnusable("it names no log position")
    _check_bound(log_path, position)
    try:
        state = json.loads(body)
    except ValueError as exc:
        raise SnapshotUnusable("its state is not JSON") from exc
    if not isinstance(state, dict):
        raise SnapshotUnusable("its state is not a JSON object")
    return Snapshot(path, position, state)


def _check_bound(log_path: Path, position: LogPosition) -> None:
    """The log holds, at the snapshot's place, the record the snapshot names."""
    if position.seq < 1 or position.offset < 0 or position.length < 2:
        raise SnapshotUnusable("it names no record of the log")
    segment = segment_of(log_path, position.segment)
    try:
        with segment.open("rb") as handle:
            handle.seek(position.offset)
            line = handle.read(position.length)
    except FileNotFoundError:
        line = b""
    except OSError as exc:
        raise SnapshotUnusable(f"the log segment it names cannot be read: {exc}") from exc
    mismatch = LogInvalid(
        position.seq,
        position.seq - 1,
        f"the log does not hold the record with hash {position.hash} at"
        f" {segment.name}:{position.offset}, which the signed snapshot names: the log was"
        " cut or replaced since (move the snapshots aside only if this log is meant to"
        " replace them)",
    )
    if len(line) != position.length or not line.endswith(b"\n"):
        raise mismatch
    if digest(line[:-1]) != position.hash:
        raise mismatch
    try:
        seq = parse_record(line[:-1]).get("seq")
    except AbcError as exc:
        raise mismatch from exc
    if seq != position.seq - 1:
        raise mismatch


class Snapshotter:
    """Takes a snapshot whenever the log has grown by ``every`` records since the last one
    (checked every ``interval`` seconds), and when asked (``take``). A snapshot that
    cannot be written is logged and tried again later: it only saves start-up time."""

    def __init__(
        self,
        directory: Path,
        key: Ed25519PrivateKey,
        source: Callable[[], tuple[LogPosition, dict[str, Any]]],
        head: Callable[[], int],
        every: int,
        interval: float = 1.0,
    ) -> None:
        self._directory, self._key, self._source, self._head = directory, key, source, head
        self._every, self._interval = every, interval
        newest = _numbered(directory)
        self._last = newest[0][0] if newest else 0
        self._lock = threading.Lock()  # one snapshot at a time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="snapshots", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if self._head() - self._last >= self._every:
                self.take()

    def take(self) -> Path | None:
        """A snapshot of the state now, unless the log did not move since the last one."""
        with self._lock:
            try:
                position, state = self._source()
            except LogUnavailable as exc:
                log.error("snapshot not taken: %s", exc)
                return None
            if position.seq == self._last or position.seq == 0:
                return None
            try:
                path = write_snapshot(self._directory, position, state, self._key)
            except (OSError, TypeError, ValueError) as exc:
                log.error("snapshot at seq %d not written: %s", position.seq, exc)
                return None
            self._last = position.seq
            log.info("snapshot at seq %d written: %s", position.seq, path.name)
            return path

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
