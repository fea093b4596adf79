"""``abcctl audit verify`` and ``replay``, with ``audit list`` and ``explain`` from
``pdp/cli/audit.py``: reading a PDP's decision log."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pdp.cli.audit import add_audit_list_parser, add_explain_parser
from pdp.cli.learn import add_log_flags, add_what_if_flags, what_if_command
from pdp.decisionlog import LogInvalid, verify_log
from pdp.errors import ConfigError
from pdp.learn.replay import replay_log
from pdp.manifest.keys import load_public_key

__all__ = ["register"]


def cmd_audit_verify(args: argparse.Namespace) -> int:
    key = load_public_key(args.pub)
    try:
        report = verify_log(args.log, key, allow_tail=args.allow_tail, expect_seq=args.expect_seq)
    except OSError as exc:
        raise ConfigError(f"cannot read log {args.log}: {exc.strerror}") from exc
    except LogInvalid as exc:
        print(f"tampered: {exc} ({args.log})", file=sys.stderr)
        return 1
    print(
        f"intact: {report.records} records, {report.checkpoints} signed checkpoints,"
        f" {report.unsigned_tail} after the last; head {report.head}"
    )
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    key = load_public_key(args.pub)
    if args.policies or args.manifest:
        return what_if_command(args, key)
    if args.bundles is None:
        raise ConfigError("replay needs --bundles STATE/bundles (or a what-if candidate)")
    try:
        report = replay_log(
            args.log, args.bundles, key, allow_tail=args.allow_tail, expect_seq=args.expect_seq
        )
    except LogInvalid as exc:
        print(f"tampered: {exc} ({args.log}); not replayed", file=sys.stderr)
        return 1
    for divergence in report.divergences[: args.show]:
        replayed = divergence.replayed
        shown = replayed if isinstance(replayed, str) else json.dumps(replayed, sort_keys=True)
        logged = json.dumps(divergence.logged, sort_keys=True)
        print(f"DIVERGES {divergence.decision_id}: logged {logged}")
        print(f"         replayed {shown}")
    print(
        f"{report.decisions} decisions re-decided: {report.identical} identical,"
        f" {len(report.divergences)} divergent"
    )
    return 1 if report.divergences else 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit verify``/``list``, ``replay`` and ``explain`` to ``abcctl``'s subcommands."""
    audit = commands.add_parser("audit", help="decision logs").add_subparsers(
        dest="audit_command", required=True
    )
    audit_verify = audit.add_parser("verify", help="check a decision log's chain and checkpoints")
    audit_verify.add_argument("log", type=Path)
    audit_verify.add_argument("--pub", type=Path, required=True, help="the PDP's public key")
    audit_verify.add_argument(
        "--allow-tail", action="store_true", help="accept records after the last checkpoint"
    )
    audit_verify.add_argument(
        "--expect-seq", type=int, help="the log must reach this seq (an anchor kept elsewhere)"
    )
    audit_verify.set_defaults(func=cmd_audit_verify)
    add_audit_list_parser(audit)

    replay = commands.add_parser(
        "replay",
        help="re-decide a log's decisions with their pinned policies and manifests,"
        " or with a candidate (what-if)",
    )
    replay.add_argument("log", type=Path)
    replay.add_argument("--pub", type=Path, required=True, help="the PDP's public key")
    replay.add_argument(
        "--bundles", type=Path, help="e.g. STATE/bundles: the runs' own policy bundles"
    )
    replay.add_argument("--show", type=int, default=20, help="divergences to print")
    add_log_flags(replay)
    add_what_if_flags(replay)
    replay.set_defaults(func=cmd_replay)

    add_explain_parser(commands)
