"""``abcctl policy digest|test``: the Rego bundle a manifest pins."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pdp.bundle import load_bundle
from pdp.engine.policytest import run_policy_tests

__all__ = ["register"]


def cmd_policy_digest(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.policies)
    print(bundle.digest)
    return 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.policies)
    outcomes = run_policy_tests(bundle)
    if not outcomes:
        print(f"abcctl: error: {args.policies} holds no test_ rules", file=sys.stderr)
        return 1
    for outcome in outcomes:
        if not outcome.passed or args.verbose:
            mark = "PASS" if outcome.passed else "FAIL"
            detail = f": {outcome.detail}" if outcome.detail else ""
            print(f"{mark} {outcome.name}{detail}")
    failed = sum(not o.passed for o in outcomes)
    print(f"{len(outcomes) - failed} passed, {failed} failed")
    return 1 if failed else 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``policy digest|test`` to ``abcctl``'s subcommands."""
    policy = commands.add_parser("policy", help="policy bundles").add_subparsers(
        dest="policy_command", required=True
    )
    policy_digest = policy.add_parser("digest", help="print a bundle's digest")
    policy_digest.add_argument("policies", type=Path)
    policy_digest.set_defaults(func=cmd_policy_digest)
    policy_test = policy.add_parser("test", help="run the bundle's Rego unit tests (test_ rules)")
    policy_test.add_argument("policies", type=Path)
    policy_test.add_argument("-v", "--verbose", action="store_true", help="list passing tests too")
    policy_test.set_defaults(func=cmd_policy_test)
