"""The append-only decision log, durable before an answer leaves the PDP.

``append`` returns only after the whole record is written and fsynced. Concurrent appends
are group-committed: the first caller to find no write under way writes whatever is
waiting, fsyncs once, and wakes every caller in the batch. ``queue`` adds a record to the
next batch without waiting (what is answered with a later record: a settlement carried by a
decision), and ``sync`` waits for it. Every ``checkpoint_every``
records or ``checkpoint_seconds`` seconds a signed checkpoint is appended, naming the
chain head.

A write that fails (a full disk, a file size limit, an I/O error) fails its whole batch:
the file is cut back to the last durable record and the chain head rolled back to it, so
no torn or unacknowledged record stays in the file and the next record chains onto the
last one that is really there. Nothing is sticky: the next append tries again, and while
the log cannot write, the idle timer retries a checkpoint every ``retry_seconds`` so that
the PDP recovers by itself once space returns. ``on_writable`` hears each change
(health goes ``NOT_SERVING`` while the log cannot write).

Secrets never reach the disk: the configured paths of a decision's policy input
(``--log-mask``, e.g. ``action.args.password``) are replaced by ``"***"`` before the
record is hashed, and the record lists the paths it masked (``masked``). Nothing else is
masked, and nothing else needs to be: a policy input holds the action (kind, target,
tool arguments, max_tokens, HTTP method and path) and the run's step, never a request's
headers, so an agent's authorization header never reaches the PDP, let alone its log.
With ``segment_bytes``, a file that reaches that size is sealed and the log goes on in a
fresh one, the chain unbroken (``segments.py``).

Records are typed (``records.py``); the writer adds their place in the chain (``v``,
``seq``, ``prev``) and takes their ``time`` as given (the decision's own ``now``), reading
its clock only for the checkpoints it signs.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import errno
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pdp.clock import utc_now
from pdp.decisionlog.chain import sign_checkpoint
from pdp.decisionlog.head import open_state
from pdp.decisionlog.mac import mac_key, with_mac
from pdp.decisionlog.records import (
    CheckpointRecord,
    DecisionRecord,
    Record,
    WritableRecord,
    line_fields,
)
from pdp.decisionlog.segments import LogPosition, seal
from pdp.errors import ConfigError, LogUnavailable
from pdp.manifest.canonical import canonical_record_bytes, digest

__all__ = ["DecisionLog", "MaskRule", "Queued"]

MASK = "***"
# After a failed rotation, the log grows on in its file this long before it tries again.
_ROTATE_BACKOFF = 60.0
# How many times the durable seq a failed epoch kept is remembered (each time it moved).
_KEPT_EPOCHS = 4096
log = logging.getLogger("abc.pdp")


@dataclass(frozen=True)
class MaskRule:
    """A dotted path inside a decision record's ``input`` whose value is replaced before
    writing."""

    path: tuple[str, ...]

    @staticmethod
    def parse(text: str) -> MaskRule:
        parts = tuple(text.split("."))
        if not text or any(not part for part in parts) or parts[0] not in ("action", "run"):
            raise ConfigError(f"mask path {text!r} must be dotted and start with action. or run.")
        return MaskRule(parts)


def _holders(document: dict[str, Any], rules: Sequence[MaskRule]) -> list[tuple[Any, MaskRule]]:
    """(the dict holding the masked value, its rule) for each rule that masks something."""
    found = []
    for rule in rules:
        node: Any = document
        for part in rule.path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and rule.path[-1] in node:
            found.append((node, rule))
    return found


def _mask(document: dict[str, Any], rules: Sequence[MaskRule]) -> list[str]:
    masked: list[str] = []
    for node, rule in _holders(document, rules):
        node[rule.path[-1]] = MASK
        masked.append(".".join(rule.path))
    return masked


@dataclass(frozen=True)
class Queued:
    """A record queued to go with the log's next commit (``DecisionLog.queue``)."""

    seq: int
    epoch: int  # the failures the log had had when it was queued


