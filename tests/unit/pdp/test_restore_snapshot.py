"""Start-up from a snapshot gives the state a full replay gives: runs, books, open
reservations and kept answers; a snapshot whose state cannot be put back means a full
replay, with a WARNING, and the same state."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pdp.decisionlog.recovery import restore_from_log
from pdp.decisionlog.snapshot import write_snapshot
from tests.factories import NOW
from tests.unit.pdp.test_service import LOG_KEY, _digest, _model, _Pdp


def _busy(tmp_path: Path) -> tuple[_Pdp, list[str]]:
    """A PDP with a grant, two started runs, settled and open reservations, answers,
    and a snapshot taken halfway."""
    pdp = _Pdp(tmp_path)
    digest = _digest(pdp, pdp.register())
    runs = [pdp.service.start_run(digest, key, NOW)[0].run_id for key in ("a", "b")]
    for i in range(3):
        outcome = pdp.service.decide(runs[0], f"req-{i}", _model(10), NOW)
        pdp.service.report_usage(outcome.reservation_id, 7, 3, NOW)
    position, state = pdp.service.export_state()
    write_snapshot(tmp_path / "snapshots", position, state, LOG_KEY)
    pdp.service.decide(runs[0], "req-3", _model(20), NOW)  # left open: reserved
    runs.append(pdp.service.start_run(digest, "c", NOW)[0].run_id)  # after the snapshot
    pdp.service.decide(runs[2], "req-0", _model(30), NOW)
    return pdp, runs


def _views(pdp: _Pdp, runs: list[str]) -> list[object]:
    return [pdp.service.get_run(run_id, NOW) for run_id in runs]


def test_a_restart_from_a_snapshot_equals_a_full_replay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pdp, runs = _busy(tmp_path)
    before = _views(pdp, runs)
    pdp.log.close()
    from_snapshot, replayed = _Pdp(tmp_path), _Pdp(tmp_path)
    with caplog.at_level(logging.INFO, "abc.pdp"):
        tail = restore_from_log(
            from_snapshot.service, pdp.log_path, LOG_KEY.public_key(), tmp_path / "snapshots"
        )
    assert "from the snapshot at seq" in caplog.text and "WARNING" not in caplog.text
    whole = restore_from_log(replayed.service, pdp.log_path, LOG_KEY.public_key())
    assert 0 < tail < whole
    assert _views(from_snapshot, runs) == _views(replayed, runs) == before
    # A retried request id gets the answer it got before the snapshot, not a new charge.
    for restarted in (from_snapshot, replayed):
        again = restarted.service.decide(runs[0], "req-1", _model(10), NOW)
        assert again.decision.allow and restarted.service.get_run(runs[0], NOW) == before[0]


def test_a_snapshot_whose_state_cannot_be_put_back_means_a_full_replay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pdp, runs = _busy(tmp_path)
    before = _views(pdp, runs)
    position, state = pdp.service.export_state()
    # Signed and bound, but malformed: the grants import, the store's runs do not.
    state["store"]["runs"][runs[0]]["reserved"] = [["rsv_x", "not costs", "never"]]
    write_snapshot(tmp_path / "snapshots", position, state, LOG_KEY)
    pdp.log.close()
    restarted = _Pdp(tmp_path)
    with caplog.at_level(logging.WARNING, "abc.pdp"):
        restore_from_log(
            restarted.service, pdp.log_path, LOG_KEY.public_key(), tmp_path / "snapshots"
        )
    assert "a run of the snapshot is malformed" in caplog.text
    assert "replaying the whole decision log" in caplog.text
    assert _views(restarted, runs) == before
