"""``abc-pdp --decide-socket PATH``: ``Decide`` on a local Unix socket; ``--decide-listen
HOST:PORT``: the same over TLS, to sidecars on other hosts that present a client certificate.

Its wire format is ``pdp.api.decide_socket``.

A thread per connection reads requests, judges them and writes the answers itself; a
connection opened for settlements (``SETTLE_PREAMBLE``) settles usage batches instead. Over
gRPC the same decision crosses gRPC's polling thread and its worker pool, and those
hand-offs cost more CPU than the decision (issue 18's profile); the decision itself is the
same ``DecisionServicer``'s, with its guarantees: durable before the answer.

A sidecar sends its decisions on one connection without waiting for each answer. What one
read brings (up to ``DECIDED_TOGETHER`` requests) is decided in turn and made durable with
one commit, and the answers go back together in one write: one wake-up of this thread, one
fsync and two system calls for them all, where a thread per decision in flight cost ten
wake-ups a decision at 16 clients.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from google.protobuf.message import DecodeError, Message

from pdp.api import pdp_pb2
from pdp.api.decide_socket import (
    BUSY,
    HEADER,
    MAX_FRAME,
    OK,
    PIPELINED,
    PREAMBLE,
    REFUSED,
    SETTLE_PREAMBLE,
    frame,
)
from pdp.errors import AbcError, ConfigError

__all__ = ["DecideSocketServer", "bind_decide_socket"]

log = logging.getLogger("abc.pdp")

DecideAll = Callable[[list[pdp_pb2.DecideRequest]], list[pdp_pb2.DecideResponse | Exception]]
Settle = Callable[[pdp_pb2.ReportUsageBatchRequest], pdp_pb2.ReportUsageBatchResponse]
Answer = Callable[[list[bytes]], Sequence[Message | Exception]]
DECIDED_TOGETHER = 64  # requests at most in one batch: the state gate is held for all
IDLE_SECONDS = 60.0  # waiting for a connection's next request
FRAME_SECONDS = 5.0  # all of a preamble or a request, once it has begun
REFUSED_SAID_SECONDS = 10.0  # one warning at most this often for connections over the cap
# Connections over TLS that have not finished their handshake, at most, and from one peer
# address: past either, one of the peer with the most is cut off, its oldest. Nobody holds
# the connection slots, or their threads, without a client certificate, and one address
# cannot push out the handshakes of the others: a flood must come from many.
HANDSHAKING = 64
HANDSHAKING_PER_PEER = 4
_TLS_HEADER = 5  # a TLS record's type, version and length, before its payload


def _turn_away(conn: socket.socket) -> None:
    """Close a connection this PDP cannot serve now, saying ``BUSY`` first: closed at its
    preamble, a sidecar would take this PDP for one of before pipelined decisions."""
    with contextlib.suppress(OSError):
        conn.send(BUSY)
    conn.close()


def _attempt(settle: Settle, batch: pdp_pb2.ReportUsageBatchRequest) -> Message | Exception:
    try:
        return settle(batch)
    except AbcError as exc:
        return exc


def _claim(path: Path) -> None:
    """Make room for the socket: a socket file a dead PDP left is removed; a live one, or
    any other file (a symlink too), stops start-up."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ConfigError(f"--decide-socket {path}: exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)  # a live PDP too busy to accept is live all the same
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                path.unlink()  # nobody listens on it any more
                return
    except FileNotFoundError:
        return
    except OSError as exc:  # not a directory, no permission, a timeout
        raise ConfigError(f"--decide-socket {path}: {exc.strerror or exc}") from exc
    raise ConfigError(f"--decide-socket {path}: another process is serving on it")


