"""Decision log: durable appends, chain and checkpoints; every kind of tampering is named."""

from __future__ import annotations

import base64
import errno
import json
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pdp.decisionlog import (
    DecisionLog,
    DecisionRecord,
    LogInvalid,
    MaskRule,
    read_verified_log,
    verify_log,
)
from pdp.decisionlog.chain import record_hash
from pdp.errors import BadRequest, ConfigError, LogUnavailable
from pdp.manifest.canonical import canonical_bytes

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
NOW = datetime(2026, 11, 22, 10, 5, tzinfo=UTC)


def decision(i: int, args: dict[str, Any] | None = None) -> DecisionRecord:
    return DecisionRecord(
        time=NOW,
        decision_id=f"dec_{i}",
        request_id=f"req_{i}",
        run_id="run_1",
        manifest_digest="sha256:" + "1" * 64,
        policy_digest="sha256:" + "2" * 64,
        input={
            "action": {
                "kind": "tool",
                "target": "tool:kb/search",
                "args": {"q": str(i)} if args is None else args,
            }
        },
        result={"allow": i % 2 == 0, "reasons": [], "obligations": {}},
        reservation_id="",
    )


def written_log(tmp_path: Path, records: int = 10, every: int = 4) -> Path:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY, checkpoint_every=every)
    for i in range(records):
        log.append(decision(i))
    log.close()
    return path


def test_a_clean_log_verifies(tmp_path: Path) -> None:
    report = verify_log(written_log(tmp_path), KEY.public_key())
    # 10 decisions, a checkpoint after every 4, and one at close.
    assert report.records == 13 and report.checkpoints == 3 and report.unsigned_tail == 0


def test_the_records_read_are_the_records_verified(tmp_path: Path) -> None:
    path = written_log(tmp_path)
    verified = read_verified_log(path, KEY.public_key())
    assert verified.report == verify_log(path, KEY.public_key())
    assert [entry.seq for entry in verified.logged] == list(range(13))
    assert [r.decision_id for r in verified.records if isinstance(r, DecisionRecord)] == [
        f"dec_{i}" for i in range(10)
    ]
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))  # the closing checkpoint cut off
    with pytest.raises(LogInvalid, match="after the last checkpoint"):
        read_verified_log(path, KEY.public_key())
    assert len(read_verified_log(path, KEY.public_key(), allow_tail=True).records) == 12


def test_concurrent_appends_are_all_durable_and_chained(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY, checkpoint_every=50)
    seqs: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(50):
            seq = log.append(decision(n * 100 + i))
            with lock:
                seqs.append(seq)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    assert len(set(seqs)) == 400
    report = verify_log(path, KEY.public_key())
    assert report.records - report.checkpoints == 400


def test_a_restarted_log_continues_the_chain(tmp_path: Path) -> None:
    path = written_log(tmp_path, records=3)
    log = DecisionLog(path, KEY)
    assert log.append(decision(99)) == 4  # after 3 records and the closing checkpoint
    log.close()
    assert verify_log(path, KEY.public_key()).records == 6


def test_an_idle_tail_is_checkpointed_within_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY, checkpoint_seconds=0.2)
    try:
        for i in range(3):  # appends before the interval ends do not put the timer off
            log.append(decision(i))
            time.sleep(0.05)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            kinds = [json.loads(line)["kind"] for line in path.read_text().splitlines()]
            if kinds[-1:] == ["checkpoint"]:
                break
            time.sleep(0.02)
        assert kinds == ["decision"] * 3 + ["checkpoint"]
        time.sleep(0.5)  # nothing new: no further checkpoint
        assert len(path.read_text().splitlines()) == 4
    finally:
        log.close()
    assert verify_log(path, KEY.public_key()).records == 5


def test_records_queued_and_never_synced_are_written_by_the_idle_timer(tmp_path: Path) -> None:
    """A record queued that no commit takes (a settlement answered before its write), whose
    queuing put the due checkpoint behind it: nothing is left to sign, and both are written
    within the interval all the same."""
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY, checkpoint_every=2, checkpoint_seconds=0.3)
    try:
        log.append(decision(0))
        log.queue(decision(1))  # the second record since the last checkpoint: one is due
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            kinds = [json.loads(line)["kind"] for line in path.read_text().splitlines()]
            if len(kinds) == 3:
                break
            time.sleep(0.02)
        assert kinds == ["decision", "decision", "checkpoint"]
    finally:
        log.close()


