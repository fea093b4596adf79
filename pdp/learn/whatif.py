"""What-if replay: re-decide the recorded actions under a candidate policy and/or manifest.

``abcctl replay LOG --policies DIR --manifest ENVELOPE`` asks "had this candidate been in
force, what would the agent's past actions have got?". Each decision record's logged
policy input is evaluated again, by the candidate bundle (or the run's own pinned bundle,
from the content-addressed store) with the candidate manifest (or the run's own), and the
answer is compared with the policy's original answer (``policy_result``, before the
ledger). Changes are counted per direction, reason code and capability, with example
decision ids.

What a replay cannot know, it says rather than guesses:

- The recorded ``input.run`` (step, completed steps) is used as is: had an earlier step
  change been decided otherwise, the run would have been elsewhere. A candidate that
  renames steps therefore refuses everything in the old names (``step_out_of_order``).
- Budgets are the ledger's, not the policy's. With a candidate manifest, each run's
  recorded reservations and settlements go through a real ledger (the PDP's own
  in-memory run store) with the candidate's limits, in log order: reservations it would
  refuse are listed (``budget_exhausted``), and what the run would have used is compared
  with the limits. A call that was not made (refused then, allowed now) has no observed
  usage and is not charged; it is counted instead.
- Arguments masked in the log (``--log-mask``) are re-decided as the ``***`` the log
  holds; such decisions are counted.

With a candidate manifest, only the runs of its lineage are re-decided: another agent's
runs say nothing about this agent's next manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdp.bundle import PolicyBundle, load_stored_bundle
from pdp.decisionlog import DecisionRecord
from pdp.engine import EngineError, PreparedPolicy, policy_data
from pdp.errors import ConfigError, ReasonCode
from pdp.learn.history import History, RunInfo, policy_answer
from pdp.learn.whatif_budgets import RunBudget, ledger
from pdp.ledger import BUDGETS
from pdp.manifest.model import Manifest

__all__ = ["Candidate", "Change", "RunBudget", "WhatIfReport", "format_report", "what_if"]

ALLOW_TO_DENY = "allow_to_deny"
DENY_TO_ALLOW = "deny_to_allow"


@dataclass(frozen=True)
class Candidate:
    """What to re-decide with; ``None`` keeps each run's own bundle or manifest."""

    bundle: PolicyBundle | None = None
    manifest: Manifest | None = None
    manifest_digest: str = ""
    verified_by: str = ""  # the trust-store key id that verified the manifest, "" if not verified
    stored_bundles: Path | None = None  # STATE/bundles, for runs' own bundles


@dataclass
class Change:
    """Decisions that flip one way, for one reason code and one capability.

    ``reason`` is the new refusal's code for allow -> deny, and the old one for
    deny -> allow (what used to refuse it).
    """

    direction: str
    reason: str
    target: str
    probe: bool
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "reason": self.reason,
            "target": self.target,
            "probe": self.probe,
            "count": self.count,
            "examples": self.examples,
        }


@dataclass
class WhatIfReport:
    policy: str  # what judged: a digest, or "each run's own"
    manifest: str
    decisions: int = 0  # calls + probes + step changes
    calls: int = 0  # model, tool and HTTP calls (what `abcctl suggest` counts)
    probes: int = 0  # tools/list probes: a tool's name judged, nothing called
    steps: int = 0  # step changes
    runs: int = 0
    unchanged_allow: int = 0
    unchanged_deny: int = 0
    # same allow/deny, something else changed: what changed -> (count, example ids)
    other_changes: dict[str, tuple[int, list[str]]] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    other_lineages: int = 0  # decisions left out: not the candidate manifest's lineage
    undecidable: list[tuple[str, str]] = field(default_factory=list)  # (decision id, why)
    masked: int = 0
    budgets: list[RunBudget] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def flipped(self, direction: str) -> list[Change]:
        return [c for c in self.changes if c.direction == direction]

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "manifest": self.manifest,
            "decisions": self.decisions,
            "calls": self.calls,
            "probes": self.probes,
            "steps": self.steps,
            "runs": self.runs,
            "allow_to_deny": sum(c.count for c in self.flipped(ALLOW_TO_DENY)),
            "deny_to_allow": sum(c.count for c in self.flipped(DENY_TO_ALLOW)),
            "unchanged": {"allow": self.unchanged_allow, "deny": self.unchanged_deny},
            "other_changes": [
                {"what": what, "count": count, "examples": ids}
                for what, (count, ids) in self.other_changes.items()
            ],
            "changes": [c.as_dict() for c in self.changes],
            "other_lineages": self.other_lineages,
            "undecidable": [{"decision_id": d, "why": w} for d, w in self.undecidable],
            "masked": self.masked,
            "budgets": [b.as_dict() for b in self.budgets],
            "notes": self.notes,
        }


