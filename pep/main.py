"""``abc-pep``: bind to a run (or register a manifest), then proxy until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry

from pdp.api.config import read_envelope_file
from pdp.api.tls import TlsFileError, load_certificates, load_key_pair
from pep.config import ConfigError, PepConfig, parse_config, transport_warnings
from pep.metrics import PepMetrics
from pep.models_list import GrantedModels, granted_models
from pep.pdp_client import PdpClient, PdpTls
from pep.proxy import Sidecar, build_app, metrics_app
from pep.runs import RunKeys

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


async def _site(runner: web.AppRunner, address: str) -> None:
    host, _, port = address.rpartition(":")
    try:
        await web.TCPSite(runner, host, int(port)).start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}") from exc


async def serve(config: PepConfig, stop: asyncio.Event) -> None:
    pdp = PdpClient(config.pdp, config.pdp_deadline_seconds, _pdp_tls(config))
    for warning in transport_warnings(config):
        log.warning("%s", warning)
    runners: list[web.AppRunner] = []
    try:
        run_id: str | None = config.run
        runs: RunKeys | None = None
        models: GrantedModels | None = None
        if config.manifest:
            grant, run_id, models = await _register(pdp, config)
            runs = RunKeys(pdp, grant)
        metrics = PepMetrics(CollectorRegistry())
        sidecar = Sidecar(config, pdp, metrics, run_id, runs, models=models)
        proxy = web.AppRunner(build_app(sidecar), access_log=None, handle_signals=False)
        runners.append(proxy)
        await proxy.setup()
        await _site(proxy, config.listen)
        if config.metrics:
            exporter = web.AppRunner(metrics_app(metrics), access_log=None, handle_signals=False)
            runners.append(exporter)
            await exporter.setup()
            await _site(exporter, config.metrics)
        log.info(
            "abc-pep proxying on %s for run %s (PDP %s, %s)",
            config.listen,
            run_id or "-",
            config.pdp,
            "plaintext" if config.pdp_ca is None else "TLS",
        )
        await stop.wait()
        log.info("abc-pep stopping")
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        await pdp.close()
    log.info("abc-pep stopped")


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # not on this platform: the standard loop works, slower
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_config(argv)
    except ConfigError as exc:
        print(f"abc-pep: error: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    _install_uvloop()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    try:
        asyncio.run(run())
    except ConfigError as exc:
        print(f"abc-pep: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main_exit() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