def test_a_record_made_durable_before_a_long_outage_is_known_durable_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A settlement answered before its write and written, then a disk that fails many
    times over, then the decision that carries it again: its record is durable, not
    written a second time."""
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY)
    try:
        written = log.queue(decision(0))
        log.sync(written)
        synced, failing = os.fdatasync, [True]

        def outage(fd: int) -> None:
            if failing[0]:
                raise OSError(errno.ENOSPC, "a full disk")
            synced(fd)

        monkeypatch.setattr("pdp.decisionlog.writer.os.fdatasync", outage)
        for n in range(100):  # far more failed writes than the recent ones kept in full
            with pytest.raises(LogUnavailable):
                log.append(decision(n + 1))
        failing[0] = False
        log.sync(written)  # durable: no LogUnavailable, nothing written again
        assert not log.pending(written)
        kinds = [json.loads(line)["kind"] for line in path.read_text().splitlines()]
        assert kinds == ["decision"]
    finally:
        log.close()


def test_a_log_written_to_takes_its_timed_checkpoints_along_with_its_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interval passes while records keep coming: the checkpoint goes with the next
    record's commit, and the idle timer, a little later, finds nothing to sign. No write of
    its own: one fsync a record."""
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY, checkpoint_seconds=2.0)  # the idle timer's grace: 0.2 s
    syncs = _count_syncs(monkeypatch, _log_fd(log))
    appended = 0
    try:
        started = time.monotonic()
        while time.monotonic() - started < 4.5:
            log.append(decision(appended))
            appended += 1
            time.sleep(0.01)
        kinds = [json.loads(line)["kind"] for line in path.read_text().splitlines()]
        assert kinds.count("checkpoint") == 2
        assert len(syncs) == appended
    finally:
        log.close()


