"""mTLS between PEP and PDP: real abc-pdp and abc-pep on loopback, certificates from abcctl.

The PDP requires a client certificate signed by its client CA; anything else fails the
handshake before any RPC. A sidecar whose certificate is refused fails closed.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx2 as httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdp.api import pdp_pb2, pdp_pb2_grpc
from pdp.api.decide_socket import PIPELINED
from tests.fakes.serve import FakeUpstreams
from tests.harness import (
    API_KEY,
    POLICIES,
    PdpProcess,
    PepProcess,
    Signer,
    abcctl,
    free_port,
    pdp_flags,
    sample,
    start_pdp,
    start_pep,
    start_up_error,
)

CHAT = "/openai/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@dataclass(frozen=True)
class Pki:
    """One ``abcctl certs`` output directory."""

    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()


def make_pki(directory: Path) -> Pki:
    done = abcctl("certs", "--out", directory, "--days", "2", check=False)
    assert done.returncode == 0, done.stderr
    return Pki(directory)


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki-ours"))


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A second, unrelated CA with certificates of the same names."""
    return make_pki(tmp_path_factory.mktemp("pki-other"))


def client_credentials(
    trusted: Pki, client: Pki | None, name: str = "pep"
) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(trusted.read("ca.pem"))
    return grpc.ssl_channel_credentials(
        trusted.read("ca.pem"), client.read(f"{name}.key"), client.read(f"{name}.pem")
    )


@pytest.fixture(scope="module")
def health_address() -> str:
    return f"127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def decide_address() -> str:
    return f"127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def tls_pdp(
    signer: Signer,
    ours: Pki,
    health_address: str,
    decide_address: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PdpProcess]:
    process = start_pdp(
        signer,
        tmp_path_factory.mktemp("tls-pdp") / "state",
        POLICIES,
        "--tls-cert",
        ours.path("pdp.pem"),
        "--tls-key",
        ours.path("pdp.key"),
        "--tls-client-ca",
        ours.path("ca.pem"),
        "--health",
        health_address,
        "--decide-listen",
        decide_address,
        credentials=client_credentials(ours, ours),
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def run_id(tls_pdp: PdpProcess, demo_envelope: bytes) -> str:
    with tls_pdp.channel() as channel:
        reply = pdp_pb2_grpc.DecisionServiceStub(channel).RegisterManifest(
            pdp_pb2.RegisterManifestRequest(envelope=demo_envelope), timeout=10
        )
    return str(reply.run_id)


def search(run: str) -> pdp_pb2.DecideRequest:
    return pdp_pb2.DecideRequest(
        run_id=run,
        request_id=f"r-{uuid.uuid4().hex}",
        action=pdp_pb2.Action(kind="tool", target="tool:kb/search", args_json=b'{"query": "x"}'),
    )


def test_a_client_with_a_certificate_from_the_ca_is_served(
    tls_pdp: PdpProcess, run_id: str
) -> None:
    with tls_pdp.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reply = pdp_pb2_grpc.DecisionServiceStub(channel).Decide(search(run_id), timeout=5)
    assert reply.allow and reply.decision_id.startswith("dec_")
    assert "TLS, client certificates required" in tls_pdp.output()


def test_probes_get_plaintext_health_and_nothing_else(
    tls_pdp: PdpProcess, health_address: str, run_id: str
) -> None:
    with grpc.insecure_channel(health_address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            pdp_pb2_grpc.DecisionServiceStub(channel).Decide(search(run_id), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    "client",
    ["no-client-cert", "cert-from-another-ca", "server-cert-as-client", "plaintext"],
)
def test_a_client_without_a_valid_certificate_is_refused(
    tls_pdp: PdpProcess, run_id: str, ours: Pki, other: Pki, client: str
) -> None:
    channel = {
        "no-client-cert": lambda: grpc.secure_channel(
            tls_pdp.address, client_credentials(ours, None)
        ),
        "cert-from-another-ca": lambda: grpc.secure_channel(
            tls_pdp.address, client_credentials(ours, other)
        ),
        # Signed by the right CA, but for serverAuth only: the EKU check refuses it.
        "server-cert-as-client": lambda: grpc.secure_channel(
            tls_pdp.address, client_credentials(ours, ours, name="pdp")
        ),
        "plaintext": lambda: grpc.insecure_channel(tls_pdp.address),
    }[client]()
    with channel:
        with pytest.raises(grpc.RpcError) as health:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        with pytest.raises(grpc.RpcError) as decide:
            pdp_pb2_grpc.DecisionServiceStub(channel).Decide(search(run_id), timeout=5)
    assert health.value.code() == decide.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_pdp_ca_stops_at_the_handshake(
    tls_pdp: PdpProcess, other: Pki
) -> None:
    """The other direction: a PDP whose certificate the client's CA did not sign is refused."""
    channel = grpc.secure_channel(tls_pdp.address, client_credentials(other, other))
    with channel, pytest.raises(grpc.RpcError) as caught:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_sidecar_over_mtls_forwards_an_allowed_call_end_to_end(
    tls_pdp: PdpProcess,
    ours: Pki,
    fakes: FakeUpstreams,
    demo_envelope: bytes,
    tmp_path: Path,
) -> None:
    # Registered over mTLS too.
    pep = _sidecar(tls_pdp, fakes, tmp_path, *_manifest(demo_envelope, tmp_path), *_tls(ours, ours))
    try:
        client = openai.OpenAI(base_url=f"{pep.url}/openai/v1", api_key=API_KEY, max_retries=0)
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "over mTLS"}]
        )
        assert reply.choices[0].message.content.startswith("Hello from the fake OpenAI")
        assert (
            fakes.recorder.last("openai", path="/v1/chat/completions").header("authorization")
            == f"Bearer {API_KEY}"
        )
        # Decided by the PDP, not waved through: a model outside the manifest is refused.
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.chat.completions.create(
                model="gpt-5", messages=[{"role": "user", "content": "x"}]
            )
        assert refused.value.code == "model_not_allowed"
        assert "(PDP " in pep.output() and ", TLS)" in pep.output()
    finally:
        pep.stop()


