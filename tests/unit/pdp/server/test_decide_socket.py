"""pdp/server/decide_socket.py: no connection holds a thread forever, the cap holds, and a
PDP removes only its own socket file."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pdp.api import pdp_pb2
from pdp.api.decide_socket import (
    BUSY,
    HEADER,
    OK,
    PIPELINED,
    PREAMBLE,
    REFUSED,
    SETTLE_PREAMBLE,
    frame,
)
from pdp.certs import write_dev_certs
from pdp.errors import BadRequest, ConfigError, LogUnavailable
from pdp.server.decide_socket import DecideAll, DecideSocketServer, bind_decide_socket
from tests.harness import read_frame


@pytest.fixture
def where() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="abc-ds-"))  # short: a socket path is 107 bytes
    yield directory / "decide.sock"
    shutil.rmtree(directory, ignore_errors=True)


def _answer(
    requests: list[pdp_pb2.DecideRequest],
) -> list[pdp_pb2.DecideResponse | Exception]:
    return [pdp_pb2.DecideResponse(decision_id="dec_" + r.request_id) for r in requests]


def _settle(request: pdp_pb2.ReportUsageBatchRequest) -> pdp_pb2.ReportUsageBatchResponse:
    if any(report.reservation_id == "res_down" for report in request.reports):
        raise LogUnavailable("pdp_unavailable")
    return pdp_pb2.ReportUsageBatchResponse(settled=[r.tokens > 0 for r in request.reports])


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
    server.start(_answer, _settle)
    try:
        with _connect(where) as stalled, _connect(where) as working:
            stalled.sendall(PREAMBLE + HEADER.pack(100) + b"half")  # and nothing more
            working.sendall(PREAMBLE)
            assert _decide(working, "a") == "dec_a"
            assert stalled.recv(1) == b""  # dropped once idle, its thread freed
            assert working.recv(1) == b""  # an idle one too: its sidecar opens another
    finally:
        server.close(time.monotonic() + 2)


def test_a_peer_trickling_a_frame_loses_its_slot(where: Path) -> None:
    """Each byte within the idle limit, the frame never whole: dropped once the frame's
    own time is up, so the one slot serves a sidecar again."""
    server = DecideSocketServer(
        bind_decide_socket(where), where, max_connections=1, idle_seconds=1.0, frame_seconds=0.4
    )
    server.start(_answer, _settle)
    try:
        with _connect(where) as trickler:
            trickler.sendall(PREAMBLE + HEADER.pack(100))
            until = time.monotonic() + 1.6
            with contextlib.suppress(OSError):  # dropped: the next byte finds no reader
                while time.monotonic() < until:
                    trickler.sendall(b"x")
                    time.sleep(0.2)
            with _connect(where) as working:
                working.sendall(PREAMBLE)
                assert _decide(working, "a") == "dec_a"
    finally:
        server.close(time.monotonic() + 2)


def test_a_connection_may_wait_before_its_preamble_as_long_as_the_idle_limit(
    where: Path,
) -> None:
    server = DecideSocketServer(
        bind_decide_socket(where), where, idle_seconds=2.0, frame_seconds=0.2
    )
    server.start(_answer, _settle)
    try:
        with _connect(where) as early:
            time.sleep(0.5)  # longer than a frame may take, within the idle limit
            early.sendall(PREAMBLE)
            assert _decide(early, "a") == "dec_a"
    finally:
        server.close(time.monotonic() + 2)


def test_a_connection_without_a_thread_is_refused_and_the_next_served(
    where: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No thread to be had (a pids limit, no memory): that connection is closed, the
    socket goes on serving, and stopping joins only threads that started."""
    start = threading.Thread.start
    failures = [RuntimeError("can't start new thread")]

    def start_or_fail(thread: threading.Thread) -> None:
        if thread.name == "decide-conn" and failures:
            raise failures.pop()
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_or_fail)
    server = DecideSocketServer(bind_decide_socket(where), where)
    server.start(_answer, _settle)
    try:
        with caplog.at_level(logging.ERROR, "abc.pdp"), _connect(where) as unserved:
            assert unserved.recv(64) == BUSY  # not taken for a PDP of before
            assert unserved.recv(1) == b""
        assert "no thread for a connection" in caplog.text
        with _connect(where) as served:
            served.sendall(PREAMBLE)
            assert _decide(served, "b") == "dec_b"
    finally:
        server.close(time.monotonic() + 2)


