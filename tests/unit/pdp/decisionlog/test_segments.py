"""Log segments: the writer seals a full file and goes on in a fresh one, one chain across
them; every reader reads them as one log, and an edit or a missing segment is named."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from pdp.decisionlog import CheckpointRecord, DecisionLog, LogInvalid, read_verified_log, verify_log
from pdp.decisionlog.segments import sealed_paths, segment_paths
from tests.unit.pdp.decisionlog.test_log import KEY, decision


def rotated_log(tmp_path: Path, records: int = 40, segment_bytes: int = 2000) -> Path:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY, segment_bytes=segment_bytes)
    for i in range(records):
        log.append(decision(i))
    log.close()
    return path


def test_a_full_file_is_sealed_and_the_chain_goes_on_across_segments(tmp_path: Path) -> None:
    path = rotated_log(tmp_path)
    sealed = sealed_paths(path)
    assert len(sealed) >= 3
    seqs = [entry.seq for entry in read_verified_log(path, KEY.public_key()).logged]
    assert seqs == list(range(len(seqs)))  # one chain, in order, nothing lost
    decisions = [
        e for e in read_verified_log(path, KEY.public_key()).records if e.kind == "decision"
    ]
    assert [d.decision_id for d in decisions] == [f"dec_{i}" for i in range(40)]
    for segment in sealed:
        # Named by its first seq, and ending signed: each sealed file verifies its own end.
        lines = segment.read_bytes().splitlines()
        first = json.loads(lines[0])["seq"]
        assert segment.name == f"decisions.log.{first:012d}"
        assert json.loads(lines[-1])["kind"] == "checkpoint"


def test_a_restarted_writer_continues_the_chain_after_the_last_segment(tmp_path: Path) -> None:
    path = rotated_log(tmp_path)
    path.unlink()  # a crash between sealing and the next file: only sealed segments remain
    before = verify_log(path, KEY.public_key())
    log = DecisionLog(path, KEY, segment_bytes=2000)
    log.append(decision(99))
    log.close()
    after = verify_log(path, KEY.public_key())
    assert after.records == before.records + 2  # the decision and the closing checkpoint
    records = read_verified_log(path, KEY.public_key()).records
    assert isinstance(records[-1], CheckpointRecord)


def test_a_fresh_file_that_cannot_be_made_leaves_the_log_in_its_active_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY, segment_bytes=2000)
    opened = Path.open
    tries: list[int] = []

    def no_room_for_the_fresh_file(self: Path, mode: str = "r", *args: Any, **kw: Any) -> Any:
        if self == path and mode == "ab":  # a full disk, say
            tries.append(1)
            raise OSError(errno.ENOSPC, "no room")
        return opened(self, mode, *args, **kw)

    monkeypatch.setattr(Path, "open", no_room_for_the_fresh_file)
    for i in range(40):
        log.append(decision(i))
    monkeypatch.undo()
    # Renamed back, tried once (then not before the back-off), and nothing lost.
    assert sealed_paths(path) == [] and path.exists() and len(tries) == 1
    assert verify_log(path, KEY.public_key(), allow_tail=True).records > 40
    # kill -9 in the middle of a write: a restart cuts the torn line and goes on.
    with path.open("ab") as handle:
        handle.write(b'{"v": 1, "kind": "deci')
    log = DecisionLog(path, KEY, segment_bytes=2000)
    log.append(decision(99))
    log.close()
    decisions = [
        e for e in read_verified_log(path, KEY.public_key()).records if e.kind == "decision"
    ]
    assert [d.decision_id for d in decisions] == [f"dec_{i}" for i in [*range(40), 99]]


def test_a_torn_tail_of_the_last_sealed_segment_is_cut_when_no_active_file_follows(
    tmp_path: Path,
) -> None:
    # The log went on in a sealed file (neither a fresh file nor the rename back could be
    # made), then a crash tore its last line: the PDP still starts.
    path = rotated_log(tmp_path)
    path.unlink()
    last = sealed_paths(path)[-1]
    with last.open("ab") as handle:
        handle.write(b'{"v": 1, "kind": "deci')
    log = DecisionLog(path, KEY, segment_bytes=2000)
    log.append(decision(99))
    log.close()
    assert verify_log(path, KEY.public_key()).records > 40


def test_an_edit_inside_a_sealed_segment_is_named(tmp_path: Path) -> None:
    path = rotated_log(tmp_path)
    middle = sealed_paths(path)[1]
    middle.write_bytes(middle.read_bytes().replace(b'"q":"', b'"q":"x', 1))
    with pytest.raises(LogInvalid, match="edited"):
        verify_log(path, KEY.public_key())


def test_a_missing_segment_is_named(tmp_path: Path) -> None:
    path = rotated_log(tmp_path)
    sealed_paths(path)[1].unlink()
    with pytest.raises(LogInvalid, match="missing or out of order"):
        verify_log(path, KEY.public_key())


def test_a_torn_sealed_segment_is_named(tmp_path: Path) -> None:
    path = rotated_log(tmp_path)
    first = sealed_paths(path)[0]
    first.write_bytes(first.read_bytes()[:-5])
    with pytest.raises(LogInvalid, match=f"segment {first.name} ends inside a record"):
        verify_log(path, KEY.public_key())


def test_a_log_that_never_rotated_is_one_file(tmp_path: Path) -> None:
    path = rotated_log(tmp_path, segment_bytes=0)
    assert segment_paths(path) == [path]
