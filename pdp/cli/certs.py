"""``abcctl certs``: a development CA and the PDP's and PEP's TLS certificates."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pdp.certs import DEFAULT_DAYS, DEFAULT_PDP_HOSTS, write_dev_certs

__all__ = ["register"]


def cmd_certs(args: argparse.Namespace) -> int:
    paths = write_dev_certs(args.out, args.pdp_host, args.days, args.force)
    for path in paths:
        print(path)
    print(
        f"wrote a development CA and the PDP's and PEP's certificates into {args.out}"
        " (keys mode 0600); keep ca.key off the servers",
        file=sys.stderr,
    )
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``certs`` to ``abcctl``'s subcommands."""
    certs = commands.add_parser(
        "certs", help="make a development CA and TLS certificates for the PDP and the PEP"
    )
    certs.add_argument(
        "--out", type=Path, required=True, help="directory for ca, pdp and pep .pem/.key"
    )
    certs.add_argument(
        "--pdp-host",
        action="append",
        default=[],
        help=f"another name or IP in the PDP certificate, besides {', '.join(DEFAULT_PDP_HOSTS)};"
        " repeatable",
    )
    certs.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})"
    )
    certs.add_argument("--force", action="store_true", help="replace existing files")
    certs.set_defaults(func=cmd_certs)
