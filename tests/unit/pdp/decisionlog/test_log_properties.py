"""Fuzz: every append is durable whole and read back exactly, or refused and leaves no trace.

Arguments are any JSON-ish values an agent could get past a parser (any float, NaN,
integers past 2^53, lone surrogates), and the disk may fill up at any byte. Bounded:
a few seconds in CI.
"""

from __future__ import annotations

import errno
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdp.decisionlog import DecisionLog, DecisionRecord, read_verified_log
from pdp.errors import BadRequest, LogUnavailable
from pdp.manifest.canonical import canonical_record_bytes, parse_record

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)  # lone surrogates included
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_a_record_is_spelled_exactly_or_refused(value: Any) -> None:
    try:
        encoded = canonical_record_bytes({"x": value})
    except BadRequest:
        return
    assert parse_record(encoded) == {"x": value}  # as the verifier and a restart read it


class _Disk:
    def __init__(self, fd: int, room: int) -> None:
        self.fd, self.room, self._write = fd, room, os.write

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if fd != self.fd:
            return self._write(fd, data)
        size = min(len(data), self.room)
        if size == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= size
        return self._write(fd, bytes(data[:size]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(values, st.integers(min_value=0, max_value=600)), min_size=1, max_size=6))
def test_every_append_is_on_disk_whole_or_refused_without_a_trace(
    appends: list[tuple[Any, int]],
) -> None:
    with tempfile.TemporaryDirectory() as directory, pytest.MonkeyPatch.context() as patch:
        path = Path(directory) / "decisions.log"
        log = DecisionLog(path, KEY, retry_seconds=60)
        disk = _Disk(log._fd, 0)  # the seam: os.write on the log's file
        patch.setattr(os, "write", disk.write)
        kept: list[Any] = []
        for number, (args, room) in enumerate(appends):
            disk.room = room  # the disk fills up anywhere, or not at all
            record = DecisionRecord(
                time=datetime(2026, 11, 22, 10, 5, tzinfo=UTC),
                decision_id=f"dec_{number}",
                request_id=f"req_{number}",
                run_id="run_1",
                manifest_digest="",
                policy_digest="",
                input={"action": {"args": args}},
                result={"allow": False, "reasons": [], "obligations": {}},
                reservation_id="",
            )
            try:
                log.append(record)
            except (BadRequest, LogUnavailable):
                continue
            kept.append(args)
        disk.room = 10**6
        log.close()
        logged = [
            r
            for r in read_verified_log(path, KEY.public_key()).records
            if isinstance(r, DecisionRecord)
        ]
        assert [r.action["args"] for r in logged] == kept
