"""``abcctl explain``: why one decision came out as it did, from the decision log alone.

Everything shown was recorded when the decision was made, or is rebuilt from the records
before it: the action and the run's step (the policy input), each reason with the
evidence the policy itself wrote, the manifest entries the policy consulted (the
capability for the target, the step it was in), the policy and manifest digests, and
the run's budgets at that moment (the log's reservations and settlements, folded). The
log must verify first; nothing is re-decided (that is ``abcctl replay``). The decision is
named as ``audit.find_decision`` reads it: an id, a unique prefix, ``last``, ``last-denied``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pdp.clock import log_time
from pdp.decisionlog import DecisionRecord, SettlementRecord
from pdp.engine import policy_data
from pdp.learn.audit import AmbiguousId, NotInLog, find_decision
from pdp.learn.history import RunInfo, load_history
from pdp.ledger import MemoryRunStore, Usage
from pdp.manifest.model import Manifest

__all__ = ["AmbiguousId", "Explanation", "NotInLog", "explain", "render"]


@dataclass(frozen=True)
class Explanation:
    decision_id: str
    time: str
    run_id: str
    enforced: bool
    action: dict[str, Any]
    run: dict[str, Any]
    result: dict[str, Any]
    policy_digest: str
    manifest_digest: str
    consulted: dict[str, Any]  # the manifest entries the policy looked at
    budget: dict[str, dict[str, int]]  # limits, spent, reserved, remaining, before it
    # A narrowed run's narrower and the digest of the effective grant it was judged by.
    narrower: dict[str, Any] | None = None
    effective_digest: str = ""
    refused_on: str = ""  # the sidecar's route, for a refusal it made before any action

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _consulted(manifest: Manifest | None, action: dict[str, Any], step: str) -> dict[str, Any]:
    if manifest is None or not action:  # no action: the sidecar refused before making one
        return {}
    index = policy_data(manifest)["abc"]["index"]
    target = str(action.get("target", ""))
    if action.get("kind") == "step":
        name = target.removeprefix("step:")
        return {"step": {name: index["steps"].get(name)}, "current_step": step}
    entry = index["targets"].get(target)
    return {"capability": {target: entry}, "current_step": step}


def explain(
    log: Path,
    selector: str,
    key: Ed25519PublicKey,
    *,
    allow_tail: bool = False,
    expect_seq: int | None = None,
) -> Explanation:
    """LogInvalid for a log that does not verify as ``audit verify`` would with the same
    opt-ins; NotInLog or AmbiguousId when ``selector`` names no decision, or several."""
    history = load_history(log, key, allow_tail=allow_tail, expect_seq=expect_seq)
    decision_id = find_decision(history.records, selector)
    books = MemoryRunStore()
    for run in history.runs.values():
        manifest = run.manifest
        books.open(
            run.run_id,
            manifest.assembly.steps[0].id,
            Usage(**manifest.budgets.model_dump()),
            manifest.metadata.lineage,
            manifest.metadata.version,
        )
    for record in history.records:
        if isinstance(record, SettlementRecord):
            if record.run_id in history.runs:
                books.settle(record.reservation_id, record.tokens, record.usd_micros)
        elif not isinstance(record, DecisionRecord):
            continue
        elif record.decision_id == decision_id:
            return _explanation(record, history.runs.get(record.run_id), books)
        elif record.cost and record.run_id in history.runs:
            books.hold(
                record.run_id,
                record.reservation_id,
                Usage(**record.cost),
                record.time,  # never expired here: expiries are settlement records
            )
    raise NotInLog(f"no decision {decision_id} in {log}")


def _explanation(
    record: DecisionRecord, info: RunInfo | None, books: MemoryRunStore
) -> Explanation:
    manifest = info.manifest if info else None
    action = record.input.get("action", {})
    run = record.input.get("run", {})
    budget: dict[str, dict[str, int]] = {}
    if manifest is not None:
        held = books.books(record.run_id)
        budget = {
            "limits": held.limits.as_dict(),
            "spent": held.spent.as_dict(),
            "reserved": held.reserved.as_dict(),
            "remaining": held.remaining().as_dict(),
        }
    return Explanation(
        decision_id=record.decision_id,
        time=log_time(record.time),
        run_id=record.run_id,
        enforced=record.enforced,
        action=action,
        run=run,
        result=record.result,
        policy_digest=record.policy_digest,
        manifest_digest=record.manifest_digest,
        consulted=_consulted(manifest, action, str(run.get("step", ""))),
        budget=budget,
        narrower=info.narrower if info else None,
        effective_digest=info.effective_digest if info else "",
        refused_on=str(record.input.get("refused_by_sidecar", {}).get("route", "")),
    )


def render(explanation: Explanation) -> str:
    """The explanation for a person: one fact per line."""
    e = explanation
    verdict = "ALLOW" if e.result["allow"] else "DENY"
    run = f"run      {e.run_id}"
    if e.run:
        completed = ", ".join(e.run.get("completed_steps", [])) or "none"
        run += f", step {e.run.get('step', '?')} (completed: {completed})"
    action = json.dumps(e.action, sort_keys=True) if e.action else "none"
    if e.refused_on:
        action += f": refused by the sidecar on its {e.refused_on} route before it made one"
    lines = [
        f"decision {e.decision_id} at {e.time}: {verdict}"
        + ("" if e.enforced else " (shadow: not enforced)"),
        run,
        f"action   {action}",
        f"policy   {e.policy_digest}",
        f"manifest {e.manifest_digest}",
    ]
    if e.narrower is not None:
        lines.append(f"narrowed {e.effective_digest} by {json.dumps(e.narrower, sort_keys=True)}")
    for name, entry in e.consulted.items():
        if name != "current_step":
            for key, value in entry.items():
                shown = json.dumps(value, sort_keys=True) if value is not None else "none matched"
                lines.append(f"consulted {name} {key}: {shown}")
    for reason in e.result["reasons"]:
        lines.append(f"reason   {reason['code']}: {reason['message']}")
        for key, value in sorted(reason.get("evidence", {}).items()):
            lines.append(f"         {key}: {json.dumps(value, sort_keys=True)}")
    for name, values in e.budget.items():
        shown = ", ".join(f"{k} {v}" for k, v in values.items())
        lines.append(f"budget   {name}: {shown}")
    return "\n".join(lines)
