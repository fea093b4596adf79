"""Start-up recovery: the decision log is the record of every change; state is its fold.

Runs, steps, reservations, settlements and answered request ids are rebuilt by replaying
the log in order. The log is verified first (chain and checkpoints; an unsigned tail
from a crash is allowed): a log that does not verify stops start-up, because state
rebuilt from a tampered log could not be trusted. The records applied are parsed from
the very bytes that verified.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pdp.decisionlog.records import CheckpointRecord, Record
from pdp.decisionlog.verify import LogInvalid, read_verified_log
from pdp.errors import ConfigError

__all__ = ["Restorable", "restore_from_log"]

log = logging.getLogger("abc.pdp")


class Restorable(Protocol):
    def restore(self, record: Record, trust_now: datetime) -> None:
        """Apply one verified record; a registration is verified again as of ``trust_now``."""


def restore_from_log(target: Restorable, path: Path, key: Ed25519PublicKey) -> int:
    """Replay ``path`` into ``target``; the number of records applied."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    try:
        verified = read_verified_log(path, key, allow_tail=True)
    except LogInvalid as exc:
        raise ConfigError(f"decision log {path} does not verify, refusing to start: {exc}") from exc
    count = 0
    for record in verified.records:
        if isinstance(record, CheckpointRecord):
            continue
        # A registration is verified again as of when it was accepted: its record's time.
        target.restore(record, record.time)
        count += 1
    log.info("restored state from %d decision-log records", count)
    return count
