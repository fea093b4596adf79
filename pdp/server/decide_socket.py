"""``abc-pdp --decide-socket PATH``: ``Decide`` on a local Unix socket.

Its wire format is ``pdp.api.decide_socket``.

A thread per connection reads a request, judges it and writes the answer itself. Over
gRPC the same decision crosses gRPC's polling thread and its worker pool, and those
hand-offs cost more CPU than the decision (issue 18's profile); the decision itself is the
same ``DecisionServicer.decide``, with its guarantees: durable before the answer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from google.protobuf.message import DecodeError

from pdp.api import pdp_pb2
from pdp.api.decide_socket import HEADER, MAX_FRAME, OK, PREAMBLE, REFUSED, frame
from pdp.errors import BadRequest, ConfigError

__all__ = ["DecideSocketServer", "bind_decide_socket"]

log = logging.getLogger("abc.pdp")

Decide = Callable[[pdp_pb2.DecideRequest], pdp_pb2.DecideResponse]
IDLE_SECONDS = 60.0


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


class DecideSocketServer:
    """Serves a bound decide socket once started; at most ``max_connections`` at once (a
    connection beyond them is closed at once, and its client refuses its call)."""

    def __init__(
        self,
        sock: socket.socket,
        path: Path,
        max_connections: int = 256,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self._sock, self._path, self._max, self._idle = sock, path, max_connections, idle_seconds
        # Which file is ours: a PDP started on the same path while this one drains has
        # replaced it, and this one must not remove the newcomer's.
        created = os.lstat(path)
        self._file = (created.st_dev, created.st_ino)
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._closing = False
        self._acceptor: threading.Thread | None = None

    def start(self, decide: Decide) -> None:
        self._acceptor = threading.Thread(
            target=self._accept, args=(decide,), name="decide-socket", daemon=True
        )
        self._acceptor.start()

    def _accept(self, decide: Decide) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                if self._closing:
                    return
                log.warning("decide socket: accept failed: %s", exc)  # EMFILE: wait, go on
                time.sleep(0.1)
                continue
            with self._lock:
                if self._closing or len(self._connections) >= self._max:
                    if not self._closing:
                        log.warning("decide socket: %d connections open, one refused", self._max)
                    conn.close()
                    continue
                # A connection idle this long is dropped (the sidecar opens another), and
                # one that stalls mid-frame frees its thread: nobody holds one forever.
                conn.settimeout(self._idle)
                thread = threading.Thread(
                    target=self._serve, args=(conn, decide), name="decide-conn", daemon=True
                )
                self._connections[conn] = thread
            thread.start()

    def _serve(self, conn: socket.socket, decide: Decide) -> None:
        reader = conn.makefile("rb")
        try:
            if reader.read(len(PREAMBLE)) != PREAMBLE:
                return
            while header := reader.read(HEADER.size):
                if len(header) < HEADER.size:
                    return
                (length,) = HEADER.unpack(header)
                body = reader.read(length) if length <= MAX_FRAME else b""
                if len(body) != length:
                    return  # too long, or cut short
                request = pdp_pb2.DecideRequest.FromString(body)
                try:
                    answer = OK + decide(request).SerializeToString()
                except BadRequest as exc:
                    answer = REFUSED + str(exc).encode()
                conn.sendall(frame(answer))
        except (OSError, DecodeError):
            pass  # the client is gone, or spoke something else: it refuses its own call
        except Exception:
            # Closed, so the client refuses: a bug here must not answer anything.
            log.exception("decide socket: a request failed")
        finally:
            reader.close()
            conn.close()
            with self._lock:
                self._connections.pop(conn, None)

    def close(self, deadline: float) -> None:
        """Remove the socket file, stop accepting, and let decisions in progress answer
        until ``deadline`` (monotonic)."""
        with contextlib.suppress(FileNotFoundError):
            now = os.lstat(self._path)
            if (now.st_dev, now.st_ino) == self._file:
                self._path.unlink()  # first: a PDP starting meanwhile may take the path
        with self._lock:
            self._closing = True
            serving = dict(self._connections)
        for sock in (self._sock, *serving):
            # Wakes a thread blocked in accept() or waiting for a next request; a decision
            # in progress still writes its answer.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        self._sock.close()
        if self._acceptor is not None:
            self._acceptor.join(max(0.0, deadline - time.monotonic()))
        for thread in serving.values():
            thread.join(max(0.0, deadline - time.monotonic()))
