"""``abc-pep``: bind to a run (or register a manifest), then proxy until SIGTERM.

``abc-pep mcp-stdio --server NAME [flags] -- COMMAND ARGS...``: the same, between an agent
host and the stdio MCP server it starts (``pep.stdio``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry

from pdp.api.config import read_envelope_file, split_host_port
from pdp.api.tls import TlsFileError, load_certificates, load_key_pair
from pep.config import ConfigError, PepConfig, parse_config, transport_warnings
from pep.decide_socket import TlsPeer
from pep.front import IDLE_SECONDS, Front
from pep.metrics import PepMetrics
from pep.models_list import GrantedModels, granted_models
from pep.pdp_client import PdpClient, PdpTls
from pep.proxy import MODEL_HANDLERS, Sidecar, build_app, metrics_app
from pep.runs import RunKeys
from pep.stdio import serve_stdio

__all__ = ["main", "main_exit", "serve"]

log = logging.getLogger("abc.pep")
REGISTER_ATTEMPTS = 30


def _pdp_tls(config: PepConfig) -> PdpTls | None:
    """Read and check the PDP channel's PEM files once, at start-up; None for plaintext."""
    if config.pdp_ca is None:
        return None
    try:
        root = load_certificates(config.pdp_ca, "--pdp-ca")
        chain, key = (
            load_key_pair(
                config.pdp_cert, config.pdp_key, "--pdp-cert", "--pdp-key", datetime.now(UTC)
            )
            if config.pdp_cert is not None and config.pdp_key is not None
            else (None, None)
        )
    except TlsFileError as exc:
        raise ConfigError(str(exc)) from exc
    return PdpTls(root, chain, key, config.pdp_server_name)


