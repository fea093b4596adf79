"""pdp/server/decide_socket.py: no connection holds a thread forever, the cap holds, and a
PDP removes only its own socket file."""

from __future__ import annotations

import logging
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdp.api import pdp_pb2
from pdp.api.decide_socket import HEADER, OK, PREAMBLE, frame
from pdp.errors import ConfigError
from pdp.server.decide_socket import DecideSocketServer, bind_decide_socket
from tests.harness import read_frame


@pytest.fixture
def where() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="abc-ds-"))  # short: a socket path is 107 bytes
    yield directory / "decide.sock"
    shutil.rmtree(directory, ignore_errors=True)


def _answer(request: pdp_pb2.DecideRequest) -> pdp_pb2.DecideResponse:
    return pdp_pb2.DecideResponse(decision_id="dec_" + request.request_id)


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


def _decide(sock: socket.socket, request_id: str) -> str:
    sock.sendall(frame(pdp_pb2.DecideRequest(request_id=request_id).SerializeToString()))
    answer = read_frame(sock.makefile("rb"))
    assert answer is not None and answer[:1] == OK
    return pdp_pb2.DecideResponse.FromString(answer[1:]).decision_id


def test_an_idle_or_stalled_connection_is_dropped(where: Path) -> None:
    server = DecideSocketServer(bind_decide_socket(where), where, idle_seconds=0.3)
    server.start(_answer)
    try:
        with _connect(where) as stalled, _connect(where) as working:
            stalled.sendall(PREAMBLE + HEADER.pack(100) + b"half")  # and nothing more
            working.sendall(PREAMBLE)
            assert _decide(working, "a") == "dec_a"
            assert stalled.recv(1) == b""  # dropped once idle, its thread freed
            assert working.recv(1) == b""  # an idle one too: its sidecar opens another
    finally:
        server.close(time.monotonic() + 2)


def test_connections_over_the_cap_are_refused_and_said(
    where: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = DecideSocketServer(bind_decide_socket(where), where, max_connections=2)
    server.start(_answer)
    try:
        with _connect(where) as first, _connect(where) as second:
            for sock in (first, second):
                sock.sendall(PREAMBLE)
            assert _decide(first, "1") == "dec_1" and _decide(second, "2") == "dec_2"
            with caplog.at_level(logging.WARNING, "abc.pdp"), _connect(where) as third:
                assert third.recv(1) == b""
            assert "2 connections open, one refused" in caplog.text
            assert _decide(first, "3") == "dec_3"  # those held are still served
    finally:
        server.close(time.monotonic() + 2)


def test_a_stopping_pdp_removes_its_own_socket_file_only(where: Path) -> None:
    old = DecideSocketServer(bind_decide_socket(where), where)
    where.rename(where.with_name("old.sock"))  # as if a newer PDP took the path meanwhile
    new = DecideSocketServer(bind_decide_socket(where), where)
    old.close(time.monotonic() + 1)
    assert where.exists()
    new.close(time.monotonic() + 1)
    assert not where.exists()


def test_a_path_in_the_way_is_refused_and_a_dead_ones_socket_replaced(where: Path) -> None:
    regular = where.with_name("regular")
    regular.write_text("not a socket")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        bind_decide_socket(regular)
    assert regular.read_text() == "not a socket"  # left as it was
    with pytest.raises(ConfigError, match="Not a directory"):
        bind_decide_socket(regular / "decide.sock")
    missing = where.parent / "missing" / "decide.sock"
    with pytest.raises(ConfigError, match=re.escape(f"its directory {missing.parent} does not")):
        bind_decide_socket(missing)
    live = bind_decide_socket(where)
    with pytest.raises(ConfigError, match="another process is serving on it"):
        bind_decide_socket(where)
    live.close()  # its file stays, with nobody behind it
    bind_decide_socket(where).close()
    assert where.exists()
