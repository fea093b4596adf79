"""Real processes on loopback for integration tests: keys, trust, envelopes, abc-pdp."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from pdp.api.decide_socket import HEADER, PREAMBLE

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
INTENT = ROOT / "deploy" / "demo" / "intent.yaml"
POLICIES = ROOT / "policies"
NODE_EXAMPLE = ROOT / "examples" / "node"
# The provider key the fake OpenAI upstream takes (the integration tests' `fakes`): the
# agent sends it through the sidecar, which must forward it and never log it.
API_KEY = "sk-test-secret-4242"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_records(path: Path) -> list[dict[str, Any]]:
    """The records of a decision log written whole so far: a line a running PDP is still
    writing is left for the next look."""
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def read_frame(reader: BinaryIO) -> bytes | None:
    """The next frame a decide socket answers with, or None when the PDP hung up."""
    header = reader.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    return bytes(reader.read(HEADER.unpack(header)[0]))


class DecideRelay:
    """A decide socket at ``path`` in front of the PDP's at ``pdp``. It passes each request
    on ``delay`` seconds late (a PDP slow to decide); with ``decisions_only``, it closes a
    connection that opens with anything but the first preamble (one decision at a time),
    as a PDP of before pipelined decisions and settlements on its socket does (``said``:
    what each connection opened with). A thread per direction per connection; each ends
    when its peer hangs up."""

    def __init__(
        self, pdp: Path, path: Path, delay: float = 0.0, decisions_only: bool = False
    ) -> None:
        self.path, self._pdp, self._delay, self._only = path, pdp, delay, decisions_only
        self.said: list[bytes] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sidecar, _ = self._listener.accept()
            except OSError:
                return  # closed
            said = b""
            while self._only and len(said) < len(PREAMBLE):
                chunk = sidecar.recv(len(PREAMBLE) - len(said))
                if not chunk:
                    break
                said += chunk
            self.said.append(said)
            if self._only and said != PREAMBLE:
                sidecar.close()
                continue
            pdp = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            pdp.connect(str(self._pdp))
            pdp.sendall(said)
            for source, sink, delay in ((sidecar, pdp, self._delay), (pdp, sidecar, 0.0)):
                threading.Thread(target=_pipe, args=(source, sink, delay), daemon=True).start()

    def close(self) -> None:
        self._listener.close()


def _pipe(source: socket.socket, sink: socket.socket, delay: float) -> None:
    with suppress(OSError):
        while chunk := source.recv(65536):
            time.sleep(delay)
            sink.sendall(chunk)
    with suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def abcctl(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "abcctl"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def abcctl_here(*args: object) -> None:
    """abcctl's own ``main`` in this process, for set-up steps (keys, trust, freeze) whose
    output no test reads: the same code as the binary without its ~1 s interpreter start-up,
    paid by every Signer and envelope. Tests of the command itself call :func:`abcctl`."""
    from pdp.cli.main import main  # ~1 s of imports, paid once per test process

    code = main([str(arg) for arg in args])
    assert code == 0, f"abcctl {' '.join(map(str, args))} exited {code} (its stderr is above)"


@contextmanager
def locked_node_example() -> Iterator[Path]:
    """examples/node, for this test process alone while held: ``npm ci`` there replaces
    node_modules, so two pytest workers (``-n``) must not install or run it at once."""
    handle = os.open(NODE_EXAMPLE, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the descriptor closes
        yield NODE_EXAMPLE
    finally:
        os.close(handle)


def audit_verify(state: Path) -> subprocess.CompletedProcess[str]:
    """``abcctl audit verify`` on a PDP state directory's log, with its generated public key."""
    return abcctl(
        "audit", "verify", state / "decisions.log", "--pub", state / "pdp-log.pub", check=False
    )


@dataclass
class Signer:
    """A key trusted for tenant acme, and helpers to freeze intents with it."""

    dir: Path
    key: Path = field(init=False)
    trust: Path = field(init=False)

    def __post_init__(self) -> None:
        abcctl_here("keygen", "--out", self.dir / "keys", "--name", "signer")
        self.key, self.trust = self.dir / "keys" / "signer.key", self.dir / "trust.yaml"
        abcctl_here(
            "trust",
            "add",
            "--store",
            self.trust,
            "--pub",
            self.dir / "keys" / "signer.pub",
            "--tenant",
            "acme",
        )

    @classmethod
    def existing(cls, directory: Path) -> Signer:
        """A signer whose keys/signer.key and trust.yaml were made already (by abcctl)."""
        signer = cls.__new__(cls)
        signer.dir, signer.key, signer.trust = (
            directory,
            directory / "keys" / "signer.key",
            directory / "trust.yaml",
        )
        return signer

    def freeze(self, intent_text: str, name: str, policies: Path = POLICIES) -> bytes:
        intent = self.dir / f"{name}.yaml"
        intent.write_text(intent_text)
        envelope = self.dir / f"{name}.json"
        abcctl_here("freeze", intent, "--key", self.key, "--policies", policies, "-o", envelope)
        return envelope.read_bytes().rstrip(b"\n")


class _Child:
    """What a started abc-pdp or abc-pep shares: stopping it, its output, its metrics."""

    process: subprocess.Popen[bytes]
    log: Path
    metrics_url: str

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return str(response.read().decode())


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text, its labels in any order."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    raise AssertionError(f"{name}{labels} not exported")


@dataclass
class PdpProcess(_Child):
    process: subprocess.Popen[bytes]
    address: str
    metrics_address: str
    log: Path
    credentials: grpc.ChannelCredentials | None = None  # set for a PDP started with TLS
    http_address: str = ""  # the REST door's HOST:PORT, for a PDP started with http=True
    state: Path | None = None  # its --state directory (the decision log's)
    metrics_url: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.metrics_url = f"http://{self.metrics_address}/metrics"

    def channel(self) -> grpc.Channel:
        if self.credentials is not None:
            return grpc.secure_channel(self.address, self.credentials)
        return grpc.insecure_channel(self.address)