def test_records_queued_just_before_the_idle_timer_wakes_go_with_the_next_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decision's carried settlement is queued a moment before the decision is judged
    and committed: the idle timer, waking in between, leaves it to that commit rather than
    writing it alone (a second fsync for one request). Here the moment is 20 ms, and a
    settlement is pending nearly all the time the timer may wake (first at 2.2 s)."""
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY, checkpoint_seconds=2.0)  # the idle timer's grace: 0.2 s
    syncs = _count_syncs(monkeypatch, _log_fd(log))
    requests = 0
    try:
        started = time.monotonic()
        while time.monotonic() - started < 2.8:
            log.queue(decision(2 * requests))  # the carried settlement
            time.sleep(0.02)
            log.append(decision(2 * requests + 1))  # the decision, one commit for both
            requests += 1
        assert len(syncs) == requests
    finally:
        log.close()
    kinds = [json.loads(line)["kind"] for line in path.read_text().splitlines()]
    assert kinds.count("decision") == 2 * requests


def test_a_torn_last_line_from_a_crash_is_cut_on_restart(tmp_path: Path) -> None:
    path = written_log(tmp_path, records=3)
    with path.open("ab") as handle:
        handle.write(b'{"half a reco')
    log = DecisionLog(path, KEY)
    log.append(decision(7))
    log.close()
    verify_log(path, KEY.public_key())


def test_secrets_are_masked_before_hashing(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY, masks=[MaskRule.parse("action.args.password")])
    record = decision(1, {"q": "1", "password": "hunter2"})
    log.append(record)
    log.close()
    text = path.read_text()
    assert "hunter2" not in text
    first = json.loads(text.splitlines()[0])
    assert first["input"]["action"]["args"]["password"] == "***"
    assert first["masked"] == ["action.args.password"]
    assert record.action["args"]["password"] == "hunter2"  # the caller's copy
    (read,) = [r for r in read_verified_log(path, KEY.public_key()).records if r.kind == "decision"]
    assert isinstance(read, DecisionRecord) and read.masked == ("action.args.password",)


def test_a_record_without_a_masked_path_lists_none(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY, masks=[MaskRule.parse("action.args.password")])
    log.append(decision(1))
    log.close()
    assert "masked" not in json.loads(path.read_text().splitlines()[0])


@pytest.mark.parametrize("path", ["", "args.x", "action..x", "input.action"])
def test_bad_mask_paths_stop_startup(path: str) -> None:
    with pytest.raises(ConfigError):
        MaskRule.parse(path)


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def _edit(line: bytes, change: object) -> bytes:
    record = json.loads(line)
    change(record)  # type: ignore[operator]
    return canonical_bytes(record) + b"\n"


def test_edited_record_is_named(tmp_path: Path) -> None:
    path = written_log(tmp_path)
    lines = _lines(path)
    lines[2] = _edit(lines[2], lambda r: r["result"].update(allow=not r["result"]["allow"]))
    _rewrite(path, lines)
    with pytest.raises(LogInvalid) as caught:
        verify_log(path, KEY.public_key())
    assert caught.value.seq == 3  # the next record's prev no longer matches


def test_edit_with_rechained_hashes_is_caught_by_the_checkpoint(tmp_path: Path) -> None:
    """Rewriting every later prev makes the chain consistent; the signed head does not follow."""
    path = written_log(tmp_path)
    lines = _lines(path)
    records = [json.loads(line) for line in lines]
    records[1]["result"]["allow"] = not records[1]["result"]["allow"]
    for i in range(2, len(records)):
        records[i]["prev"] = record_hash(records[i - 1])
        if records[i]["kind"] == "checkpoint":
            records[i]["head"] = records[i]["prev"]
    _rewrite(path, [canonical_bytes(r) + b"\n" for r in records])
    with pytest.raises(LogInvalid, match="forged") as caught:
        verify_log(path, KEY.public_key())
    assert caught.value.seq == 4  # the first checkpoint after the edit


def test_deleted_record_is_named(tmp_path: Path) -> None:
    path = written_log(tmp_path)
    lines = _lines(path)
    del lines[5]
    _rewrite(path, lines)
    with pytest.raises(LogInvalid, match="missing or out of order") as caught:
        verify_log(path, KEY.public_key())
    assert caught.value.line == 6


def test_reordered_records_are_named(tmp_path: Path) -> None:
    path = written_log(tmp_path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    _rewrite(path, lines)
    with pytest.raises(LogInvalid) as caught:
        verify_log(path, KEY.public_key())
    assert caught.value.line == 2


def test_truncated_mid_record(tmp_path: Path) -> None:
    path = written_log(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(LogInvalid, match="truncated"):
        verify_log(path, KEY.public_key())


def test_truncated_at_a_record_boundary_loses_the_final_checkpoint(tmp_path: Path) -> None:
    path = written_log(tmp_path)
    _rewrite(path, _lines(path)[:-2])
    with pytest.raises(LogInvalid, match="after the last checkpoint"):
        verify_log(path, KEY.public_key())
    assert verify_log(path, KEY.public_key(), allow_tail=True).unsigned_tail == 1


def test_truncated_after_a_checkpoint_needs_an_anchor(tmp_path: Path) -> None:
    path = written_log(tmp_path)
    _rewrite(path, _lines(path)[:5])  # ends on the first checkpoint: looks complete alone
    assert verify_log(path, KEY.public_key())
    with pytest.raises(LogInvalid, match="ends before seq 12"):
        verify_log(path, KEY.public_key(), expect_seq=12)


def test_forged_checkpoint_signature(tmp_path: Path) -> None:
    path = written_log(tmp_path)
    lines = _lines(path)
    forger = Ed25519PrivateKey.generate()

    def resign(record: dict[str, object]) -> None:
        unsigned = {k: v for k, v in record.items() if k != "sig"}
        record["sig"] = base64.b64encode(forger.sign(canonical_bytes(unsigned))).decode()

    lines[4] = _edit(lines[4], resign)
    _rewrite(path, lines)
    with pytest.raises(LogInvalid, match="forged") as caught:
        verify_log(path, KEY.public_key())
    assert caught.value.seq == 4


def test_inserted_record_is_named(tmp_path: Path) -> None:
    path = written_log(tmp_path)
    lines = _lines(path)
    lines.insert(3, lines[2])
    _rewrite(path, lines)
    with pytest.raises(LogInvalid) as caught:
        verify_log(path, KEY.public_key())
    assert caught.value.line == 4


def test_a_fractional_argument_is_logged_verified_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    record = decision(1, {"score": 0.5, "tiny": 1e-7})
    log = DecisionLog(path, KEY)
    log.append(record)
    log.close()
    log = DecisionLog(path, KEY)  # the head is read back after a restart
    log.append(decision(2))
    log.close()
    verified = read_verified_log(path, KEY.public_key())
    first = verified.records[0]
    assert isinstance(first, DecisionRecord)
    assert first.action["args"] == {"score": 0.5, "tiny": 1e-7}


def test_a_record_without_a_canonical_spelling_is_refused_and_the_chain_unchanged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY)
    log.append(decision(1))
    record = decision(2, {"q": "\ud800"})
    with pytest.raises(BadRequest):
        log.append(record)
    assert log.append(decision(3)) == 1  # nothing was taken by the refused one
    log.close()
    assert verify_log(path, KEY.public_key()).records == 3


class Disk:
    """``os.write`` on the log's file as a nearly full disk: at most ``chunk`` bytes a call
    (a short write), and an error once ``room`` is used up. Other files write as usual."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fd: int, room: int, chunk: int) -> None:
        self.fd, self.room, self.chunk = fd, room, chunk
        self._write = os.write
        monkeypatch.setattr(os, "write", self.write)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if fd != self.fd:
            return self._write(fd, data)
        size = min(len(data), self.room, self.chunk)
        if size == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= size
        return self._write(fd, bytes(data[:size]))


