"""The budgets ``abcctl suggest`` proposes: each run's use as the next version must hold it.

Only calls the next version allows count (allowed then, or learned now), made or not.

- **tokens**: what the ledger must let the run reserve, its calls in log order: the most
  of (tokens used before the previous call + the previous call's reservation, still held
  + this call's reservation). The sidecar settles after the response and in batches, so
  the call before may not be settled yet when the next is reserved; one call of lag is
  assumed, whatever the log shows (a what-if replays the log's own timing). A call's use
  is its settlement's, wherever that landed in the log; a call never settled counts at
  its worst case (what it reserved). So the same calls with the same usage give the same
  answer whether their settlements came at once or late.
- **usd_micros**: settled, as reported (a call never settled: what it reserved).
- **tool_calls**, **requests**: the calls the next version allows.

Each is proposed as the nearest-rank p95 across runs times ``headroom``, rounded up to two
significant digits; a budget nothing used is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from pdp.decisionlog import DecisionRecord, SettlementRecord, WritableRecord
from pdp.learn.infer import nearest_rank_p95, plural, round_up
from pdp.learn.write import Draft
from pdp.ledger import BUDGETS
from pdp.manifest.model import Budgets

__all__ = ["size_budgets"]


@dataclass
class _RunUse:
    tokens: int = 0
    usd_micros: int = 0
    tool_calls: int = 0
    requests: int = 0
    used_tokens: int = 0  # settled (or worst case) so far, in log order
    held: int = 0  # the previous call's reservation, less what it used (its settlement lag)
    settled: int = 0  # charged calls whose usage was reported
    unsettled: int = 0  # charged calls counted at their worst case
    refused_for_budget: int = 0  # enforced: the ledger refused the call
    shadow_over: int = 0  # shadow: forwarded past a budget


def _ratio(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(float(value))


def _use(
    records: list[WritableRecord],
    calls: list[DecisionRecord],
    allowed_next: set[str],
    runs: list[str],
) -> dict[str, _RunUse]:
    use = {run_id: _RunUse() for run_id in runs}
    settled = {
        (r.run_id, r.reservation_id): r
        for r in reversed(records)  # the first settlement of a reservation is the one held
        if isinstance(r, SettlementRecord) and not r.expired
    }
    for record in calls:
        run = use[record.run_id]
        if record.decision_id not in allowed_next:
            continue
        action: dict[str, Any] = record.action
        run.requests += 1
        run.tool_calls += action.get("kind") == "tool"
        if record.over_budget:
            run.shadow_over += 1
        elif record.enforced and [r["code"] for r in record.result["reasons"]] == [
            "budget_exhausted"
        ]:
            run.refused_for_budget += 1
        if not record.cost:
            continue  # not made (refused), or nothing reserved: no usage observed
        worst = record.cost["tokens"]
        run.tokens = max(run.tokens, run.used_tokens + run.held + worst)
        settlement = settled.get((record.run_id, record.reservation_id))
        if settlement is None:
            run.unsettled += 1
            used, usd = worst, record.cost["usd_micros"]
        else:
            run.settled += 1
            used, usd = settlement.tokens, settlement.usd_micros
        run.used_tokens += used
        run.usd_micros += usd
        run.held = max(worst - used, 0)
    return use


def size_budgets(
    plan: Draft,
    records: list[WritableRecord],
    calls: list[DecisionRecord],
    allowed_next: set[str],
    runs: list[str],
    headroom: Fraction,
) -> Budgets:
    """The next budgets from ``calls`` (in log order) of ``runs``; ``allowed_next`` holds the
    decision ids the next version allows. Writes each budget's evidence into ``plan``."""
    use = _use(records, calls, allowed_next, runs)
    settled = sum(u.settled for u in use.values())
    unsettled = sum(u.unsettled for u in use.values())
    how = {
        "tokens": f"settled usage of {plural(settled, 'call')}"
        + (f" ({unsettled} never settled: at their worst case)" if unsettled else "")
        + ", plus the next call's reservation and the one before it (not settled yet)",
        "usd_micros": f"settled usage of {plural(settled, 'call')}"
        + (f" ({unsettled} never settled: what they reserved)" if unsettled else ""),
        "tool_calls": "tool calls the next version allows",
        "requests": "calls the next version allows",
    }
    proposed: dict[str, int] = {}
    current = plan.base.budgets.model_dump()
    for name in BUDGETS:
        values = [getattr(run, name) for run in use.values()]
        p95, most = nearest_rank_p95(values), max(values)
        if most == 0:
            proposed[name] = current[name]
            plan.budget_notes[name] = f"no {name} observed in {plural(len(values), 'run')}: kept"
            continue
        proposed[name] = round_up(Fraction(p95) * headroom)
        plan.budget_notes[name] = (
            f"{plural(len(values), 'run')}: max {most}, p95 {p95} ({how[name]});"
            f" proposed p95 x {_ratio(headroom)}, rounded up"
        )
        if most > proposed[name]:
            plan.budget_notes[name] += f" (the largest run, {most}, would NOT fit)"
        plan.summary.append(
            f"  ~ budget {name}: {current[name]} -> {proposed[name]} ({plan.budget_notes[name]})"
        )
    for run_id, run in use.items():
        if run.refused_for_budget:
            plan.notes.append(
                f"run {run_id}: {plural(run.refused_for_budget, 'call')} refused for budget"
                " (budget_exhausted) and never made: its use is a lower bound"
            )
        if run.shadow_over:
            plan.notes.append(
                f"run {run_id}: {plural(run.shadow_over, 'call')} went past a budget in shadow"
                " (forwarded, not refused): counted in its use"
            )
    return Budgets(**proposed)