@pytest.mark.parametrize(
    "problem", ["cert-from-another-ca", "no-client-cert", "wrong-server-name", "plaintext"]
)
def test_a_sidecar_the_pdp_refuses_fails_closed(
    tls_pdp: PdpProcess,
    run_id: str,
    ours: Pki,
    other: Pki,
    fakes: FakeUpstreams,
    tmp_path: Path,
    problem: str,
) -> None:
    tls = {
        "cert-from-another-ca": _tls(ours, other),
        "no-client-cert": ["--pdp-ca", ours.path("ca.pem")],
        "wrong-server-name": [*_tls(ours, ours), "--pdp-server-name", "not-the-pdp.example"],
        "plaintext": [],
    }[problem]
    _fails_closed(tls_pdp, fakes, tmp_path, "--run", run_id, *tls)


def _sidecar(pdp: PdpProcess, fakes: FakeUpstreams, log_dir: Path, *flags: str) -> PepProcess:
    """A sidecar of ``pdp``, started with ``flags``, its model calls going to the fake OpenAI."""
    return start_pep(pdp.address, {"openai": fakes.openai_url.removesuffix("/v1")}, log_dir, *flags)


def _manifest(envelope: bytes, tmp_path: Path) -> list[str]:
    """The flags registering ``envelope``, written to a file for it."""
    path = tmp_path / "envelope.json"
    path.write_bytes(envelope)
    return ["--manifest", str(path)]


def _tls(pki: Pki, client: Pki) -> list[str]:
    """The flags trusting ``pki``'s CA alone and showing ``client``'s sidecar certificate."""
    return [
        "--pdp-ca",
        pki.path("ca.pem"),
        "--pdp-cert",
        client.path("pep.pem"),
        "--pdp-key",
        client.path("pep.key"),
    ]


def _fails_closed(pdp: PdpProcess, fakes: FakeUpstreams, log_dir: Path, *flags: str) -> str:
    """A sidecar started with ``flags`` refuses a call ``pdp_unavailable`` and forwards
    nothing; its output."""
    pep = _sidecar(pdp, fakes, log_dir, *flags)
    forwarded = len(fakes.recorder.find("openai"))
    try:
        reply = httpx.post(pep.url + CHAT, json=BODY, timeout=10)
        assert reply.status_code == 503
        assert reply.json()["error"]["code"] == "pdp_unavailable"
        assert reply.headers["x-abc-decision-id"].startswith("pep_")  # no PDP decision behind it
        assert len(fakes.recorder.find("openai")) == forwarded  # nothing went upstream
        return pep.output()
    finally:
        pep.stop()


