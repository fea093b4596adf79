"""Start-up recovery: the decision log is the record of every change; state is its fold.

Runs, steps, reservations, settlements and answered request ids are rebuilt by replaying
the log in order, from the newest snapshot that verifies and matches the log
(``snapshot.py``) when there is one, else from the first record. What is replayed is
verified first, record by record (chain and checkpoints; an unsigned tail from a crash is
allowed): a log that does not verify stops start-up, because state rebuilt from a
tampered log could not be trusted. The records applied are parsed from the very bytes that
verified.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pdp.decisionlog.records import CheckpointRecord, Record
from pdp.decisionlog.segments import LogPosition, segment_paths
from pdp.decisionlog.snapshot import load_snapshot
from pdp.decisionlog.verify import LogInvalid, LogReader
from pdp.errors import ConfigError

__all__ = ["Restorable", "restore_from_log"]

log = logging.getLogger("abc.pdp")


class Restorable(Protocol):
    def restore(self, record: Record, trust_now: datetime) -> None:
        """Apply one verified record; a registration is verified again as of ``trust_now``."""

    def import_state(self, state: dict[str, Any]) -> None:
        """Put back a snapshot's state into a fresh target; ``ValueError`` if malformed,
        having changed nothing a full replay would not change the same way."""


def restore_from_log(
    target: Restorable,
    path: Path,
    key: Ed25519PublicKey,
    snapshots: Path | None = None,
    *,
    mac_key: bytes | None = None,
) -> int:
    """Replay ``path`` into ``target``, after the newest usable snapshot in ``snapshots``
    if there is one; the number of records applied. ``key`` verifies the checkpoints;
    with ``mac_key`` (the PDP's, ``mac.py``) the tail after the last one must carry its
    MACs, or it was not this PDP's to replay and then sign."""
    started = time.monotonic()
    try:
        if not any(p.stat().st_size for p in segment_paths(path)):
            if snapshots is not None:
                # A new log, unless a signed snapshot names a record of it (LogInvalid):
                # then it was emptied or deleted.
                load_snapshot(snapshots, path, key)
            return 0
        start = _from_snapshot(target, path, key, snapshots) if snapshots is not None else None
        count = 0
        for logged in LogReader(path, key, allow_tail=True, start=start, mac_key=mac_key):
            if isinstance(logged.record, CheckpointRecord):
                continue
            # A registration is verified again as of when it was accepted: its record's time.
            target.restore(logged.record, logged.record.time)
            count += 1
    except LogInvalid as exc:
        raise ConfigError(f"decision log {path} does not verify, refusing to start: {exc}") from exc
    log.info(
        "restored state from %s and %d decision-log records in %.2fs",
        f"the snapshot at seq {start.seq}" if start else "the whole log",
        count,
        time.monotonic() - started,
    )
    return count


def _from_snapshot(
    target: Restorable, path: Path, key: Ed25519PublicKey, snapshots: Path
) -> LogPosition | None:
    snapshot = load_snapshot(snapshots, path, key)
    if snapshot is not None:
        try:
            target.import_state(snapshot.state)
            return snapshot.position
        except ValueError as exc:
            log.warning("snapshot %s not used: %s", snapshot.path, exc)
    log.warning("no usable snapshot in %s: replaying the whole decision log %s", snapshots, path)
    return None
