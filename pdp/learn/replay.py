"""``abcctl replay``: re-decide every logged decision with its pinned policy and manifest.

Each decision record names the policy bundle (by digest) and the manifest (by digest)
that judged it, and carries the policy's own answer (``policy_result``) next to the
final one (which the ledger may have turned into ``budget_exhausted``). Replay loads the
bundle from the content-addressed store, refusing one whose files no longer hash to its
digest, rebuilds the manifest from its registration record, evaluates the logged input
again and compares. The log itself must first pass ``audit verify``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pdp.bundle import load_stored_bundle
from pdp.engine import EngineError, PreparedPolicy, policy_data
from pdp.errors import ConfigError
from pdp.learn.history import load_history, policy_answer

__all__ = ["Divergence", "ReplayReport", "replay_log"]


@dataclass(frozen=True)
class Divergence:
    decision_id: str
    logged: dict[str, Any]
    replayed: dict[str, Any] | str  # a result, or why it could not be re-decided


@dataclass
class ReplayReport:
    decisions: int = 0
    identical: int = 0
    divergences: list[Divergence] = field(default_factory=list)


def _normalized(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result.get(k) for k in ("allow", "reasons", "obligations")}


def replay_log(
    log: Path,
    bundles: Path,
    key: Ed25519PublicKey,
    *,
    allow_tail: bool = False,
    expect_seq: int | None = None,
) -> ReplayReport:
    # LogInvalid: a log that `audit verify` refuses is never replayed, and what is replayed
    # is read from the very bytes that verified.
    history = load_history(log, key, allow_tail=allow_tail, expect_seq=expect_seq)
    policies: dict[tuple[str, str], PreparedPolicy] = {}
    report = ReplayReport()
    for record in history.decisions():
        report.decisions += 1
        logged = _normalized(policy_answer(record))
        run = history.runs.get(record.run_id)
        # Each run by what it was judged by: a narrowed run by its own effective grant.
        pair = (record.policy_digest, run.judged_digest if run else record.manifest_digest)
        try:
            if run is None:
                raise KeyError(record.run_id)
            if pair not in policies:
                bundle = load_stored_bundle(bundles, pair[0])
                policies[pair] = PreparedPolicy(
                    bundle.rego_modules(), policy_data(run.manifest), pair[0], pair[1]
                )
            decision = policies[pair].evaluate(record.input)
        except (ConfigError, EngineError, KeyError) as exc:
            reason = (
                f"manifest {pair[1]} was never registered"
                if isinstance(exc, KeyError)
                else str(exc)
            )
            report.divergences.append(Divergence(record.decision_id, logged, reason))
            continue
        replayed = decision.as_dict()
        if replayed == logged:
            report.identical += 1
        else:
            report.divergences.append(Divergence(record.decision_id, logged, replayed))
    return report
