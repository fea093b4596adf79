"""``abc-pep`` configuration: flags, else ``ABC_PEP_*`` variables, else a YAML file."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

from pdp.api.config import ConfigError, host_port
from pdp.api.tls import is_loopback

__all__ = ["ConfigError", "PepConfig", "build_parser", "parse_config", "transport_warnings"]


@dataclass(frozen=True)
class PepConfig:
    listen: str
    pdp: str
    run: str | None
    manifest: Path | None
    metrics: str | None
    upstreams: dict[str, str] = field(default_factory=dict)
    pdp_deadline_seconds: float = 0.25
    settle_linger_seconds: float = 0.1
    max_body_bytes: int = 1024 * 1024
    log_level: str = "INFO"
    pdp_ca: Path | None = None
    pdp_cert: Path | None = None
    pdp_key: Path | None = None
    pdp_server_name: str | None = None
    narrower: Path | None = None  # every run key's run is started narrowed by it
    pdp_socket: Path | None = None  # the PDP's decide socket: Decide there, the rest by gRPC
    pdp_decide: str | None = None  # the same protocol over TLS, to a PDP on another host


MAX_SOCKET_PATH = 107  # sun_path's 108 bytes, the last one NUL
_UPSTREAM_KINDS = ("openai", "anthropic", "mcp:", "http:")
_OPTIONS: tuple[tuple[str, str, Any, str], ...] = (
    ("listen", "ABC_PEP_LISTEN", "127.0.0.1:15001", "proxy address HOST:PORT"),
    ("pdp", "ABC_PEP_PDP", "127.0.0.1:9191", "PDP gRPC address HOST:PORT"),
    (
        "pdp_socket",
        "ABC_PEP_PDP_SOCKET",
        None,
        "the PDP's decide socket (abc-pdp --decide-socket) on this host: decisions go there,"
        " for less CPU than gRPC, and the rest to --pdp",
    ),
    (
        "pdp_decide",
        "ABC_PEP_PDP_DECIDE",
        None,
        "HOST:PORT of a PDP's decide socket over TLS (abc-pdp --decide-listen): decisions go"
        " there, for less CPU than gRPC, and the rest to --pdp; needs --pdp-ca, --pdp-cert"
        " and --pdp-key",
    ),
    ("run", "ABC_PEP_RUN", None, "default run id (requests may name one in x-abc-run)"),
    ("manifest", "ABC_PEP_MANIFEST", None, "envelope to register at start-up instead of --run"),
    (
        "narrower",
        "ABC_PEP_NARROWER",
        None,
        "narrower JSON every run key's run is started with (--manifest only)",
    ),
    (
        "metrics",
        "ABC_PEP_METRICS",
        "127.0.0.1:15090",
        "Prometheus address HOST:PORT ('off' to disable)",
    ),
    ("pdp_deadline_ms", "ABC_PEP_PDP_DEADLINE_MS", 250, "PDP deadline per decision, ms"),
    (
        "settle_linger_ms",
        "ABC_PEP_SETTLE_LINGER_MS",
        100,
        "how long a call's usage waits for the next decision to carry it, ms",
    ),
    ("max_body_bytes", "ABC_PEP_MAX_BODY_BYTES", 1024 * 1024, "largest request body read"),
    ("log_level", "ABC_PEP_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
    ("pdp_ca", "ABC_PEP_PDP_CA", None, "CA bundle PEM that signed the PDP's certificate (TLS)"),
    ("pdp_cert", "ABC_PEP_PDP_CERT", None, "client certificate PEM presented to the PDP"),
    ("pdp_key", "ABC_PEP_PDP_KEY", None, "client private key PEM"),
    (
        "pdp_server_name",
        "ABC_PEP_PDP_SERVER_NAME",
        None,
        "name checked in the PDP's certificate when not the host of --pdp",
    ),
)


def _upstream(entry: str) -> tuple[str, str]:
    name, sep, url = entry.partition("=")
    if not sep or not name.startswith(_UPSTREAM_KINDS) or name in ("mcp:", "http:"):
        raise ConfigError(
            f"--upstream {entry!r}: expected openai=URL, anthropic=URL,"
            " mcp:SERVER=URL or http:NAME=URL"
        )
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"--upstream {name}: {url!r} is not an http(s) URL")
    if parsed.user is not None or parsed.password is not None:
        # The agent's own credentials go upstream (its Authorization or x-api-key header);
        # a second set in the URL would be sent by one client and not another.
        raise ConfigError(f"--upstream {name}: credentials in the URL are not supported")
    if name in ("openai", "anthropic"):
        # The SDKs' base URL form (https://api.openai.com/v1) is accepted: the sidecar
        # forwards the agent's /v1/... path itself, and /v1/v1/... would be a paid 404.
        return name, url.rstrip("/").removesuffix("/v1")
    return name, url.rstrip("/") if not name.startswith("mcp:") else url


def _file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file is a mapping")
    return data


def _path(value: Any) -> Path | None:
    return Path(str(value)) if value else None


def _socket_path(value: Any) -> Path | None:
    path = _path(value)
    if path is not None and len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(f"--pdp-socket: a Unix socket's path is at most 107 bytes: {path}")
    return path


def _tls(values: Mapping[str, Any]) -> tuple[Path | None, Path | None, Path | None, str | None]:
    """(CA, cert, key, server name) for the PDP channel; the CA is what turns TLS on."""
    ca, cert, key = (_path(values.get(k)) for k in ("pdp_ca", "pdp_cert", "pdp_key"))
    name = str(values["pdp_server_name"]) if values.get("pdp_server_name") else None
    if bool(cert) != bool(key):
        raise ConfigError("--pdp-cert and --pdp-key go together: give both or neither")
    # No fallback to the system's CAs: the PDP is trusted because our CA signed it.
    if cert and not ca:
        raise ConfigError("--pdp-cert and --pdp-key need --pdp-ca (the CA of the PDP)")
    if name and not ca:
        raise ConfigError("--pdp-server-name needs --pdp-ca: it names the PDP's certificate")
    return ca, cert, key, name


def build_parser(environ: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abc-pep", description="ABC sidecar proxy (PEP)")
    parser.add_argument(
        "--config", default=environ.get("ABC_PEP_CONFIG"), help="YAML file (env ABC_PEP_CONFIG)"
    )
    for name, env, default, text in _OPTIONS:
        shown = f"env {env}" + ("" if default is None else f", default {default}")
        parser.add_argument("--" + name.replace("_", "-"), dest=name, help=f"{text} ({shown})")
    parser.add_argument(
        "--upstream",
        action="append",
        default=[],
        help="openai=URL, anthropic=URL, mcp:SERVER=URL or http:NAME=URL; repeatable"
        " (env ABC_PEP_UPSTREAMS, comma-separated)",
    )
    return parser


def parse_config(argv: Sequence[str] | None, environ: Mapping[str, str] = os.environ) -> PepConfig:
    args = build_parser(environ).parse_args(argv)
    from_file = _file(args.config)
    values: dict[str, Any] = {}
    for name, env, default, _ in _OPTIONS:
        for source in (getattr(args, name), environ.get(env), from_file.get(name), default):
            if source is not None:
                values[name] = source
                break
    entries = list(args.upstream) or [
        e for e in environ.get("ABC_PEP_UPSTREAMS", "").split(",") if e.strip()
    ]
    if not entries:
        entries = [f"{k}={v}" for k, v in (from_file.get("upstreams") or {}).items()]
    upstreams = dict(_upstream(entry.strip()) for entry in entries)
    if values.get("run") and values.get("manifest"):
        raise ConfigError("give --run or --manifest, not both")
    if values.get("narrower") and not values.get("manifest"):
        raise ConfigError("--narrower narrows the runs of --manifest: give both")
    try:
        deadline_ms, max_body = int(values["pdp_deadline_ms"]), int(values["max_body_bytes"])
        linger_ms = int(values["settle_linger_ms"])
    except ValueError as exc:
        raise ConfigError(
            f"--pdp-deadline-ms, --settle-linger-ms and --max-body-bytes are integers: {exc}"
        ) from exc
    if not 1 <= deadline_ms <= 60_000 or not 1 <= max_body <= 64 * 1024 * 1024:
        raise ConfigError("--pdp-deadline-ms must be 1..60000 and --max-body-bytes 1..64 MiB")
    if not 0 <= linger_ms <= 10_000:
        # Held at their worst case meanwhile: seconds, never the reservations' own expiry.
        raise ConfigError("--settle-linger-ms must be 0..10000")
    metrics = str(values["metrics"])
    pdp_ca, pdp_cert, pdp_key, pdp_server_name = _tls(values)
    pdp_decide = (
        host_port(str(values["pdp_decide"]), "--pdp-decide") if values.get("pdp_decide") else None
    )
    if pdp_decide and values.get("pdp_socket"):
        raise ConfigError("give --pdp-socket or --pdp-decide, not both: decisions go one way")
    if pdp_decide and pdp_key is None:
        # The PDP takes no decision over TCP from a sidecar it does not know by certificate.
        raise ConfigError("--pdp-decide needs --pdp-ca, --pdp-cert and --pdp-key")
    return PepConfig(
        listen=host_port(str(values["listen"]), "--listen"),
        pdp=host_port(str(values["pdp"]), "--pdp"),
        run=values.get("run"),
        manifest=Path(values["manifest"]) if values.get("manifest") else None,
        narrower=_path(values.get("narrower")),
        pdp_socket=_socket_path(values.get("pdp_socket")),
        pdp_decide=pdp_decide,
        metrics=None if metrics == "off" else host_port(metrics, "--metrics"),
        upstreams=upstreams,
        pdp_deadline_seconds=deadline_ms / 1000,
        settle_linger_seconds=linger_ms / 1000,
        max_body_bytes=max_body,
        log_level=str(values["log_level"]).upper(),
        pdp_ca=pdp_ca,
        pdp_cert=pdp_cert,
        pdp_key=pdp_key,
        pdp_server_name=pdp_server_name,
    )


def transport_warnings(config: PepConfig) -> list[str]:
    """What is unsafe about the way to the PDP; empty when nothing is."""
    if config.pdp_ca is None and not is_loopback(config.pdp):
        return [
            f"the PDP at {config.pdp} is reached without TLS: decisions can be read and forged"
            " on the way; give --pdp-ca, --pdp-cert and --pdp-key"
        ]
    return []