def _logged(path: Path) -> list[str]:
    """The verified log's records: a decision by its id, any other by its kind."""
    records = read_verified_log(path, KEY.public_key()).records
    return [getattr(record, "decision_id", record.kind) for record in records]


def _log_fd(log: DecisionLog) -> int:
    return log._fd  # the seam the fake disk needs


def test_short_writes_are_finished_before_a_record_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY)
    Disk(monkeypatch, _log_fd(log), room=10**6, chunk=7)
    for i in range(3):
        log.append(decision(i))
    log.close()
    assert verify_log(path, KEY.public_key()).records == 4


def test_a_full_disk_fails_the_record_whole_and_recovers_when_space_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY, retry_seconds=60)
    changes: list[bool] = []
    log.watch(changes.append)
    log.append(decision(0))
    durable = path.read_bytes()
    disk = Disk(monkeypatch, _log_fd(log), room=40, chunk=1000)  # part of the next record fits
    with pytest.raises(LogUnavailable):
        log.append(decision(1))
    assert path.read_bytes() == durable  # the torn part is cut back
    assert not log.writable and changes == [True, False]
    with pytest.raises(LogUnavailable):  # refused again, still nothing torn
        log.append(decision(2))
    assert path.read_bytes() == durable
    disk.room = 10**6  # space returns: the next append goes through, chained on record 0
    assert log.append(decision(3)) == 1
    assert log.writable and changes == [True, False, True]
    log.close()
    assert _logged(path) == ["dec_0", "dec_3", "checkpoint"]


def test_an_unwritable_log_retries_by_itself_and_closes_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY, retry_seconds=0.05)
    log.append(decision(0))
    disk = Disk(monkeypatch, _log_fd(log), room=0, chunk=1000)
    with pytest.raises(LogUnavailable):
        log.append(decision(1))
    log.close()  # the final checkpoint fails: said in the log, not raised
    assert verify_log(path, KEY.public_key(), allow_tail=True).records == 1
    log = DecisionLog(path, KEY, retry_seconds=0.05)
    with pytest.raises(LogUnavailable):
        log.append(decision(2))
    disk.fd, disk.room = _log_fd(log), 10**6  # no append: the retry timer finds the space
    deadline = time.monotonic() + 5
    while not log.writable and time.monotonic() < deadline:
        time.sleep(0.02)
    assert log.writable
    log.close()
    assert verify_log(path, KEY.public_key()).records == 3  # dec_0, the retry's checkpoint, close


