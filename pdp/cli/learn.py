"""``abcctl suggest`` and the what-if ``abcctl replay``: learning outside execution.

Both read a decision log only after it verifies as ``abcctl audit verify`` would (same
``--allow-tail`` and ``--expect-seq`` opt-ins), and neither applies anything.

Exit codes: 0 once the report or the suggested intent is written (a what-if that finds
changes has done its job: the changes are its answer); 1 for a log that does not verify
(``tampered: ...`` on stderr), an unusable candidate or another mistake; 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from fractions import Fraction
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pdp.api.config import read_envelope_file
from pdp.bundle import load_bundle
from pdp.clock import utc_now
from pdp.decisionlog import LogInvalid
from pdp.errors import AbcError, ConfigError
from pdp.learn.history import History, load_history, parse_since
from pdp.learn.suggest import suggest
from pdp.learn.whatif import Candidate, format_report, what_if
from pdp.manifest import VerificationPolicy, load_trust_store, verify_envelope
from pdp.manifest.canonical import digest, parse_canonical
from pdp.manifest.envelope import parse_envelope
from pdp.manifest.keys import load_public_key
from pdp.manifest.model import Manifest

__all__ = [
    "add_log_flags",
    "add_suggest_parser",
    "add_what_if_flags",
    "instant_arg",
    "what_if_command",
]


def _history(args: argparse.Namespace, key: Ed25519PublicKey) -> History | None:
    """The verified log, or None after saying on stderr why it is refused."""
    try:
        return load_history(args.log, key, allow_tail=args.allow_tail, expect_seq=args.expect_seq)
    except LogInvalid as exc:
        print(f"tampered: {exc} ({args.log}); not read", file=sys.stderr)
        return None


def _candidate_manifest(path: Path, trust: Path | None) -> tuple[Manifest, str, str]:
    """(manifest, digest, signer key id or "") of a candidate envelope.

    With ``--trust`` it is verified as a PDP would (signature, key scope, not expired; it
    may start later); without, only its form is checked (canonical, a valid RunManifest)
    and stderr says it was not verified: a what-if applies nothing, and the candidate is
    often one the operator has just frozen.
    """
    raw = read_envelope_file(path)
    if trust is not None:
        verified = verify_envelope(
            raw, load_trust_store(trust), utc_now(), VerificationPolicy.CANDIDATE
        )
        return verified.manifest, verified.digest, verified.signer
    payload = parse_envelope(raw).unverified_payload
    try:
        parse_canonical(payload)
        manifest = Manifest.model_validate_json(payload)
    except (AbcError, ValueError) as exc:
        raise ConfigError(f"{path}: payload is not a canonical RunManifest: {exc}") from exc
    return manifest, digest(payload), ""


def what_if_command(args: argparse.Namespace, key: Ed25519PublicKey) -> int:
    """``replay --policies DIR and/or --manifest ENVELOPE``."""
    if args.policies is None and args.bundles is None:
        raise ConfigError(
            "a candidate manifest alone is judged by each run's own policy bundle:"
            " give --bundles STATE/bundles, or a candidate --policies DIR"
        )
    history = _history(args, key)
    if history is None:
        return 1
    bundle = load_bundle(args.policies) if args.policies else None
    manifest, manifest_digest, signer = (
        _candidate_manifest(args.manifest, args.trust) if args.manifest else (None, "", "")
    )
    if args.manifest and not signer:
        print(
            f"note: candidate manifest {args.manifest} NOT VERIFIED (no --trust given)",
            file=sys.stderr,
        )
    candidate = Candidate(bundle, manifest, manifest_digest, signer, args.bundles)
    report = what_if(history, candidate, examples=args.examples)
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    return 0


def cmd_suggest(args: argparse.Namespace) -> int:
    key = load_public_key(args.pub)
    # Only the payload's digest is read from the envelope: it must name a run of the
    # verified log, whose registration record (verified by the PDP when it accepted it,
    # chained and signed since) is where the manifest is read from.
    envelope = parse_envelope(read_envelope_file(args.manifest))
    history = _history(args, key)
    if history is None:
        return 1
    suggestion = suggest(
        history,
        digest(envelope.unverified_payload),
        since=args.since,
        min_count=args.min_count,
        headroom=args.headroom,
        examples=args.examples,
        enforce=args.enforce,
    )
    diff_path = args.output.with_name(args.output.name + ".diff")
    for path, text in ((args.output, suggestion.text), (diff_path, suggestion.diff)):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc
    print("\n".join(suggestion.summary))
    print(
        f"wrote {args.output} and {diff_path}: nothing is applied; review each PROPOSED entry,"
        f" `abcctl freeze {args.output} ...`, then a what-if `abcctl replay` of the envelope"
    )
    return 0


def _headroom(text: str) -> Fraction:
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number such as 1.5") from exc


def instant_arg(text: str) -> datetime:
    """An ISO 8601 instant with its time zone, for a flag (``--since``, ``--until``)."""
    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_log_flags(parser: argparse.ArgumentParser) -> None:
    """The same opt-ins as ``audit verify``: a log it refuses is refused here too."""
    parser.add_argument(
        "--allow-tail",
        action="store_true",
        help="accept records after the last checkpoint (a PDP still running)",
    )
    parser.add_argument(
        "--expect-seq", type=int, help="the log must reach this seq (an anchor kept elsewhere)"
    )


def add_what_if_flags(replay: argparse.ArgumentParser) -> None:
    group = replay.add_argument_group(
        "what-if", "re-decide under a candidate and report what would change (exit 0)"
    )
    group.add_argument("--policies", type=Path, help="candidate policy bundle directory")
    group.add_argument("--manifest", type=Path, help="candidate manifest envelope")
    group.add_argument(
        "--trust", type=Path, help="verify the candidate manifest with this trust store"
    )
    group.add_argument("--json", action="store_true", help="the report as JSON")
    group.add_argument("--examples", type=int, default=3, help="decision ids per change")


def add_suggest_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "suggest", help="write the next intent version from a verified log (applies nothing)"
    )
    parser.add_argument("log", type=Path)
    parser.add_argument("--pub", type=Path, required=True, help="the PDP's public key")
    parser.add_argument(
        "--manifest",
        type=Path,
        required=True,
        help="the envelope of a run in the log: the runs of its lineage are learned from",
    )
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="the next intent (and OUTPUT.diff)"
    )
    parser.add_argument("--since", type=instant_arg, help="only records from this ISO 8601 time on")
    parser.add_argument(
        "--min-count",
        type=int,
        default=2,
        help="refusals of one target, for one reason, in one step that make a proposal (default 2)",
    )
    parser.add_argument(
        "--headroom",
        type=_headroom,
        default=Fraction(3, 2),
        help="budgets = per-run p95 x this (default 1.5)",
    )
    parser.add_argument("--examples", type=int, default=3, help="decision ids per proposal")
    parser.add_argument(
        "--enforce",
        action="store_true",
        help="write `enforcement: enforce` (a shadow run's next version refuses what it does"
        " not allow); without it the mode stays as it was",
    )
    add_log_flags(parser)
    parser.set_defaults(func=cmd_suggest)
