"""``abcctl keygen`` and ``abcctl trust``: signing keys and the stores that trust them."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path

from pdp.cli._common import now, timestamp_arg
from pdp.errors import ConfigError
from pdp.manifest import TrustEntry, TrustStore, load_trust_store, save_trust_store
from pdp.manifest.keys import keyid, load_public_key, raw_public_key, write_keypair

__all__ = ["register"]


def cmd_keygen(args: argparse.Namespace) -> int:
    key_path, pub_path, key_id = write_keypair(args.out, args.name)
    print(key_id)
    print(f"wrote {key_path} (private, mode 0600) and {pub_path}", file=sys.stderr)
    return 0


def cmd_trust_add(args: argparse.Namespace) -> int:
    public = load_public_key(args.pub)
    store = load_trust_store(args.store) if args.store.exists() else TrustStore(())
    not_before = args.not_before or now()
    not_after = args.not_after or not_before + timedelta(days=365)
    if not_after <= not_before:
        raise ConfigError("--not-after must be after --not-before")
    key_id = keyid(raw_public_key(public))
    entry = TrustEntry(
        keyid=key_id,
        public_key=public,
        tenants=frozenset(args.tenant),
        modes=frozenset(args.mode or ["enforce"]),
        not_before=not_before,
        not_after=not_after,
        revoked=False,
        comment=args.comment or "",
    )
    save_trust_store(store.with_entry(entry), args.store)
    print(f"trusted {key_id} for tenant(s) {', '.join(sorted(entry.tenants))} in {args.store}")
    return 0


def cmd_trust_revoke(args: argparse.Namespace) -> int:
    store = load_trust_store(args.store)
    save_trust_store(store.revoke(args.keyid), args.store)
    print(f"revoked {args.keyid} in {args.store}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keygen`` and ``trust add|revoke`` to ``abcctl``'s subcommands."""
    keygen = commands.add_parser("keygen", help="make an Ed25519 signing key pair")
    keygen.add_argument(
        "--out", type=Path, required=True, help="directory for NAME.key and NAME.pub"
    )
    keygen.add_argument("--name", default="signer")
    keygen.set_defaults(func=cmd_keygen)

    trust = commands.add_parser("trust", help="edit a trust store").add_subparsers(
        dest="trust_command", required=True
    )
    add = trust.add_parser("add", help="trust a public key for one or more tenants")
    add.add_argument("--store", type=Path, required=True)
    add.add_argument("--pub", type=Path, required=True)
    add.add_argument("--tenant", action="append", required=True, help="repeat for several")
    add.add_argument("--mode", action="append", choices=["enforce", "shadow"])
    add.add_argument("--not-before", type=timestamp_arg, help="default: now")
    add.add_argument("--not-after", type=timestamp_arg, help="default: one year after not-before")
    add.add_argument("--comment")
    add.set_defaults(func=cmd_trust_add)
    revoke = trust.add_parser("revoke", help="mark a key revoked")
    revoke.add_argument("--store", type=Path, required=True)
    revoke.add_argument("--keyid", required=True)
    revoke.set_defaults(func=cmd_trust_revoke)
