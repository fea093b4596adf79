"""Snapshot files: trusted only once signature, digest and binding to the log check;
anything else is passed over with a WARNING saying why, never used."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pdp.decisionlog import DecisionLog, LogInvalid, LogReader, verify_log
from pdp.decisionlog.recovery import restore_from_log
from pdp.decisionlog.segments import sealed_paths, segment_paths
from pdp.decisionlog.snapshot import load_snapshot, write_snapshot
from pdp.errors import ConfigError
from tests.unit.pdp.decisionlog.test_log import KEY, decision

STATE = {"registry": {"grants": [], "runs": []}, "store": {"runs": {"run_1": "anything"}}}


def log_with_snapshots(tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    """A rotated log with a snapshot after 10 and after 25 decisions, and 5 more after."""
    path, snapshots = tmp_path / "decisions.log", tmp_path / "snapshots"
    log = DecisionLog(path, KEY, segment_bytes=1500)
    written = []
    for i in range(30):
        log.append(decision(i))
        if i in (9, 24):
            written.append(write_snapshot(snapshots, log.position(), {**STATE, "at": i}, KEY))
    log.close()
    return path, snapshots, written


def test_the_newest_snapshot_is_loaded_and_only_the_tail_is_read(tmp_path: Path) -> None:
    path, snapshots, _ = log_with_snapshots(tmp_path)
    snapshot = load_snapshot(snapshots, path, KEY.public_key())
    assert snapshot is not None and snapshot.state == {**STATE, "at": 24}
    tail = list(LogReader(path, KEY.public_key(), start=snapshot.position))
    assert tail[0].seq == snapshot.position.seq
    ids = [e.record.decision_id for e in tail if e.record.kind == "decision"]  # type: ignore[union-attr]
    assert ids == [f"dec_{i}" for i in range(25, 30)]


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda data: data[:-3] + b"}}}", "does not match its digest"),
        (lambda data: data.replace(b'"seq":', b'"seq":1', 1), "not signed by this log's key"),
        (lambda data: b"", "not signed by this log's key"),
    ],
)
def test_a_damaged_snapshot_is_passed_over_for_the_older_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object, why: str
) -> None:
    path, snapshots, written = log_with_snapshots(tmp_path)
    written[-1].write_bytes(damage(written[-1].read_bytes()))  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, "abc.pdp"):
        snapshot = load_snapshot(snapshots, path, KEY.public_key())
    assert snapshot is not None and snapshot.state["at"] == 9
    assert why in caplog.text and written[-1].name in caplog.text


def test_a_snapshot_signed_by_another_key_is_not_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, snapshots, _ = log_with_snapshots(tmp_path)
    with caplog.at_level(logging.WARNING, "abc.pdp"):
        assert load_snapshot(snapshots, path, Ed25519PrivateKey.generate().public_key()) is None
    assert caplog.text.count("not signed by this log's key") == 2


def test_a_log_replaced_under_its_snapshots_stops_start_up(tmp_path: Path) -> None:
    _, snapshots, _ = log_with_snapshots(tmp_path)
    other = tmp_path / "other" / "decisions.log"
    log = DecisionLog(other, KEY, segment_bytes=1500)
    for i in range(30):
        log.append(decision(i + 1000))  # same shape, other records: other hashes
    log.close()
    with pytest.raises(LogInvalid, match="cut or replaced"):
        load_snapshot(snapshots, other, KEY.public_key())


def test_a_log_cut_before_its_snapshot_stops_start_up(tmp_path: Path) -> None:
    # Cut at a checkpoint: the log alone verifies, shorter; the signed snapshot says not.
    path, snapshots, _ = log_with_snapshots(tmp_path)
    for segment in sealed_paths(path)[2:]:
        segment.unlink()
    path.unlink()
    assert verify_log(path, KEY.public_key()).records < 25
    with pytest.raises(LogInvalid, match="cut or replaced"):
        load_snapshot(snapshots, path, KEY.public_key())


@pytest.mark.parametrize("how", ["emptied", "deleted"])
def test_a_log_emptied_or_deleted_under_its_snapshots_stops_start_up(
    tmp_path: Path, how: str
) -> None:
    path, snapshots, _ = log_with_snapshots(tmp_path)
    for segment in segment_paths(path):
        if how == "emptied":
            segment.write_bytes(b"")
        else:
            segment.unlink()
    with pytest.raises(ConfigError, match="cut or replaced"):
        restore_from_log(_Nothing(), path, KEY.public_key(), snapshots)


class _Nothing:
    def restore(self, record: object, trust_now: object) -> None:
        raise AssertionError("nothing to replay")

    def import_state(self, state: dict[str, object]) -> None:
        raise AssertionError("no snapshot fits")
