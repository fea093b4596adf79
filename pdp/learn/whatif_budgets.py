"""A what-if's budgets: each run's recorded reservations and settlements through a real
ledger (the PDP's own in-memory run store) with the candidate manifest's limits, in log order.

A reservation is re-capped with the PDP's own formula (``pdp.api.cost.worst_case_tokens``):
the logged cost holds the completion cap the PDP reserved plus the prompt's bound, so the
prompt's bound is the cost less the logged cap, and the candidate reserves its own cap on
top. A call the candidate allows but that was not made (refused then, in an enforced run)
has no observed usage and is not charged; it is counted instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pdp.api.cost import worst_case_tokens
from pdp.decisionlog import DecisionRecord, SettlementRecord
from pdp.learn.history import History, RunInfo, is_call, policy_answer
from pdp.ledger import BUDGETS, MemoryRunStore, Usage
from pdp.manifest.model import Manifest

__all__ = ["RunBudget", "ledger", "reservation"]

_FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)  # expiries come from the log's settlements


@dataclass
class RunBudget:
    run_id: str
    limits: dict[str, int]
    used: dict[str, int]  # settled plus still held at the end, under the candidate's ledger
    refused: int = 0
    refused_budgets: list[str] = field(default_factory=list)
    refused_examples: list[str] = field(default_factory=list)
    not_charged: int = 0  # allowed by the candidate, but never made: usage unknown

    @property
    def over(self) -> list[str]:
        return [name for name in BUDGETS if self.used[name] > self.limits[name]]

    @property
    def fits(self) -> bool:
        return not self.refused and not self.over

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "limits": self.limits,
            "used": self.used,
            "over": self.over,
            "refused": self.refused,
            "refused_budgets": self.refused_budgets,
            "refused_examples": self.refused_examples,
            "not_charged": self.not_charged,
            "fits": self.fits,
        }


def reservation(record: DecisionRecord, answer: dict[str, Any]) -> Usage:
    """What the PDP would reserve for ``record``'s call had the candidate answered ``answer``.

    Both the logged cost and this one are ``worst_case_tokens``: the cap (the decision's
    ``max_tokens`` obligation, else the one asked for) plus the prompt's bound.
    """
    cost = Usage(**(record.cost or {}))
    if record.action.get("kind") == "model":
        asked = int(record.action.get("max_tokens") or 0)
        old = policy_answer(record).get("obligations") or {}
        prompt = max(cost.tokens - worst_case_tokens(old, asked, 0), 0)
        cost.tokens = worst_case_tokens(answer.get("obligations") or {}, asked, prompt)
    return cost


def ledger(
    history: History,
    runs: dict[str, RunInfo],
    manifest: Manifest,
    answers: dict[str, dict[str, Any]],
    examples: int,
) -> list[RunBudget]:
    """Each run's recorded reservations and settlements through a ledger with the
    candidate's limits, in log order (the PDP's own run store, not a model of it)."""
    limits = Usage(**manifest.budgets.model_dump())
    store = MemoryRunStore()
    results: dict[str, RunBudget] = {}
    for run_id, run in runs.items():
        store.open(run_id, run.manifest.assembly.steps[0].id, Usage(**limits.as_dict()), "", 0)
        results[run_id] = RunBudget(run_id, limits.as_dict(), {})
    for record in history.records:
        if not isinstance(record, (DecisionRecord, SettlementRecord)):
            continue
        result = results.get(record.run_id)
        if result is None:
            continue
        if isinstance(record, SettlementRecord):
            # A reservation the candidate refused was never held: its settlement is unknown.
            store.settle(record.reservation_id, record.tokens, record.usd_micros)
            continue
        answer = answers.get(record.decision_id)
        if answer is None or not answer["allow"]:
            continue
        if not record.cost:
            if is_call(record):
                result.not_charged += 1  # not made then (refused): no usage was ever observed
            continue
        cost = reservation(record, answer)
        left = store.books(result.run_id).remaining()
        if not store.reserve(result.run_id, record.reservation_id, cost, _FAR_FUTURE):
            short = [name for name in BUDGETS if getattr(cost, name) > getattr(left, name)]
            result.refused += 1
            for name in short or ["usd_micros"]:  # a spent money budget refuses everything
                if name not in result.refused_budgets:
                    result.refused_budgets.append(name)
            if len(result.refused_examples) < examples:
                result.refused_examples.append(record.decision_id)
    for run_id, result in results.items():
        books = store.books(run_id)
        used = Usage(**books.spent.as_dict())
        used.add(books.reserved)
        result.used = used.as_dict()
    return list(results.values())
