"""``abcctl`` entry point: flags in, plain arguments down, one-line errors out.

Exit codes: 0 success, 1 a check failed or a user mistake (one line on stderr,
never a traceback), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path

from pdp.api.config import read_envelope_file
from pdp.bundle import load_bundle
from pdp.certs import DEFAULT_DAYS, DEFAULT_PDP_HOSTS, write_dev_certs
from pdp.cli.audit import add_audit_list_parser, add_explain_parser
from pdp.cli.learn import (
    add_log_flags,
    add_suggest_parser,
    add_what_if_flags,
    what_if_command,
)
from pdp.clock import utc_now
from pdp.decisionlog import LogInvalid, verify_log
from pdp.engine.policytest import run_policy_tests
from pdp.errors import AbcError, ConfigError
from pdp.learn.replay import replay_log
from pdp.manifest import (
    SqliteHighWater,
    TrustEntry,
    TrustStore,
    VerificationPolicy,
    admit_rollback_mark,
    freeze,
    load_intent,
    load_trust_store,
    save_trust_store,
    sign_manifest,
    verify_envelope,
)
from pdp.manifest.canonical import digest
from pdp.manifest.envelope import parse_envelope
from pdp.manifest.keys import (
    keyid,
    load_private_key,
    load_public_key,
    raw_public_key,
    write_keypair,
)
from pdp.manifest.model import Manifest, parse_timestamp

__all__ = ["main", "main_exit"]

STATE_DB = "abc.db"


def _now() -> datetime:
    # Whole seconds: manifests and trust entries spell their times without fractions.
    return utc_now().replace(microsecond=0)


def _timestamp_arg(text: str) -> datetime:
    try:
        return parse_timestamp(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(data)
        temporary.replace(path)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc


def cmd_keygen(args: argparse.Namespace) -> int:
    key_path, pub_path, key_id = write_keypair(args.out, args.name)
    print(key_id)
    print(f"wrote {key_path} (private, mode 0600) and {pub_path}", file=sys.stderr)
    return 0


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


def cmd_trust_add(args: argparse.Namespace) -> int:
    public = load_public_key(args.pub)
    store = load_trust_store(args.store) if args.store.exists() else TrustStore(())
    not_before = args.not_before or _now()
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


def cmd_freeze(args: argparse.Namespace) -> int:
    intent = load_intent(args.intent)
    key = load_private_key(args.key)
    bundle = load_bundle(args.policies)
    manifest = freeze(intent, bundle.digest, _now())
    envelope = sign_manifest(manifest, key)
    _write(args.output, envelope + b"\n")
    print(
        f"froze {manifest.metadata.lineage} v{manifest.metadata.version} into {args.output}"
        f" (policy {bundle.digest}, expires {manifest.metadata.expires_at})"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    trust = load_trust_store(args.trust)
    high_water = SqliteHighWater(args.state / STATE_DB) if args.state else None
    now = args.at or _now()
    try:
        # No bundle at hand: the pin is not checked; with --state, the mark is admitted too.
        verified = verify_envelope(
            read_envelope_file(args.envelope), trust, now, VerificationPolicy.OFFLINE
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


def _summary(manifest: Manifest, manifest_digest: str) -> dict[str, object]:
    return {
        "verified": False,
        "manifest_digest": manifest_digest,
        "lineage": manifest.metadata.lineage,
        "version": manifest.metadata.version,
        "tenant": manifest.metadata.tenant,
        "agent": manifest.metadata.agent,
        "enforcement": manifest.enforcement,
        "not_before": manifest.metadata.not_before,
        "expires_at": manifest.metadata.expires_at,
        "policy_bundle_digest": manifest.policy.bundle_digest,
        "models": [m.target for m in manifest.capabilities.models],
        "tools": [t.target for t in manifest.capabilities.tools],
        "http": [h.target for h in manifest.capabilities.http],
        "steps": [
            {"id": s.id, "uses": list(s.uses), "after": list(s.after)}
            for s in manifest.assembly.steps
        ],
        "budgets": manifest.budgets.model_dump(),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    envelope = parse_envelope(read_envelope_file(args.envelope))
    try:
        manifest = Manifest.model_validate_json(envelope.unverified_payload)
    except ValueError as exc:
        raise ConfigError(f"{args.envelope}: payload is not a RunManifest") from exc
    summary = _summary(manifest, digest(envelope.unverified_payload))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"UNVERIFIED (run `abcctl verify` to check the signature): {args.envelope}")
    for label, key in [
        ("lineage", "lineage"),
        ("version", "version"),
        ("tenant", "tenant"),
        ("agent", "agent"),
        ("enforcement", "enforcement"),
        ("valid from", "not_before"),
        ("expires at", "expires_at"),
        ("manifest", "manifest_digest"),
        ("policy", "policy_bundle_digest"),
    ]:
        print(f"  {label:<12} {summary[key]}")
    print("  models       " + (", ".join(m.target for m in manifest.capabilities.models) or "-"))
    for tool in manifest.capabilities.tools:
        constraints = ", ".join(
            f"{name}:{c.type}" + ("!" if c.required else "") for name, c in tool.args.items()
        )
        print(f"  tool         {tool.target}({constraints})")
    for http in manifest.capabilities.http:
        print(f"  http         {'|'.join(http.methods)} {http.host}{http.path_prefix}*")
    for step in manifest.assembly.steps:
        after = f" after {', '.join(step.after)}" if step.after else ""
        print(f"  step         {step.id}{after}: {', '.join(step.uses)}")
    budgets = manifest.budgets
    print(
        f"  budgets      tokens={budgets.tokens} usd_micros={budgets.usd_micros}"
        f" tool_calls={budgets.tool_calls} requests={budgets.requests}"
    )
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abcctl", description="ABC governance sidecar control")
    commands = parser.add_subparsers(dest="command", required=True)

    keygen = commands.add_parser("keygen", help="make an Ed25519 signing key pair")
    keygen.add_argument(
        "--out", type=Path, required=True, help="directory for NAME.key and NAME.pub"
    )
    keygen.add_argument("--name", default="signer")
    keygen.set_defaults(func=cmd_keygen)

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

    trust = commands.add_parser("trust", help="edit a trust store").add_subparsers(
        dest="trust_command", required=True
    )
    add = trust.add_parser("add", help="trust a public key for one or more tenants")
    add.add_argument("--store", type=Path, required=True)
    add.add_argument("--pub", type=Path, required=True)
    add.add_argument("--tenant", action="append", required=True, help="repeat for several")
    add.add_argument("--mode", action="append", choices=["enforce", "shadow"])
    add.add_argument("--not-before", type=_timestamp_arg, help="default: now")
    add.add_argument("--not-after", type=_timestamp_arg, help="default: one year after not-before")
    add.add_argument("--comment")
    add.set_defaults(func=cmd_trust_add)
    revoke = trust.add_parser("revoke", help="mark a key revoked")
    revoke.add_argument("--store", type=Path, required=True)
    revoke.add_argument("--keyid", required=True)
    revoke.set_defaults(func=cmd_trust_revoke)

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
    verify.add_argument("--at", type=_timestamp_arg, help="verify as of this time (default: now)")
    verify.set_defaults(func=cmd_verify)

    inspect = commands.add_parser("inspect", help="show an envelope's manifest (unverified)")
    inspect.add_argument("envelope", type=Path)
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_inspect)

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