def test_tls_mistakes_stop_start_up_naming_the_file(
    signer: Signer, ours: Pki, other: Pki, tmp_path: Path
) -> None:
    pdp = pdp_flags(signer.trust, tmp_path / "state")
    only_cert = start_up_error("abc-pdp", *pdp, "--tls-cert", ours.path("pdp.pem"))
    assert "--tls-cert and --tls-key go together" in only_cert
    swapped = start_up_error(
        "abc-pdp", *pdp, "--tls-cert", ours.path("pdp.pem"), "--tls-key", other.path("pdp.key")
    )
    assert f"--tls-key {other.path('pdp.key')} is not the key of --tls-cert" in swapped
    assert "PRIVATE KEY" not in swapped  # never the key itself
    missing_ca = start_up_error(
        "abc-pep", "--run", "r", "--pdp-ca", str(tmp_path / "absent.pem"), "--metrics", "off"
    )
    assert "cannot read --pdp-ca" in missing_ca


# The decide socket over TLS (--decide-listen / --pdp-decide): the gRPC port's files, the
# same rule (a client certificate the client CA signed), and no plaintext at all.


def _established(port: int) -> int:
    """TCP connections on this host established to local ``port`` (the PDP's ends)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            count += state == "01" and int(local.rsplit(":", 1)[1], 16) == port
    return count


def _decide_tls_flags(pki: Pki, client: Pki, address: str) -> list[str]:
    return ["--pdp-decide", address, *_tls(pki, client)]


def test_the_sidecar_decides_and_settles_over_the_decide_socket_over_tls(
    tls_pdp: PdpProcess,
    decide_address: str,
    ours: Pki,
    fakes: FakeUpstreams,
    demo_envelope: bytes,
    tmp_path: Path,
) -> None:
    port = int(decide_address.rsplit(":", 1)[1])
    before = _established(port)
    pep = _sidecar(
        tls_pdp,
        fakes,
        tmp_path,
        *_manifest(demo_envelope, tmp_path),
        "--settle-linger-ms",
        "10",
        *_decide_tls_flags(ours, ours, decide_address),
    )
    try:
        client = openai.OpenAI(base_url=f"{pep.url}/openai/v1", api_key=API_KEY, max_retries=0)
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "over the decide TLS"}]
        )
        assert reply.choices[0].message.content.startswith("Hello from the fake OpenAI")
        # No decision follows to carry the call's usage: it is settled on a settlement
        # connection of the same port, within the 10 ms linger, and nothing stays reserved.
        run_id = pep.output().split("for run ")[1].split()[0]
        deadline = time.monotonic() + 10
        while True:
            with tls_pdp.channel() as channel:
                run = pdp_pb2_grpc.DecisionServiceStub(channel).GetRun(
                    pdp_pb2.GetRunRequest(run_id=run_id), timeout=5
                )
            if run.reserved.tokens == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert run.reserved.tokens == 0 and run.spent.tokens > 0
        # Both went to the decide port: the decisions' connection and the settlements'
        # (a settlement refused there would have gone over gRPC instead, and said so).
        assert _established(port) - before >= 2
        assert "usage reports go over gRPC" not in pep.output()
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.chat.completions.create(
                model="gpt-5", messages=[{"role": "user", "content": "x"}]
            )
        assert refused.value.code == "model_not_allowed"
        assert refused.value.response.headers["x-abc-decision-id"].startswith("dec_")
        metrics = pep.metrics()
        assert sample(metrics, "abc_pep_pdp_transport", transport="decide_tls") == 1
        assert sample(metrics, "abc_pep_pdp_transport", transport="grpc") == 0
        assert f"decisions on {decide_address}" in pep.output()
        assert f"Decide over TLS on {decide_address}" in tls_pdp.output()
    finally:
        pep.stop()


def _handshake(address: str, context: ssl.SSLContext) -> bytes:
    """What a client holding ``context`` reads back after saying the pipelined preamble:
    the PDP's answer, or b"" (or an error) when it was not taken."""
    host, _, port = address.rpartition(":")
    raw = socket.create_connection((host, int(port)), timeout=5)
    with context.wrap_socket(raw, server_hostname="localhost") as conn:
        conn.sendall(PIPELINED)
        return conn.recv(64)