def _count_syncs(monkeypatch: pytest.MonkeyPatch, fd: int) -> list[int]:
    """Every fdatasync of the log's file, counted (and done)."""
    calls: list[int] = []
    real = os.fdatasync

    def fdatasync(target: int) -> None:
        if target == fd:
            calls.append(target)
        real(target)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return calls


def test_queued_records_go_with_the_next_append_in_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY)
    syncs = _count_syncs(monkeypatch, _log_fd(log))
    first, second = log.queue(decision(0)), log.queue(decision(1))
    assert path.read_bytes() == b"" and not syncs  # queued: nothing written yet
    assert log.append(decision(2)) == 2
    assert len(syncs) == 1  # the two queued ones and the append: one write, one fsync
    log.sync(first)
    log.sync(second)  # already durable: no second fsync
    assert len(syncs) == 1
    log.close()
    assert _logged(path) == ["dec_0", "dec_1", "dec_2", "checkpoint"]


def test_sync_writes_what_no_append_took_and_flush_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY)
    syncs = _count_syncs(monkeypatch, _log_fd(log))
    log.sync(log.queue(decision(0)))
    assert len(syncs) == 1 and path.read_bytes().count(b"\n") == 1
    log.queue(decision(1))
    log.flush()
    assert len(syncs) == 2 and path.read_bytes().count(b"\n") == 2
    log.close()


def test_a_record_waited_for_rides_on_the_next_commit_or_takes_its_own_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY)
    syncs = _count_syncs(monkeypatch, _log_fd(log))
    settled = log.queue(decision(0))
    appended = threading.Timer(0.2, log.append, args=(decision(1),))
    appended.start()
    started = time.monotonic()
    log.wait_written(settled, within=10.0)
    log.sync(settled)
    # Durable with the append's commit, well before its own 10 s: one fsync for both.
    assert time.monotonic() - started < 5 and len(syncs) == 1
    appended.join()
    assert len(syncs) == 1 and path.read_bytes().count(b"\n") == 2
    alone = log.queue(decision(2))
    started = time.monotonic()
    log.wait_written(alone, within=0.3)  # nothing else commits: its own write, in time
    log.sync(alone)
    assert 0.25 <= time.monotonic() - started < 5 and len(syncs) == 2
    log.wait_written(alone, within=10.0)  # durable already: at once
    assert time.monotonic() - started < 5 and len(syncs) == 2
    log.close()
    assert _logged(path) == ["dec_0", "dec_1", "dec_2", "checkpoint"]


def test_a_record_waited_for_whose_batch_fails_stops_waiting_and_fails_its_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY, retry_seconds=60)
    waited = log.queue(decision(0))
    disk = Disk(monkeypatch, _log_fd(log), room=0, chunk=1000)

    def commit() -> None:  # another caller's commit, on the full disk
        with pytest.raises(LogUnavailable):
            log.flush()

    failing = threading.Timer(0.2, commit)
    failing.start()
    started = time.monotonic()
    log.wait_written(waited, within=10.0)  # woken by the failed commit, not its 10 s
    assert time.monotonic() - started < 5
    failing.join()
    disk.room = 10**6
    with pytest.raises(LogUnavailable):
        log.sync(waited)  # lost with its batch: never said to be settled
    log.close()


def test_a_queued_record_lost_with_its_batch_fails_its_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY, retry_seconds=60)
    kept = log.queue(decision(0))
    log.sync(kept)
    lost = log.queue(decision(1))
    disk = Disk(monkeypatch, _log_fd(log), room=0, chunk=1000)
    with pytest.raises(LogUnavailable):
        log.append(decision(2))  # its batch carried the queued record down with it
    disk.room = 10**6
    assert log.append(decision(3)) == 1  # a later record takes the lost one's seq
    with pytest.raises(LogUnavailable):
        log.sync(lost)  # its seq is durable again, but not with its record
    log.sync(kept)  # durable before the failure: still said to be
    log.close()
    assert _logged(path) == ["dec_0", "dec_3", "checkpoint"]
