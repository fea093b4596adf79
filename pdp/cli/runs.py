"""``abcctl run narrow|start``: a run's effective grant before it starts, and starting one.

``run narrow`` reads a manifest envelope and a narrower and prints the effective grant a run
started with it would be judged by (or why it is refused), without a PDP. ``run start``
asks a PDP to start the run of a run key, narrowed or not, over its public gRPC API.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import grpc

from pdp.api import pdp_pb2, pdp_pb2_grpc
from pdp.api.config import read_envelope_file
from pdp.errors import ConfigError
from pdp.manifest.canonical import digest
from pdp.manifest.envelope import parse_envelope
from pdp.manifest.model import Manifest
from pdp.manifest.narrow import narrow

__all__ = ["register"]


def _read(path: Path | None) -> bytes:
    if path is None:
        return b""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc


def _grant(envelope: Path) -> tuple[str, Manifest]:
    """The digest and manifest an envelope carries (its signature is the PDP's to check)."""
    payload = parse_envelope(read_envelope_file(envelope)).unverified_payload
    return digest(payload), Manifest.model_validate_json(payload)


def cmd_run_narrow(args: argparse.Namespace) -> int:
    _, grant = _grant(args.envelope)
    narrowed = narrow(grant, _read(args.narrower))  # NotNarrower/BadRequest: one line, exit 1
    if narrowed is None:
        print("the narrower takes nothing away: the run is judged by the manifest as signed")
        return 0
    print(f"effective grant {narrowed.digest}")
    print(json.dumps(narrowed.manifest.document(), indent=2, sort_keys=True))
    return 0


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.pdp_ca is None:
        return grpc.insecure_channel(args.pdp)
    credentials = grpc.ssl_channel_credentials(
        _read(args.pdp_ca), _read(args.pdp_key) or None, _read(args.pdp_cert) or None
    )
    return grpc.secure_channel(args.pdp, credentials)


def cmd_run_start(args: argparse.Namespace) -> int:
    manifest_digest, _ = _grant(args.envelope)
    request = pdp_pb2.StartRunRequest(
        manifest_digest=manifest_digest, run_key=args.run_key, narrower=_read(args.narrower)
    )
    with _channel(args) as channel:
        stub = pdp_pb2_grpc.DecisionServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            response = stub.StartRun(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            # The PDP's answer: the reason code, then what was wrong (a narrower's field).
            raise ConfigError(f"the PDP refused: {exc.details()}") from None
    print(f"{response.run_id} {'started' if response.started else 'already started'}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``run narrow|start`` to ``abcctl``'s subcommands."""
    run = commands.add_parser("run", help="runs of a registered manifest").add_subparsers(
        dest="run_command", required=True
    )
    narrow_cmd = run.add_parser("narrow", help="print the effective grant of a narrower")
    narrow_cmd.add_argument("envelope", type=Path, help="the signed manifest (the grant)")
    narrow_cmd.add_argument("narrower", type=Path, help="narrower JSON")
    narrow_cmd.set_defaults(func=cmd_run_narrow)
    start = run.add_parser("start", help="start the run of a run key at a PDP")
    start.add_argument("envelope", type=Path, help="the registered manifest (the grant)")
    start.add_argument("run_key", help="the task id: [A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
    start.add_argument("--narrower", type=Path, help="narrower JSON the run is started with")
    start.add_argument("--pdp", default="127.0.0.1:9191", help="PDP gRPC HOST:PORT")
    start.add_argument("--pdp-ca", type=Path, help="CA PEM of the PDP's certificate (TLS)")
    start.add_argument("--pdp-cert", type=Path, help="client certificate PEM")
    start.add_argument("--pdp-key", type=Path, help="client private key PEM")
    start.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    start.set_defaults(func=cmd_run_start)
