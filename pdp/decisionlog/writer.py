"""The append-only decision log, durable before an answer leaves the PDP.

``append`` returns only after the record is written and fsynced. Concurrent appends are
group-committed: the first caller to find no write under way writes whatever is waiting,
fsyncs once, and wakes every caller in the batch. Every ``checkpoint_every`` records or
``checkpoint_seconds`` seconds a signed checkpoint is appended, naming the chain head.

Secrets never reach the disk: configured argument paths (e.g. ``action.args.password``)
and authorization headers are replaced by ``"***"`` before a record is hashed, and each
record lists the paths it masked.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pdp.decisionlog.record import GENESIS, RECORD_VERSION, record_hash, sign_checkpoint
from pdp.errors import ConfigError
from pdp.manifest.canonical import canonical_bytes, digest, parse_strict_json

__all__ = ["DecisionLog", "LogHead", "MaskRule", "read_head"]

MASK = "***"


@dataclass(frozen=True)
class MaskRule:
    """A dotted path inside a record's ``input`` whose value is replaced before writing."""

    path: tuple[str, ...]

    @staticmethod
    def parse(text: str) -> MaskRule:
        parts = tuple(text.split("."))
        if not text or any(not part for part in parts) or parts[0] not in ("action", "run"):
            raise ConfigError(f"mask path {text!r} must be dotted and start with action. or run.")
        return MaskRule(parts)


def _mask(document: dict[str, Any], rules: Sequence[MaskRule]) -> list[str]:
    masked: list[str] = []
    for rule in rules:
        node: Any = document
        for part in rule.path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and rule.path[-1] in node:
            node[rule.path[-1]] = MASK
            masked.append(".".join(rule.path))
    return masked


@dataclass(frozen=True)
class LogHead:
    seq: int  # the next record's sequence number
    hash: str  # the last record's hash (GENESIS for an empty log)


def read_head(path: Path) -> LogHead:
    """The head of an existing log (its last complete record), for appending after a restart.

    A torn last line (a crash mid-write, never acknowledged) is cut off.
    """
    if not path.exists():
        return LogHead(0, GENESIS)
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with path.open("r+b") as handle:
            handle.truncate(len(complete))
    lines = complete.splitlines()
    if not lines:
        return LogHead(0, GENESIS)
    last = parse_strict_json(lines[-1])
    return LogHead(int(last["seq"]) + 1, record_hash(last))


class DecisionLog:
    def __init__(
        self,
        path: Path,
        key: Ed25519PrivateKey,
        *,
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 60.0,
        masks: Sequence[MaskRule] = (),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        head = read_head(path)
        self._seq, self._prev = head.seq, head.hash
        self._key = key
        self._every, self._seconds = checkpoint_every, checkpoint_seconds
        self._masks = tuple(masks)
        self._clock = clock
        self._file = path.open("ab", buffering=0)
        self._lock = threading.Condition()
        self._pending: list[bytes] = []
        self._written = head.seq  # every seq below this is on disk
        self._since_checkpoint, self._checkpoint_at = 0, time.monotonic()
        self._closed = False
        self._writing = False
        self._failure: OSError | None = None
        # Its own event, not the log's condition: every commit notifies that condition,
        # and a timer woken by each one would compete for the GIL on the decision path.
        self._stop_timer = threading.Event()
        self._timer = threading.Thread(
            target=self._idle_checkpoints, name="decision-log-checkpoints", daemon=True
        )
        self._timer.start()

    def append(self, kind: str, fields: dict[str, Any]) -> int:
        """Append one record and return its seq once it is on disk (fsynced)."""
        record = dict(fields)
        masked: list[str] = []
        if self._masks and isinstance(record.get("input"), dict):
            # Masking edits a copy: the caller's input is left as it was.
            record["input"] = copy.deepcopy(record["input"])
            masked = _mask(record["input"], self._masks)
        with self._lock:
            if self._closed:
                raise RuntimeError("the decision log is closed")
            seq = self._enqueue(kind, record, masked)
            if self._due_checkpoint():
                self._enqueue_checkpoint()
            self._commit_through(seq + 1)
        return seq

    def _commit_through(self, target: int) -> None:
        """Return once every seq below ``target`` is on disk. Holds ``self._lock``.

        Group commit, leader and followers: whoever finds no write under way writes and
        fsyncs everything pending (its own record and any that queued meanwhile); the
        others wait for that fsync. One fsync per batch, and no thread hand-off for a
        caller that is alone.
        """
        while self._written < target:
            if self._failure is not None:
                raise self._failure
            if self._writing:
                self._lock.wait()
                continue
            self._writing = True
            batch, self._pending = self._pending, []
            upto = self._seq
            self._lock.release()
            try:
                self._file.write(b"".join(batch))
                # fdatasync: the data and the size that reaches it, not the mtime.
                os.fdatasync(self._file.fileno())
            except OSError as exc:  # a log that cannot be written stops every decision
                failure: OSError | None = exc
            else:
                failure = None
            finally:
                self._lock.acquire()
                self._writing = False
            if failure is not None:
                self._failure = failure
            else:
                self._written = upto
            self._lock.notify_all()
        if self._failure is not None and self._written < target:
            raise self._failure

    def _enqueue(self, kind: str, record: dict[str, Any], masked: list[str]) -> int:
        seq = self._seq
        full = {
            **record,
            "v": RECORD_VERSION,
            "seq": seq,
            "kind": kind,
            "time": self._clock().strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "prev": self._prev,
            **({"masked": masked} if masked else {}),
        }
        encoded = canonical_bytes(full)  # once: the line written is the line hashed
        self._pending.append(encoded + b"\n")
        self._seq, self._prev = seq + 1, digest(encoded)
        self._since_checkpoint += 1
        return seq

    def _due_checkpoint(self) -> bool:
        return self._since_checkpoint >= self._every or (
            time.monotonic() - self._checkpoint_at >= self._seconds
        )

    def _enqueue_checkpoint(self) -> None:
        checkpoint = sign_checkpoint(
            {
                "v": RECORD_VERSION,
                "seq": self._seq,
                "kind": "checkpoint",
                "time": self._clock().strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "prev": self._prev,
                "head": self._prev,
            },
            self._key,
        )
        encoded = canonical_bytes(checkpoint)
        self._pending.append(encoded + b"\n")
        self._seq, self._prev = self._seq + 1, digest(encoded)
        self._since_checkpoint, self._checkpoint_at = 0, time.monotonic()

    def checkpoint(self) -> None:
        """Append a signed checkpoint now and wait until it is on disk."""
        with self._lock:
            self._enqueue_checkpoint()
            self._commit_through(self._seq)

    def _idle_checkpoints(self) -> None:
        """Sign an idle log's tail within ``checkpoint_seconds``."""
        while True:
            with self._lock:
                left = self._checkpoint_at + self._seconds - time.monotonic()
            if self._stop_timer.wait(timeout=left if left > 0 else self._seconds):
                return
            with self._lock:
                if self._closed:
                    return
                if self._since_checkpoint and self._due_checkpoint():
                    self._enqueue_checkpoint()
                    self._commit_through(self._seq)

    def close(self) -> None:
        """Checkpoint, flush and close (what a clean shutdown does)."""
        if self._closed:
            return
        self.checkpoint()
        with self._lock:
            self._closed = True
        self._stop_timer.set()
        self._timer.join(timeout=10)
        self._file.close()