def bind_decide_socket(path: Path) -> socket.socket:
    """A listening socket at ``path``, mode 0600 from its first moment. Nothing guards who
    serves on a path, only who connects: the sidecar checks that its PDP runs as its own
    user (``pep.decide_socket``)."""
    _claim(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bind() creates the file with the umask's mode: a chmod after it would leave a moment
    # when another user could connect. Start-up is single-threaded here.
    mask = os.umask(0o177)
    try:
        sock.bind(str(path))
        sock.listen()
    except FileNotFoundError as exc:
        sock.close()
        raise ConfigError(
            f"--decide-socket {path}: its directory {path.parent} does not exist"
        ) from exc
    except OSError as exc:
        sock.close()
        why = exc.strerror or exc
        raise ConfigError(f"cannot serve the decide socket on {path}: {why}") from exc
    finally:
        os.umask(mask)
    return sock


class _Requests:
    """Whole requests from one connection. Waiting for the next one is bounded by the idle
    limit; once one has begun, all of it must arrive within ``frame_seconds``: a peer that
    sends a byte now and then cannot hold a thread and a connection slot for good."""

    def __init__(
        self,
        conn: socket.socket,
        idle: float,
        frame_seconds: float,
        tcp: socket.socket | None = None,
    ) -> None:
        self._conn, self._idle, self._frame_seconds = conn, idle, frame_seconds
        self._buffer = bytearray()
        self._timeout = idle
        conn.settimeout(idle)
        # ``conn`` over TLS, the TCP socket under it (its own descriptor): a TLS read hands
        # over one record, and the sidecar writes one a request. The whole records already
        # here are read too, so that what came together is decided together, with one
        # commit (else one fsync a request, at load).
        self._tls = (conn, tcp) if isinstance(conn, ssl.SSLSocket) and tcp is not None else None

    def _recv(self, timeout: float) -> bool:
        """One read, waiting at most ``timeout`` (``TimeoutError``); False at end of stream."""
        if timeout != self._timeout:  # a system call: only when it changes
            self._conn.settimeout(timeout)
            self._timeout = timeout
        chunk = self._conn.recv(65536)
        self._buffer += chunk
        if chunk and self._tls is not None:
            self._read_arrived(*self._tls)
        return bool(chunk)

    def _read_arrived(self, conn: ssl.SSLSocket, tcp: socket.socket) -> None:
        """The records already here whole, a batch's worth at most (a client that never
        pauses must not keep this from deciding). Looked at, not read, first: a record cut
        short would block the read until the rest came, and a read of the end of the stream
        would leave TLS unable to send the answers."""
        for _ in range(DECIDED_TOGETHER):
            if not conn.pending():
                try:
                    head = tcp.recv(_TLS_HEADER, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                    if len(head) < _TLS_HEADER:
                        return  # nothing, the end of the stream, or a header cut short
                    whole = _TLS_HEADER + int.from_bytes(head[3:5], "big")
                    if len(tcp.recv(whole, socket.MSG_PEEK | socket.MSG_DONTWAIT)) < whole:
                        return
                except BlockingIOError:
                    return
            self._buffer += conn.recv(65536)

    def _fill(self, size: int, deadline: float) -> bool:
        """``size`` bytes buffered by ``deadline`` (``TimeoutError`` past it); False if the
        peer stopped short of them."""
        while len(self._buffer) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("a frame took too long")
            if not self._recv(min(left, self._idle)):  # a stall ends it at the idle limit
                return False
        return True

    def preamble(self) -> bytes | None:
        """What the connection opened with (every preamble is as long); None if nothing."""
        if not self._recv(self._idle):  # a sidecar that connects ahead says it at once
            return None
        if not self._fill(len(PREAMBLE), time.monotonic() + self._frame_seconds):
            return None
        said = bytes(self._buffer[: len(PREAMBLE)])
        del self._buffer[: len(PREAMBLE)]
        return said

    def next(self) -> bytes | None:
        """The next request's bytes; None when the peer is done, or sent a frame too long
        or cut short."""
        if not self._buffer and not self._recv(self._idle):
            return None
        deadline = time.monotonic() + self._frame_seconds
        if not self._fill(HEADER.size, deadline):
            return None
        (length,) = HEADER.unpack_from(self._buffer)
        if length > MAX_FRAME or not self._fill(HEADER.size + length, deadline):
            return None
        return self._take(length)

    def next_alone(self) -> list[bytes] | None:
        """``next``, as a batch of one."""
        body = self.next()
        return None if body is None else [body]

    def batch(self) -> list[bytes] | None:
        """The next request and those whole after it in what was read, at most
        ``DECIDED_TOGETHER``; None as for ``next``."""
        first = self.next()
        if first is None:
            return None
        bodies = [first]
        while len(bodies) < DECIDED_TOGETHER and len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME or len(self._buffer) < HEADER.size + length:
                break  # ``next`` waits for the rest, or refuses it
            bodies.append(self._take(length))
        return bodies

    def _take(self, length: int) -> bytes:
        end = HEADER.size + length
        body = bytes(memoryview(self._buffer)[HEADER.size : end])  # one copy
        del self._buffer[:end]
        return body


class DecideSocketServer:
    """Serves a bound decide socket once started: the Unix socket at ``path``, or a TCP
    socket whose connections must complete ``tls`` (a server context that requires client
    certificates) before a byte of the protocol. At most ``max_connections`` at once (a
    connection beyond them is told ``BUSY`` and closed, over TCP closed without a word, and
    its client refuses its call), of which at most ``handshaking`` without a finished
    handshake."""

    def __init__(
        self,
        sock: socket.socket,
        path: Path | None = None,
        tls: ssl.SSLContext | None = None,
        max_connections: int = 256,
        idle_seconds: float = IDLE_SECONDS,
        frame_seconds: float = FRAME_SECONDS,
        handshaking: int = HANDSHAKING,
        handshaking_per_peer: int = HANDSHAKING_PER_PEER,
    ) -> None:
        if (path is None) == (tls is None):
            raise ValueError("a decide socket is a Unix socket's path or a TLS listener")
        if tls is not None and tls.verify_mode != ssl.CERT_REQUIRED:
            raise ValueError("the decide socket over TLS takes only clients with certificates")
        self._sock, self._path, self._tls, self._max = sock, path, tls, max_connections
        self._idle, self._frame_seconds = idle_seconds, frame_seconds
        # Which file is ours: a PDP started on the same path while this one drains has
        # replaced it, and this one must not remove the newcomer's.
        created = os.lstat(path) if path is not None else None
        self._file = (created.st_dev, created.st_ino) if created is not None else None
        self._lock = threading.Lock()
        # Each accepted socket (over TLS, the TCP one under it: shut down, it wakes its
        # thread at any point, the handshake included) and the thread serving it.
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._handshaking: dict[socket.socket, str] = {}  # to its peer's address, oldest first
        self._max_handshaking, self._per_peer = handshaking, handshaking_per_peer
        self._closing = False
        self._acceptor: threading.Thread | None = None
        self._refused, self._refused_said = 0, -REFUSED_SAID_SECONDS

    def start(self, decide_all: DecideAll, settle: Settle) -> None:
        def decide(bodies: list[bytes]) -> Sequence[Message | Exception]:
            return decide_all([pdp_pb2.DecideRequest.FromString(body) for body in bodies])

        answers: dict[bytes, Answer] = {
            PIPELINED: decide,
            PREAMBLE: decide,  # a sidecar of before: one request at a time, a batch of one
            SETTLE_PREAMBLE: lambda bodies: [
                _attempt(settle, pdp_pb2.ReportUsageBatchRequest.FromString(body))
                for body in bodies
            ],
        }
        self._acceptor = threading.Thread(
            target=self._accept, args=(answers,), name="decide-socket", daemon=True
        )
        self._acceptor.start()

    def _accept(self, answers: dict[bytes, Answer]) -> None:
        while True:
            try:
                conn, address = self._sock.accept()
            except OSError as exc:
                if self._closing:
                    return
                log.warning("decide socket: accept failed: %s", exc)  # EMFILE: wait, go on
                time.sleep(0.1)
                continue
            with self._lock:
                if self._closing or len(self._connections) >= self._max:
                    if not self._closing:
                        self._say_refused()
                    self._refuse(conn)
                    continue
                if self._tls is not None:
                    peer = str(address[0])
                    self._make_room_to_handshake(peer)
                    self._handshaking[conn] = peer
                thread = threading.Thread(
                    target=self._serve, args=(conn, answers), name="decide-conn", daemon=True
                )
                self._connections[conn] = thread
            try:
                thread.start()
            except RuntimeError as exc:  # no thread to be had: a pids limit, no memory
                log.error("decide socket: no thread for a connection, refused: %s", exc)
                with self._lock:
                    self._connections.pop(conn, None)
                    self._handshaking.pop(conn, None)
                self._refuse(conn)
                time.sleep(0.1)

    def _refuse(self, conn: socket.socket) -> None:
        """Close a connection not served: saying ``BUSY`` on the Unix socket; over TCP
        without a word, since nothing goes outside TLS (nor a handshake on this thread)."""
        if self._tls is None:
            _turn_away(conn)
        else:
            conn.close()

    def _make_room_to_handshake(self, peer: str) -> None:
        """Before ``peer``'s new connection: past the limits, cut off the oldest unfinished
        handshake of ``peer``, or else of the peer with the most; its thread wakes to a
        closed connection. Holds ``self._lock``."""
        counts = collections.Counter(self._handshaking.values())
        if counts[peer] < self._per_peer:
            if len(self._handshaking) < self._max_handshaking:
                return
            peer = counts.most_common(1)[0][0]
        oldest = next(sock for sock, whose in self._handshaking.items() if whose == peer)
        del self._handshaking[oldest]
        with contextlib.suppress(OSError):
            oldest.shutdown(socket.SHUT_RDWR)

    def _say_refused(self) -> None:
        """Warn of connections over the cap, at most once per ``REFUSED_SAID_SECONDS``: a
        peer opening connections in a loop must not flood the log. Holds ``self._lock``."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_said >= REFUSED_SAID_SECONDS:
            log.warning(
                "decide socket: %d connections open, %d refused since the last warning",
                self._max,
                self._refused,
            )
            self._refused, self._refused_said = 0, now

    def _serve(self, tcp: socket.socket, answers: dict[bytes, Answer]) -> None:
        conn = tcp
        try:
            if self._tls is not None:
                conn = self._handshake(tcp)
                if self._closing:  # stopping: said inside TLS, and nothing decided
                    _turn_away(conn)
                    return
            requests = _Requests(conn, self._idle, self._frame_seconds, tcp)
            said = requests.preamble()
            if said is None and self._closing:
                # Stopping: said, or the sidecar would take this PDP for one of before.
                _turn_away(conn)
                return
            answer_to = answers.get(said) if said is not None else None
            if answer_to is None:
                return
            if said == PIPELINED:
                conn.sendall(PIPELINED)  # the sidecar sends nothing before it reads this
            # Settlements come one batch at a time: a batch may wait for a decision's commit.
            take = requests.next_alone if said == SETTLE_PREAMBLE else requests.batch
            while (bodies := take()) is not None:
                if self._closing:
                    # Stopping: nothing more is decided, as the PDP's state closes behind
                    # this. A TCP socket shut for reading still takes what a busy client
                    # sends: only this ends its connection. Its clients refuse the calls.
                    return
                out = []
                for answer in answer_to(bodies):
                    if isinstance(answer, AbcError):  # not judged, or not settled: so said
                        out.append(frame(REFUSED + str(answer).encode()))
                    elif isinstance(answer, Exception):
                        # A failure answers nothing but a refusal, which its client refuses
                        # the call on; those decided with it are answered as decided.
                        log.error("decide socket: a request failed", exc_info=answer)
                        out.append(frame(REFUSED + b"the PDP failed to answer (its log says)"))
                    else:
                        out.append(frame(OK + answer.SerializeToString()))
                conn.sendall(b"".join(out))
        except (OSError, DecodeError):
            # The client is gone, slow, spoke something else or failed the handshake (an
            # ssl.SSLError, said by the server's log nowhere else): it refuses its own call.
            pass
        except Exception:
            log.exception("decide socket: a connection failed")  # closed: its client refuses
        finally:
            conn.close()
            tcp.close()
            with self._lock:
                self._connections.pop(tcp, None)
                self._handshaking.pop(tcp, None)

    def _handshake(self, tcp: socket.socket) -> ssl.SSLSocket:
        """TLS over ``tcp`` once its client has shown a certificate the client CA signed,
        within ``frame_seconds``; ``ssl.SSLError`` (an ``OSError``) otherwise. On a
        descriptor of its own: ``tcp`` stays this server's, to wake the thread by."""
        assert self._tls is not None
        # Answers go as soon as they are written: Nagle's algorithm would hold a batch's
        # answers until the client acknowledged the last ones, a delayed ACK of up to 40 ms.
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        own = tcp.dup()
        own.settimeout(self._frame_seconds)  # a client that never finishes holds no thread
        try:
            conn = self._tls.wrap_socket(own, server_side=True)
            if conn.version() is None:
                # Closed before (cut off, or its client gone): Python then hands back a
                # socket that never shook hands, whose reads and writes would be plain.
                conn.close()
                raise ConnectionResetError("closed before its TLS handshake")
            return conn
        finally:
            own.close()  # taken by the TLS socket, or left by a failed handshake
            with self._lock:
                self._handshaking.pop(tcp, None)

    def close(self, deadline: float) -> None:
        """Remove the socket file, stop accepting, and let decisions in progress answer
        until ``deadline`` (monotonic)."""
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                now = os.lstat(self._path)
                if (now.st_dev, now.st_ino) == self._file:
                    self._path.unlink()  # first: a PDP starting meanwhile may take the path
        with self._lock:
            self._closing = True
            serving = dict(self._connections)
        for sock in (self._sock, *serving):
            # Wakes a thread blocked in accept(), a handshake or waiting for a next request;
            # a decision in progress still writes its answer. Always a plain socket's
            # shutdown: SSLSocket's own drops TLS, and that answer would leave unencrypted.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        self._sock.close()
        if self._acceptor is not None:
            self._acceptor.join(max(0.0, deadline - time.monotonic()))
        for thread in serving.values():
            if thread.ident is not None:  # started (a failed start left it behind)
                thread.join(max(0.0, deadline - time.monotonic()))
