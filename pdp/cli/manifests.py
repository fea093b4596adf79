"""``abcctl freeze``, ``verify`` and ``inspect``: from an intent to a signed manifest and back."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pdp.api.config import read_envelope_file
from pdp.bundle import load_bundle
from pdp.cli._common import STATE_DB, now, timestamp_arg, write_file
from pdp.errors import AbcError, ConfigError
from pdp.manifest import (
    SqliteHighWater,
    VerificationPolicy,
    admit_rollback_mark,
    freeze,
    load_intent,
    load_trust_store,
    sign_manifest,
    verify_envelope,
)
from pdp.manifest.canonical import digest
from pdp.manifest.envelope import parse_envelope
from pdp.manifest.keys import load_private_key
from pdp.manifest.model import ArgConstraint, Manifest

__all__ = ["register"]


def cmd_freeze(args: argparse.Namespace) -> int:
    intent = load_intent(args.intent)
    key = load_private_key(args.key)
    bundle = load_bundle(args.policies)
    manifest = freeze(intent, bundle.digest, now())
    envelope = sign_manifest(manifest, key)
    write_file(args.output, envelope + b"\n")
    print(
        f"froze {manifest.metadata.lineage} v{manifest.metadata.version} into {args.output}"
        f" (policy {bundle.digest}, expires {manifest.metadata.expires_at})"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    trust = load_trust_store(args.trust)
    high_water = SqliteHighWater(args.state / STATE_DB) if args.state else None
    at = args.at or now()
    try:
        # No bundle at hand: the pin is not checked; with --state, the mark is admitted too.
        verified = verify_envelope(
            read_envelope_file(args.envelope), trust, at, VerificationPolicy.OFFLINE
        )
        if high_water is not None:
            admit_rollback_mark(verified, high_water)
    except AbcError as exc:
        print(f"{exc.reason}: {exc} ({args.envelope})", file=sys.stderr)
        return 1
    meta = verified.manifest.metadata
    print(
        f"valid: {meta.lineage} v{meta.version} tenant {meta.tenant},"
        f" signed by {verified.signer}, manifest {verified.digest}"
    )
    return 0


def summary(manifest: Manifest, manifest_digest: str) -> dict[str, object]:
    """Everything the manifest grants, as ``inspect --json`` prints it (unverified)."""
    capabilities = manifest.capabilities
    return {
        "verified": False,
        "manifest_digest": manifest_digest,
        "lineage": manifest.metadata.lineage,
        "version": manifest.metadata.version,
        "tenant": manifest.metadata.tenant,
        "agent": manifest.metadata.agent,
        "goal": manifest.metadata.goal,
        "enforcement": manifest.enforcement,
        "not_before": manifest.metadata.not_before,
        "expires_at": manifest.metadata.expires_at,
        "policy_bundle_digest": manifest.policy.bundle_digest,
        # Each capability as signed (every field, none renamed), with its target name.
        "models": [{"target": m.target, **_signed(m)} for m in capabilities.models],
        "tools": [{"target": t.target, **_signed(t)} for t in capabilities.tools],
        "http": [{"target": h.target, **_signed(h)} for h in capabilities.http],
        "steps": [_signed(step) for step in manifest.assembly.steps],
        "budgets": _signed(manifest.budgets),
    }


def _signed(part: BaseModel) -> dict[str, Any]:
    return part.model_dump(mode="json", exclude_none=True)


def _constraint(name: str, constraint: ArgConstraint) -> str:
    rules = constraint.model_dump(exclude_none=True, exclude={"type", "required"})
    shown = " ".join(f"{key}={json.dumps(value)}" for key, value in rules.items())
    required = " required" if constraint.required else ""
    return f"{name}: {constraint.type}{required}" + (f" {shown}" if shown else "")


def _print_text(manifest: Manifest, manifest_digest: str, envelope: Path) -> None:
    meta = manifest.metadata
    print(f"UNVERIFIED (run `abcctl verify` to check the signature): {envelope}")
    for label, value in [
        ("lineage", meta.lineage),
        ("version", meta.version),
        ("tenant", meta.tenant),
        ("agent", meta.agent),
        ("goal", meta.goal or "-"),
        ("enforcement", manifest.enforcement),
        ("valid from", meta.not_before),
        ("expires at", meta.expires_at),
        ("manifest", manifest_digest),
        ("policy", manifest.policy.bundle_digest),
    ]:
        print(f"  {label:<12} {value}")
    capabilities = manifest.capabilities
    for model in capabilities.models:
        print(f"  model        {model.target} max_tokens_per_call={model.max_tokens_per_call}")
    for tool in capabilities.tools:
        print(f"  tool         {tool.target}" + ("" if tool.args else " (no arguments)"))
        for name, constraint in tool.args.items():
            print(f"                 {_constraint(name, constraint)}")
    for http in capabilities.http:
        print(f"  http         {http.target} {'|'.join(http.methods)} {http.path_prefix}*")
    for step in manifest.assembly.steps:
        after = f" after {', '.join(step.after)}" if step.after else ""
        print(f"  step         {step.id}{after}: {', '.join(step.uses)}")
    budgets = manifest.budgets
    print(
        f"  budgets      tokens={budgets.tokens} usd_micros={budgets.usd_micros}"
        f" tool_calls={budgets.tool_calls} requests={budgets.requests}"
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    envelope = parse_envelope(read_envelope_file(args.envelope))
    try:
        manifest = Manifest.model_validate_json(envelope.unverified_payload)
    except ValueError as exc:
        raise ConfigError(f"{args.envelope}: payload is not a RunManifest") from exc
    manifest_digest = digest(envelope.unverified_payload)
    if args.json:
        print(json.dumps(summary(manifest, manifest_digest), indent=2))
    else:
        _print_text(manifest, manifest_digest, args.envelope)
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``freeze``, ``verify`` and ``inspect`` to ``abcctl``'s subcommands."""
    freeze_cmd = commands.add_parser("freeze", help="freeze an intent into a signed manifest")
    freeze_cmd.add_argument("intent", type=Path)
    freeze_cmd.add_argument("--key", type=Path, required=True)
    freeze_cmd.add_argument("--policies", type=Path, required=True)
    freeze_cmd.add_argument("-o", "--output", type=Path, required=True)
    freeze_cmd.set_defaults(func=cmd_freeze)

    verify = commands.add_parser("verify", help="verify a signed manifest envelope")
    verify.add_argument("envelope", type=Path)
    verify.add_argument("--trust", type=Path, required=True)
    verify.add_argument(
        "--state", type=Path, help="state directory: check and raise the rollback high-water mark"
    )
    verify.add_argument("--at", type=timestamp_arg, help="verify as of this time (default: now)")
    verify.set_defaults(func=cmd_verify)

    inspect = commands.add_parser(
        "inspect", help="show everything an envelope's manifest grants (unverified)"
    )
    inspect.add_argument("envelope", type=Path)
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_inspect)
