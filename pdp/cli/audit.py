"""``abcctl audit list`` and ``abcctl explain``: finding decisions in a verified log, and
why one came out as it did.

Both read the log only once it verifies as ``audit verify`` would, with the same opt-ins
(``--allow-tail`` for a running PDP's unsigned tail, ``--expect-seq``), and never change it.
Exit codes: 0 shown (an empty list included), 1 a log that does not verify, a decision
not found or an ambiguous prefix (one line on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pdp.cli.learn import add_log_flags, instant_arg
from pdp.decisionlog import LogInvalid
from pdp.learn.audit import LAST, LAST_DENIED, DecisionFilter, list_decisions
from pdp.learn.explain import AmbiguousId, NotInLog, explain, render
from pdp.learn.history import load_history
from pdp.manifest.keys import load_public_key

__all__ = ["add_audit_list_parser", "add_explain_parser"]


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def cmd_audit_list(args: argparse.Namespace) -> int:
    key = load_public_key(args.pub)
    try:
        history = load_history(
            args.log, key, allow_tail=args.allow_tail, expect_seq=args.expect_seq
        )
    except LogInvalid as exc:
        print(f"tampered: {exc} ({args.log}); nothing listed", file=sys.stderr)
        return 1
    where = DecisionFilter(
        denied=None if args.decision is None else args.decision == "deny",
        reason=args.reason,
        run=args.run,
        since=args.since,
        until=args.until,
    )
    rows = list_decisions(history.records, where, args.last)
    if args.json:
        print(json.dumps([row.as_dict() for row in rows], indent=2))
    else:
        for row in rows:
            print(row.line())
        print(f"{len(rows)} decision(s)", file=sys.stderr)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    key = load_public_key(args.pub)
    try:
        explanation = explain(
            args.log,
            args.decision_id,
            key,
            allow_tail=args.allow_tail,
            expect_seq=args.expect_seq,
        )
    except LogInvalid as exc:
        print(f"tampered: {exc} ({args.log}); nothing explained", file=sys.stderr)
        return 1
    except (NotInLog, AmbiguousId) as exc:
        print(f"abcctl: error: {exc} ({args.log})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(explanation.as_dict(), sort_keys=True, indent=2))
    else:
        print(render(explanation))
    return 0


def _log_flags(parser: argparse.ArgumentParser, positional: bool) -> None:
    if positional:
        parser.add_argument("log", type=Path)
    else:
        parser.add_argument("--log", type=Path, required=True, help="the decision log")
    parser.add_argument("--pub", type=Path, required=True, help="the PDP's public key")
    add_log_flags(parser)
    parser.add_argument("--json", action="store_true", help="JSON, for machines")


def add_audit_list_parser(audit: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = audit.add_parser(
        "list", help="the decisions of a verified log, filtered (one line each, or --json)"
    )
    _log_flags(parser, positional=True)
    parser.add_argument(
        "--decision",
        choices=("allow", "deny"),
        help="deny: refused, or would have been (shadow-deny: forwarded by a shadow run)",
    )
    parser.add_argument("--reason", help="a reason code, e.g. tool_not_allowed")
    parser.add_argument("--run", help="a run id, or the start of one")
    parser.add_argument("--since", type=instant_arg, help="at or after this ISO 8601 time")
    parser.add_argument("--until", type=instant_arg, help="before this ISO 8601 time")
    parser.add_argument("--last", type=_count, help="only the last N that match")
    parser.set_defaults(func=cmd_audit_list)


def add_explain_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("explain", help="why one logged decision came out as it did")
    parser.add_argument(
        "decision_id",
        help=f"a decision id, a unique start of one, {LAST!r} or {LAST_DENIED!r}",
    )
    _log_flags(parser, positional=False)
    parser.set_defaults(func=cmd_explain)
