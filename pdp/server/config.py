"""``abc-pdp`` configuration: flags, else ``ABC_PDP_*`` environment variables, else defaults."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pdp.api.config import host_port
from pdp.api.tls import is_loopback
from pdp.errors import ConfigError

__all__ = ["DEFAULT_HTTP", "PdpConfig", "build_parser", "parse_config", "transport_warnings"]

DEFAULT_HTTP = "127.0.0.1:8181"  # OPA's port


@dataclass(frozen=True)
class PdpConfig:
    listen: str
    trust: Path
    policies: Path
    state: Path
    metrics: str | None
    workers: int
    grace_seconds: float
    log_level: str
    decision_log: Path
    log_key: Path | None
    log_masks: tuple[str, ...]
    checkpoint_every: int
    checkpoint_seconds: float
    reservation_ttl_seconds: float
    segment_bytes: int = 64 * 1024 * 1024
    snapshot_every: int = 100_000
    store: str = "memory"
    run_retention_seconds: float = 3600.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    http: str | None = None  # the OPA-compatible REST door; off when None
    health: str | None = None  # plaintext grpc.health.v1 only, for probes; off when None
    decide_socket: Path | None = None  # Decide alone, for a sidecar on this host; off when None
    decide_listen: str | None = None  # the same over mTLS, for sidecars elsewhere; off when None
    ext_authz_openai_prefix: str | None = "/openai/"  # None: no OpenAI route
    ext_authz_anthropic_prefix: str | None = "/anthropic/"


_OPTIONS: tuple[tuple[str, str, str | None, str], ...] = (
    # flag, environment variable, default, help
    ("--listen", "ABC_PDP_LISTEN", "127.0.0.1:9191", "gRPC address HOST:PORT"),
    ("--trust", "ABC_PDP_TRUST", None, "trust store YAML (required)"),
    ("--policies", "ABC_PDP_POLICIES", None, "policy bundle directory (required)"),
    ("--state", "ABC_PDP_STATE", None, "state directory (required)"),
    ("--metrics", "ABC_PDP_METRICS", None, "Prometheus address HOST:PORT (off when unset)"),
    (
        "--health",
        "ABC_PDP_HEALTH",
        None,
        "plaintext gRPC health (only) on HOST:PORT, for probes that cannot speak mTLS (off)",
    ),
    (
        "--decide-socket",
        "ABC_PDP_DECIDE_SOCKET",
        None,
        "Unix socket PATH serving Decide alone, for less CPU than gRPC, to a sidecar on this"
        " host (abc-pep --pdp-socket); mode 0600, so the PDP's user only (off when unset)",
    ),
    (
        "--decide-listen",
        "ABC_PDP_DECIDE_LISTEN",
        None,
        "HOST:PORT serving the decide socket's protocol over TLS to sidecars on other hosts"
        " (abc-pep --pdp-decide), for less CPU than gRPC; needs --tls-cert, --tls-key and"
        " --tls-client-ca (off when unset)",
    ),
    ("--workers", "ABC_PDP_WORKERS", "8", "gRPC worker threads"),
    ("--grace", "ABC_PDP_GRACE", "5", "seconds to drain on SIGTERM"),
    ("--log-level", "ABC_PDP_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
    (
        "--decision-log",
        "ABC_PDP_DECISION_LOG",
        None,
        "decision log file (default STATE/decisions.log)",
    ),
    (
        "--log-key",
        "ABC_PDP_LOG_KEY",
        None,
        "Ed25519 key signing log checkpoints (default: made in STATE)",
    ),
    (
        "--checkpoint-every",
        "ABC_PDP_CHECKPOINT_EVERY",
        "1000",
        "records between signed checkpoints",
    ),
    (
        "--checkpoint-seconds",
        "ABC_PDP_CHECKPOINT_SECONDS",
        "60",
        "seconds between signed checkpoints",
    ),
    (
        "--segment-bytes",
        "ABC_PDP_SEGMENT_BYTES",
        str(64 * 1024 * 1024),
        "bytes after which the decision log file is sealed and a new segment begun (0: never)",
    ),
    (
        "--snapshot-every",
        "ABC_PDP_SNAPSHOT_EVERY",
        "100000",
        "log records between snapshots of live state in STATE/snapshots, so that start-up"
        " replays only the log after the newest one (0: none, start-up replays all)",
    ),
    (
        "--reservation-ttl",
        "ABC_PDP_RESERVATION_TTL",
        "600",
        "seconds before an unreported reservation settles at its worst case",
    ),
    (
        "--run-retention",
        "ABC_PDP_RUN_RETENTION",
        "3600",
        "seconds an ended or expired run's live state is kept before it is released",
    ),
    (
        "--store",
        "ABC_PDP_STORE",
        "memory",
        "run state and budgets: memory (rebuilt from the decision log at start-up) or"
        " redis://[:PASSWORD@]HOST:PORT/DB shared by several replicas",
    ),
    ("--tls-cert", "ABC_PDP_TLS_CERT", None, "server certificate chain PEM (TLS with --tls-key)"),
    ("--tls-key", "ABC_PDP_TLS_KEY", None, "server private key PEM"),
    (
        "--tls-client-ca",
        "ABC_PDP_TLS_CLIENT_CA",
        None,
        "CA bundle PEM: clients must present a certificate it signed",
    ),
    (
        "--ext-authz-openai-prefix",
        "ABC_PDP_EXT_AUTHZ_OPENAI_PREFIX",
        "/openai/",
        "Envoy ext_authz: path prefix of the OpenAI API route (PREFIXv1/...), or off",
    ),
    (
        "--ext-authz-anthropic-prefix",
        "ABC_PDP_EXT_AUTHZ_ANTHROPIC_PREFIX",
        "/anthropic/",
        "Envoy ext_authz: path prefix of the Anthropic API route, or off",
    ),
)


def _tls(args: argparse.Namespace) -> tuple[Path | None, Path | None, Path | None]:
    """Cert and key come together; a client CA needs them (it is checked inside TLS)."""
    cert, key, client_ca = args.tls_cert, args.tls_key, args.tls_client_ca
    if bool(cert) != bool(key):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    if client_ca and not cert:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key: it is checked in TLS")
    return (
        Path(cert) if cert else None,
        Path(key) if key else None,
        Path(client_ca) if client_ca else None,
    )


def build_parser(environ: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abc-pdp", description="ABC policy decision point")
    for flag, env, default, text in _OPTIONS:
        shown = f" (env {env}" + (f", default {default})" if default else ")")
        parser.add_argument(flag, default=environ.get(env, default), help=text + shown)
    parser.add_argument(
        "--http",
        nargs="?",
        const=DEFAULT_HTTP,
        default=environ.get("ABC_PDP_HTTP") or None,
        metavar="HOST:PORT",
        help=f"serve OPA's REST Data API on HOST:PORT ({DEFAULT_HTTP} when given alone;"
        " off when not given) (env ABC_PDP_HTTP)",
    )
    parser.add_argument(
        "--log-mask",
        action="append",
        default=None,
        help="input path masked in the decision log, e.g. action.args.password; repeatable"
        " (env ABC_PDP_LOG_MASKS, comma-separated)",
    )
    return parser


def parse_config(argv: Sequence[str] | None, environ: Mapping[str, str] = os.environ) -> PdpConfig:
    args = build_parser(environ).parse_args(argv)
    masks = args.log_mask or [m for m in environ.get("ABC_PDP_LOG_MASKS", "").split(",") if m]
    for flag in ("--trust", "--policies", "--state"):
        if not getattr(args, flag[2:]):
            raise ConfigError(f"{flag} is required (or its ABC_PDP_* variable)")
    try:
        workers, grace = int(args.workers), float(args.grace)
        every, seconds = int(args.checkpoint_every), float(args.checkpoint_seconds)
        ttl, retention = float(args.reservation_ttl), float(args.run_retention)
        segment_bytes, snapshot_every = int(args.segment_bytes), int(args.snapshot_every)
    except ValueError as exc:
        raise ConfigError(
            "--workers, --grace, --checkpoint-*, --segment-bytes, --snapshot-every,"
            f" --reservation-ttl and --run-retention are numbers: {exc}"
        ) from exc
    if segment_bytes < 0 or snapshot_every < 0:
        raise ConfigError("--segment-bytes and --snapshot-every must be >= 0 (0: off)")
    if every < 1 or seconds <= 0 or ttl <= 0 or retention < 0:
        raise ConfigError(
            "--checkpoint-every must be >= 1; --checkpoint-seconds, --reservation-ttl > 0;"
            " --run-retention >= 0"
        )
    if not 1 <= workers <= 256:
        raise ConfigError("--workers must be between 1 and 256")
    tls_cert, tls_key, tls_client_ca = _tls(args)
    if args.decide_listen and tls_client_ca is None:
        # No plaintext door, not even on loopback: the Unix socket is the local one.
        raise ConfigError(
            "--decide-listen needs --tls-cert, --tls-key and --tls-client-ca: it takes"
            " sidecars by their client certificates only"
        )
    openai = _prefix("openai", args.ext_authz_openai_prefix)
    anthropic = _prefix("anthropic", args.ext_authz_anthropic_prefix)
    if openai and anthropic and (openai.startswith(anthropic) or anthropic.startswith(openai)):
        # One provider's requests would be judged as the other's.
        raise ConfigError("--ext-authz-openai-prefix and --ext-authz-anthropic-prefix overlap")
    return PdpConfig(
        listen=host_port(args.listen, "--listen"),
        trust=Path(args.trust),
        policies=Path(args.policies),
        state=Path(args.state),
        metrics=host_port(args.metrics, "--metrics") if args.metrics else None,
        workers=workers,
        grace_seconds=grace,
        log_level=args.log_level.upper(),
        decision_log=Path(args.decision_log or Path(args.state) / "decisions.log"),
        log_key=Path(args.log_key) if args.log_key else None,
        log_masks=tuple(masks),
        checkpoint_every=every,
        checkpoint_seconds=seconds,
        reservation_ttl_seconds=ttl,
        segment_bytes=segment_bytes,
        snapshot_every=snapshot_every,
        store=_store(args.store),
        run_retention_seconds=retention,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        http=host_port(args.http, "--http") if args.http else None,
        health=host_port(args.health, "--health") if args.health else None,
        decide_socket=Path(args.decide_socket) if args.decide_socket else None,
        decide_listen=host_port(args.decide_listen, "--decide-listen")
        if args.decide_listen
        else None,
        ext_authz_openai_prefix=openai,
        ext_authz_anthropic_prefix=anthropic,
    )


def _prefix(provider: str, value: str) -> str | None:
    """A path prefix that ends on a segment boundary ("/openai/"), or None for off."""
    if value == "off":
        return None
    if not (value.startswith("/") and value.endswith("/")) or "%" in value:
        raise ConfigError(f"--ext-authz-{provider}-prefix must be off or a path like /{provider}/")
    return value


def _store(value: str) -> str:
    if value == "memory" or value.startswith(("redis://", "rediss://", "unix://")):
        return value
    raise ConfigError("--store must be memory, redis://..., rediss://... or unix://...")


def transport_warnings(config: PdpConfig) -> list[str]:
    """What is unsafe about how the gRPC and REST ports are exposed; empty when nothing is.

    Loopback without TLS is the development setup and stays quiet. A reachable port is
    not refused (a service mesh may add mTLS outside the process) but is said loudly.
    Both ports serve decisions and take the same TLS files, so they get the same words.
    """
    warnings = []
    for flag, address in (("--listen", config.listen), ("--http", config.http)):
        if address is None or is_loopback(address):
            continue
        if config.tls_cert is None:
            can = (
                "register manifests and ask for decisions"
                if flag == "--listen"
                else "ask for decisions and spend budgets"
            )
            warnings.append(
                f"{flag} {address} is reachable from other hosts without TLS: anyone who"
                f" reaches it can {can}; give --tls-cert, --tls-key and --tls-client-ca"
            )
        elif config.tls_client_ca is None:
            warnings.append(
                f"{flag} {address} accepts any TLS client: give --tls-client-ca to"
                " require client certificates"
            )
    return warnings
