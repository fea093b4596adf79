"""Start-up recovery: the decision log is the record of every change; state is its fold.

Runs, steps, reservations, settlements and answered request ids are rebuilt by replaying
the log in order. The log is verified first (chain and checkpoints; an unsigned tail
from a crash is allowed): a log that does not verify stops start-up, because state
rebuilt from a tampered log could not be trusted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pdp.clock import parse_log_time
from pdp.decisionlog import LogInvalid, verify_log
from pdp.errors import ConfigError
from pdp.service import DecisionService

__all__ = ["restore_from_log"]

log = logging.getLogger("abc.pdp")


def restore_from_log(service: DecisionService, path: Path, key: Ed25519PublicKey) -> int:
    """Replay ``path`` into ``service``; the number of records applied."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    try:
        verify_log(path, key, allow_tail=True)
    except LogInvalid as exc:
        raise ConfigError(f"decision log {path} does not verify, refusing to start: {exc}") from exc
    count = 0
    with path.open("rb") as handle:
        for line in handle:
            record = json.loads(line)
            if record["kind"] == "checkpoint":
                continue
            service.restore(record, parse_log_time(record["time"]))
            count += 1
    log.info("restored state from %d decision-log records", count)
    return count
