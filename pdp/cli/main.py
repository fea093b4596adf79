"""``abcctl`` entry point: flags in, plain arguments down, one-line errors out.

Each command lives in the module of its concern (``keys``, ``certs``, ``manifests``,
``init``, ``policy``, ``decisions``, ``runs``, ``learn``); this module only assembles the parser.

Exit codes: 0 success, 1 a check failed or a user mistake (one line on stderr,
never a traceback), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from pdp.cli import certs, decisions, init, keys, manifests, policy, runs
from pdp.cli.learn import add_suggest_parser
from pdp.errors import AbcError, ConfigError

__all__ = ["build_parser", "main", "main_exit"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abcctl", description="ABC governance sidecar control")
    commands = parser.add_subparsers(dest="command", required=True)
    init.register(commands)
    keys.register(commands)
    certs.register(commands)
    manifests.register(commands)
    policy.register(commands)
    decisions.register(commands)
    runs.register(commands)
    add_suggest_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, AbcError) as exc:
        print(f"abcctl: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main_exit() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
