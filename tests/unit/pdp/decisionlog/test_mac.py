"""Record MACs: start-up replays an unsigned tail only if this PDP wrote it."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pdp.decisionlog import (
    DecisionLog,
    LogInvalid,
    LogReader,
    Record,
    SettlementRecord,
    verify_log,
)
from pdp.decisionlog.chain import GENESIS, record_hash, sign_checkpoint
from pdp.decisionlog.mac import carries_mac, mac_key
from pdp.decisionlog.records import line_fields
from pdp.decisionlog.recovery import restore_from_log
from pdp.errors import ConfigError
from pdp.manifest.canonical import canonical_record_bytes, digest
from tests.unit.pdp.decisionlog.test_log import KEY, NOW, decision


class _Collected:
    def __init__(self) -> None:
        self.records: list[Record] = []

    def restore(self, record: Record, trust_now: datetime) -> None:
        self.records.append(record)

    def import_state(self, state: dict[str, object]) -> None:
        raise AssertionError("no snapshot here")


def _restore(path: Path, key: Ed25519PrivateKey = KEY) -> list[Record]:
    target = _Collected()
    restore_from_log(target, path, key.public_key(), mac_key=mac_key(key))
    return target.records


def _append_forged(path: Path, mac: str | None) -> None:
    """A settlement chained correctly after the last line, as anyone can write one."""
    last = json.loads(path.read_bytes().splitlines()[-1])
    forged = SettlementRecord(
        time=NOW, run_id="run_1", reservation_id="rsv_big", tokens=1, usd_micros=0
    )
    fields = line_fields(forged, last["seq"] + 1, record_hash(last))
    if mac is not None:
        fields["~mac"] = mac
    with path.open("ab") as handle:
        handle.write(canonical_record_bytes(fields) + b"\n")


def test_every_record_carries_the_mac_and_checkpoints_say_so(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY, checkpoint_every=3)
    for i in range(5):
        log.append(decision(i))
    log.close()
    lines = path.read_bytes().splitlines()
    for line in lines:
        record = json.loads(line)
        if record["kind"] == "checkpoint":
            assert record["macs"] is True and "~mac" not in record
        else:
            assert carries_mac(line, mac_key(KEY))
            assert not carries_mac(line, mac_key(Ed25519PrivateKey.generate()))
    assert verify_log(path, KEY.public_key()).records == len(lines)


def test_a_crash_tail_the_pdp_wrote_is_replayed(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY, checkpoint_every=1000)
    for i in range(3):
        log.append(decision(i))
    # kill -9: no closing checkpoint, the three records are an unsigned tail.
    assert [r.decision_id for r in _restore(path)] == ["dec_0", "dec_1", "dec_2"]  # type: ignore[union-attr]


@pytest.mark.parametrize("mac", [None, "0" * 32], ids=["no-mac", "wrong-mac"])
def test_a_tail_written_while_the_pdp_was_stopped_stops_start_up(
    tmp_path: Path, mac: str | None
) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY)
    log.append(decision(0))
    log.close()
    _append_forged(path, mac)
    # Readable as an unsigned tail by anyone holding the public key...
    assert verify_log(path, KEY.public_key(), allow_tail=True).unsigned_tail == 1
    # ...but the PDP will not replay it, and then sign it as its own.
    with pytest.raises(ConfigError, match="not written by this PDP"):
        _restore(path)


def test_a_tail_after_a_checkpoint_from_before_macs_is_replayed_as_before(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY)
    log.append(decision(0))
    log.close()
    # The last checkpoint as versions before MACs wrote it, then their (MAC-less) tail.
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join(lines[:-1]) + b"\n")
    last = json.loads(lines[-2])
    old = sign_checkpoint(last["seq"] + 1, record_hash(last), NOW, KEY, macs=False)
    with path.open("ab") as handle:
        handle.write(canonical_record_bytes(line_fields(old, last["seq"] + 1, record_hash(last))))
        handle.write(b"\n")
    _append_forged(path, None)
    assert len(_restore(path)) == 2


def test_an_older_versions_crash_tail_without_any_checkpoint_is_replayed(tmp_path: Path) -> None:
    # Written as versions before MACs did: no ~mac, and no checkpoint yet (a crash within
    # the first minute). An upgrade must not turn it into a refusal to start.
    path = tmp_path / "decisions.log"
    prev, lines = GENESIS, []
    for seq in range(3):
        line = canonical_record_bytes(line_fields(decision(seq), seq, prev))
        prev = digest(line)
        lines.append(line + b"\n")
    path.write_bytes(b"".join(lines))
    assert len(_restore(path)) == 3


def test_a_line_added_to_a_crash_tail_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY, checkpoint_every=1000)
    log.append(decision(0))  # then kill -9: no checkpoint at all
    _append_forged(path, None)
    with pytest.raises(ConfigError, match="not written by this PDP"):
        _restore(path)


def test_a_line_added_after_a_snapshots_record_is_refused(tmp_path: Path) -> None:
    # Start-up from a snapshot reads only what follows its record: that record says the
    # records after it carry MACs, so a forged one there is refused too.
    path = tmp_path / "decisions.log"
    log = DecisionLog(path, KEY, checkpoint_every=1000)
    for i in range(3):
        log.append(decision(i))
    snapshot_at = log.position()
    log.close()
    data = path.read_bytes()
    path.write_bytes(data[: snapshot_at.offset + snapshot_at.length])  # its checkpoint cut
    _append_forged(path, None)
    reader = LogReader(
        path, KEY.public_key(), allow_tail=True, start=snapshot_at, mac_key=mac_key(KEY)
    )
    with pytest.raises(LogInvalid, match="not written by this PDP"):
        list(reader)