def _with_fresh_ports(start: Any) -> Any:
    """A port found free can be taken before the process binds it: retry on new ports."""

    def retrying(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(3):
            try:
                return start(*args, **kwargs)
            except EarlyExit:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    return retrying


class EarlyExit(RuntimeError):
    """The process exited before it was ready (e.g. its port was taken meanwhile)."""


def pdp_flags(
    trust: Path, state: Path, policies: Path = POLICIES, *, listen: str | None = None
) -> list[str]:
    """The flags every abc-pdp needs; it listens on a free loopback port unless told."""
    return [
        "--listen",
        listen or f"127.0.0.1:{free_port()}",
        "--trust",
        str(trust),
        "--policies",
        str(policies),
        "--state",
        str(state),
    ]


def start_up_error(binary: str, *args: object) -> str:
    """Run abc-pdp or abc-pep expecting it to refuse to start: exit 1 and one clean error
    line, no traceback. Returns what it printed."""
    done = subprocess.run(
        [str(BIN / binary), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"{binary}: error:") and "Traceback" not in done.stderr
    return done.stderr


@_with_fresh_ports
def start_pdp(
    signer: Signer,
    state: Path,
    policies: Path = POLICIES,
    *extra: str,
    credentials: grpc.ChannelCredentials | None = None,
    http: bool = False,
) -> PdpProcess:
    """Start abc-pdp; ``extra`` flags (e.g. --tls-*) need ``credentials`` to reach it.
    ``http`` serves the REST door too, on a free port of its own."""
    address = f"127.0.0.1:{free_port()}"
    metrics = f"127.0.0.1:{free_port()}"
    http_address = f"127.0.0.1:{free_port()}" if http else ""
    if http:
        extra = (*extra, "--http", http_address)
    log = state.parent / f"pdp-{address.rsplit(':', 1)[1]}.log"
    handle = log.open("wb")
    process = subprocess.Popen(
        [
            str(BIN / "abc-pdp"),
            *pdp_flags(signer.trust, state, policies, listen=address),
            "--metrics",
            metrics,
            *extra,
        ],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    pdp = PdpProcess(process, address, metrics, log, credentials, http_address, state)
    wait_serving(pdp)
    return pdp


def serving_within(channel: grpc.Channel, process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether the gRPC health service on ``channel`` says SERVING before ``timeout``,
    while ``process`` runs (False as soon as it exits)."""
    deadline = time.monotonic() + timeout
    stub = health_pb2_grpc.HealthStub(channel)
    while time.monotonic() < deadline and process.poll() is None:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return True
        except grpc.RpcError:
            pass  # not listening yet: the deadline decides
        time.sleep(0.05)
    return False


def wait_serving(pdp: PdpProcess, timeout: float = 30) -> None:
    with pdp.channel() as channel:
        if serving_within(channel, pdp.process, timeout):
            return
    if pdp.process.poll() is not None:
        raise EarlyExit(f"abc-pdp exited early:\n{pdp.output()}")
    pdp.stop(signal.SIGKILL)
    raise RuntimeError(f"abc-pdp did not become SERVING:\n{pdp.output()}")


@dataclass
class PepProcess(_Child):
    process: subprocess.Popen[bytes]
    url: str
    metrics_url: str
    log: Path


TEST_PDP_DEADLINE_MS = 3000


@_with_fresh_ports
def start_pep(
    pdp_address: str, upstreams: dict[str, str], log_dir: Path, *extra: str
) -> PepProcess:
    """Start abc-pep on free loopback ports; ``extra`` carries --run or --manifest and more.

    Unless a test names its own ``--pdp-deadline-ms``, the sidecar waits up to
    ``TEST_PDP_DEADLINE_MS`` for a decision instead of the product's 250 ms: these tests are
    about what is decided, and on a loaded two-core machine (two test workers, each with
    its own PDPs) a decision may take longer. The deadline itself is proven by the tests
    that set 250 ms explicitly (tests/integration/test_pep_failures.py)."""
    if "--pdp-deadline-ms" not in extra:
        extra = (*extra, "--pdp-deadline-ms", str(TEST_PDP_DEADLINE_MS))
    port, metrics_port = free_port(), free_port()
    log = log_dir / f"pep-{port}.log"
    args = [
        str(BIN / "abc-pep"),
        "--listen",
        f"127.0.0.1:{port}",
        "--pdp",
        pdp_address,
        "--metrics",
        f"127.0.0.1:{metrics_port}",
        *extra,
    ]
    for name, url in upstreams.items():
        args += ["--upstream", f"{name}={url}"]
    handle = log.open("wb")
    process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT)
    pep = PepProcess(
        process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", log
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EarlyExit(f"abc-pep exited early:\n{pep.output()}")
        try:
            pep.metrics()
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return pep
        except OSError:
            time.sleep(0.05)
    pep.stop(signal.SIGKILL)
    raise RuntimeError(f"abc-pep did not start:\n{pep.output()}")


async def serve_app(app: Any) -> tuple[Any, int]:
    """Serve an aiohttp app on a free loopback port; (runner to clean up, port)."""
    from aiohttp import web

    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]


@dataclass
class RedisProcess:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=10)


@_with_fresh_ports
def start_redis(directory: Path) -> RedisProcess:
    """A real redis-server (Debian's package) on loopback, no persistence, in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EarlyExit("redis-server exited early")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return RedisProcess(process, port)
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not answer PING")