def _first_code(answer: dict[str, Any]) -> str:
    reasons = answer.get("reasons") or []
    return str(reasons[0]["code"]) if reasons else ""


def _normalized(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: answer.get(k) for k in ("allow", "reasons", "obligations")}


def _what_changed(logged: dict[str, Any], answer: dict[str, Any]) -> str:
    """Of two answers with the same allow, what differs, named for a person."""
    if [r["code"] for r in logged["reasons"] or []] != [r["code"] for r in answer["reasons"] or []]:
        return "reason codes"
    if logged["reasons"] != answer["reasons"]:
        # e.g. a refusal's `closest` evidence now naming a capability the candidate adds
        return "reason messages or evidence"
    changed = sorted(
        k
        for k in {*(logged["obligations"] or {}), *(answer["obligations"] or {})}
        if (logged["obligations"] or {}).get(k) != (answer["obligations"] or {}).get(k)
    )
    return f"obligations ({', '.join(changed)})" if changed else "obligations"


class _Judges:
    """Prepared policies by (bundle digest, manifest digest), compiled once each."""

    def __init__(self, candidate: Candidate) -> None:
        self.candidate = candidate
        self._prepared: dict[tuple[str, str], PreparedPolicy] = {}

    def for_record(self, record: DecisionRecord, run: RunInfo) -> PreparedPolicy:
        candidate = self.candidate
        if candidate.bundle is not None:
            bundle = candidate.bundle
        else:
            assert candidate.stored_bundles is not None  # checked by what_if
            bundle = load_stored_bundle(candidate.stored_bundles, record.policy_digest)
        if candidate.manifest is not None:
            manifest, manifest_digest = candidate.manifest, candidate.manifest_digest
        else:
            manifest, manifest_digest = run.manifest, run.judged_digest
        key = (bundle.digest, manifest_digest)
        if key not in self._prepared:
            try:
                self._prepared[key] = PreparedPolicy(
                    bundle.rego_modules(), policy_data(manifest), *key
                )
            except EngineError as exc:
                raise ConfigError(
                    f"policy {bundle.digest} does not compile with manifest"
                    f" {manifest_digest}: {exc}"
                ) from exc
        return self._prepared[key]


def _decide(policy: PreparedPolicy, policy_input: dict[str, Any]) -> dict[str, Any]:
    try:
        return policy.evaluate(policy_input).as_dict()
    except EngineError:
        # What the PDP answers when its policy cannot decide: refused, fail closed.
        return {
            "allow": False,
            "reasons": [
                {"code": ReasonCode.PDP_UNAVAILABLE.value, "message": "the policy could not decide"}
            ],
            "obligations": {},
        }


def what_if(history: History, candidate: Candidate, examples: int = 3) -> WhatIfReport:
    """Re-decide ``history``'s decisions under ``candidate``; the log was verified already."""
    if candidate.bundle is None and candidate.manifest is None:
        raise ConfigError("a what-if needs a candidate policy bundle, manifest, or both")
    if candidate.bundle is None and candidate.stored_bundles is None:
        raise ConfigError("without a candidate bundle, the runs' own need --bundles STATE/bundles")
    report = WhatIfReport(
        policy=candidate.bundle.digest if candidate.bundle else "each run's own pinned bundle",
        manifest=(
            f"{candidate.manifest.metadata.lineage} v{candidate.manifest.metadata.version}"
            f" {candidate.manifest_digest}"
            + (
                f" (signature verified, key {candidate.verified_by})"
                if candidate.verified_by
                else " (NOT VERIFIED)"
            )
            if candidate.manifest
            else "each run's own manifest"
        ),
    )
    in_scope = history.runs
    if candidate.manifest is not None:
        lineage = candidate.manifest.metadata.lineage
        in_scope = history.lineage_runs(lineage)
        if not in_scope:
            raise ConfigError(f"no run in {history.path} belongs to lineage {lineage}")
        if candidate.bundle and candidate.manifest.policy.bundle_digest != candidate.bundle.digest:
            report.notes.append(
                f"the candidate manifest pins policy {candidate.manifest.policy.bundle_digest},"
                f" not the candidate bundle {candidate.bundle.digest}: a PDP running that bundle"
                " would refuse to register it (policy_mismatch)"
            )
    judges = _Judges(candidate)
    answers: dict[str, dict[str, Any]] = {}  # decision id -> the candidate's answer
    groups: dict[tuple[str, str, str, bool], Change] = {}
    seen_runs: dict[str, None] = {}  # in the order the log first shows them
    for record in history.decisions():
        run = in_scope.get(record.run_id)
        if run is None:
            if record.run_id in history.runs:
                report.other_lineages += 1
            else:
                report.undecidable.append((record.decision_id, "its run was never registered"))
            continue
        try:
            policy = judges.for_record(record, run)
        except ConfigError as exc:
            if candidate.bundle is not None:
                raise  # the candidate itself is unusable: nothing can be said
            report.undecidable.append((record.decision_id, str(exc)))
            continue
        seen_runs.setdefault(run.run_id)
        report.decisions += 1
        if record.action.get("probe"):
            report.probes += 1
        elif record.action.get("kind") == "step":
            report.steps += 1
        else:
            report.calls += 1
        if record.masked:
            report.masked += 1
        logged = _normalized(policy_answer(record))
        answer = _decide(policy, record.input)
        answers[record.decision_id] = answer
        if answer["allow"] == logged["allow"]:
            if _normalized(answer) != logged:
                what = _what_changed(logged, _normalized(answer))
                count, ids = report.other_changes.get(what, (0, []))
                report.other_changes[what] = (
                    count + 1,
                    ids + [record.decision_id][: examples - len(ids)],
                )
            if answer["allow"]:
                report.unchanged_allow += 1
            else:
                report.unchanged_deny += 1
            continue
        action = record.action
        direction = ALLOW_TO_DENY if logged["allow"] else DENY_TO_ALLOW
        code = _first_code(answer if logged["allow"] else logged)
        key = (direction, code, str(action.get("target", "")), bool(action.get("probe")))
        change = groups.setdefault(key, Change(*key))
        change.count += 1
        if len(change.examples) < examples:
            change.examples.append(record.decision_id)
    report.runs = len(seen_runs)
    report.changes = sorted(
        groups.values(), key=lambda c: (c.direction, -c.count, c.reason, c.target, c.probe)
    )
    if candidate.manifest is not None:
        report.budgets = ledger(
            history, {r: in_scope[r] for r in seen_runs}, candidate.manifest, answers, examples
        )
    return report