class DecisionLog:
    def __init__(
        self,
        path: Path,
        key: Ed25519PrivateKey,
        *,
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 60.0,
        retry_seconds: float = 1.0,
        masks: Sequence[MaskRule] = (),
        clock: Callable[[], datetime] = utc_now,
        segment_bytes: int = 0,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        head, active = open_state(path)
        self._path = path
        self._segment_bytes = segment_bytes  # 0: one file, never rotated
        self._first = active.first
        self._seq, self._prev = head.seq, head.hash
        self._key = key
        self._mac_key = mac_key(key)
        self._every, self._seconds = checkpoint_every, checkpoint_seconds
        self._retry = retry_seconds
        self._masks = tuple(masks)
        self._clock = clock
        self._file = path.open("ab", buffering=0)
        self._fd = self._file.fileno()
        self._lock = threading.Condition()
        self._pending: list[bytes] = []
        self._pending_at = 0.0  # monotonic time the oldest of them was queued
        self._written = head.seq  # every seq below this is on disk
        self._since_checkpoint, self._checkpoint_at = 0, time.monotonic()
        self._rotate_after = 0.0  # monotonic time before which no rotation is tried
        # The last durable state, where a failed batch rolls back to.
        self._durable = _Durable(
            os.fstat(self._fd).st_size,
            head.seq,
            head.hash,
            0,
            (active.last_segment, active.last_offset, active.last_length),
        )
        self._torn = False  # a failed write's tail may still be in the file: cut it first
        # Bumped by every failed batch: a waiter whose epoch passed lost its record (unless
        # that epoch had made it durable), even if later records reuse its seq.
        self._epoch = 0
        # Per failed epoch: its error, and the seq it had made durable (those below it).
        self._failures: dict[int, tuple[OSError, int]] = {}
        # The same durable seq for older epochs, kept longer: (first epoch, seq) each time it
        # moved. A settlement answered before its write is carried again by a decision,
        # perhaps after a long outage; it must find its record durable, not write it twice.
        self._kept: list[tuple[int, int]] = []
        self._writable = True
        self._watchers: list[Callable[[bool], None]] = []
        self._closed = False
        self._writing = False
        # Its own event, not the log's condition: every commit notifies that condition,
        # and a timer woken by each one would compete for the GIL on the decision path.
        # Set on close and when the log becomes unwritable (to start retrying).
        self._wake_timer = threading.Event()
        self._timer = threading.Thread(
            target=self._idle_checkpoints, name="decision-log-checkpoints", daemon=True
        )
        self._timer.start()

    @property
    def writable(self) -> bool:
        """False from a failed write until the next one that succeeds."""
        return self._writable

    def watch(self, on_writable: Callable[[bool], None]) -> None:
        """Call ``on_writable(now_writable)`` at each change, under the log's lock (so
        changes arrive in order); it must not call back into the log."""
        with self._lock:
            self._watchers.append(on_writable)
            on_writable(self._writable)

    def append(self, record: WritableRecord) -> int:
        """Append one record and return its seq once it is on disk (fsynced).

        ``BadRequest`` if the record has no canonical spelling (nothing is written and the
        chain is unchanged); ``LogUnavailable`` if it could not be made durable (nothing of
        it stays in the file; the ``OSError`` is its cause) or once the log is closed.
        """
        queued = self.queue(record)
        self.sync(queued)
        return queued.seq

    def masks(self, policy_input: dict[str, Any]) -> bool:
        """Whether a record of ``policy_input`` would have a value masked."""
        return bool(self._masks) and bool(_holders(policy_input, self._masks))

    def queue(self, record: WritableRecord) -> Queued:
        """Queue one record without waiting for it: it is written with the next commit
        (any caller's ``append``, or ``sync``), so records that are answered together
        cost one fsync. Nothing queued may be acknowledged before ``sync`` returns for it.

        ``BadRequest`` and ``LogUnavailable`` as for ``append``.
        """
        if self._masks and isinstance(record, DecisionRecord):
            record = self._masked(record)
        with self._lock:
            if self._closed:
                raise LogUnavailable("the decision log is closed")
            queued = Queued(self._enqueue(record), self._epoch)
            if self._due_checkpoint():
                self._enqueue_checkpoint()
        return queued

    def sync(self, queued: Queued) -> None:
        """Return once ``queued`` (and all before it) is on disk; ``LogUnavailable`` if
        it was lost (nothing of its batch stays in the file)."""
        with self._lock:
            self._commit_or_unavailable(queued.seq + 1, queued.epoch)
            if (
                self._segment_bytes
                and self._durable.size >= self._segment_bytes
                and time.monotonic() >= self._rotate_after
            ):
                self._rotate()

    def pending(self, queued: Queued) -> bool:
        """Queued and not written yet, nor lost with a failed batch: the next commit takes it."""
        with self._lock:
            return queued.epoch == self._epoch and self._written <= queued.seq

    def wait_written(self, queued: Queued, within: float) -> None:
        """Wait up to ``within`` seconds for another caller's commit to take ``queued``
        along (or for its batch to fail): a record no answer is waiting on, such as a
        settlement no decision carried, then costs no write of its own while decisions keep
        coming. ``sync`` says what became of it, writing it only if none did."""
        deadline = time.monotonic() + within
        with self._lock:
            while self._written <= queued.seq and self._epoch == queued.epoch:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._lock.wait(left)  # every commit and every failure notifies

    def _rotate(self) -> None:
        """Seal the active file (ending it with a checkpoint) and start the next one.

        The record asked for is durable already: a failure here is logged and the active
        file grows on until an append after ``_ROTATE_BACKOFF`` rotates it (not every
        append: each try costs a checkpoint and its fsync). Holds ``self._lock``.
        """
        sealed: Path | None = None
        try:
            self._enqueue_checkpoint()
            self._commit_through(self._seq)
            if self._writing or self._pending or self._durable.size < self._segment_bytes:
                return  # another batch got in between, or another caller rotated already
            sealed = seal(self._path, self._first)
            fresh = self._path.open("ab", buffering=0)
        except OSError as exc:
            log.error("decision log: cannot rotate %s: %s", self._path, exc)
            self._rotate_after = time.monotonic() + _ROTATE_BACKOFF
            if sealed is not None:
                # The new file could not be made: the sealed one is the active file again,
                # so that a restart finds the log where it goes on.
                try:
                    os.rename(sealed, self._path)
                except OSError as back:
                    # It goes on in the sealed file: still one chain in order, and start-up
                    # cuts a torn tail there as in the active file.
                    log.error("decision log: cannot rename %s back: %s", sealed, back)
            return
        self._file.close()
        self._file, self._fd = fresh, fresh.fileno()
        self._first = self._durable.seq
        self._durable = replace(self._durable, size=0)
        log.info("decision log: sealed %s, continuing at seq %d", sealed.name, self._first)

    def position(self) -> LogPosition:
        """Where the durable log stands now: what a snapshot of state is bound to."""
        with self._lock:
            durable = self._durable
            segment, offset, length = durable.last
            return LogPosition(durable.seq, durable.prev, segment, offset, length)

    def flush(self) -> None:
        """Return once every record queued so far is on disk (``LogUnavailable`` if not)."""
        with self._lock:
            self._commit_or_unavailable(self._seq, self._epoch)

    def _commit_or_unavailable(self, target: int, epoch: int) -> None:
        try:
            self._commit_through(target, epoch)
        except OSError as exc:
            raise LogUnavailable(f"the decision log cannot write: {exc}") from exc

    def _masked(self, record: DecisionRecord) -> DecisionRecord:
        # Masking edits a copy: the caller's input is left as it was.
        policy_input = copy.deepcopy(record.input)
        masked = _mask(policy_input, self._masks)
        if not masked:
            return record
        return record.model_copy(update={"input": policy_input, "masked": tuple(masked)})

    def _commit_through(self, target: int, epoch: int | None = None) -> None:
        """Return once every seq below ``target`` (queued in ``epoch``, by default the
        current one) is on disk, or raise the ``OSError`` that lost it. Holds ``self._lock``.

        Group commit, leader and followers: whoever finds no write under way writes and
        fsyncs everything pending (its own record and any that queued meanwhile); the
        others wait for that fsync. One fsync per batch, and no thread hand-off for a
        caller that is alone.
        """
        epoch = self._epoch if epoch is None else epoch
        while self._written < target or self._epoch != epoch:
            if self._epoch != epoch:
                # A batch failed since: the records it had made durable before stay so.
                lost, kept = self._failures.get(epoch, (None, self._kept_in(epoch)))
                if target <= kept:
                    return
                raise lost or OSError(errno.EIO, "decision log write failed")
            if self._writing:
                self._lock.wait()
                continue
            self._writing = True
            batch, self._pending = self._pending, []
            start, torn = self._durable.size, self._torn
            last = (
                (self._first, start + sum(map(len, batch[:-1])), len(batch[-1]))
                if batch
                else self._durable.last
            )
            seq, prev, since = self._seq, self._prev, self._since_checkpoint
            self._lock.release()
            try:
                size = self._write(b"".join(batch), start, torn)
            except OSError as exc:
                failure: OSError | None = exc
            else:
                failure = None
            finally:
                self._lock.acquire()
                self._writing = False
            if failure is None:
                self._durable = _Durable(size, seq, prev, since, last)
                self._written, self._torn = seq, False
                self._set_writable(True)
            else:
                self._fail(failure)
            self._lock.notify_all()

    def _write(self, data: bytes, start: int, torn: bool) -> int:
        """Write ``data`` after the ``start`` durable bytes and fsync; the new durable size.

        On any error the file is cut back to ``start`` (best effort: if that fails too,
        the next batch cuts first) and the error raised: a record is durable whole or not
        at all, never a torn line that a restart would cut after it was answered.
        """
        try:
            if torn:
                self._cut(start)
            view = memoryview(data)
            while view:
                # os.write may write less than asked (a nearly full disk, a file size limit):
                # only bytes it reports written count, and zero is as good as an error.
                written = os.write(self._fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, "the decision log accepted no more bytes")
                view = view[written:]
            # fdatasync: the data and the size that reaches it, not the mtime.
            os.fdatasync(self._fd)
        except OSError:
            try:
                self._cut(start)
            except OSError as cut_failure:
                log.error("decision log: cannot cut a failed write back: %s", cut_failure)
            raise
        return start + len(data)

    def _kept_in(self, epoch: int) -> int:
        """The seq a failed ``epoch`` had made durable; 0 (none known) if forgotten."""
        found = bisect.bisect_right(self._kept, (epoch, sys.maxsize)) - 1
        return self._kept[found][1] if found >= 0 and self._kept[0][0] <= epoch else 0

    def _cut(self, size: int) -> None:
        os.ftruncate(self._fd, size)
        os.fdatasync(self._fd)
        self._torn = False

    def _fail(self, failure: OSError) -> None:
        """A batch was lost: its records and any queued behind them (chained onto them)
        fail; the chain and checkpoint count go back to the last durable record."""
        log.error("decision log unwritable: %s", failure)
        self._failures[self._epoch] = (failure, self._durable.seq)
        self._failures.pop(self._epoch - 64, None)  # only waiters of recent epochs remain
        if not self._kept or self._kept[-1][1] != self._durable.seq:
            self._kept.append((self._epoch, self._durable.seq))
            del self._kept[:-_KEPT_EPOCHS]
        self._epoch += 1
        self._pending = []
        durable = self._durable
        self._seq, self._prev = durable.seq, durable.prev
        self._since_checkpoint = durable.since_checkpoint
        self._written = durable.seq
        self._torn = True
        self._set_writable(False)

    def _set_writable(self, writable: bool) -> None:
        if writable == self._writable:
            return
        self._writable = writable
        if writable:
            log.warning("decision log writable again")
        else:
            self._wake_timer.set()
        for watcher in self._watchers:
            watcher(writable)

    def _enqueue(self, record: Record) -> int:
        seq = self._seq
        # Once: the line written is the line hashed. A record that cannot be spelled
        # raises here, before the chain moves.
        encoded = canonical_record_bytes(line_fields(record, seq, self._prev))
        if not isinstance(record, CheckpointRecord):  # signed on its own
            encoded = with_mac(encoded, self._mac_key)
        if not self._pending:
            self._pending_at = time.monotonic()
        self._pending.append(encoded + b"\n")
        self._seq, self._prev = seq + 1, digest(encoded)
        self._since_checkpoint += 1
        return seq

    def _due_checkpoint(self) -> bool:
        return self._since_checkpoint >= self._every or (
            time.monotonic() - self._checkpoint_at >= self._seconds
        )

    def _enqueue_checkpoint(self) -> None:
        checkpoint = sign_checkpoint(self._seq, self._prev, self._clock(), self._key)
        self._enqueue(checkpoint)
        self._since_checkpoint, self._checkpoint_at = 0, time.monotonic()

    def checkpoint(self) -> None:
        """Append a signed checkpoint now and wait until it is on disk (or raise OSError)."""
        with self._lock:
            self._enqueue_checkpoint()
            self._commit_through(self._seq)

    def _idle_checkpoints(self) -> None:
        """Sign an idle log's tail, and write what is queued, within ``checkpoint_seconds``
        and a tenth more (a second at most): a log still written to meanwhile takes its
        checkpoint along with the next record's commit, not in a write of its own, and
        records queued less than that tenth ago are left to the commit about to take them.
        While the log cannot write, try a checkpoint every ``retry_seconds``, so that it
        recovers (and health with it) without waiting for a decision that health keeps
        away."""
        grace = min(1.0, self._seconds / 10)
        while True:
            with self._lock:
                now = time.monotonic()
                if not self._writable:
                    wait = self._retry
                elif self._pending:
                    # Left for the grace to the commit most likely about to take them (a
                    # decision's carried settlement is queued just before the decision).
                    wait = max(0.0, self._pending_at + grace - now)
                else:
                    left = self._checkpoint_at + self._seconds + grace - now
                    wait = left if left > 0 else (0.0 if self._since_checkpoint else self._seconds)
            woken = self._wake_timer.wait(timeout=wait)
            self._wake_timer.clear()
            with self._lock:
                if self._closed:
                    return
                if woken:
                    continue  # the log just failed: first retry after retry_seconds
                # Overdue by the grace: a record queued meanwhile would have taken it along.
                now = time.monotonic()
                due = self._since_checkpoint and now - self._checkpoint_at >= self._seconds + grace
                # Records queued that no commit took within the grace are written too: a
                # settlement answered before its write, whose own queuing put the due
                # checkpoint behind it.
                stale = self._pending and now - self._pending_at >= grace
                if not (due or stale or not self._writable):
                    continue
                if due or not self._writable:
                    self._enqueue_checkpoint()
                # A failure is logged by _fail and tried again after retry_seconds.
                with contextlib.suppress(OSError):
                    self._commit_through(self._seq)

    def close(self) -> None:
        """Checkpoint, flush and close (what a clean shutdown does).

        If the final checkpoint cannot be written the log is closed all the same, its
        tail unsigned (``audit verify --allow-tail`` reads it): a full disk must not turn
        a clean stop into a crash.
        """
        if self._closed:
            return
        try:
            self.checkpoint()
        except OSError as exc:
            log.error("decision log closed without its final checkpoint: %s", exc)
        with self._lock:
            self._closed = True
        self._wake_timer.set()
        self._timer.join(timeout=10)
        self._file.close()


@dataclass(frozen=True)
class _Durable:
    """Where the log stands on disk: its size, next seq, head hash, records since the
    last checkpoint."""

    size: int
    seq: int
    prev: str
    since_checkpoint: int
    last: tuple[int, int, int]  # the last record's line: segment (first seq), offset, length
