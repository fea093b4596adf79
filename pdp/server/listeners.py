"""``abc-pdp``'s ports, all bound before any state is made.

A start that fails because a port is taken must leave nothing behind: no state
directory, no new decision-log key. So every address (gRPC, health probes, metrics,
REST, the decide sockets) is bound first, and the state comes after (``pdp.server.main``).
"""

from __future__ import annotations

import socket
import ssl
from concurrent import futures
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from pdp.api.config import split_host_port
from pdp.errors import ConfigError
from pdp.manifest.envelope import MAX_ENVELOPE_BYTES
from pdp.server.config import PdpConfig
from pdp.server.decide_socket import DecideSocketServer, bind_decide_socket

__all__ = ["Listeners", "listen", "server_ssl_context"]


def _add_port(
    server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None
) -> None:
    # Tried with a plain socket first: gRPC's core would print its own multi-line error to
    # stderr before raising, and the promise is one line.
    _bind_tcp(address, "gRPC").close()
    try:
        bound = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError:  # grpc >= 1.60 raises "Failed to bind" instead of returning 0
        bound = 0
    if bound == 0:
        raise ConfigError(f"cannot listen on {address}")


def _bind_tcp(address: str, what: str) -> socket.socket:
    host, port = split_host_port(address)
    try:
        family, kind, proto, _name, where = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(where)
            sock.listen()
        except OSError:
            sock.close()
            raise
        return sock
    except OSError as exc:  # gaierror too: a host that does not resolve
        raise ConfigError(f"cannot serve {what} on {address}: {exc.strerror}") from exc


def server_ssl_context(config: PdpConfig, flag: str) -> ssl.SSLContext | None:
    """TLS for a port served by Python (REST, the decide socket over TCP): the gRPC port's
    files and the same client-certificate rule. None without ``--tls-cert``."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    # A bare server context: create_default_context() would also trust the system's CAs
    # for client certificates, letting in any client a public CA ever signed.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=config.tls_client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{flag}: cannot use the --tls-* files: {exc}") from exc
    return context


@dataclass
class Listeners:
    """Every port, bound before any state is written: a taken port leaves nothing behind."""

    server: grpc.Server
    probes: grpc.Server | None
    health: health.HealthServicer
    registry: CollectorRegistry
    metrics_server: WSGIServer | None
    rest_socket: socket.socket | None
    # The Unix socket (--decide-socket) and the TLS one (--decide-listen), each if given.
    deciders: list[DecideSocketServer] = field(default_factory=list)

    def close(self) -> None:
        self.server.stop(0)
        for decider in self.deciders:
            decider.close(deadline=0.0)
        if self.probes is not None:
            self.probes.stop(0)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self.rest_socket is not None:
            self.rest_socket.close()


def listen(config: PdpConfig, credentials: grpc.ServerCredentials | None) -> Listeners:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="pdp"),
        options=[
            ("grpc.max_receive_message_length", MAX_ENVELOPE_BYTES + 4096),
            ("grpc.so_reuseport", 0),
        ],
    )
    listeners = Listeners(server, None, health.HealthServicer(), CollectorRegistry(), None, None)
    try:
        _add_port(server, config.listen, credentials)
        if config.health is not None:
            # Health alone, in plaintext, on its own port: Kubernetes' gRPC probes cannot
            # present a client certificate, and this port answers only SERVING/NOT_SERVING.
            listeners.probes = grpc.server(
                futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health")
            )
            health_pb2_grpc.add_HealthServicer_to_server(listeners.health, listeners.probes)
            _add_port(listeners.probes, config.health, None)
        if config.metrics:
            host, port = split_host_port(config.metrics)
            try:
                listeners.metrics_server, _thread = start_http_server(
                    port, addr=host, registry=listeners.registry
                )
            except OSError as exc:
                raise ConfigError(f"cannot serve metrics on {config.metrics}: {exc}") from exc
        if config.http:
            listeners.rest_socket = _bind_tcp(config.http, "REST")
        if config.decide_socket is not None:
            sock = bind_decide_socket(config.decide_socket)
            listeners.deciders.append(DecideSocketServer(sock, path=config.decide_socket))
        if config.decide_listen is not None:
            tls = server_ssl_context(config, "--decide-listen")
            sock = _bind_tcp(config.decide_listen, "the decide socket")
            listeners.deciders.append(DecideSocketServer(sock, tls=tls))
    except ConfigError:
        listeners.close()
        raise
    return listeners
