"""``abc-pdp``: load trust, policies and state, then serve gRPC (and REST) until SIGTERM.

Health is honest: ``SERVING`` only once the policy bundle has compiled and the state
store is open, and ``NOT_SERVING`` while the decision log cannot write (it comes back by
itself when the log can); on SIGTERM or SIGINT it turns ``NOT_SERVING`` for good, then
drains.
The REST door's ``/health`` follows the same state.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdp.api import pdp_pb2, pdp_pb2_grpc
from pdp.api.decide_socket import SETTLE_WAIT_SECONDS
from pdp.api.tls import TlsFileError, load_certificates, load_key_pair
from pdp.bundle import PolicyBundle, load_bundle, store_bundle
from pdp.clock import utc_now
from pdp.decisionlog import DecisionLog, MaskRule
from pdp.decisionlog.mac import mac_key
from pdp.decisionlog.recovery import restore_from_log
from pdp.decisionlog.snapshot import Snapshotter
from pdp.engine import EngineError, PreparedPolicy, policy_data
from pdp.errors import ConfigError, StoreUnavailable
from pdp.ledger import MemoryRunStore, RunStore
from pdp.manifest import HighWater, Manifest, SqliteHighWater, TrustStore, load_trust_store
from pdp.manifest.keys import load_private_key, write_keypair
from pdp.metrics import PdpMetrics
from pdp.server.config import PdpConfig, parse_config, transport_warnings
from pdp.server.ext_authz import SERVICE_NAME as EXT_AUTHZ_SERVICE
from pdp.server.ext_authz import ExtAuthzServicer, ModelRoutes
from pdp.server.listeners import Listeners, listen, server_ssl_context
from pdp.server.servicer import DecisionServicer
from pdp.service import DecisionService

if TYPE_CHECKING:  # imported where used: redis and aiohttp cost start-up when unused
    from pdp.server.rest import RestServer

__all__ = ["check_bundle_compiles", "main", "main_exit", "serve", "stop_on_signal"]

log = logging.getLogger("abc.pdp")
_SIGNAL_POLL_SECONDS = 0.2
SERVICE_NAME = pdp_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name
STATE_DB = "abc.db"
SNAPSHOTS = "snapshots"


# The smallest manifest the schema accepts: one model, one step. Compiled with its
# ``policy_data``, the exact data shape every registered manifest gives the policy.
_STARTUP_MANIFEST = {
    "apiVersion": "abc/v1",
    "kind": "RunManifest",
    "metadata": {
        "lineage": "startup/check",
        "version": 1,
        "tenant": "startup",
        "agent": "check",
        "issued_at": "2000-01-01T00:00:00Z",
        "not_before": "2000-01-01T00:00:00Z",
        "expires_at": "2000-01-01T00:00:01Z",
    },
    "policy": {"bundle_digest": "sha256:" + "0" * 64},
    "capabilities": {
        "models": [{"provider": "startup", "model": "check", "max_tokens_per_call": 1}]
    },
    "budgets": {"tokens": 0, "usd_micros": 0, "tool_calls": 0, "requests": 0},
    "assembly": {"steps": [{"id": "check", "uses": ["model:startup/check"]}]},
}


def check_bundle_compiles(bundle: PolicyBundle) -> None:
    """Compile the bundle with a real (minimal) manifest's data, so a policy that cannot
    compile beside a manifest stops start-up (``ConfigError``) instead of refusing every
    registration later."""
    data = policy_data(Manifest.model_validate_json(json.dumps(_STARTUP_MANIFEST)))
    try:
        PreparedPolicy(bundle.rego_modules(), data, bundle.digest, "startup")
    except EngineError as exc:
        raise ConfigError(f"policy bundle {bundle.digest}: {exc}") from exc


def _log_key(config: PdpConfig) -> Ed25519PrivateKey:
    """The checkpoint signing key: ``--log-key``, else one made once in the state directory."""
    if config.log_key is not None:
        return load_private_key(config.log_key)
    path = config.state / "pdp-log.key"
    if not path.exists():
        write_keypair(config.state, "pdp-log")
        log.warning(
            "no --log-key: made %s; verify the log with %s (use a key from a secret in production)",
            path,
            config.state / "pdp-log.pub",
        )
    return load_private_key(path)


def _run_store(config: PdpConfig) -> tuple[RunStore, HighWater]:
    """In this process (state rebuilt from the log), or Redis shared by replicas."""
    if config.store == "memory":
        return MemoryRunStore(), SqliteHighWater(config.state / STATE_DB)
    from pdp.ledger.redis import RedisRunStore  # only with --store redis://: ~0.2 s of import

    # The URL may carry a password (in the authority or the query): never echo it.
    shown = f"--store {urlsplit(config.store).scheme}://{urlsplit(config.store).hostname}"
    try:
        store = RedisRunStore(config.store)
        store.ping()
    except ValueError as exc:
        raise ConfigError(f"{shown}: not a Redis URL") from exc
    except StoreUnavailable as exc:
        raise ConfigError(f"{shown}: {exc}") from exc
    return store, store


def _server_credentials(config: PdpConfig) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port when a certificate is given; None means plaintext."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    try:
        chain, key = load_key_pair(
            config.tls_cert, config.tls_key, "--tls-cert", "--tls-key", utc_now()
        )
        client_ca = (
            load_certificates(config.tls_client_ca, "--tls-client-ca")
            if config.tls_client_ca
            else None
        )
    except TlsFileError as exc:
        raise ConfigError(str(exc)) from exc
    # With a client CA, a client without a certificate it signed fails the handshake:
    # it never reaches a servicer, so no RPC can forget to check.
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _transport(config: PdpConfig) -> str:
    if config.tls_cert is None:
        return "plaintext"
    return "TLS, client certificates required" if config.tls_client_ca else "TLS"


def _health_follows_log(
    health_servicer: health.HealthServicer, serving: threading.Event, stop: threading.Event
) -> Callable[[bool], None]:
    """What the decision log calls when it stops or starts being writable."""

    def on_writable(writable: bool) -> None:
        if stop.is_set():
            return  # shutting down: NOT_SERVING for good
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if writable
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME, EXT_AUTHZ_SERVICE):
            health_servicer.set(name, status)
        if writable:
            serving.set()
        else:
            serving.clear()

    return on_writable


def _start(
    config: PdpConfig,
    bundle: PolicyBundle,
    trust: TrustStore,
    listeners: Listeners,
    serving: threading.Event,
) -> tuple[DecisionService, DecisionLog, RestServer | None, Snapshotter | None]:
    """Make the state (bundles, log key, log, run store), rebuild it, then start serving."""
    store_bundle(bundle, config.state / "bundles")  # so any past decision can be replayed
    store, high_water = _run_store(config)
    metrics = PdpMetrics(listeners.registry)
    log_key = _log_key(config)
    try:
        decision_log = DecisionLog(
            config.decision_log,
            log_key,
            checkpoint_every=config.checkpoint_every,
            checkpoint_seconds=config.checkpoint_seconds,
            masks=[MaskRule.parse(mask) for mask in config.log_masks],
            segment_bytes=config.segment_bytes,
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot open decision log {config.decision_log}: {exc.strerror}"
        ) from exc
    service = DecisionService(
        bundle,
        trust,
        high_water,
        metrics,
        decision_log,
        reservation_ttl=timedelta(seconds=config.reservation_ttl_seconds),
        store=store,
        run_retention=timedelta(seconds=config.run_retention_seconds),
    )
    snapshots = config.state / SNAPSHOTS if config.snapshot_every else None
    replayed = restore_from_log(
        service, config.decision_log, log_key.public_key(), snapshots, mac_key=mac_key(log_key)
    )
    # Runs the log brought back that ended or expired longer than the retention ago are
    # released again before serving: a restart brings no released run's state back.
    service.sweep(utc_now(), limit=sys.maxsize)
    snapshotter = None
    if snapshots is not None:
        snapshotter = Snapshotter(
            snapshots,
            log_key,
            service.export_state,
            lambda: decision_log.position().seq,
            config.snapshot_every,
        )
        if replayed >= config.snapshot_every:
            snapshotter.take()  # the next start need not replay the same records again
        snapshotter.start()
    server = listeners.server
    servicer = DecisionServicer(service)
    pdp_pb2_grpc.add_DecisionServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    # Envoy's ext_authz door, on the same port and the same decision path.
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        ExtAuthzServicer(
            service, ModelRoutes(config.ext_authz_openai_prefix, config.ext_authz_anthropic_prefix)
        ),
        server,
    )
    health_pb2_grpc.add_HealthServicer_to_server(listeners.health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, EXT_AUTHZ_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    rest = None
    if config.http and listeners.rest_socket is not None:  # both or neither (listen)
        from pdp.server.rest import RestServer  # aiohttp: ~0.3 s of import, only with --http

        rest = RestServer(
            service,
            config.http,
            serving,
            sock=listeners.rest_socket,
            workers=config.workers,
            ssl_context=server_ssl_context(config, "--http"),
        )
        rest.start()
    server.start()
    if listeners.deciders:
        # A batch on the socket is one no decision carried: it may wait for the next one's
        # commit rather than take a write of its own (the sidecar waits that much longer).
        # Not with a shared store: there the settlement is seen by the other replicas at
        # once, and must not go unlogged for longer than a write takes.
        within = SETTLE_WAIT_SECONDS if config.store == "memory" else 0.0
        settle = functools.partial(servicer.settle, within=within)
        # One connection carries all of a sidecar's decisions: none waits there for a
        # request id decided elsewhere, which would hold up all those behind it.
        decide_all = functools.partial(servicer.decide_all, wait_for_claims=False)
        for decider in listeners.deciders:
            decider.start(decide_all, settle)
    if listeners.probes is not None:
        listeners.probes.start()
    return service, decision_log, rest, snapshotter


def serve(config: PdpConfig, stop: threading.Event, ready: threading.Event | None = None) -> None:
    credentials = _server_credentials(config)  # first: a wrong file stops start-up at once
    for warning in transport_warnings(config):
        log.warning("%s", warning)
    bundle = load_bundle(config.policies)
    check_bundle_compiles(bundle)
    trust = load_trust_store(config.trust)
    listeners = listen(config, credentials)
    serving = threading.Event()  # the REST door's view of the gRPC health status
    try:
        service, decision_log, rest, snapshotter = _start(config, bundle, trust, listeners, serving)
    except BaseException:
        listeners.close()
        raise
    server, probes, health_servicer = listeners.server, listeners.probes, listeners.health
    # SERVING now, and from here on whenever the decision log can write (it cannot decide
    # without it: a full disk turns health NOT_SERVING until space returns).
    decision_log.watch(_health_follows_log(health_servicer, serving, stop))
    log.info(
        "abc-pdp serving on %s (%s; policy %s, %d trusted keys)%s%s%s",
        config.listen,
        _transport(config),
        bundle.digest,
        len(trust.entries),
        f"; OPA REST API on {config.http}" if config.http else "",
        f"; Decide on {config.decide_socket}" if config.decide_socket else "",
        f"; Decide over TLS on {config.decide_listen}" if config.decide_listen else "",
    )
    if ready is not None:
        ready.set()
    # Polled, not one blocking wait: the kernel may hand SIGTERM to any thread that does
    # not block it (gRPC's; the engine's Go threads do, pdp.opa), and Python runs its
    # handler only when the main thread next runs Python code. One blocking wait once
    # noticed it 14 s late.
    while not stop.wait(_SIGNAL_POLL_SECONDS):
        pass
    log.info("abc-pdp stopping: NOT_SERVING, draining for up to %.1fs", config.grace_seconds)
    deadline = time.monotonic() + config.grace_seconds
    serving.clear()
    health_servicer.enter_graceful_shutdown()
    stopped = server.stop(config.grace_seconds)
    for decider in listeners.deciders:
        decider.close(deadline)  # drains beside gRPC, in the same grace
    stopped.wait()
    if probes is not None:
        probes.stop(0)
    if rest is not None:
        rest.stop(deadline)  # REST requests in flight finish within the same grace
    if snapshotter is not None:
        snapshotter.close()
        snapshotter.take()  # drained: the next start replays (almost) nothing
    decision_log.close()  # a final signed checkpoint: a cleanly stopped log verifies whole
    service.close()
    if listeners.metrics_server is not None:
        listeners.metrics_server.shutdown()
    log.info("abc-pdp stopped")


def stop_on_signal(stop: threading.Event) -> Callable[[int, FrameType | None], None]:
    """A signal handler that sets ``stop``, from a thread of its own. Python runs a handler
    in the main thread between two of its steps, and the main thread waits in ``stop.wait``:
    a handler calling ``stop.set`` there, just as the wait took the event's lock back, would
    wait for that lock forever (a PDP that never stopped on SIGTERM). ``SimpleQueue.put``
    takes no lock a handler can meet."""
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()

    def relay() -> None:
        signals.get()
        stop.set()

    threading.Thread(target=relay, name="signals", daemon=True).start()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals.put(signum)

    return on_signal


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_config(argv)
        logging.basicConfig(
            level=config.log_level,
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
            stream=sys.stderr,
        )
        stop = threading.Event()
        on_signal = stop_on_signal(stop)
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        serve(config, stop)
    except ConfigError as exc:
        print(f"abc-pdp: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main_exit() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
