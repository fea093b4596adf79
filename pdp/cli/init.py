"""``abcctl init``: write a commented intent to start from, one that freezes as it is."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pdp.cli._common import write_file
from pdp.errors import ConfigError
from pdp.manifest import parse_intent

__all__ = ["register", "render_intent"]

# Every field is shown, the optional ones at their defaults; docs/intent.md has the rest.
TEMPLATE = """\
# What one run of {agent} may do. `abcctl freeze` turns this file into a signed,
# frozen RunManifest; anything not granted here is refused. Every field, its type and
# its default: docs/intent.md. Check it with `abcctl freeze` (it reports file:line:column).
apiVersion: abc/v1
kind: RunIntent
tenant: {tenant}  # the signing key must be trusted for it (abcctl trust add --tenant)
agent: {agent}
lineage: {tenant}/{agent}  # versions of one lineage only go up: raise `version` to re-freeze
version: 1
goal: Say in one sentence what this agent is for.
enforcement: enforce  # or shadow: decide and log everything, refuse nothing (needs --mode shadow)
lifetime: 8h          # how long the manifest is valid after freezing (s, m, h, d; at most 30d)

# Models: provider is the sidecar route (openai, anthropic); every call's token field is
# capped at max_tokens_per_call.
models:
  - provider: openai
    model: gpt-4o-mini
    max_tokens_per_call: 1024

# MCP tools: server is the name in `abc-pep --upstream mcp:NAME=URL`. Arguments not listed
# are refused; each listed one may carry type, required, enum, minLength, maxLength,
# pattern, minimum, maximum.
tools:
  - server: kb
    name: search
    args:
      query: {{type: string, required: true, maxLength: 200}}

# Plain HTTP: host is the name in `abc-pep --upstream http:HOST=URL`.
http:
  - host: api.internal
    methods: [GET]
    path_prefix: /v1/

# Budgets for the whole run: a call is refused once it could overspend one of them.
budgets:
  tokens: 100000
  usd_micros: 1000000   # millionths of a dollar
  tool_calls: 50
  requests: 200

# Steps in order: each names the capabilities it uses; `after` lists steps that come first.
steps:
  - id: work
    uses: [model:openai/gpt-4o-mini, tool:kb/search, http:api.internal]
"""


def render_intent(tenant: str, agent: str) -> str:
    """The commented starting intent; checked to parse, so what is written always freezes."""
    text = TEMPLATE.format(tenant=tenant, agent=agent)
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