def _decide_peer(config: PepConfig) -> TlsPeer | None:
    """The PDP's decide socket over TLS (--pdp-decide): its CA alone trusted, this sidecar's
    certificate shown, the PDP's name checked; None when not given."""
    if config.pdp_decide is None:
        return None
    assert config.pdp_ca is not None and config.pdp_cert is not None  # parse_config's rule
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname checked, certificate required
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=config.pdp_ca)
        context.load_cert_chain(config.pdp_cert, config.pdp_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--pdp-decide: cannot use the --pdp-* files: {exc}") from exc
    host, port = split_host_port(config.pdp_decide)
    return TlsPeer(host, port, context, config.pdp_server_name or host)


def _pdp_client(config: PepConfig) -> PdpClient:
    for warning in transport_warnings(config):
        log.warning("%s", warning)
    tls = _pdp_tls(config)  # first: a wrong file is named by the flag that gave it
    return PdpClient(
        config.pdp,
        config.pdp_deadline_seconds,
        tls,
        settle_linger=config.settle_linger_seconds,
        decide_socket=config.pdp_socket or _decide_peer(config),
    )


async def _register(pdp: PdpClient, config: PepConfig) -> tuple[str, str, GrantedModels]:
    """Register the manifest, waiting (bounded) for a PDP that is still starting: its
    digest (the grant runs are started under), its default run id and the models it grants."""
    assert config.manifest is not None
    envelope = read_envelope_file(config.manifest)
    for attempt in range(REGISTER_ATTEMPTS):
        try:
            grant, run_id = await pdp.register(envelope)
            return grant, run_id, granted_models(envelope)  # accepted: the verified payload
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise ConfigError(f"the PDP refused {config.manifest}: {exc.details()}") from exc
            # The details tell a PDP still starting from a TLS handshake that will never pass.
            log.info("PDP not reachable yet (attempt %d): %s", attempt + 1, exc.details())
            await asyncio.sleep(1)
    raise ConfigError(f"the PDP at {config.pdp} did not answer; {config.manifest} not registered")


async def _check_decide_socket(pdp: PdpClient, config: PepConfig, registered: bool) -> None:
    """A wrong --pdp-socket would refuse every call: said at start-up, not per request.
    With a registered manifest the PDP is known to be up, so it stops start-up."""
    problem = await pdp.check_decide_socket()
    if problem is None:
        return
    if config.pdp_decide is not None:
        message = (
            f"--pdp-decide {config.pdp_decide}: cannot decide there ({problem}); is abc-pdp"
            " started with --decide-listen there, and do the TLS files match?"
        )
    else:
        message = (
            f"--pdp-socket {config.pdp_socket}: cannot decide there ({problem});"
            f" is abc-pdp started with --decide-socket {config.pdp_socket}?"
        )
    if registered:
        raise ConfigError(message)
    log.warning("%s", message)


def _narrower(config: PepConfig) -> bytes:
    """The --narrower document, read once (the PDP judges it at each run's start)."""
    if config.narrower is None:
        return b""
    try:
        return config.narrower.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read --narrower {config.narrower}: {exc.strerror}") from exc


async def _listen(address: str, start: Callable[[str, int], Awaitable[object]]) -> None:
    """``start(host, port)`` of a checked HOST:PORT; ``ConfigError`` if it cannot listen."""
    host, port = split_host_port(address)
    try:
        await start(host, port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}") from exc


async def _front(proxy: web.AppRunner, config: PepConfig) -> Front:
    """The proxy's listening socket: model calls lean, the rest on ``proxy``'s server."""
    assert proxy.server is not None, "set up first"
    app = proxy.app
    front = Front(app, app[MODEL_HANDLERS], proxy.server, config.max_body_bytes)
    await _listen(config.listen, front.listen)
    return front


def _metrics(pdp: PdpClient) -> PepMetrics:
    metrics = PepMetrics(CollectorRegistry())
    metrics.decide_over(pdp.transport)
    return metrics


async def _export(metrics: PepMetrics, address: str) -> web.AppRunner:
    """The metrics endpoint, listening; the caller cleans its runner up."""
    exporter = web.AppRunner(metrics_app(metrics), access_log=None, handle_signals=False)
    await exporter.setup()
    try:
        await _listen(address, lambda host, port: web.TCPSite(exporter, host, port).start())
    except ConfigError:
        await exporter.cleanup()
        raise
    return exporter


async def serve(config: PepConfig, stop: asyncio.Event) -> None:
    pdp = _pdp_client(config)
    runners: list[web.AppRunner] = []
    front: Front | None = None
    sidecar: Sidecar | None = None
    try:
        run_id: str | None = config.run
        runs: RunKeys | None = None
        models: GrantedModels | None = None
        if config.manifest:
            grant, run_id, models = await _register(pdp, config)
            runs = RunKeys(pdp, grant, _narrower(config))
        await _check_decide_socket(pdp, config, registered=bool(config.manifest))
        metrics = _metrics(pdp)
        sidecar = Sidecar(config, pdp, metrics, run_id, runs, models=models)
        # An agent that hangs up cancels its handler: the upstream call is closed at once (a
        # provider stops generating) rather than held, with its pool slot, until it answers.
        proxy = web.AppRunner(
            build_app(sidecar),
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            keepalive_timeout=IDLE_SECONDS,  # as the lean connections
        )
        runners.append(proxy)
        await proxy.setup()
        front = await _front(proxy, config)
        if config.metrics:
            runners.append(await _export(metrics, config.metrics))
        log.info(
            "abc-pep proxying on %s for run %s (PDP %s, %s%s)",
            config.listen,
            run_id or "-",
            config.pdp,
            "plaintext" if config.pdp_ca is None else "TLS",
            f"; decisions on {config.pdp_socket or config.pdp_decide}"
            if config.pdp_socket or config.pdp_decide
            else "",
        )
        await stop.wait()
        log.info("abc-pep stopping")
    finally:
        if front is not None:
            await front.close()
        for runner in reversed(runners):
            await runner.cleanup()
        if sidecar is not None and sidecar.unfinished:
            # What cancelled handlers left running (a hung-up call's release, a refusal's
            # record) ends first: the settlements it queues are flushed with the rest.
            await asyncio.wait(sidecar.unfinished, timeout=config.pdp_deadline_seconds + 1)
        await pdp.close()
    log.info("abc-pep stopped")


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # not on this platform: the standard loop works, slower
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve_mcp_stdio(
    config: PepConfig, server: str, command: Sequence[str], stop: asyncio.Event
) -> int:
    """Register (or bind), then run ``command`` as the stdio MCP server ``server``."""
    pdp = _pdp_client(config)
    exporter: web.AppRunner | None = None
    try:
        run_id = config.run
        if config.manifest:
            _, run_id, _ = await _register(pdp, config)
        await _check_decide_socket(pdp, config, registered=bool(config.manifest))
        if not run_id:
            # No header can name a run on stdio: without one every message would be refused.
            raise ConfigError("mcp-stdio needs --manifest or --run")
        metrics = _metrics(pdp)
        if config.metrics:
            exporter = await _export(metrics, config.metrics)
        return await serve_stdio(server, command, pdp, run_id, metrics, stop)
    finally:
        if exporter is not None:
            await exporter.cleanup()
        await pdp.close()


def _stdio_args(argv: Sequence[str]) -> tuple[PepConfig, str, list[str]]:
    """``--server NAME [flags] -- COMMAND ARGS...``; metrics off unless asked for (many
    wrappers run side by side, one per server a host starts)."""
    if "--" not in argv:
        raise ConfigError("mcp-stdio needs -- COMMAND ARGS... (the MCP server to run)")
    split = list(argv).index("--")
    head, command = list(argv[:split]), list(argv[split + 1 :])
    if not command:
        raise ConfigError("mcp-stdio needs a COMMAND after --")
    parser = argparse.ArgumentParser(prog="abc-pep mcp-stdio", add_help=False)
    parser.add_argument("--server", required=True)
    try:
        known, rest = parser.parse_known_args(head)
    except SystemExit as exc:
        raise ConfigError("mcp-stdio needs --server NAME (its tools are tool:NAME/...)") from exc
    if not any(a.startswith("--metrics") for a in rest) and "ABC_PEP_METRICS" not in os.environ:
        rest += ["--metrics", "off"]
    config = parse_config(rest)
    if config.narrower is not None:
        # No run key reaches a stdio server: its one run would be the grant as signed.
        raise ConfigError(
            "mcp-stdio takes no --narrower: start the narrowed run with `abcctl run start"
            " --narrower` and give its id with --run"
        )
    return config, str(known.server), command


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    stdio = bool(args) and args[0] == "mcp-stdio"
    try:
        if stdio:
            config, server, command = _stdio_args(args[1:])
        else:
            config = parse_config(args)
    except ConfigError as exc:
        print(f"abc-pep: error: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    _install_uvloop()

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if stdio:
            return await serve_mcp_stdio(config, server, command, stop)
        await serve(config, stop)
        return 0

    try:
        return asyncio.run(run())
    except ConfigError as exc:
        print(f"abc-pep: error: {exc}", file=sys.stderr)
        return 1


def main_exit() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
