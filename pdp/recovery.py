"""Start-up recovery: the decision log is the record of every change; state is its fold.

Runs, steps, reservations, settlements and answered request ids are rebuilt by replaying
the log in order. The log is verified first (chain and checkpoints; an unsigned tail
from a crash is allowed): a log that does not verify stops start-up, because state
rebuilt from a tampered log could not be trusted. The records applied are parsed from
the very bytes that verified.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pdp.decisionlog import CheckpointRecord, LogInvalid, read_verified_log
from pdp.errors import ConfigError
from pdp.service import DecisionService

__all__ = ["restore_from_log"]

log = logging.getLogger("abc.pdp")


def restore_from_log(service: DecisionService, path: Path, key: Ed25519PublicKey) -> int:
    """Replay ``path`` into ``service``; the number of records applied."""
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
        service.restore(record, record.time)
        count += 1
    log.info("restored state from %d decision-log records", count)
    return count
