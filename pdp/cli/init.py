"""``abcctl init``: write a commented intent to start from, one that freezes as it is."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from pdp.cli._common import write_file
from pdp.errors import ConfigError
from pdp.manifest import parse_intent
from pdp.manifest.model import Name
from pdp.manifest.reference import example_intent

__all__ = ["register", "render_intent"]


_NAME = TypeAdapter(Name)


def render_intent(tenant: str, agent: str) -> str:
    """The commented starting intent; checked to parse, so what is written always freezes."""
    for flag, value in (("--tenant", tenant), ("--agent", agent)):
        try:
            _NAME.validate_python(value)
        except ValidationError as exc:
            raise ConfigError(
                f"{flag} {value!r}: letters, digits, '.', '_' and '-' only (at most 128)"
            ) from exc
    text = example_intent(tenant, agent)
    parse_intent(text, "<abcctl init>")
    return text


def cmd_init(args: argparse.Namespace) -> int:
    if args.output.exists() and not args.force:
        raise ConfigError(f"{args.output} exists; pass --force to replace it")
    write_file(args.output, render_intent(args.tenant, args.agent).encode())
    print(f"wrote {args.output}; edit it, then:", file=sys.stderr)
    print(
        f"  abcctl freeze {args.output} --key keys/signer.key --policies policies/"
        " -o envelope.json",
        file=sys.stderr,
    )
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``init`` to ``abcctl``'s subcommands."""
    init = commands.add_parser("init", help="write a commented intent to start from")
    init.add_argument(
        "output", type=Path, nargs="?", default=Path("intent.yaml"), help="default: intent.yaml"
    )
    init.add_argument("--tenant", default="acme", help="default: acme")
    init.add_argument("--agent", default="my-agent", help="default: my-agent")
    init.add_argument("--force", action="store_true", help="replace an existing file")
    init.set_defaults(func=cmd_init)