def _client_context(trusted: Pki, client: Pki | None, name: str = "pep") -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=trusted.path("ca.pem"))
    if client is not None:
        context.load_cert_chain(client.path(f"{name}.pem"), client.path(f"{name}.key"))
    return context


def test_the_decide_port_answers_a_client_with_a_certificate_from_the_ca(
    tls_pdp: PdpProcess, decide_address: str, ours: Pki
) -> None:
    assert _handshake(decide_address, _client_context(ours, ours)) == PIPELINED


@pytest.mark.parametrize(
    "client", ["no-client-cert", "cert-from-another-ca", "server-cert-as-client", "plaintext"]
)
def test_the_decide_port_refuses_a_client_without_a_valid_certificate(
    tls_pdp: PdpProcess, decide_address: str, ours: Pki, other: Pki, client: str
) -> None:
    if client == "plaintext":
        host, _, port = decide_address.rpartition(":")
        answer = b""
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(PIPELINED)
            with contextlib.suppress(ConnectionResetError):  # not a TLS ClientHello
                answer = conn.recv(64)
        assert PIPELINED not in answer  # the start of a TLS alert, or nothing: never served
        return
    context = {
        "no-client-cert": lambda: _client_context(ours, None),
        "cert-from-another-ca": lambda: _client_context(ours, other),
        # Signed by the right CA, but for serverAuth only: the EKU check refuses it.
        "server-cert-as-client": lambda: _client_context(ours, ours, name="pdp"),
    }[client]()
    # TLS 1.3 finishes the client's side of the handshake before the server has checked its
    # certificate: the refusal comes as an alert on the first read, or as an end of stream.
    with contextlib.suppress(ssl.SSLError, ConnectionResetError):
        assert _handshake(decide_address, context) == b""


@pytest.mark.parametrize("problem", ["cert-from-another-ca", "wrong-server-name", "other-ca"])
def test_a_sidecar_on_the_decide_port_that_tls_refuses_fails_closed(
    tls_pdp: PdpProcess,
    decide_address: str,
    run_id: str,
    ours: Pki,
    other: Pki,
    fakes: FakeUpstreams,
    tmp_path: Path,
    problem: str,
) -> None:
    flags = {
        # The PDP refuses the sidecar's certificate.
        "cert-from-another-ca": _decide_tls_flags(ours, other, decide_address),
        # The sidecar refuses the PDP's: not the name it asked for, or not its CA's.
        "wrong-server-name": [
            *_decide_tls_flags(ours, ours, decide_address),
            "--pdp-server-name",
            "not-the-pdp.example",
        ],
        "other-ca": _decide_tls_flags(other, ours, decide_address),
    }[problem]
    output = _fails_closed(tls_pdp, fakes, tmp_path, "--run", run_id, *flags)
    assert "cannot decide there" in output  # said once, at start-up


def test_decide_over_tls_without_its_files_stops_start_up(
    signer: Signer, ours: Pki, tmp_path: Path
) -> None:
    pdp = pdp_flags(signer.trust, tmp_path / "state")
    tls = ["--tls-cert", ours.path("pdp.pem"), "--tls-key", ours.path("pdp.key")]
    listen = ["--decide-listen", f"127.0.0.1:{free_port()}"]
    assert "--decide-listen needs --tls-cert, --tls-key and --tls-client-ca" in start_up_error(
        "abc-pdp", *pdp, *tls, *listen
    )
    no_cert = start_up_error(
        "abc-pep", "--run", "r", "--metrics", "off", "--pdp-decide", "127.0.0.1:1",
        "--pdp-ca", ours.path("ca.pem"),
    )  # fmt: skip
    assert "--pdp-decide needs --pdp-ca, --pdp-cert and --pdp-key" in no_cert