def format_report(report: WhatIfReport) -> str:
    """The report as text for a person; ``WhatIfReport.as_dict`` is for machines."""
    lines = [
        f"what-if: policy {report.policy}; manifest {report.manifest}",
        f"{report.decisions} decisions of {report.runs} run(s) re-decided ({report.calls} calls,"
        f" {report.probes} tools/list probes, {report.steps} step changes):"
        f" {sum(c.count for c in report.flipped(ALLOW_TO_DENY))} allow -> deny,"
        f" {sum(c.count for c in report.flipped(DENY_TO_ALLOW))} deny -> allow,"
        f" {report.unchanged_allow + report.unchanged_deny} unchanged"
        f" ({report.unchanged_allow} allowed, {report.unchanged_deny} denied)",
    ]
    width = max((len(c.target) + (8 if c.probe else 0) for c in report.changes), default=0)
    for direction, title, label in (
        (ALLOW_TO_DENY, "allow -> deny", "now refused by"),
        (DENY_TO_ALLOW, "deny -> allow", "was refused by"),
    ):
        changes = report.flipped(direction)
        if not changes:
            continue
        lines.append(f"  {title} ({label}):")
        for c in changes:
            target = c.target + (" (probe)" if c.probe else "")
            lines.append(
                f"    {c.reason:<18} {target:<{width}} {c.count:>4}  {', '.join(c.examples)}"
            )
    for what, (count, ids) in report.other_changes.items():
        lines.append(f"  same allow/deny, other {what}: {count}, e.g. {', '.join(ids)}")
    if report.other_lineages:
        lines.append(f"  {report.other_lineages} decisions of other lineages left out")
    if report.masked:
        lines.append(
            f"  {report.masked} decisions had masked arguments: re-decided with *** in their place"
        )
    for decision_id, why in report.undecidable[:5]:
        lines.append(f"  NOT RE-DECIDED {decision_id}: {why}")
    if len(report.undecidable) > 5:
        lines.append(f"  ... {len(report.undecidable) - 5} more not re-decided")
    if report.budgets:
        lines.append(
            "budgets (used = recorded usage through a ledger with the candidate's limits):"
        )
        for budget in report.budgets:
            used = "  ".join(
                f"{name} {budget.used[name]}/{budget.limits[name]}" for name in BUDGETS
            )
            verdict = "fits" if budget.fits else "DOES NOT FIT"
            lines.append(f"  {budget.run_id}  {used}  {verdict}")
            if budget.refused:
                lines.append(
                    f"    {budget.refused} reservation(s) refused (budget_exhausted:"
                    f" {', '.join(budget.refused_budgets)}), e.g."
                    f" {', '.join(budget.refused_examples)}"
                )
            if budget.over:
                lines.append(f"    over the limit: {', '.join(budget.over)}")
            if budget.not_charged:
                lines.append(
                    f"    {budget.not_charged} call(s) allowed now but not made then:"
                    " not charged (their usage was never observed)"
                )
    lines.extend(f"note: {note}" for note in report.notes)
    return "\n".join(lines)
