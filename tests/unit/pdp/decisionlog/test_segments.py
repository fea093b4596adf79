"""Log segments: the writer seals a full file and goes on in a fresh one, one chain across
them; every reader reads them as one log, and an edit or a missing segment is named."""

from __future__ import annotations

import json
from pathlib import Path

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