def test_a_connection_opened_for_settlements_settles_batches(where: Path) -> None:
    server = DecideSocketServer(bind_decide_socket(where), where)
    server.start(_answer, _settle)
    try:
        with _connect(where) as sock:
            sock.sendall(SETTLE_PREAMBLE)
            answers = sock.makefile("rb")
            for reports, said in (
                ([("res_a", 5), ("res_b", 0)], [True, False]),
                ([("res_down", 1)], None),  # refused: to be sent again
                ([("res_c", 1)], [True]),  # and the connection serves on
            ):
                batch = pdp_pb2.ReportUsageBatchRequest(
                    reports=[
                        pdp_pb2.ReportUsageRequest(reservation_id=r, tokens=t) for r, t in reports
                    ]
                )
                sock.sendall(frame(batch.SerializeToString()))
                answer = read_frame(answers)
                assert answer is not None
                if said is None:
                    assert answer == REFUSED + b"pdp_unavailable"
                else:
                    assert answer[:1] == OK
                    assert pdp_pb2.ReportUsageBatchResponse.FromString(answer[1:]).settled == said
    finally:
        server.close(time.monotonic() + 2)


def test_a_decision_that_fails_is_refused_and_logged_and_the_others_answered(
    where: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def failing(
        requests: list[pdp_pb2.DecideRequest],
    ) -> list[pdp_pb2.DecideResponse | Exception]:
        return [
            OSError("the state directory went away")
            if r.request_id == "x"
            else pdp_pb2.DecideResponse(decision_id="dec_" + r.request_id)
            for r in requests
        ]

    server = DecideSocketServer(bind_decide_socket(where), where)
    server.start(failing, _settle)
    try:
        with caplog.at_level(logging.ERROR, "abc.pdp"), _connect(where) as sock:
            requests = [pdp_pb2.DecideRequest(request_id=i).SerializeToString() for i in "xy"]
            sock.sendall(PREAMBLE + b"".join(frame(r) for r in requests))
            answers = sock.makefile("rb")
            failed = read_frame(answers)
            assert failed is not None and failed.startswith(REFUSED)  # its client refuses
            assert b"state directory" not in failed  # the detail is the PDP's log's
            assert (
                read_frame(answers)
                == OK + pdp_pb2.DecideResponse(decision_id="dec_y").SerializeToString()
            )
        assert "a request failed" in caplog.text and "state directory" in caplog.text
    finally:
        server.close(time.monotonic() + 2)


def test_every_preamble_is_as_long_so_one_read_tells_them_apart() -> None:
    assert len(PIPELINED) == len(PREAMBLE) == len(SETTLE_PREAMBLE)


def test_requests_that_came_together_are_decided_together_and_answered_in_order(
    where: Path,
) -> None:
    batches: list[list[str]] = []

    def decide_all(
        requests: list[pdp_pb2.DecideRequest],
    ) -> list[pdp_pb2.DecideResponse | Exception]:
        batches.append([r.request_id for r in requests])
        return [
            BadRequest("not this one")
            if r.request_id == "b"
            else pdp_pb2.DecideResponse(decision_id="dec_" + r.request_id)
            for r in requests
        ]

    server = DecideSocketServer(bind_decide_socket(where), where)
    server.start(decide_all, _settle)
    try:
        with _connect(where) as sock:
            requests = [pdp_pb2.DecideRequest(request_id=i) for i in "abc"]
            sock.sendall(PIPELINED + b"".join(frame(r.SerializeToString()) for r in requests))
            answers = sock.makefile("rb")
            assert answers.read(len(PIPELINED)) == PIPELINED  # said back: it takes them so
            said = [read_frame(answers) for _ in requests]
            assert said[0] == OK + pdp_pb2.DecideResponse(decision_id="dec_a").SerializeToString()
            assert said[1] == REFUSED + b"not this one"  # and the others are answered
            assert said[2] == OK + pdp_pb2.DecideResponse(decision_id="dec_c").SerializeToString()
            assert batches == [["a", "b", "c"]]  # one read, one batch: one commit
            assert _decide(sock, "d") == "dec_d"  # and the connection serves on
    finally:
        server.close(time.monotonic() + 2)


def test_connections_over_the_cap_are_refused_and_said(
    where: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = DecideSocketServer(bind_decide_socket(where), where, max_connections=2)
    server.start(_answer, _settle)
    try:
        with _connect(where) as first, _connect(where) as second:
            for sock in (first, second):
                sock.sendall(PREAMBLE)
            assert _decide(first, "1") == "dec_1" and _decide(second, "2") == "dec_2"
            with caplog.at_level(logging.WARNING, "abc.pdp"):
                for _ in range(3):
                    with _connect(where) as over:
                        assert over.recv(64) == BUSY
                        assert over.recv(1) == b""
            # Said once, not once per connection: a peer in a loop cannot flood the log.
            assert caplog.text.count("2 connections open, 1 refused since the last") == 1
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


def _tls_context(pki: Path, verify: ssl.VerifyMode = ssl.CERT_REQUIRED) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "pdp.pem", pki / "pdp.key")
    context.load_verify_locations(cafile=pki / "ca.pem")
    context.verify_mode = verify
    return context


def _tls_server(
    pki: Path, decide_all: DecideAll = _answer, **limits: Any
) -> tuple[DecideSocketServer, tuple[str, int]]:
    """A decide socket over TLS on loopback, started, its certificates made in ``pki``;
    and its address."""
    write_dev_certs(pki, ["localhost"], 2, False)
    listener = socket.create_server(("127.0.0.1", 0))
    server = DecideSocketServer(listener, tls=_tls_context(pki), **limits)
    server.start(decide_all, _settle)
    return server, listener.getsockname()


def _tls_client(pki: Path, address: tuple[str, int]) -> ssl.SSLSocket:
    """A sidecar's connection: its certificate shown, the pipelined preamble said back."""
    context = ssl.create_default_context(cafile=pki / "ca.pem")
    context.load_cert_chain(pki / "pep.pem", pki / "pep.key")
    raw = socket.create_connection(address, timeout=5)
    conn = context.wrap_socket(raw, server_hostname="localhost")
    conn.sendall(PIPELINED)
    assert conn.recv(len(PIPELINED)) == PIPELINED
    return conn


def test_over_tls_only_clients_with_certificates_and_no_stalled_handshake(
    tmp_path: Path,
) -> None:
    write_dev_certs(tmp_path, ["localhost"], 2, False)
    listener = socket.create_server(("127.0.0.1", 0))
    with pytest.raises(ValueError, match="only clients with certificates"):
        DecideSocketServer(listener, tls=_tls_context(tmp_path, ssl.CERT_OPTIONAL))
    with pytest.raises(ValueError, match="a Unix socket's path or a TLS listener"):
        DecideSocketServer(listener)
    server = DecideSocketServer(listener, tls=_tls_context(tmp_path), frame_seconds=0.3)
    server.start(_answer, _settle)
    try:
        # A client that opens a connection and never says its ClientHello holds no thread.
        with socket.create_connection(listener.getsockname(), timeout=5) as stalled:
            started = time.monotonic()
            assert stalled.recv(1) == b""
            assert time.monotonic() - started < 3
        with _tls_client(tmp_path, listener.getsockname()) as conn:
            assert _decide(conn, "over-tls") == "dec_over-tls"
    finally:
        server.close(deadline=time.monotonic() + 2)


def test_over_tls_what_arrived_together_is_decided_together(tmp_path: Path) -> None:
    """A TLS read hands over one record, and a sidecar writes one a request: the records
    already there are read too, so the batch is as large as on the Unix socket."""
    busy, batches = threading.Event(), []

    def decide_all(
        requests: list[pdp_pb2.DecideRequest],
    ) -> list[pdp_pb2.DecideResponse | Exception]:
        batches.append(len(requests))
        busy.wait(5)  # the first batch holds the thread while the next requests arrive
        return _answer(requests)

    server, address = _tls_server(tmp_path, decide_all)
    try:
        with _tls_client(tmp_path, address) as conn:
            for n in range(6):  # six writes: six TLS records
                conn.sendall(frame(pdp_pb2.DecideRequest(request_id=f"r{n}").SerializeToString()))
                if n == 0:
                    deadline = time.monotonic() + 5
                    while not batches and time.monotonic() < deadline:
                        time.sleep(0.01)
            time.sleep(0.2)  # all five in the server's socket before its next read
            busy.set()
            answers = conn.makefile("rb")
            ids = []
            for _ in range(6):
                answer = read_frame(answers)
                assert answer is not None and answer[:1] == OK
                ids.append(pdp_pb2.DecideResponse.FromString(answer[1:]).decision_id)
        assert ids == [f"dec_r{n}" for n in range(6)]
        assert batches == [1, 5]
    finally:
        busy.set()
        server.close(deadline=time.monotonic() + 2)


def test_over_tls_unfinished_handshakes_cannot_hold_the_slots(tmp_path: Path) -> None:
    """Past ``handshaking`` unfinished handshakes the oldest is cut off, long before its
    own limit: connections without a certificate cannot keep a sidecar out."""
    # Room for the three connections without a certificate (the one cut off may not have
    # left yet) and the sidecar's: cut off, two could not hold a third slot.
    server, address = _tls_server(tmp_path, max_connections=4, handshaking=2)
    stalled = [socket.create_connection(address, timeout=5) for _ in range(2)]
    try:
        time.sleep(0.2)  # both accepted, handshaking
        started = time.monotonic()
        stalled.append(socket.create_connection(address, timeout=5))  # the first is cut off
        assert stalled[0].recv(1) == b""
        assert time.monotonic() - started < 2  # not the 5 s handshake limit
        with _tls_client(tmp_path, address) as conn:  # pushes the second out, and is served
            assert _decide(conn, "served") == "dec_served"  # type: ignore[arg-type]
    finally:
        for sock in stalled:
            sock.close()
        server.close(deadline=time.monotonic() + 2)


def test_over_tls_stopping_wakes_every_thread_and_answers_what_is_decided(
    tmp_path: Path,
) -> None:
    deciding, release = threading.Event(), threading.Event()

    def decide_all(
        requests: list[pdp_pb2.DecideRequest],
    ) -> list[pdp_pb2.DecideResponse | Exception]:
        if requests[0].request_id == "in-flight":
            deciding.set()
            release.wait(5)
        return _answer(requests)

    server, address = _tls_server(tmp_path, decide_all)
    handshaking = socket.create_connection(address, timeout=5)
    idle = _tls_client(tmp_path, address)
    busy = _tls_client(tmp_path, address)
    try:
        busy.sendall(frame(pdp_pb2.DecideRequest(request_id="in-flight").SerializeToString()))
        assert deciding.wait(5)
        started = time.monotonic()
        stopping = threading.Thread(target=server.close, args=(time.monotonic() + 5,))
        stopping.start()
        time.sleep(0.2)
        release.set()
        # The decision in progress is answered, over TLS still (not the plain socket's
        # bytes: this read would fail); the others are woken and closed at once.
        answer = read_frame(busy.makefile("rb"))
        assert answer is not None and answer[:1] == OK
        assert pdp_pb2.DecideResponse.FromString(answer[1:]).decision_id == "dec_in-flight"
        while handshaking.recv(64):  # a TLS alert perhaps, then the end (not a timeout)
            pass
        with contextlib.suppress(ssl.SSLError, ConnectionResetError):
            assert idle.recv(1) == b""
        stopping.join(5)
        assert not stopping.is_alive() and time.monotonic() - started < 2
    finally:
        release.set()
        for sock in (handshaking, idle, busy):
            sock.close()


def test_over_tls_one_address_cannot_push_out_the_handshakes_of_others(tmp_path: Path) -> None:
    server, address = _tls_server(tmp_path, handshaking=8, handshaking_per_peer=2)
    other = socket.create_connection(address, timeout=0.5, source_address=("127.0.0.2", 0))
    flood = [socket.create_connection(address, timeout=5) for _ in range(6)]
    try:
        # The flood's address keeps its two newest; the other address's is left alone.
        for cut_off in flood[:4]:
            assert cut_off.recv(1) == b""
        with pytest.raises(TimeoutError):
            other.recv(1)
    finally:
        for sock in (other, *flood):
            sock.close()
        server.close(deadline=time.monotonic() + 2)


def test_over_tls_stopping_ends_a_busy_connection(tmp_path: Path) -> None:
    """A TCP socket shut for reading still takes what its client sends: a client that keeps
    sending is not decided for once the PDP stops."""
    batches: list[int] = []

    def decide_all(
        requests: list[pdp_pb2.DecideRequest],
    ) -> list[pdp_pb2.DecideResponse | Exception]:
        batches.append(len(requests))
        time.sleep(0.002)  # a decision's time: requests wait in the socket meanwhile
        return _answer(requests)

    server, address = _tls_server(tmp_path, decide_all)
    conn = _tls_client(tmp_path, address)
    sending = threading.Event()
    sending.set()

    def keep_sending() -> None:
        n = 0
        with contextlib.suppress(OSError):
            while sending.is_set():
                conn.sendall(frame(pdp_pb2.DecideRequest(request_id=f"r{n}").SerializeToString()))
                n += 1
                time.sleep(0.0005)

    def keep_reading() -> None:
        with contextlib.suppress(OSError), conn.makefile("rb") as answers:
            while read_frame(answers) is not None:
                pass

    sender = threading.Thread(target=keep_sending)
    reader = threading.Thread(target=keep_reading, daemon=True)
    sender.start()
    reader.start()
    try:
        deadline = time.monotonic() + 5
        while len(batches) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        server.close(deadline=time.monotonic() + 2)
        assert time.monotonic() - started < 1  # not held to its deadline
        at_close = len(batches)
        time.sleep(0.3)
        assert at_close >= 20 and len(batches) <= at_close + 1  # a batch in progress at most
    finally:
        sending.clear()
        sender.join(5)
        conn.close()


def test_over_tls_a_connection_gone_before_its_handshake_is_never_served(
    tmp_path: Path,
) -> None:
    """Closed before its thread runs (cut off, or its client gone), a TCP socket comes back
    from ``wrap_socket`` with no handshake at all, its reads and writes plain: refused."""
    write_dev_certs(tmp_path, ["localhost"], 2, False)
    listener = socket.create_server(("127.0.0.1", 0))
    server = DecideSocketServer(listener, tls=_tls_context(tmp_path))
    client = socket.create_connection(listener.getsockname(), timeout=5)
    tcp, _ = listener.accept()
    try:
        client.close()
        tcp.shutdown(socket.SHUT_RDWR)
        time.sleep(0.1)  # the connection is gone: getpeername() fails
        with pytest.raises(ConnectionResetError, match="closed before its TLS handshake"):
            server._handshake(tcp)
    finally:
        tcp.close()
        listener.close()
